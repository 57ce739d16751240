"""``python -m dpgen.benchmark [--profile cpu|gpu]`` (``make benchmark-table``): the headline table.

Every method of the profile runs at every ε of the profile on the embedded MNIST-5k, plus the
non-private ceiling, each with the *same time budget for its training stage*. DP-SGD needs its
number of steps before it starts (σ is calibrated to it), so the budget cannot be a wall-clock
stop: each method's training step is timed first, on random tensors of the training batch's
shape (the sensitive data is not read), and its steps are the budget divided by that time.
Public pretraining costs no privacy and is cached, so it is shared and not counted in the
budget; the table shows each run's whole wall time beside it.

The runs are Hydra multiruns into one sweep directory (one per method; subdirectories
``<method>_eps<ε>``, the ceiling's ``<method>``). The sweep report is written there, and the
table goes into README between the profile's markers (``<!-- benchmark:<profile>:start -->``
... ``end -->``), with the sweep's plots copied to ``docs/benchmark/<profile>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from dpgen.benchmark_checks import (
    check_markers,
    check_readme,
    load_profile,
    plots_dir,
    readme_markers,
    refuse,
)
from dpgen.cli import log_info_to_stderr
from dpgen.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch's training stack (Lightning, diffusers, Opacus) and the report's are imported where they
# are used, after the profile, the README and every run's config have been checked: a refusal
# takes seconds, not the quarter minute those imports take.

log = logging.getLogger("dpgen")
CALIBRATION_JSON = "calibration.json"


def method_overrides(profile: DictConfig, method: str) -> list[str]:
    """The Hydra overrides every run of ``method`` gets (before its steps)."""
    return [f"method={method}", *profile.overrides, *profile.method_overrides.get(method, [])]


def compose_run_config(overrides: list[str], validate: bool = True) -> DictConfig:
    """The run's config as ``python -m dpgen <overrides>`` would see it (``hydra:`` resolvers set),
    validated unless ``validate`` is false; an override that does not compose or a value that
    cannot work is a ConfigError."""
    from hydra.core.hydra_config import HydraConfig

    from dpgen.config import validate_config
    from dpgen.overrides import compose_overrides

    cfg = compose_overrides(overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if validate:
        validate_config(cfg)
    return cfg


def validate_runs(profile: DictConfig) -> None:
    """Every run the sweeps will start (the ceiling, each method at each ε) composed and validated
    as ``python -m dpgen`` will, before any step is timed: each multirun checks only its own jobs
    when it starts, after the earlier multiruns have trained for hours. The methods must train
    with DP (their sweep is over ε) and the ceiling without."""
    from dpgen.privacy.config import validate_privacy_config
    from dpgen.privacy.guarantee import training_is_private

    runs = [(profile.ceiling, None)] + [(m, eps) for m in profile.methods for eps in profile.eps]
    # Twice: first what is cheap (composing, and the privacy settings, which alone differ between
    # a method's ε), then the whole validation, which builds each DP method's model.
    for validate in (False, True):
        for method, eps in runs:
            where = f"the ceiling {method}" if eps is None else f"{method} at ε={eps:g}"
            sweep = [] if eps is None else [f"privacy.eps={eps:g}"]  # as sweep_commands writes it
            try:
                cfg = compose_run_config([*method_overrides(profile, method), *sweep], validate)
                if eps is not None and not validate:
                    validate_privacy_config(cfg.privacy, cfg.trainer.precision)
            except ConfigError as err:
                raise SystemExit(f"dpgen.benchmark: run {where}: {err}") from err
            if eps is None and training_is_private(cfg):
                refuse("ceiling", method, "trains with DP; the ceiling is the non-private reference",
                       "ceiling: nonprivate, and list DP methods under methods")
            if eps is not None and not training_is_private(cfg):
                refuse("methods", list(profile.methods), f"{method} trains without DP, so its sweep over ε "
                       "would repeat one run", f"drop {method}, or make it the ceiling")
    log.info("benchmark: the configs of all %d runs are valid", len(runs))


class TrainingStep:
    """One training step of ``cfg``'s method, ready to time: the DP-SGD step (per-example clipping
    in chunks of ``privacy.max_physical_batch``, as training runs it, noise, optimizer) for a
    private method, a plain step for the ceiling. Random images of the sensitive data's shape
    stand in for the data."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        import torch

        from dpgen.bench import StepPair
        from dpgen.privacy.guarantee import training_is_private
        from dpgen.stages.training import build_module

        torch.manual_seed(0)
        module = build_module(cfg).to(device)
        d, b = cfg.data, int(cfg.method.train.batch_size)
        images = torch.rand(b, d.channels, d.image_size, d.image_size, device=device) * 2 - 1
        with torch.no_grad():  # what training feeds: DP-LDM's latents are encoded once, before the steps
            inputs = module.diffusion_inputs(images)
        batch = [inputs, torch.randint(0, d.num_classes, (b,), device=device)]
        private = training_is_private(cfg)
        chunk = int(cfg.privacy.max_physical_batch) if private else None
        clipping = str(cfg.privacy.get("clipping", "mixed"))
        # Timed at the precision the run trains at (bf16-mixed under trainer=gpu): the steps bought
        # must be the steps the run can take in the budget.
        precision = "bf16" if str(cfg.trainer.precision).startswith("bf16") else "32"
        self.pair = StepPair(module, batch, precision, clipping, max_physical_batch=chunk)
        self.step = self.pair.private if private else self.pair.nonprivate
        self.device = device
        # Methods whose steps are the same computation (dpdm, PrivImage and DP-FETA all train the
        # same UNet the same way) share one timing: timed apart, 2-core noise made them differ by 35 %.
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        self.signature = json.dumps({
            "model": OmegaConf.to_container(cfg.model, resolve=True), "inputs": list(inputs.shape),
            "multiplicity": getattr(module, "multiplicity", 1), "private": private, "chunk": chunk,
            "clipping": clipping, "trainable": trainable, "precision": precision}, sort_keys=True)

    def median_seconds(self, warmup: int, repeats: int) -> float:
        from dpgen.bench import time_step

        times = [time_step(self.step, self.device) for _ in range(warmup + repeats)]
        return statistics.median(times[warmup:])


