"""The bash completion the package ships (packaging/completion.py renders it from the parser):
real bash sources it and completes commands, options, choices and file names."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "packaging"))

import completion  # noqa: E402 - packaging/ is not a package

from agent.cli import build_parser  # noqa: E402

SCRIPT = completion.render()


def complete(*words: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for the last of ``words`` (the word being typed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    program = (
        f"{SCRIPT}\nCOMP_WORDS=(vicifast-agent {quoted}); COMP_CWORD={len(words)};"
        ' _vicifast_agent; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run(
        [bash, "--norc", "-c", program],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
        timeout=30,
    )
    return [line for line in done.stdout.splitlines() if line]


def test_the_script_is_valid_bash_and_registers_itself() -> None:
    subprocess.run(["bash", "-n"], input=SCRIPT, text=True, check=True, timeout=30)
    assert "complete -o filenames -F _vicifast_agent vicifast-agent" in SCRIPT


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        ([""], {"status", "list", "allow", "revoke", "why", "doctor", "audit", "ctl", "version"}),
        (["st"], {"status"}),
        (["--ver"], {"--version"}),
        (["ctl", ""], {"allow", "revoke", "sync", "erase", "state", "watch"}),
        (["ctl", "--json", "st"], {"state"}),
        (["ctl", "allow", "--t"], {"--ttl", "--target", "--timeout"}),
        (["ctl", "sync", "x.csv", "--format", ""], {"jsonl", "csv"}),
        (["allow", "198.18.0.1", "--sub"], {"--subject"}),
        (
            ["revoke", "--"],
            {"--subject", "--profile", "--json", "--socket", "--config", "--timeout", "--help"},
        ),
        (["allow", "--subject", ""], set()),  # free text: nothing to offer
        (["why", "198.18.0.1", ""], set()),
    ],
)
def test_completes_commands_options_and_choices(words: list[str], offered: set[str]) -> None:
    got = set(complete(*words))
    if words in ([""], ["revoke", "--"]):
        assert offered <= got  # the whole list, checked elsewhere
    else:
        assert got == offered


def test_file_options_and_arguments_complete_file_names(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("")
    (tmp_path / "grants.csv").write_text("")
    assert complete("status", "--config", "ag", cwd=tmp_path) == ["agent.toml"]
    assert complete("check-config", "ag", cwd=tmp_path) == ["agent.toml"]
    assert complete("ctl", "sync", "gr", cwd=tmp_path) == ["grants.csv"]


def test_every_command_and_option_of_the_parser_is_in_the_script() -> None:
    for path, parser in completion._walk(build_parser(), ""):
        options = complete(*path.split(), "-")
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--"):
                    assert option in options, (path, option)
        if path:
            *before, last = path.split()
            assert last in complete(*before, last[:2]), path
