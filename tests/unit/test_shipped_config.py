"""packaging/agent.toml as a sysadmin edits it: every commented example, uncommented where it
stands (alone, and all together), loads with the real loader and only adds what it shows.

An example is a run of commented lines that are TOML (``# key = value``, ``# [table]``). A table
header uncommented in the middle of another table's keys would capture the keys below it (the
issue that made ``clock_skew_s`` a trusted key): the subset check below catches that.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.preflight import EXAMPLE_KEYID, readiness_problems, service_user
from agent.rpc.signing import trusted_keys_from_config

SHIPPED = Path(__file__).resolve().parents[2] / "packaging" / "agent.toml"
_EXAMPLE_LINE = re.compile(r'^# ?(\[[A-Za-z0-9_."-]+\]|"?[A-Za-z0-9_.:-]+"? = .+)$')


def example_blocks(lines: list[str]) -> list[list[int]]:
    """Line numbers of each run of commented TOML lines."""
    blocks: list[list[int]] = []
    for i, line in enumerate(lines):
        if not _EXAMPLE_LINE.match(line):
            continue
        if blocks and blocks[-1][-1] == i - 1:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks


def uncommented(lines: list[str], numbers: list[int]) -> str:
    out = list(lines)
    for i in numbers:
        out[i] = re.sub(r"^# ?", "", out[i])
    return "\n".join(out) + "\n"


def is_subset(small: Any, big: Any, path: str = "") -> list[str]:
    """Keys of ``small`` that ``big`` lacks or holds with another value."""
    if not isinstance(small, dict):
        return [] if small == big else [path]
    if not isinstance(big, dict):
        return [path]
    lost = []
    for key, value in small.items():
        lost += is_subset(value, big.get(key), f"{path}.{key}" if path else key)
    return lost


LINES = SHIPPED.read_text().splitlines()
BLOCKS = example_blocks(LINES)


def test_the_shipped_file_has_the_examples_this_test_is_about() -> None:
    headers = {LINES[b[0]] for b in BLOCKS}
    assert "# [signing.trusted_keys]" in headers
    assert "# [profiles.admin]" in headers
    assert len(BLOCKS) >= 4


def _load(text: str, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    cfg = load_config(path)  # the daemon's loader
    trusted_keys_from_config(cfg.signing.trusted_keys)  # check-config's key decoding


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: LINES[b[0]].lstrip("# "))
def test_each_example_works_uncommented_in_place(block: list[int], tmp_path: Path) -> None:
    text = uncommented(LINES, block)
    _load(text, tmp_path)
    before = tomllib.loads(SHIPPED.read_text())
    after = tomllib.loads(text)
    assert is_subset(before, after) == [], "uncommenting changed or captured existing keys"
    assert after != before


def test_all_examples_together_work_uncommented_in_place(tmp_path: Path) -> None:
    text = uncommented(LINES, [i for b in BLOCKS for i in b])
    _load(text, tmp_path)
    assert is_subset(tomllib.loads(SHIPPED.read_text()), tomllib.loads(text)) == []


def test_the_example_trusted_key_is_refused_by_check_config(tmp_path: Path) -> None:
    (block,) = [b for b in BLOCKS if LINES[b[0]] == "# [signing.trusted_keys]"]
    path = tmp_path / "agent.toml"
    path.write_text(uncommented(LINES, block))
    keys = [p.key for p in readiness_problems(load_config(path), service_user(), files=False)]
    assert f'signing.trusted_keys."{EXAMPLE_KEYID}"' in keys
    assert "agent_id" in keys
    assert "signing.trusted_keys" not in keys  # there is a key now, just not a usable one
