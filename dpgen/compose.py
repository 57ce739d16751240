"""``python -m dpgen.compose <run or sweep dir>...``: the guarantee of releasing runs together.

A directory given that holds a ``privacy.json`` is that run; any other is searched, symbolic
links followed, for every directory holding one, finished or not (a crashed run's checkpoints
are outputs too). Each run is composed with the others trained on the same sensitive data
(:mod:`dpgen.privacy.composition`). Canary audits (``python -m dpgen.audit``) count too: their
published results are computed from a model trained on the sensitive data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from dpgen.privacy.accounting import check_delta, format_epsilon
from dpgen.privacy.composition import (
    combine,
    combine_by_data,
    has_guarantee,
    saved_config,
    spent_ledger,
    without_resamplings,
)
from dpgen.stages import trained_on_canaries


def _is_canary_audit(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.json"
    return metrics.is_file() and "canary_audit" in json.loads(metrics.read_text())


def _run_dirs_below(root: Path) -> list[Path]:
    """Every directory at or below ``root`` holding a privacy.json, symbolic links followed (a
    sweep assembled from links to runs is still every run), each real directory once."""
    seen: set[str] = set()
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # a link back up the tree, or a second link to one run
            subdirs.clear()
            continue
        seen.add(real)
        subdirs.sort()
        if "privacy.json" in files:
            found.append(Path(directory))
    return found


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories at or below ``paths``, each once."""
    found: dict[Path, None] = {}
    for path in paths:
        if not path.is_dir():
            raise SystemExit(f"dpgen.compose: {path} is not a directory. Fix: pass run or sweep directories")
        runs = [path] if (path / "privacy.json").is_file() else _run_dirs_below(path)
        found.update((run.resolve(), None) for run in runs)
    if not found:
        raise SystemExit(f"dpgen.compose: no privacy.json at or below {', '.join(map(str, paths))}. "
                         "Fix: pass the directories of dpgen runs")
    return list(found)


def _load(run_dir: Path) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    config = saved_config(run_dir)
    # An unfinished audit has no metrics.json yet; its config (or Hydra's record) says what it is.
    audit = _is_canary_audit(run_dir) or trained_on_canaries(run_dir, config or {})
    return f"{run_dir} (canary audit)" if audit else str(run_dir), spent_ledger(run_dir), config


def _fmt(x: float | None) -> str:
    return "–" if x is None else format_epsilon(x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpgen.compose", description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="run directories, or directories to search below")
    parser.add_argument("--delta", type=float, default=None,
                        help="δ of the composed guarantee (default: the smallest δ among the runs)")
    parser.add_argument("--same-data", action="store_true",
                        help="compose every run as one group, whatever data.name says (datasets that share people)")
    args = parser.parse_args(argv)
    if args.delta is not None:
        try:
            check_delta(args.delta)
        except ValueError:
            sys.exit(f"dpgen.compose: --delta {args.delta}: must be in (0, 1)")
    try:
        loaded = {run_dir: _load(run_dir) for run_dir in find_runs(args.paths)}
    except ValueError as err:
        sys.exit(f"dpgen.compose: {err}")
    runs, resampled = without_resamplings(loaded)
    for run_dir, source in resampled.items():
        print(f"{run_dir}: re-samples {source}, which is composed; no further cost")
    groups = ({"every run given (--same-data)": combine({name: p for name, p, _ in runs}, args.delta)}
              if args.same_data else combine_by_data(runs, args.delta))
    for data, combined in groups.items():
        print(f"sensitive data: {data}")
        for name, privacy, _ in runs:
            if name in combined.runs:
                own = (f"ε = {_fmt(privacy['epsilon_spent'])} at δ = {_fmt(privacy['delta'])}"
                       if has_guarantee(privacy) else "no formal guarantee")
                print(f"  {name}: {own}")
        if combined.without_guarantee:
            print(f"  together: no formal guarantee ({len(combined.without_guarantee)} of the runs have none)")
            continue
        composed = ("– (a ledger's events do not account for its ε)" if combined.epsilon is None
                    else f"ε = {_fmt(combined.epsilon)} at δ = {_fmt(combined.delta)}")
        print(f"  together, composed (PLD): {composed}")
        print(f"  together, summed: ε = {_fmt(combined.epsilon_sum)} at δ = {_fmt(combined.delta_sum)}")


if __name__ == "__main__":
    main()