def calibrate(profile: DictConfig) -> dict[str, dict[str, Any]]:
    """Per method (ceiling included): the measured step time and the steps the budget buys."""
    import torch

    device = torch.device(profile.device)
    out: dict[str, dict[str, Any]] = {}
    timed: dict[str, tuple[str, float]] = {}  # signature -> (first method timed, seconds)
    for method in [profile.ceiling, *profile.methods]:
        cfg = compose_run_config(method_overrides(profile, method))
        step = TrainingStep(cfg, device)
        if step.signature not in timed:
            timed[step.signature] = (method, step.median_seconds(profile.calibration.warmup,
                                                                  profile.calibration.repeats))
        same_as, step_s = timed[step.signature]
        del step
        steps = max(int(profile.min_steps), int(profile.budget_s / step_s))
        out[method] = {"step_s": step_s, "steps": steps, "batch_size": int(cfg.method.train.batch_size),
                       "model": cfg.model.name, "timed_with": same_as}
        log.info("benchmark: %s: %.3f s per training step (timed with %s) -> %d steps in %g s", method, step_s,
                 same_as, steps, profile.budget_s)
    return out


def sweep_commands(profile: DictConfig, calibration: dict[str, dict[str, Any]], sweep_dir: Path) -> list[list[str]]:
    """One ``python -m dpgen -m`` per method (its own overrides and steps), all into ``sweep_dir``;
    the ceiling first, so that the last multirun's report already lists every run."""
    eps = ",".join(f"{e:g}" for e in profile.eps)
    commands = []
    for method in [profile.ceiling, *profile.methods]:
        ceiling = method == profile.ceiling
        sweep = [] if ceiling else [f"privacy.eps={eps}"]
        subdir = "${method.name}" if ceiling else "${method.name}_eps${privacy.eps}"
        commands.append([sys.executable, "-m", "dpgen", "-m", *method_overrides(profile, method), *sweep,
                         f"method.train.steps={calibration[method]['steps']}", f"hydra.sweep.dir={sweep_dir}",
                         f"hydra.sweep.subdir={subdir}"])
    return commands


