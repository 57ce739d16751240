"""Validation of the ``eval`` config group, before any work starts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dpgen.checks import is_number_in, require_choice, require_int, require_number, to_plain
from dpgen.errors import ConfigError
from dpgen.eval.downstream import validation_size
from dpgen.models.classifiers import CLASSIFIERS

METRICS = ("fid", "kid", "isc", "prc")  # what dpgen.eval.fidelity computes, by torch-fidelity's names
# The metrics.json keys each of them writes, and those every evaluation writes.
METRIC_KEYS = {"fid": ("fid",), "kid": ("kid_mean", "kid_std"),
               "isc": ("inception_score_mean", "inception_score_std"), "prc": ("precision", "recall", "f_score")}
ALWAYS_WRITTEN = ("epsilon", "delta", "num_samples", "trainable_parameters", "total_parameters", "train_wall_s",
                  "total_wall_s")


def _subset(cfg: dict[str, Any], prefix: str, key: str, allowed: tuple[str, ...]) -> list[str]:
    value = cfg.get(key)
    if not isinstance(value, list) or any(v not in allowed for v in value) or len(set(value)) != len(value):
        raise ConfigError(f"{prefix}.{key}", value, f"must be a list of distinct names from {', '.join(allowed)}",
                          f"e.g. {prefix}.{key}=[{','.join(allowed)}] (or [] to skip)")
    return value


def _optional_positive(cfg: dict[str, Any], prefix: str, key: str) -> None:
    if cfg.get(key) is not None:
        require_int(cfg, prefix, key, minimum=1)


def _positive_number(cfg: dict[str, Any], prefix: str, key: str, example: str) -> None:
    """``cfg[key]``, a finite number > 0 (a learning rate of 0 trains nothing; below, it ascends)."""
    value = cfg.get(key)
    if not is_number_in(value, 0, math.inf, low_open=True, high_open=True):
        raise ConfigError(f"{prefix}.{key}", value, "must be a number > 0", f"set e.g. {prefix}.{key}={example}")


def validate_eval_config(cfg: Any, num_samples: int, num_classes: int) -> None:
    """``cfg`` is the ``eval`` node; ``num_samples`` is how many samples the sample stage writes,
    ``num_classes`` the data's."""
    e = to_plain(cfg, "eval")
    _optional_positive(e, "eval", "num_samples")
    _optional_positive(e, "eval", "num_threads")
    if (e.get("num_samples") or 0) > num_samples:
        raise ConfigError("eval.num_samples", e["num_samples"], f"exceeds sample.num_samples={num_samples}",
                          f"use at most {num_samples}, or null for all")
    evaluated = e.get("num_samples") or num_samples
    count_key = "eval.num_samples" if e.get("num_samples") else "sample.num_samples"

    fid, p = e["fid"], "eval.fid"
    if _subset(fid, p, "metrics", METRICS):
        for key in ("batch_size", "kid_subsets", "prc_neighborhood"):
            require_int(fid, p, key, minimum=1)
        require_int(fid, p, "kid_subset_size", minimum=2)
        require_choice(fid, p, "heldout", (True, False))
        weights = fid.get("weights_path")
        if weights is not None and not Path(weights).is_file():
            raise ConfigError(f"{p}.weights_path", weights, "is not a file",
                              "point it at Inception-v3 weights in torch-fidelity's format, or null for glyphnet")
        if weights is None:
            from dpgen.data import validate_public_config

            validate_public_config(fid["glyphs"])
            for key in ("width", "feature_dim", "epochs", "batch_size"):
                require_int(fid["glyphnet"], f"{p}.glyphnet", key, minimum=1)
            _positive_number(fid["glyphnet"], f"{p}.glyphnet", "lr", "1e-3")
            if "seed" in fid["glyphnet"]:
                require_int(fid["glyphnet"], f"{p}.glyphnet", "seed", minimum=0)
        # Fewer samples fail in evaluate, after training: FID's covariance needs two, precision and
        # recall each sample's k-th nearest neighbour among the others.
        least = fid["prc_neighborhood"] + 1 if "prc" in fid["metrics"] else 2
        _enough(count_key, evaluated, least, "the fidelity metrics")

    d, p = e["downstream"], "eval.downstream"
    if _subset(d, p, "classifiers", tuple(CLASSIFIERS)):
        for key in ("epochs", "batch_size"):
            require_int(d, p, key, minimum=1)
        _optional_positive(d, p, "patience")
        _positive_number(d, p, "lr", "1e-3")
        require_number(d, p, "val_fraction", 0.01, 0.9)
        _enough(count_key, evaluated, _fewest_images(num_classes, d["val_fraction"]),
                f"the classifiers (one training image per class, {num_classes}, beside the validation split)")
    require_choice(e, "eval", "reference", (True, False))
    require_choice(e, "eval", "audit", (True, False))
    if require_choice(e, "eval", "utility_study", (True, False)):
        if not d["classifiers"]:
            raise ConfigError("eval.downstream.classifiers", [], "the utility study trains these families",
                              "name at least one, or set eval.utility_study=false")
        _validate_utility(e["utility"])


def check_objective(objective: str, cfg: Any) -> None:
    """``objective`` (the metrics.json key a sweeper optimises, dotted) names a number this
    evaluation (``cfg``, the ``eval`` node) writes: otherwise every trial runs in full and only
    then fails to read it."""
    e = to_plain(cfg, "eval")
    written = {key for metric in e["fid"]["metrics"] for key in METRIC_KEYS[metric]} | set(ALWAYS_WRITTEN)
    if e["downstream"]["classifiers"]:
        written.add("downstream_accuracy")
    if str(objective).split(".")[0] not in written:
        raise ConfigError("objective", objective, f"is not a metric this evaluation writes ({', '.join(sorted(written))})",
                          "e.g. objective=downstream_accuracy.mean (with eval.downstream.classifiers set), or fid "
                          "with hydra.sweeper.direction=minimize")


