"""``python -m dpgen.release <run dir> --num-samples N --format imagefolder|npz --out DIR``."""

from __future__ import annotations

import argparse
import sys

import torch

from dpgen.cli import device_problem, log_info_to_stderr
from dpgen.release.shards import FORMATS, PRECISIONS, ReleaseSpec
from dpgen.release.source import ReleaseError, open_run


def _prior(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from err


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpgen.release",
        description="Sample a finished dpgen run into a synthetic dataset with a privacy data card "
                    "(datacard.json, DATACARD.md). Interrupted releases resume when rerun with the same "
                    "arguments; output is deterministic given --seed.")
    p.add_argument("run_dir", help="a finished run directory, e.g. outputs/2026-11-23/06-34-39")
    p.add_argument("--num-samples", type=int, required=True, help="how many images to release")
    # Checked by ReleaseSpec rather than argparse's choices=, so an unknown format is one line.
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output directory: new, empty, or an unfinished release to resume")
    p.add_argument("--seed", type=int, default=0, help="release seed; shard i uses a seed made from (seed, i)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (the unit of resuming)")
    p.add_argument("--batch-size", type=int, default=None, help="sampling batch (default: the run's sample.batch_size)")
    p.add_argument("--class-prior", type=_prior, default=None,
                   help="public class weights, comma-separated, one per class (default: class-balanced). "
                        "Never the sensitive proportions: those are private")
    p.add_argument("--precision", default="32",
                   help=f"one of {', '.join(PRECISIONS)}: bf16 autocasts the networks, ~1.7x faster on CPUs "
                        "with bf16 units; pixels differ from fp32 by 0.3 grey levels on average (up to 25)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    log_info_to_stderr()
    try:
        if (problem := device_problem(args.device)) is not None:
            raise ReleaseError(f"--device={args.device}: {problem}. Fix: pass --device cpu, or cuda (cuda:<index>) "
                               "where a GPU is visible")
        batch = args.batch_size if args.batch_size is not None else int(open_run(args.run_dir).cfg.sample.batch_size)
        spec = ReleaseSpec(num_samples=args.num_samples, format=args.format, seed=args.seed,
                           shard_size=args.shard_size, batch_size=batch, class_prior=args.class_prior,
                           precision=args.precision)
        from dpgen.release.make import make_release  # the generator's libraries: not for a refusal

        out = make_release(args.run_dir, args.out, spec, device=args.device)
    except ReleaseError as err:
        sys.exit(f"dpgen.release: {err}")
    print(out)


if __name__ == "__main__":
    main()
