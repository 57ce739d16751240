"""The data card beside a release: ``datacard.json`` and a human-readable ``DATACARD.md``.

Its first line states the guarantee, or that there is none. Every privacy number is copied
from the run's ``privacy.json``, never recomputed, so the card says what the ledger said.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import dpgen
from dpgen.diffusion.config import run_solver
from dpgen.io import atomic_write
from dpgen.privacy.guarantee import epsilon_scope, guarantee_notes
from dpgen.release.shards import ReleaseSpec
from dpgen.release.source import SourceRun

JSON_NAME, MARKDOWN_NAME = "datacard.json", "DATACARD.md"
_PUBLIC_STAGES = ("pretrain_autoencoder", "pretrain_ldm", "train_query_classifier", "pretrain_selected")
_PRIVACY_KEYS = ("epsilon_spent", "epsilon_target", "delta", "accountant", "epsilon_by_accountant",
                 "neighbouring", "dataset_size")
NOT_COVERED = [
    "Hyperparameters of the run (and of dpgen's defaults) chosen by looking at sensitive data "
    "are outside the ledger.",
    "Training logs, checkpoints and evaluation metrics of the run are not part of this release "
    "and carry no guarantee.",
    "The class labels are the requested ones (uniform, or the public prior below), not the "
    "sensitive class proportions.",
    "The size N of the sensitive training split is treated as public, as in Opacus and the DP "
    "image-generation papers: it sets the sampling rate and is stated here unprotected.",
    "The class names and their number are treated as public (for an image folder, the names of "
    "its class folders).",
]

# The datasets dpgen's own defaults were tuned on (README, "How the defaults were chosen"): a run
# on them inherits that uncharged look at its sensitive data, and its card says so by name.
TUNED_ON = ("mnist5k", "mnist")
TUNED_ON_THIS_DATA = (
    "dpgen's default hyperparameters (multiplicity K, DP steps, EMA decay, guidance, sample count, "
    "solver and its steps) were chosen by comparing runs on this dataset (MNIST-5k): by downstream "
    "accuracy on its held-out split and by FID against its training split, and the public glyphs' "
    "augmentation ranges by looking at MNIST digits. This ε does not cover those choices.")


def not_covered(data_name: str) -> list[str]:
    """What the card's ε does not cover, for a run on ``data_name``."""
    return NOT_COVERED + ([TUNED_ON_THIS_DATA] if data_name in TUNED_ON else [])


def _version() -> dict[str, Any]:
    try:
        version = metadata.version("dpgen")
    except metadata.PackageNotFoundError:
        version = dpgen.__version__
    src = Path(dpgen.__file__).parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=src, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"version": version, "commit": commit, "uncommitted_changes": dirty}


def _public_data(run: SourceRun) -> dict[str, Any] | None:
    """The public set the generator was pretrained on, or None."""
    cfg = run.cfg
    uses = (cfg.method.get("pretrain", "none") == "public" and "pretrain_public" in cfg.method.stages) \
        or any(s in cfg.method.stages for s in _PUBLIC_STAGES)
    if not uses:
        return None
    public = OmegaConf.to_container(cfg.public, resolve=True)
    public.pop("cache_dir", None)
    if "pretrain_selected" in cfg.method.stages and cfg.method.get("selection") == "semantic":
        public["pretrained_on"] = ("the public classes chosen by the DP semantic query (selection.json), "
                                   "relabelled to the sensitive classes")
    return public


def _parameters(run: SourceRun) -> dict[str, int]:
    """As in metrics.json (the denoiser), plus everything sampling runs (a decoder, if any). The
    trained count comes from metrics.json where the run wrote one: what was trained then, even if
    today's dpgen would train another set (DP-LDM's in older dpgen versions)."""
    module = run.generator
    metrics = run.run_dir / "metrics.json"
    recorded = json.loads(metrics.read_text()).get("trainable_parameters") if metrics.is_file() else None
    return {
        "trainable_parameters": recorded if recorded is not None else
        sum(p.numel() for p in module.unet.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in module.unet.parameters()),
        "sampling_parameters": sum(p.numel() for p in module.parameters()),
    }


def _sampler_name(cfg: DictConfig) -> str:
    """The solver (DDIM for runs from before the choice), guided by CPSample's protection
    classifier where the run used it."""
    solver = run_solver(cfg.sample)
    sampling = cfg.get("sampling")
    return solver if sampling is None or sampling.name == "default" else f"{solver} + {sampling.name}"


def statement(run: SourceRun) -> str:
    p = run.privacy
    if not run.formal_guarantee:
        why = p.get("note") or " ".join(guarantee_notes(run.cfg)) or (
            "the run's privacy.json says its guarantee did not hold.")
        return f"NO FORMAL PRIVACY GUARANTEE: {why}"
    return (f"Differentially private synthetic data: ε = {p['epsilon_spent']:.4g}, δ = {p['delta']:g} "
            f"for adding or removing one example of the sensitive training split ({run.cfg.data.name}, "
            f"N = {p['dataset_size']}), {p['accountant'].upper()} accountant.")


