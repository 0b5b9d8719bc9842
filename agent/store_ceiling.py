"""The state_version ceiling: a bound on every version ever committed, kept beside the database.

Owns one small file next to ``state.db`` (``state.db.version-ceiling``). It is what a lost or
corrupt database cannot take with it: after a recovery the new state continues above it, so a
watcher never sees ``state_version`` go backwards. The store writes a ceiling ahead of the
versions it commits (``RESERVE`` more than needed), so the file is rewritten once per
``RESERVE`` versions, not once per commit. Each write is atomic (a temporary file, fsync,
rename, fsync of the directory). It never reads or writes the database itself.

Why a file and not the kernel's table: a table's or set's comment cannot be changed in place on
the supported kernels, and a version in every element's comment would take bytes the subject
needs there.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# Versions committed per rewrite of the file; a recovery may skip up to this many.
RESERVE = 1_000_000
SUFFIX = ".version-ceiling"


def ceiling_path(database: Path) -> Path:
    return database.with_name(database.name + SUFFIX)


class VersionCeiling:
    """The ceiling of the database at ``database`` (its file may not exist yet)."""

    def __init__(self, database: Path) -> None:
        self.path = ceiling_path(database)
        self._value = self.read()

    def read(self) -> int:
        """The recorded ceiling; 0 when there is none or it is unreadable (nothing proven)."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        return int(text) if text.isdigit() else 0

    def cover(self, version: int) -> None:
        """Make sure the file's ceiling is at least ``version`` before it is committed.

        Raises ``OSError`` when it cannot: the caller must then not commit ``version``.
        """
        if version <= self._value:
            return
        value = version + RESERVE
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, f"{value}\n".encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._value = value