def _walls(run_dir: Path) -> tuple[float | None, float | None]:
    """(training stage, whole run) seconds, from the run's metrics.json."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics.get("train_wall_s"), metrics.get("total_wall_s")


def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def copy_plots(sweep_dir: Path, readme: Path, profile_name: str) -> list[Path]:
    """The sweep's plots, copied beside README (``docs/benchmark/<profile>/``): the sweep
    directory is not committed, README's plots must be. Paths relative to README's folder."""
    from dpgen.eval.report import ACCURACY_PNG, FID_PNG
    from dpgen.io import atomic_write

    dest = plots_dir(readme, profile_name)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (ACCURACY_PNG, FID_PNG):
        if (sweep_dir / name).exists():
            atomic_write(dest / name, lambda f, src=sweep_dir / name: f.write(src.read_bytes()))
            copied.append((dest / name).relative_to(readme.parent))
    return copied


def readme_table(profile: DictConfig, sweep_dir: Path, calibration: dict[str, dict[str, Any]], command: str,
                 plots: list[Path] | None = None) -> str:
    """The Markdown that goes between the profile's README markers."""
    from dpgen.eval.report import collect_runs, method_label

    rows = collect_runs(sweep_dir)
    extractors = sorted({r["feature_extractor"] for r in rows if r["feature_extractor"]})
    lines = [
        f"Command: `{command}` ({profile.budget_s:g} s of training per run, bought as steps from a timed "
        f"step on random data; sweep `{sweep_dir}`).",
        "",
        "| method | ε target | ε spent | training steps (timed s/step) | downstream accuracy, mean of 3 classifiers | "
        f"FID ({', '.join(extractors) or '–'}) | training wall | run wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cal = calibration.get(r["method"], {})
        steps = f"{cal['steps']} ({cal['step_s']:.2f})" if cal else "–"
        acc = "–" if r["accuracy_mean"] is None else f"{100 * r['accuracy_mean']:.1f} %"
        eps_t = "non-private" if not r["private"] else _fmt(r["epsilon_target"], "g")
        train_s, total_s = _walls(sweep_dir / r["run"])
        lines.append(f"| {method_label(r)} | {eps_t} | {_fmt(r['epsilon'], '.3g')} | {steps} | {acc} "
                     f"| {_fmt(r['fid'], '.3g')} | {_fmt(train_s, '.0f')} s | {_fmt(total_s, '.0f')} s |")
    if plots:
        lines += ["", " ".join(f"![{p.stem.replace('_', ' ')}]({p.as_posix()})" for p in plots)]
    return "\n".join(lines)


def replace_between_markers(text: str, name: str, body: str) -> str:
    check_markers(text, name)
    start, end = readme_markers(name)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def write_readme_table(readme: Path, profile: DictConfig, sweep_dir: Path,
                       calibration: dict[str, dict[str, Any]], command: str) -> None:
    """The table and the sweep's plots into README, between the profile's markers."""
    from dpgen.io import atomic_write

    # Checked at the start too; README may have been edited during the sweeps. Before the plots are copied.
    text = readme.read_text()
    check_markers(text, profile.name, readme)
    plots = copy_plots(sweep_dir, readme, profile.name)
    text = replace_between_markers(text, profile.name, readme_table(profile, sweep_dir, calibration, command, plots))
    atomic_write(readme, lambda f: f.write(text.encode()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpgen.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help="cpu, gpu (conf/benchmark/) or a profile YAML file")
    parser.add_argument("--sweep-dir", type=Path, default=None,
                        help="default: multirun/benchmark-<profile>/<date>_<time>")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--dry-run", action="store_true", help="calibrate and print the commands; run nothing")
    args = parser.parse_args(argv)
    log_info_to_stderr()
    profile = load_profile(args.profile)
    # Everything the sweeps and the table need, checked before the first step is timed (the
    # dry run too: it is how a profile is tried): the table is written after hours of runs.
    check_readme(args.readme, profile.name)
    sweep_dir = args.sweep_dir or Path("multirun") / f"benchmark-{profile.name}" / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        refuse("--sweep-dir", str(sweep_dir), "is a file", "pass a folder, or leave --sweep-dir out")
    import torch

    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("dpgen.benchmark: the profile needs CUDA and none is visible. Fix: --profile cpu")
    validate_runs(profile)
    calibration = calibrate(profile)
    commands = sweep_commands(profile, calibration, sweep_dir)
    for command in commands:
        print(" ".join(command))
    if args.dry_run:
        return
    from dpgen.eval.report import write_report
    from dpgen.io import write_json

    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / CALIBRATION_JSON, {"profile": OmegaConf.to_container(profile), "methods": calibration})
    for command in commands:
        subprocess.run(command, check=True)
    write_report(sweep_dir)
    write_readme_table(args.readme, profile, sweep_dir, calibration,
                       f"make benchmark-table ARGS=\"--profile {args.profile}\"")
    print(f"table written to {args.readme}; report in {sweep_dir}")


if __name__ == "__main__":
    main()
