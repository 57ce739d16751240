"""Sweep reports: every finished run below a directory -> ``report.csv``, ``report.md`` and plots.

A run is finished when its directory holds ``metrics.json``; ``privacy.json`` beside it gives
the guarantee. Runs of a method without a formal guarantee (``nonprivate``) have no ε and
are drawn as the ceiling, next to the real-data references.

Runs of one method at one ε target are repeats only if their configs (``run_config.yaml``) agree
on everything but seeds, paths, hardware, logging and speed-only settings; otherwise each run's
``setting`` names the keys that tell them apart, and the plots draw one line per setting. Canary
audits (``python -m dpgen.audit``) train on canaries and are never evaluated: they get their own
table, not a row among the generators.

A run whose ``metrics.json``, ``privacy.json``, ``run_config.yaml`` or ``evaluate_config.yaml``
cannot be read (cut short by a full disk, a copy or a hand edit) is skipped with a warning and
listed under the report's skipped runs: one broken file must not cost the report of the others.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import MarkedYAMLError, YAMLError

from dpgen.eval.plots import accuracy_figure, fid_figure, save_figure, setting_order
from dpgen.io import atomic_write
from dpgen.privacy.composition import (
    CombinedGuarantee,
    combine_by_data,
    saved_config,
    spent_ledger,
    without_resamplings,
)
from dpgen.privacy.guarantee import RETIRED_FLAGS, ledger_kept_guarantee

log = logging.getLogger("dpgen")

CSV_NAME, MD_NAME, AUDITS_CSV_NAME = "report.csv", "report.md", "audits.csv"
ACCURACY_PNG, FID_PNG = "accuracy_vs_epsilon.png", "fid_vs_epsilon.png"
_FIDELITY = ("fid", "kid_mean", "precision", "recall", "inception_score_mean", "fid_heldout", "fid_at_reference_size")
_AUDIT = ("replication_rate", "mia_auc", "mia_tpr_at_fpr_1pct")  # with eval.audit=true (else empty)
_CANARY = ("epsilon_claimed", "epsilon_lower_bound", "epsilon_lower_bound_clopper_pearson", "confidence",
           "exceeds_claim", "canaries", "canary_auc")


# Config keys that may differ between repeats of one setting: the x-axis (ε), seeds, where files
# live, hardware and logging, and settings that change only memory or speed (the clipping modes
# and physical batch give the same update; sampling and feature batches the same distribution).
# Also `resume` (the run directory a restarted run continues) and the retired guarantee flags, as
# the pipeline's own resume check ignores them.
_REPEAT_MAY_VARY_LAST = {"seed", "split_seed", "cache_dir", "root", "data_root", "weights_path", "num_threads",
                         "log_every_n_steps", "checkpoint_every_n_steps"}
_REPEAT_MAY_VARY = {"privacy.eps", "privacy.max_physical_batch", "privacy.clipping", "privacy.log_train_loss",
                    "sample.batch_size", "eval.fid.batch_size", "eval.utility.sample_shard_size",
                    "audit.loss_score.batch_size", "resume", *RETIRED_FLAGS}
_REPEAT_MAY_VARY_PREFIX = ("paths.", "logger.", "hydra.", "trainer.")  # but trainer.precision: see below


class ReportError(ValueError):
    pass


class UnreadableRunFile(ValueError):
    """A run's file that cannot be read or parsed, or that holds no mapping; the run is skipped."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


def _parse_problem(err: Exception) -> str:
    """What is wrong with a file, in a few words (a YAML error's own text runs to several lines)."""
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err.msg}, line {err.lineno})"
    if isinstance(err, MarkedYAMLError) and err.problem:
        line = f", line {err.problem_mark.line + 1}" if err.problem_mark else ""
        return f"invalid YAML ({err.problem}{line})"
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0]}" if first else type(err).__name__


def _read_mapping(path: Path) -> dict[str, Any]:
    """The JSON or YAML mapping in ``path``; UnreadableRunFile when it cannot be had."""
    try:
        if path.suffix == ".json":
            value = json.loads(path.read_text(encoding="utf-8"))
        else:
            value = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, ValueError, YAMLError, OmegaConfBaseException) as err:  # JSON and Unicode errors are ValueErrors
        raise UnreadableRunFile(path, _parse_problem(err)) from err
    if not isinstance(value, dict):
        raise UnreadableRunFile(path, f"holds {type(value).__name__}, not a mapping")
    return value


class SkippedRun(NamedTuple):
    run: str  # relative to the report's directory
    file: str  # the file that could not be read, in the run's directory
    problem: str