def _enough(key: str, n: int, least: int, who: str) -> None:
    if n < least:
        raise ConfigError(key, n, f"evaluates {n} samples; {who} need at least {least}", f"use at least {least}")


def _positive_numbers(cfg: dict[str, Any], prefix: str, key: str, integer: bool = False) -> None:
    value = cfg.get(key)
    kinds = (int,) if integer else (int, float)
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, kinds) and is_number_in(v, 0, math.inf, low_open=True, high_open=True)
                       for v in value)):
        kind = "integers" if integer else "numbers"
        raise ConfigError(f"{prefix}.{key}", value, f"must be a non-empty list of positive {kind}",
                          f"e.g. {prefix}.{key}=[1,2]")


def _validate_utility(u: dict[str, Any]) -> None:
    p = "eval.utility"
    # Only > 0 here: what a multiple gives is round(multiple * N) images, and N (the sensitive
    # training split) is known once the data is read. No floor free of N would do: 0.001 of
    # CelebA's 162770 is 163 images, while 1 of a 5-image train_limit leaves none to train on.
    # validate_utility_sizes checks the sizes against N, before the run's first stage.
    _positive_numbers(u, p, "size_multiples")
    require_number(u, p, "selection_multiple", 1e-9, float("inf"))
    require_int(u, p, "sample_shard_size", minimum=1)
    require_choice(u, p, "grid_classifier", tuple(CLASSIFIERS))
    grid, g = u["grid"], f"{p}.grid"
    _positive_numbers(grid, g, "lr")
    _positive_numbers(grid, g, "epochs", integer=True)
    _positive_numbers(grid, g, "width", integer=True)
    augment = grid.get("augment")
    if not isinstance(augment, list) or not augment or any(not isinstance(a, bool) for a in augment):
        raise ConfigError(f"{g}.augment", augment, "must be a non-empty list of true/false",
                          f"e.g. {g}.augment=[false,true]")


def validate_utility_sizes(cfg: Any, n_train: int, num_classes: int) -> None:
    """With ``eval.utility_study=true``, every size of the study (``cfg`` is the ``eval`` node),
    round(multiple × ``n_train``) synthetic images, must leave each classifier at least one
    training image per class beside the validation split carved from it."""
    e = to_plain(cfg, "eval")
    if not e.get("utility_study"):
        return
    u, val_fraction = e["utility"], e["downstream"]["val_fraction"]
    least = _fewest_images(num_classes, val_fraction)
    for key, multiples in (("size_multiples", u["size_multiples"]), ("selection_multiple", [u["selection_multiple"]])):
        for multiple in multiples:
            n = int(round(multiple * n_train))
            if n < least:
                raise ConfigError(
                    f"eval.utility.{key}", u[key],
                    f"{multiple:g} × N={n_train} (the training split) gives {n} synthetic images; with "
                    f"eval.downstream.val_fraction={val_fraction:g} the classifiers need at least {least}, "
                    f"one training image per class ({num_classes}) beside the validation split",
                    f"use multiples of at least {_round_up(least / n_train):g}")


def _fewest_images(num_classes: int, val_fraction: float) -> int:
    """The fewest images that leave ``num_classes`` for training once validation is carved off."""
    n = num_classes + 1
    while n - validation_size(n, val_fraction) < num_classes:
        n += 1
    return n


def _round_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits, so a suggested multiple is enough."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


CANARY_KINDS = ("letters", "mislabeled")


def validate_audit_config(cfg: Any, num_train_timesteps: int) -> None:
    """``cfg`` is the ``audit`` node (used by ``eval.audit=true`` and ``python -m dpgen.audit``);
    ``num_train_timesteps`` is the run's ``diffusion.num_train_timesteps``, which the loss score's
    timesteps index into."""
    a = to_plain(cfg, "audit")
    require_number(a["replication"], "audit.replication", "threshold", -1.0, 1.0)
    require_int(a["replication"], "audit.replication", "pairs", minimum=1)
    s, p = a["loss_score"], "audit.loss_score"
    _require_timesteps(s.get("timesteps"), f"{p}.timesteps", num_train_timesteps)
    require_int(s, p, "noise_draws", minimum=1)
    require_int(s, p, "batch_size", minimum=1)
    require_int(a["mia"], "audit.mia", "max_examples", minimum=2)
    c, p = a["canary"], "audit.canary"
    count = require_int(c, p, "count", minimum=2)
    require_choice(c, p, "kind", CANARY_KINDS)
    guesses = c.get("guesses")
    if not isinstance(guesses, list) or not guesses or any(
            isinstance(g, bool) or not isinstance(g, int) or not 2 <= g <= count for g in guesses):
        raise ConfigError(f"{p}.guesses", guesses, f"must be a non-empty list of guess counts in [2, count={count}]",
                          f"e.g. {p}.guesses=[{max(2, count // 4)},{count}]")
    require_number(c, p, "confidence", 0.5, 0.9999)


def _require_timesteps(timesteps: Any, key: str, num_train_timesteps: int) -> None:
    """Timesteps of the diffusion the run trained: each in [0, num_train_timesteps)."""
    if not isinstance(timesteps, list) or not timesteps or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in timesteps):
        raise ConfigError(key, timesteps, "must be a non-empty list of timesteps >= 0",
                          f"e.g. {key}=[10,50,100,200,400]")
    if max(timesteps) >= num_train_timesteps:
        raise ConfigError(key, timesteps, f"must lie below diffusion.num_train_timesteps={num_train_timesteps}",
                          f"use timesteps below {num_train_timesteps}")
