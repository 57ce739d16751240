"""Where a DP step's extra time goes, by ablation rather than by profile.

torch.profiler attributes time per operator, and its own per-operator cost inflates a step of many
small operators. Here the DP step of ``make bench`` runs as it is and with one part of the
per-example engine switched off, alternated step by step with a non-private step in one process;
the difference of medians is what that part costs in place. The ablated steps compute wrong
gradients: this is a measurement, never a training path.

    .venv/bin/python scripts/ablate_dp_step.py --model ldm_small --trainable attention_only
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from omegaconf import OmegaConf

from dpgen.bench import StepPair, bench_batch, build_module, time_step
from dpgen.overrides import CONF_DIR
from dpgen.privacy import per_example
from dpgen.privacy.per_example import PerExampleGradients


def _skip_per_example_work(self: PerExampleGradients, key: int, module: torch.nn.Module, box: list, *args) -> None:
    self._pending.pop(key, None)
    box.clear()


def _zero_sum(self: PerExampleGradients, factors: torch.Tensor) -> list[torch.Tensor]:
    return [torch.zeros_like(p) for p in self.params]


# name -> what it replaces: (object, attribute, replacement). "no per-example norms" drops the norm
# kernels of formed gradients and the ghost norms; formed gradients are still formed (the clipped
# sum reads them). "no clipped sum" is the sum of kept gradients and kept inputs (not ghost mode's
# second backward, hence --clipping materialize or mixed).
ABLATIONS: dict[str, list[tuple[object, str, Callable]]] = {
    "no per-example work": [(PerExampleGradients, "_accumulate", _skip_per_example_work)],
    "no per-example norms": [(per_example, "_norms_of", lambda grads: []),
                             (per_example, "_ghost_sq_norms", lambda layer, acts, backprops, batch: torch.zeros(batch))],
    "no clipped sum": [(PerExampleGradients, "_weighted_sum", _zero_sum)],
}


@contextmanager
def ablated(name: str | None) -> Iterator[None]:
    patches = ABLATIONS[name] if name is not None else []
    saved = [getattr(owner, attribute) for owner, attribute, _ in patches]
    try:
        for owner, attribute, replacement in patches:
            setattr(owner, attribute, replacement)
        yield
    finally:
        for (owner, attribute, _), original in zip(patches, saved):
            setattr(owner, attribute, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ldm_small")
    parser.add_argument("--trainable", default="attention_only", choices=("full", "attention_only"))
    parser.add_argument("--multiplicity", type=int, default=1)
    parser.add_argument("--clipping", default="mixed", choices=("materialize", "mixed"))
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    cfg = OmegaConf.load(CONF_DIR / "bench.yaml").bench
    device = torch.device("cpu")
    module = build_module(args.model, args.trainable, args.multiplicity, cfg, device)
    pair = StepPair(module, bench_batch(args.model, cfg, device), "32", args.clipping)
    variants: list[str | None] = [None, *ABLATIONS]
    times: dict[str, list[float]] = {"non-private": [], **{str(v): [] for v in variants}}
    for i in range(args.repeats + 3):
        order = variants if i % 2 else variants[::-1]  # drift hits every variant alike
        for variant in order:
            with ablated(variant):
                elapsed = time_step(pair.private, device)
            base = time_step(pair.nonprivate, device)
            if i >= 3:
                times[str(variant)].append(elapsed)
                times["non-private"].append(base)
    nonprivate = statistics.median(times["non-private"])
    full = statistics.median(times["None"])
    print(f"{args.model}/{args.trainable}/{args.clipping} K={args.multiplicity}, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads; non-private step {nonprivate * 1e3:.1f} ms")
    print("| DP step | ms | × non-private | saved vs full DP step, ms |\n|---|---|---|---|")
    for variant in variants:
        t = statistics.median(times[str(variant)])
        print(f"| {variant or 'full'} | {t * 1e3:.1f} | {t / nonprivate:.3f} | {(full - t) * 1e3:+.1f} |")


if __name__ == "__main__":
    main()