class CollectedRuns(NamedTuple):
    rows: list[dict[str, Any]]  # finished generator runs
    audits: list[dict[str, Any]]  # finished canary audits
    skipped: list[SkippedRun]  # runs left out: a file of theirs cannot be read


def _may_vary_between_repeats(key: str, configs: list[dict[str, str]]) -> bool:
    if key == "data.root" and any(c.get("data.name") == '"imagefolder"' for c in configs):
        return False  # an image folder's root is the dataset itself
    if key == "trainer.precision":
        return False  # bf16 and fp32 training are different settings; the rest of trainer is hardware
    return (key in _REPEAT_MAY_VARY or key.rsplit(".", 1)[-1] in _REPEAT_MAY_VARY_LAST
            or key.startswith(_REPEAT_MAY_VARY_PREFIX))


def _flat_config(run_dir: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """The run's saved config as dotted keys -> JSON text of the value ({} if it has none). A run
    re-scored by ``python -m dpgen.evaluate`` was scored with the eval and audit config of its
    ``evaluate_config.yaml``. The feature extractor's weights count as a setting: FIDs under two
    extractors do not compare, and older dpgen versions trained GlyphNet with each run's seed."""
    path = run_dir / "run_config.yaml"
    if not path.is_file():
        return {}
    config = _read_mapping(path)
    rescored = run_dir / "evaluate_config.yaml"
    if rescored.is_file():
        used = _read_mapping(rescored)
        config.update(used if "eval" in used else {"eval": used})  # older dpgen versions saved eval alone
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = json.dumps(node, sort_keys=True)

    walk(config, "")
    sha = metrics.get("feature_extractor", {}).get("weights_sha256")
    if sha:
        flat["eval.fid.extractor_sha256"] = json.dumps(sha[:12])
    return flat


def _label_settings(rows: list[dict[str, Any]], configs: list[dict[str, str]]) -> None:
    """Sets each row's ``setting``: its values of the keys that differ between runs of one line
    (method, and whether the guarantee held) at one ε target. Such a key splits the line at every
    ε; keys that differ only across ε targets (per-ε presets of steps or learning rate) do not.
    A run without a saved config cannot be placed: it is marked so when its line's runs differ."""
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for row, cfg in zip(rows, configs):
        if cfg:
            groups[(row["method"], row["private"], row["epsilon_target"])].append(cfg)
    distinguishing: dict[tuple, set[str]] = defaultdict(set)
    for (method, private, _), cfgs in groups.items():
        keys = set().union(*cfgs)
        distinguishing[(method, private)] |= {k for k in keys if not _may_vary_between_repeats(k, cfgs)
                                              and len({c.get(k) for c in cfgs}) > 1}
    for row, cfg in zip(rows, configs):
        keys = sorted(distinguishing[(row["method"], row["private"])])
        if keys and not cfg:
            row["setting"] = "config unknown (no run_config.yaml)"
        else:
            row["setting"] = ", ".join(f"{k}={'–' if cfg.get(k) is None else _plain(cfg[k])}" for k in keys)


def _plain(json_text: str) -> str:
    value = json.loads(json_text)
    return value if isinstance(value, str) else json_text


def _relative(root: Path, run_dir: Path) -> str:
    return str(run_dir.relative_to(root)) if run_dir != root else "."


def _row(root: Path, run_dir: Path, m: dict[str, Any]) -> dict[str, Any]:
    """The report row of the run in ``run_dir``, whose ``metrics.json`` holds ``m``."""
    privacy_file = run_dir / "privacy.json"
    p = _read_mapping(privacy_file) if privacy_file.exists() else {}
    private = ledger_kept_guarantee(p) if p else bool(m.get("formal_guarantee", False))
    # A DP-trained run whose guarantee was voided (CPSample sampling) keeps the ε of its training,
    # but is neither a private point nor part of the non-private ceiling.
    epsilon = p.get("epsilon_spent", m.get("epsilon"))
    accuracy = m.get("downstream_accuracy", {})
    row: dict[str, Any] = {
        "run": _relative(root, run_dir),
        "method": m.get("method"),
        "setting": "",
        "private": private,
        "epsilon_target": p.get("epsilon_target") if epsilon is not None else None,
        "epsilon": epsilon,
        "delta": p.get("delta") if epsilon is not None else None,
        "accuracy_mean": accuracy.get("mean"),
        **{f"accuracy_{k}": v for k, v in accuracy.items() if k != "mean"},
        "accuracy_real_mean": m.get("downstream_accuracy_real", {}).get("mean"),
        **{k: m.get(k) for k in _FIDELITY},
        "fid_reference": m.get("fidelity_reference", {}).get("fid"),
        "feature_extractor": m.get("fid_feature_extractor"),
        **{k: m.get(k) for k in _AUDIT},
    }
    if "utility_study" in m:
        row.update(_utility_columns(m["utility_study"]))
    return row


def _utility_columns(study: dict[str, Any]) -> dict[str, Any]:
    """The utility study flattened: per size the families' mean, the ensemble, the member chosen
    on synthetic validation data and the best member in hindsight (on the held-out split)."""
    cols: dict[str, Any] = {}
    for s in study["sizes"]:
        x = f"{s['multiple']:g}x"
        cols[f"utility_mean_{x}"] = s["accuracy"]["mean"]
        cols[f"utility_ensemble_{x}"] = s.get("ensemble_accuracy")
        cols[f"utility_selected_member_{x}"] = s["val_selected_member_accuracy"]
        cols[f"utility_hindsight_member_{x}"] = s["hindsight_best_member_accuracy"]
    sel = study["selection"]
    cols.update({"utility_spearman": sel["spearman"], "utility_kendall": sel["kendall"],
                 "utility_selected_accuracy": sel["selected_real_accuracy"],
                 "utility_best_accuracy": sel["best_real_accuracy"]})
    return cols


def _skip(root: Path, err: UnreadableRunFile) -> SkippedRun:
    skipped = SkippedRun(_relative(root, err.path.parent), err.path.name, err.problem)
    log.warning("report: skipped run %s: its %s cannot be read: %s. Fix: repair or remove the file, or move the "
                "run out of %s", skipped.run, skipped.file, skipped.problem, root)
    return skipped


def _finished(root: Path) -> tuple[dict[Path, dict[str, Any]], dict[Path, dict[str, Any]], list[SkippedRun]]:
    """Run directory -> parsed ``metrics.json``, of generator runs and of canary audits below
    ``root``, and the runs whose ``metrics.json`` cannot be read."""
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory. Fix: pass a run or multirun directory")
    runs, audits, skipped = {}, {}, []
    for f in sorted(root.rglob("metrics.json")):
        try:
            m = _read_mapping(f)
        except UnreadableRunFile as err:
            skipped.append(_skip(root, err))
            continue
        (audits if "canary_audit" in m else runs)[f.parent] = m
    return runs, audits, skipped


def collect(root: str | Path) -> CollectedRuns:
    """One row per finished generator run below ``root`` (``root`` itself may be a run), one per
    finished canary audit (the claimed ε against its empirical lower bound), and the runs skipped
    because a file of theirs cannot be read."""
    root = Path(root)
    runs, audits, skipped = _finished(root)
    rows, configs = [], []
    for run_dir, m in runs.items():
        try:  # both before either is kept: a run is reported whole or not at all
            row, config = _row(root, run_dir, m), _flat_config(run_dir, m)
        except UnreadableRunFile as err:
            skipped.append(_skip(root, err))
            continue
        rows.append(row)
        configs.append(config)
    if not rows:
        found = f" (only {len(audits)} canary audits, reported by python -m dpgen.audit)" if audits else ""
        unreadable = f" ({len(skipped)} skipped: {', '.join(f'{s.run}/{s.file}' for s in skipped)} cannot be read)" \
            if skipped else ""
        raise ReportError(f"{root}: no finished generator run (no readable metrics.json) below it{found}{unreadable}. "
                          "Fix: pass a run or sweep directory, and repair or remove unreadable files")
    _label_settings(rows, configs)
    rows.sort(key=lambda r: (not r["private"], r["method"] or "", setting_order(r["setting"]),
                             r["epsilon"] or 0.0, r["run"]))
    audit_rows = [{"run": _relative(root, run_dir), "method": m.get("method"),
                   **{k: m["canary_audit"].get(k) for k in _CANARY}} for run_dir, m in audits.items()]
    return CollectedRuns(rows, audit_rows, sorted(skipped))


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """One row per finished generator run below ``root``."""
    return collect(root).rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"
    return str(value)


def method_label(row: dict[str, Any]) -> str:
    """The method, marked when DP training's guarantee was voided (CPSample): it keeps its ε."""
    voided = not row["private"] and row["epsilon"] is not None
    return f"{row['method']} (no formal DP)" if voided else str(row["method"])


def combined_releases(root: str | Path, rows: list[dict[str, Any]],
                      skipped: Sequence[SkippedRun] = ()) -> dict[str, CombinedGuarantee]:
    """The guarantee of releasing the samples of every private generator run of the report
    together, per sensitive dataset. A skipped run (a file of it unreadable) may be private, on
    any of the datasets: while there is one, no combined guarantee is stated, rather than one
    that leaves it out."""
    runs = {}
    for row in rows:
        if row["private"]:
            run_dir = (Path(root) / row["run"]).resolve()
            # A run whose ledger is gone, or contradicts its journal, cannot be vouched for:
            # composed, it leaves no guarantee.
            try:
                ledger = spent_ledger(run_dir)
            except ValueError as err:
                log.warning("report: %s", err)
                ledger = {}
            runs[run_dir] = (row["run"], ledger, saved_config(run_dir))
    # A resampling of a run in the report releases nothing its source does not.
    kept, _ = without_resamplings(runs)
    releases = combine_by_data(kept) if kept else {}
    unknown = tuple(s.run for s in skipped)
    return {data: dataclasses.replace(c, delta=None, epsilon=None, delta_sum=None, epsilon_sum=None,
                                      without_guarantee=(*c.without_guarantee, *unknown)) if unknown else c
            for data, c in releases.items()}


def _release_markdown(releases: dict[str, CombinedGuarantee]) -> list[str]:
    if not releases:
        return []
    lines = ["", "Releasing runs together: every finished private generator run of this report on one "
             "sensitive dataset, composed (`python -m dpgen.compose` for any other choice of runs, "
             "unfinished runs and canary audits included). Each run's own ε covers its outputs alone.", "",
             "| sensitive data | runs | ε composed (PLD) | at δ | ε summed | at δ summed |", "|" + "---|" * 6]
    for data, c in releases.items():
        if c.without_guarantee:
            none = f"none ({', '.join(c.without_guarantee)}: no usable ledger)"
            lines.append(f"| {data} | {len(c.runs)} | {none} | – | {none} | – |")
        else:
            composed = c.delta if c.epsilon is not None else None  # no δ to state without an ε
            lines.append(f"| {data} | {len(c.runs)} | {_fmt(c.epsilon)} | {_fmt(composed)} | "
                         f"{_fmt(c.epsilon_sum)} | {_fmt(c.delta_sum)} |")
    return lines


def _skipped_markdown(skipped: list[SkippedRun]) -> list[str]:
    if not skipped:
        return []
    lines = ["", "Skipped runs: a file of theirs cannot be read, so they are in no table or plot of this report, "
             "and no combined ε of releasing its runs together is stated while they may be among them. Repair or "
             "remove the file and report again.", "",
             "| run | file | problem |", "|---|---|---|"]
    return lines + [f"| `{s.run}` | {s.file} | {s.problem} |" for s in skipped]


def _markdown(rows: list[dict[str, Any]], audits: list[dict[str, Any]],
              releases: dict[str, CombinedGuarantee], skipped: list[SkippedRun]) -> bytes:
    classifiers = [k for k in _columns(rows) if k.startswith("accuracy_") and k not in ("accuracy_mean", "accuracy_real_mean")]
    settings = any(r["setting"] for r in rows)
    header = (["method"] + (["setting"] if settings else []) + ["ε target", "ε spent", "accuracy % (mean)"]
              + [f"{c[9:]} %" for c in classifiers]
              + ["real-data ceiling %", "FID ↓", "KID ↓", "precision", "recall", "IS", "FID held-out ↓",
                 "FID at reference size ↓", "run"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = ([method_label(r)] + ([r["setting"] or "–"] if settings else [])
                 + [_fmt(r["epsilon_target"]), _fmt(r["epsilon"]), _fmt(r["accuracy_mean"], True)]
                 + [_fmt(r.get(c), True) for c in classifiers]
                 + [_fmt(r["accuracy_real_mean"], True)] + [_fmt(r[k]) for k in _FIDELITY] + [f"`{r['run']}`"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += (_skipped_markdown(skipped) + _release_markdown(releases) + _utility_markdown(rows)
              + _audit_markdown(audits))
    extractors = sorted({r["feature_extractor"] for r in rows if r["feature_extractor"]})
    references = sorted({r["fid_reference"] for r in rows if r["fid_reference"] is not None})
    delta = sorted({r["delta"] for r in rows if r["delta"] is not None})
    notes = [
        "",
        f"Accuracy: classifiers trained on each run's synthetic samples, tested once on the held-out real "
        f"split. ε: add/remove-one DP at δ = {', '.join(f'{d:g}' for d in delta) or '–'}; runs without ε "
        f"have no formal guarantee (non-private ceiling). A run marked \"no formal DP\" spent its ε in DP "
        f"training but then used the sensitive data outside DP (CPSample sampling): its ε is no guarantee.",
        f"Fidelity against the real training split, features: {', '.join(extractors) or '–'}; "
        f"real held-out vs real train FID (reference): {', '.join(f'{v:.4g}' for v in references) or '–'}; "
        "it compares as many held-out images as the `fid_at_reference_size` column scores samples "
        "(FID grows as sets shrink, so only that column is comparable with it).",
        "The real-data ceiling and fidelity reference are computed on the sensitive data without privacy; "
        "they are reference points, not released outputs.",
        "Each ε is one run's. Runs on the same sensitive data compose: releasing the outputs of several "
        "(say every point of this sweep) is covered only by their combined budget (the table above), "
        "and a run repeated in a new directory spends its budget again.",
        "",
        f"![accuracy vs ε]({ACCURACY_PNG})",
        f"![FID vs ε]({FID_PNG})",
        "",
    ]
    return ("# dpgen sweep report\n\n" + "\n".join(lines + notes)).encode()


def _audit_markdown(audits: list[dict[str, Any]]) -> list[str]:
    if not audits:
        return []
    lines = ["", "Canary audits (`python -m dpgen.audit`): models trained on the sensitive split with canaries "
             "inserted, never sampled or evaluated. The empirical ε is a lower bound (Steinke, Nasr & "
             "Jagielski 2023); one above the claimed ε means the implementation is less private than it says.",
             "", "| method | ε claimed | ε lower bound | Clopper-Pearson bound | confidence | exceeds claim | "
             "canaries | canary AUC | run |", "|" + "---|" * 9]
    for a in audits:
        cells = [str(a["method"])] + [_fmt(a[k]) for k in _CANARY] + [f"`{a['run']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _utility_markdown(rows: list[dict[str, Any]]) -> list[str]:
    studied = [r for r in rows if "utility_spearman" in r]
    if not studied:
        return []
    sizes = [k[len("utility_mean_"):] for k in _columns(studied) if k.startswith("utility_mean_")]
    header = (["method", "ε spent"] + [f"mean acc % {x}" for x in sizes]
              + [f"ensemble / chosen member / best in hindsight % {x}" for x in sizes]
              + ["Spearman", "Kendall", "selected / best-in-hindsight acc %", "run"])
    lines = ["", "Utility study (eval.utility_study): accuracy on held-out real data against the synthetic set's "
             "size (multiples of the sensitive training split), the classifier families' averaged-softmax "
             "ensemble against the member chosen on synthetic validation data (and the best member in "
             "hindsight, which no user could choose without real data), and the rank correlation between "
             "choosing classifier settings on synthetic validation data and on real data.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in studied:
        cells = ([method_label(r), _fmt(r["epsilon"])] + [_fmt(r.get(f"utility_mean_{x}"), True) for x in sizes]
                 + [" / ".join(_fmt(r.get(f"utility_{k}_{x}"), True)
                               for k in ("ensemble", "selected_member", "hindsight_member"))
                    for x in sizes]
                 + [_fmt(r["utility_spearman"]), _fmt(r["utility_kendall"]),
                    f"{_fmt(r['utility_selected_accuracy'], True)} / {_fmt(r['utility_best_accuracy'], True)}",
                    f"`{r['run']}`"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(root: str | Path) -> list[Path]:
    """Write the CSV, Markdown table and both plots into ``root``, and the canary audits' CSV when
    there are any; returns their paths."""
    root = Path(root)
    rows, audits, skipped = collect(root)
    paths = [root / CSV_NAME, root / MD_NAME, root / ACCURACY_PNG, root / FID_PNG]
    atomic_write(paths[0], lambda f: f.write(_csv(rows)))
    releases = combined_releases(root, rows, skipped)
    atomic_write(paths[1], lambda f: f.write(_markdown(rows, audits, releases, skipped)))
    save_figure(accuracy_figure(rows), paths[2])
    save_figure(fid_figure(rows), paths[3])
    if audits:
        paths.append(root / AUDITS_CSV_NAME)
        atomic_write(paths[-1], lambda f: f.write(_csv(audits)))
    log.info("report: %d runs%s -> %s", len(rows), f" ({len(skipped)} skipped)" if skipped else "",
             ", ".join(str(p) for p in paths))
    return paths