def build_datacard(run: SourceRun, spec: ReleaseSpec, class_counts: list[int], training_split_size: int,
                   device: str, files: str) -> dict[str, Any]:
    cfg, p = run.cfg, run.privacy
    card: dict[str, Any] = {
        "statement": statement(run),
        "formal_guarantee": run.formal_guarantee,
        "method": cfg.method.name,
        **{k: p.get(k) for k in _PRIVACY_KEYS},
        "epsilon_scope": epsilon_scope(cfg, p, run.formal_guarantee),
        "events": p.get("events", []),
        "sensitive_dataset": {"name": cfg.data.name, "training_split_size": training_split_size,
                              "image_size": cfg.data.image_size, "channels": cfg.data.channels},
        "public_data": _public_data(run),
        "model": {"name": cfg.model.name, **_parameters(run)},
        "sampler": {"name": _sampler_name(cfg), "deterministic": True, "steps": cfg.sample.steps,
                    "guidance_scale": cfg.sample.guidance_scale, "batch_size": spec.batch_size,
                    "precision": spec.precision, "device": device},
        "num_samples": spec.num_samples,
        "class_prior": "public" if spec.class_prior is not None else "uniform",
        "per_class_counts": dict(zip(run.class_names, class_counts)),
        "seed": spec.seed,
        "format": spec.format,
        "files": files,
        "source_run": str(run.run_dir.resolve()),
        "dpgen": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "not_covered": not_covered(cfg.data.name),
    }
    if spec.class_prior is not None:
        card["class_prior_weights"] = list(spec.class_prior)
    if not run.formal_guarantee and p.get("note"):
        card["note"] = p["note"]
    return card


def card_json(card: dict[str, Any]) -> str:
    """Indented JSON whose *first line* carries the statement (``{"statement": "...",``)."""
    text = json.dumps(card, indent=2, ensure_ascii=False)
    return "{" + text[len("{\n  "):] + "\n"


def _row(name: str, value: Any) -> str:
    return f"| {name} | {value if value is not None else '–'} |"


def card_markdown(card: dict[str, Any]) -> str:
    formal = card["formal_guarantee"]
    lines = [
        f"# {card['statement']}",
        "",
        f"{card['num_samples']} synthetic images from a `{card['method']}` generator, "
        f"format `{card['format']}` ({card['files']}). Machine-readable: `{JSON_NAME}`.",
        "",
        "## Privacy",
        "",
        "| | |",
        "|---|---|",
        _row("formal guarantee", "yes" if formal else "**no**"),
        _row("ε spent" if formal else "ε spent by the generator's training (no guarantee for these samples)",
             f"{card['epsilon_spent']:.4g}" if card["epsilon_spent"] is not None else None),
        _row("ε target", card["epsilon_target"]),
        _row("δ", card["delta"]),
        _row("accountant", card["accountant"]),
        _row("ε by accountant", ", ".join(f"{k} {v:.4g}" for k, v in (card["epsilon_by_accountant"] or {}).items()
                                          if v is not None) or None),
        _row("neighbouring relation", "add/remove one example of the sensitive training split"
             if card["neighbouring"] == "add_remove" else card["neighbouring"]),
        "",
        "Ledger events (copied from the run's `privacy.json`):",
        "",
        "| stage | mechanism | noise multiplier | sample rate | count |",
        "|---|---|---|---|---|",
        *[f"| {e['stage']} | {e['mechanism']} | {e['noise_multiplier']:.4g} | {e.get('sample_rate', 1.0):.4g} "
          f"| {e.get('steps', e.get('count', 1))} |" for e in card["events"]],
        "",
        ("Sampling the trained generator is post-processing and costs no privacy." if formal else
         "No formal guarantee covers these samples: any ε above describes how the generator was trained, "
         "and the sampling or the training read the sensitive data outside differential privacy."),
        "Not covered: " + " ".join(card["not_covered"]),
    ]
    if card.get("note"):
        lines += ["", f"Note: {card['note']}"]
    s, m, smp = card["sensitive_dataset"], card["model"], card["sampler"]
    public = card["public_data"]
    lines += [
        "",
        "## Data and model",
        "",
        "| | |",
        "|---|---|",
        _row("sensitive dataset", f"{s['name']}, training split of {s['training_split_size']} images "
                                  f"({s['image_size']}×{s['image_size']}, {s['channels']} channel(s))"),
        _row("public data", f"{public['name']} ({', '.join(f'{k}={v}' for k, v in public.items() if k != 'name')})"
             if public else "none"),
        _row("model", f"{m['name']}: {m['trainable_parameters']:,} trainable of {m['total_parameters']:,} "
                      f"parameters ({m['sampling_parameters']:,} used for sampling)"),
        _row("sampler", f"{smp['name']} (deterministic ODE solver), {smp['steps']} steps, guidance scale {smp['guidance_scale']}, "
                        f"{'bfloat16 autocast' if smp['precision'] == 'bf16' else 'fp32'}"),
        _row("samples", card["num_samples"]),
        _row("class prior", card["class_prior"] + (f" {card['class_prior_weights']}" if "class_prior_weights" in card else "")),
        _row("per-class counts", ", ".join(f"{k}: {v}" for k, v in card["per_class_counts"].items())),
        _row("seed", card["seed"]),
        _row("source run", f"`{card['source_run']}`"),
        _row("dpgen", f"{card['dpgen']['version']}, commit {card['dpgen']['commit'] or 'unknown'}"
                      + (" (with uncommitted changes)" if card["dpgen"]["uncommitted_changes"] else "")),
        _row("created", card["created"]),
        "",
    ]
    return "\n".join(lines)


def write_datacard(out: Path, card: dict[str, Any]) -> None:
    atomic_write(out / JSON_NAME, lambda f: f.write(card_json(card).encode()))
    atomic_write(out / MARKDOWN_NAME, lambda f: f.write(card_markdown(card).encode()))
