"""``python -m bench [NAME ...]``: run the bench modules, print a table, update results.json.

Owns the list of bench modules and the results file; it measures nothing itself. A module is
added by appending its name to ``MODULES``; it needs one function, ``run() -> list[Figure]``.
results.json is a flat ``{"module.metric": number}`` object: a run replaces the figures it
measured and keeps the ones other modules wrote earlier.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from bench import Figure

MODULES = ("bench.kernel", "bench.rpc", "bench.daemon")
RESULTS = Path(__file__).resolve().parent / "results.json"


def _load(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int | float)}


def merge_results(path: Path, figures: Iterable[Figure]) -> dict[str, float]:
    """Write ``figures`` over what ``path`` holds, atomically; return the merged object.

    A figure whose value is not finite (NaN: it could not be measured) removes the old value.
    """
    merged = _load(path)
    for f in figures:
        if math.isfinite(f.value):
            merged[f.name] = round(f.value, 4)
        else:  # not measured this time: an older value would pass for a fresh one
            merged.pop(f.name, None)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=2) + "\n")
    tmp.replace(path)
    return merged


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def render_table(figures: Iterable[Figure]) -> str:
    rows = [("figure", "value", "unit", "target", "", "note")]
    for f in figures:
        verdict = {None: "", True: "ok", False: "MISSED"}[f.meets_target]
        bounds = [f"<= {_format(f.target_max)}"] if f.target_max is not None else []
        bounds += [f">= {_format(f.target_min)}"] if f.target_min is not None else []
        target = ", ".join(bounds)
        rows.append((f.name, _format(f.value), f.unit, target, verdict, f.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _module_runner(name: str) -> Callable[[], list[Figure]]:
    module = importlib.import_module(name)
    runner: Callable[[], list[Figure]] = module.run
    return runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "only", nargs="*", help="run only these modules (e.g. 'kernel'); default: all"
    )
    args = parser.parse_args(argv)
    wanted = [m for m in MODULES if not args.only or m.rpartition(".")[2] in args.only]
    unknown = set(args.only) - {m.rpartition(".")[2] for m in MODULES}
    if unknown:
        parser.error(f"unknown bench module(s): {', '.join(sorted(unknown))}")
    figures: list[Figure] = []
    failed = []
    for name in wanted:
        started = time.monotonic()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            got = _module_runner(name)()
        except Exception:  # noqa: BLE001 - one broken module must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            continue
        print(f"   {len(got)} figures in {time.monotonic() - started:.0f} s", file=sys.stderr)
        figures += got
    print(render_table(figures))
    merge_results(RESULTS, figures)
    print(f"\nresults merged into {RESULTS}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
