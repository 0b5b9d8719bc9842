"""Performance figures for ``make bench``: never timed tests, never run by the test suite.

Each bench module (``bench.kernel``, later ``bench.rpc``, ``bench.daemon``) has a ``run()``
returning a list of ``Figure``; ``python -m bench`` runs them, prints one table and merges the
figures into ``bench/results.json``. Figures that a noisy shared machine would distort are
ratios against a reference measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure: ``name`` is its key in results.json (e.g. ``kernel.add_1_ms``)."""

    name: str
    value: float
    unit: str = ""
    target_max: float | None = None  # the figure meets its target when value <= target_max
    note: str = ""
    target_min: float | None = None  # for rates: the figure meets its target when value >= it

    def __post_init__(self) -> None:
        prefix, dot, rest = self.name.partition(".")
        if not (prefix and dot and rest) or not self.name.replace(".", "_").isidentifier():
            raise ValueError(f"figure names are 'module.metric', got {self.name!r}")

    @property
    def meets_target(self) -> bool | None:
        if self.target_max is None and self.target_min is None:
            return None
        return (self.target_max is None or self.value <= self.target_max) and (
            self.target_min is None or self.value >= self.target_min
        )
