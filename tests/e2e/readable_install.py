"""A copy of the agent and its runtime wheels that any user can import: for tests that run the
CLI as an unprivileged user, wherever the checkout is.

A checkout under ``/root`` (mode 0700) cannot be read by ``nobody``: neither the ``agent`` package
nor the venv's wheels, so ``python -m agent`` fails with "No module named agent". The copy lives
in a fresh directory under ``/tmp`` (mode 0755, files 0644/0755) and holds exactly what the
package ships: ``agent/`` and the distributions ``requirements.txt`` names, with their own
requirements. The interpreter is the venv's base ``python3`` (a system path); Debian's bindings
(python3-nftables, python3-systemd) come from its dist-packages, as in the venv.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from agent.devlab import REPO_ROOT


@dataclass(frozen=True)
class ReadableInstall:
    root: Path

    @property
    def python(self) -> str:
        return os.path.realpath(sys.executable)  # the venv's python is a link to it

    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(self.root), str(self.root / "site")])
        return {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _runtime_distributions() -> set[str]:
    """The distributions requirements.txt names, and everything they require (no extras)."""
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    todo = [re.split(r"[=<>~! ]", line.strip(), maxsplit=1)[0] for line in lines]
    todo = [name for name in todo if name and not name.startswith("#")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for spec in metadata.requires(name) or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def make_readable_install() -> ReadableInstall:
    root = Path(tempfile.mkdtemp(prefix="vf-readable-", dir="/tmp"))
    site = root / "site"
    shutil.copytree(
        REPO_ROOT / "agent", root / "agent", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in _runtime_distributions():
        dist = metadata.distribution(name)
        for file in dist.files or ():
            source = Path(str(dist.locate_file(file)))
            if ".." in file.parts or "__pycache__" in file.parts or not source.is_file():
                continue  # scripts outside site-packages, byte code
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for directory, _dirs, files in os.walk(root):
        os.chmod(directory, 0o755)  # noqa: S103  # the point: readable by the CLI's user
        for f in files:
            path = Path(directory) / f
            path.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
    return ReadableInstall(root)
