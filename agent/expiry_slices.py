"""How many due entries the writer expires in one slice (pure, no I/O).

Owns the size of an expiry slice; it never decides which entry expires. 100,000 entries of one
Sync share their expiry time, and expiring them in one go held the writer about 1.5 s while
every request waited. The writer expires them in slices between request groups instead, each
sized from the time the last one took per entry so that one slice holds the writer about
``BUDGET_S``: on a fast or an idle machine slices grow, on a loaded one they shrink.
"""

from __future__ import annotations

from dataclasses import dataclass

# The writer's longest hold for expiry: well under the 50 ms a request may wait behind it (the
# cost per entry moves with the machine's load, so a slice may overshoot its budget).
BUDGET_S = 0.012
FIRST_SLICE = 300  # before any slice was timed (about 5 ms at 15 us per entry)
LEAST = 50  # a slice always makes this much progress, however slow the last one was
MOST = 20_000


@dataclass(slots=True)
class SliceSizer:
    """The next slice's size, learned from the slices before it."""

    budget_s: float = BUDGET_S
    size: int = FIRST_SLICE

    def observe(self, entries: int, elapsed_s: float) -> None:
        """A slice of ``entries`` took ``elapsed_s``: size the next one to the budget."""
        if entries <= 0:
            return
        per_entry = max(elapsed_s, 1e-9) / entries
        fitting = int(self.budget_s / per_entry)
        # At most doubling per slice: one quick slice (a cached page, an idle moment) must not
        # make the next one many times too long.
        self.size = max(LEAST, min(MOST, fitting, 2 * self.size))
