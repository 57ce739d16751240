"""Sweep reports on a fixture sweep written in the run-directory formats of DESIGN.md."""

from __future__ import annotations

import csv
import json
import threading

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf
from PIL import Image

from dpgen.eval.plots import accuracy_figure, fid_figure
from dpgen.eval.report import (
    ACCURACY_PNG,
    AUDITS_CSV_NAME,
    CSV_NAME,
    FID_PNG,
    MD_NAME,
    ReportError,
    collect_runs,
    write_report,
)
from dpgen.io import write_json
from dpgen.report import SweepReport, main

# (job, method, ε target, ε spent, mean accuracy, FID); job 2 repeats job 1 with another seed
RUNS = [
    ("0", "dpdm", 1.0, 0.99, 0.50, 3.0),
    ("1", "dpdm", 10.0, 9.96, 0.80, 1.0),
    ("2", "dpdm", 10.0, 9.94, 0.70, 1.2),
    ("3", "dpldm", 1.0, 0.98, 0.60, 2.0),
    ("4", "nonprivate", None, None, 0.90, 0.5),
]


def _run_config(run, method, eps, seed, **method_keys):
    """A saved config like a run's: steps follow ε (the plan), the cache path differs per run."""
    OmegaConf.save({"seed": seed, "paths": {"cache_dir": f"/tmp/cache-{run.name}"},
                    "method": {"name": method, "multiplicity": 1, "train": {"steps": int(10 * (eps or 1))},
                               **method_keys},
                    "privacy": {"eps": eps, "clipping": "mixed"}}, run / "run_config.yaml")


@pytest.fixture
def sweep(tmp_path):
    for job, method, target, spent, acc, fid in RUNS:
        run = tmp_path / job
        if target is None:
            write_json(run / "privacy.json", {"formal_guarantee": False, "method": method, "note": "none"})
        else:
            write_json(run / "privacy.json", {
                "delta": 1e-5, "epsilon_target": target, "epsilon_spent": spent, "accountant": "pld",
                "epsilon_by_accountant": {"pld": spent}, "dataset_size": 4000, "neighbouring": "add_remove",
                "events": [], "formal_guarantee": True})
        write_json(run / "metrics.json", {
            "method": method, "epsilon": spent, "delta": 1e-5 if target else None,
            "formal_guarantee": target is not None, "num_samples": 2000,
            "downstream_accuracy": {"cnn": acc + 0.05, "mlp": acc - 0.05, "mean": acc},
            "downstream_accuracy_real": {"cnn": 0.97, "mlp": 0.93, "mean": 0.95},
            "fid": fid, "kid_mean": fid / 10, "precision": 0.6, "recall": 0.5, "inception_score_mean": 5.0,
            "fid_heldout": fid + 0.1, "fid_feature_extractor": "glyphnet-v1",
            "fidelity_reference": {"fid": 0.05, "feature_extractor": "glyphnet-v1"}})
        _run_config(run, method, target, seed=int(job))
    (tmp_path / "4" / "checkpoints").mkdir()  # unrelated files are ignored
    (tmp_path / "unfinished").mkdir()  # a run without metrics.json is not in the report
    return tmp_path


def test_collect_runs(sweep):
    rows = collect_runs(sweep)
    assert [r["run"] for r in rows] == ["0", "2", "1", "3", "4"]  # private first, by method and ε
    nonprivate = rows[-1]
    assert nonprivate["private"] is False and nonprivate["epsilon"] is None
    assert rows[0]["epsilon_target"] == 1.0 and rows[0]["epsilon"] == 0.99
    assert rows[0]["accuracy_cnn"] == pytest.approx(0.55) and rows[0]["accuracy_real_mean"] == 0.95


def test_a_dp_trained_run_with_a_voided_guarantee_is_neither_private_nor_the_ceiling(sweep):
    """CPSample resamples a DP-trained generator with a classifier trained on the sensitive data:
    privacy.json keeps the training's ε but says formal_guarantee false."""
    run = sweep / "5"
    privacy = json.loads((sweep / "0" / "privacy.json").read_text())
    write_json(run / "privacy.json", {**privacy, "formal_guarantee": False, "note": "CPSample"})
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    write_json(run / "metrics.json", {**metrics, "formal_guarantee": False,
                                      "downstream_accuracy": {"cnn": 0.2, "mlp": 0.2, "mean": 0.2}})
    rows = collect_runs(sweep)
    (voided,) = [r for r in rows if r["run"] == "5"]
    assert voided["private"] is False and voided["epsilon"] == 0.99 and voided["epsilon_target"] == 1.0
    ax = accuracy_figure(rows).axes[0]
    assert list(_hline(ax, "non-private generator").get_ydata()) == pytest.approx([90.0, 90.0])  # not 55
    assert _series(ax, "dpdm, no formal DP (sampling used the data)") == ([0.99], [pytest.approx(20.0)])
    assert _series(ax, "dpdm (mean ± sd of repeats)")[1] == pytest.approx([50.0, 75.0])
    write_report(sweep)
    assert "| dpdm (no formal DP) | 1 | 0.99 | 20.0 |" in (sweep / MD_NAME).read_text()


def test_report_files(sweep):
    paths = write_report(sweep)
    assert [p.name for p in paths] == [CSV_NAME, MD_NAME, ACCURACY_PNG, FID_PNG]
    with open(sweep / CSV_NAME) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(RUNS)
    assert {"method", "epsilon_target", "epsilon", "accuracy_mean", "accuracy_cnn", "fid", "kid_mean",
            "precision", "recall", "fid_reference", "feature_extractor", "run"} <= set(table[0])
    md = (sweep / MD_NAME).read_text()
    assert md.count("| dpdm |") == 3 and "| nonprivate |" in md and "glyphnet-v1" in md
    assert f"({ACCURACY_PNG})" in md and f"({FID_PNG})" in md
    # A sweep's points are not one release of one ε: the four private runs together, by basic
    # composition only (the fixture's ledgers list no events).
    assert "covered only by their combined budget" in md
    assert f"| 4 | – | – | {0.99 + 9.96 + 9.94 + 0.98:.4g} | 4e-05 |" in md
    for name in (ACCURACY_PNG, FID_PNG):
        with Image.open(sweep / name) as img:
            assert img.format == "PNG" and img.width > 600 and img.height > 400


def _series(ax, label):
    (container,) = [c for c in ax.containers if c.get_label() == label]
    line = container.lines[0]
    return list(line.get_xdata()), list(line.get_ydata())


def _hline(ax, prefix):
    (line,) = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith(prefix)]
    return line


def test_accuracy_plot_is_readable_and_right(sweep):
    ax = accuracy_figure(collect_runs(sweep)).axes[0]
    assert ax.get_xscale() == "log" and "ε" in ax.get_xlabel() and "δ = 1e-05" in ax.get_xlabel()
    assert "%" in ax.get_ylabel() and "held-out real" in ax.get_ylabel()
    xs, ys = _series(ax, "dpdm (mean ± sd of repeats)")
    assert xs == pytest.approx([0.99, 9.95]) and ys == pytest.approx([50.0, 75.0])  # repeats averaged
    assert _series(ax, "dpldm")[1] == pytest.approx([60.0])
    ceiling = _hline(ax, "non-private generator")
    assert list(ceiling.get_ydata()) == pytest.approx([90.0, 90.0]) and ceiling.get_linestyle() == "--"
    assert list(_hline(ax, "classifiers trained on real data").get_ydata()) == pytest.approx([95.0, 95.0])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["dpdm (mean ± sd of repeats)", "dpldm"] and len(legend) == 4


def _error_bars(ax, label):
    """Half the length of each point's error bar, in the order of the points."""
    (container,) = [c for c in ax.containers if c.get_label() == label]
    return [(seg[1][1] - seg[0][1]) / 2 for seg in container.lines[2][0].get_segments()]


def test_error_bars_are_the_sample_sd_of_repeats(sweep):
    """Jobs 1 and 2 repeat dpdm at ε=10 with accuracies 80 % and 70 %: sample sd 7.07 (the
    population sd would say 5); the single run at ε=1 has no spread to show."""
    ax = accuracy_figure(collect_runs(sweep)).axes[0]
    assert _error_bars(ax, "dpdm (mean ± sd of repeats)") == pytest.approx([0.0, 50 ** 0.5])


def test_fid_plot_at_the_reference_size_names_the_runs_it_leaves_out(sweep, caplog):
    for job in ("0", "1", "2", "4"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        write_json(sweep / job / "metrics.json", {**metrics, "fid_at_reference_size": metrics["fid"] + 1})
    with caplog.at_level("WARNING", logger="dpgen"):
        ax = fid_figure(collect_runs(sweep)).axes[0]
    assert "reference's size" in ax.get_ylabel() and not [c for c in ax.containers if c.get_label() == "dpldm"]
    assert "leaves out 1 run(s)" in caplog.text and ": 3;" in caplog.text and "eval.reference=true" in caplog.text


def test_fid_plot_is_readable_and_right(sweep):
    ax = fid_figure(collect_runs(sweep)).axes[0]
    assert ax.get_xscale() == "log" and "FID" in ax.get_ylabel() and "glyphnet-v1" in ax.get_title()
    assert _series(ax, "dpdm (mean ± sd of repeats)")[1] == pytest.approx([3.0, 1.1])
    assert list(_hline(ax, "non-private generator").get_ydata()) == pytest.approx([0.5, 0.5])
    assert list(_hline(ax, "real held-out vs real train").get_ydata()) == pytest.approx([0.05, 0.05])


def test_command_line_and_multirun_callback(sweep, tmp_path_factory, capsys):
    main([str(sweep)])
    assert capsys.readouterr().out.split() == [str(sweep / n) for n in (CSV_NAME, MD_NAME, ACCURACY_PNG, FID_PNG)]
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(SystemExit, match=r"^dpgen.report: .*no finished generator run"):
        main([str(empty)])
    (sweep / CSV_NAME).unlink()
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / CSV_NAME).exists()
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}}))  # warns only
    assert not list(empty.iterdir())


def test_a_job_of_a_parallel_sweep_scans_and_writes_the_report_under_the_sweeps_lock(sweep):
    """Otherwise a job that scanned before another finished could write its older view last."""
    from filelock import FileLock

    config = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}}})
    ended = threading.Thread(target=SweepReport().on_job_end, args=(config, None))
    with FileLock(sweep / ".report.lock"):  # another job is writing
        ended.start()
        ended.join(timeout=2.0)
        assert ended.is_alive() and not (sweep / CSV_NAME).exists()
    ended.join(timeout=120.0)
    assert not ended.is_alive() and (sweep / CSV_NAME).exists()


@pytest.mark.parametrize("job, name, content, problem", [
    ("1", "metrics.json", '{"method": "dpdm",\n "fid": 1.0,\n "downstream_accuracy": {"cnn"', "invalid JSON"),
    ("4", "metrics.json", "[]", "holds list, not a mapping"),
    ("0", "privacy.json", "{\n", "invalid JSON"),
    ("3", "run_config.yaml", "seed: 3\nmethod: {name: dpldm\n", "invalid YAML"),
    ("2", "evaluate_config.yaml", "eval: [1\n", "invalid YAML"),
])
def test_a_run_whose_file_cannot_be_read_is_skipped_and_the_others_are_reported(sweep, caplog, job, name, content,
                                                                                problem):
    """A file cut short (a full disk, a copy) or hand-edited used to end the report of the whole
    sweep, and a multirun's report as each of its jobs ended."""
    (sweep / job / name).write_text(content)
    config = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}}})
    with caplog.at_level("WARNING", logger="dpgen"):
        SweepReport().on_job_end(config, None)
    assert f"skipped run {job}: its {name} cannot be read: {problem}" in caplog.text
    with open(sweep / CSV_NAME) as f:
        assert sorted(r["run"] for r in csv.DictReader(f)) == sorted(j for j, *_ in RUNS if j != job)
    md = (sweep / MD_NAME).read_text()
    assert "Skipped runs" in md and f"| `{job}` | {name} | {problem}" in md
    # it may be private, on any of the data: no combined guarantee that leaves it out
    table = md.split("| sensitive data |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert table and all("none (" in line and f"{job}: no usable ledger" in line for line in table), md
    assert (sweep / ACCURACY_PNG).exists() and (sweep / FID_PNG).exists()


def test_a_report_of_only_unreadable_runs_names_their_files(sweep):
    (sweep / "1" / "metrics.json").write_text('{"method": "dpdm", "fid"')
    with pytest.raises(ReportError, match=r"1 skipped: \./metrics\.json cannot be read"):
        write_report(sweep / "1")
    assert not (sweep / "1" / CSV_NAME).exists()


def test_a_single_run_is_a_report_too(sweep):
    rows = collect_runs(sweep / "1")
    assert len(rows) == 1 and rows[0]["run"] == "."
    assert json.loads((sweep / "1" / "metrics.json").read_text())["method"] == rows[0]["method"]


def test_a_utility_study_gets_its_own_table(sweep):
    metrics_file = sweep / "1" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["utility_study"] = {
        "sizes": [{"multiple": m, "accuracy": {"cnn": a, "mean": a}, "ensemble_accuracy": e,
                   "val_selected_member_accuracy": v, "hindsight_best_member_accuracy": a}
                  for m, a, e, v in ((1, 0.81, 0.78, 0.79), (10, 0.86, 0.84, 0.80))],
        "selection": {"spearman": 0.62, "kendall": 0.45, "selected_real_accuracy": 0.83, "best_real_accuracy": 0.85}}
    write_json(metrics_file, metrics)
    (row,) = [r for r in collect_runs(sweep) if r["run"] == "1"]
    assert row["utility_mean_10x"] == 0.86 and row["utility_ensemble_1x"] == 0.78 and row["utility_kendall"] == 0.45
    write_report(sweep)
    md = (sweep / MD_NAME).read_text()
    assert "Utility study" in md
    assert "| dpdm | 9.96 | 81.0 | 86.0 | 78.0 / 79.0 / 81.0 | 84.0 / 80.0 / 86.0 | 0.62 | 0.45 | 83.0 / 85.0 | `1` |" in md


def test_an_old_ledger_without_the_flag_counts_as_private_when_it_spent_epsilon(tmp_path):
    from dpgen.eval.report import _row

    run = tmp_path / "old"
    run.mkdir()
    write_json(run / "privacy.json", {"epsilon_spent": 9.9, "epsilon_target": 10.0, "delta": 1e-5})
    write_json(run / "metrics.json", {"method": "dpdm", "downstream_accuracy": {"mean": 0.7}})
    row = _row(tmp_path, run, json.loads((run / "metrics.json").read_text()))
    assert row["private"] and row["epsilon"] == 9.9


def test_runs_that_differ_in_more_than_seed_and_paths_are_not_averaged_as_repeats(sweep):
    """A sweep over K at ε=10 beside repeats over seeds: each K is its own line, named by the key
    that sets it apart; keys that differ only across ε (planned steps) split nothing."""
    for job, k, acc in (("6", 4, 0.9), ("7", 4, 0.95)):
        run = sweep / job
        for name in ("privacy.json", "metrics.json"):
            write_json(run / name, json.loads((sweep / "1" / name).read_text()))
        metrics = json.loads((run / "metrics.json").read_text())
        write_json(run / "metrics.json", {**metrics, "downstream_accuracy": {"cnn": acc, "mlp": acc, "mean": acc}})
        _run_config(run, "dpdm", 10.0, seed=int(job), multiplicity=k)
    rows = collect_runs(sweep)
    settings = {r["run"]: r["setting"] for r in rows}
    assert settings["0"] == settings["1"] == settings["2"] == "method.multiplicity=1"
    assert settings["6"] == settings["7"] == "method.multiplicity=4"
    assert settings["3"] == settings["4"] == ""  # nothing sets dpldm's or nonprivate's runs apart
    ax = accuracy_figure(rows).axes[0]
    assert _series(ax, "dpdm [method.multiplicity=1] (mean ± sd of repeats)")[1] == pytest.approx([50.0, 75.0])
    assert _series(ax, "dpdm [method.multiplicity=4] (mean ± sd of repeats)") == (
        [pytest.approx(9.96)], [pytest.approx(92.5)])
    write_report(sweep)
    md = (sweep / MD_NAME).read_text()
    assert "| method | setting | ε target |" in md and "| dpdm | method.multiplicity=4 | 10 | 9.96 | 90.0 |" in md


def test_settings_are_ordered_by_the_value_of_their_numbers(sweep):
    """K=16 after K=4 (as text, "16" < "4"), in the table and in the plot's legend."""
    for job, k in (("16", 16), ("6", 4)):
        run = sweep / job
        for name in ("privacy.json", "metrics.json"):
            write_json(run / name, json.loads((sweep / "1" / name).read_text()))
        _run_config(run, "dpdm", 10.0, seed=int(job), multiplicity=k)
    rows = collect_runs(sweep)
    assert [r["setting"][len("method.multiplicity="):] for r in rows if r["method"] == "dpdm"] == [
        "1", "1", "1", "4", "16"]
    labels = accuracy_figure(rows).axes[0].get_legend_handles_labels()[1]
    dpdm = [label for label in labels if label.startswith("dpdm [")]
    assert [label.split("=")[1].split("]")[0] for label in dpdm] == ["1", "4", "16"]


def test_repeats_scored_under_different_feature_extractors_are_not_averaged(sweep):
    """Older dpgen versions trained GlyphNet with each run's seed: FIDs of such runs do not compare."""
    for job, sha in (("1", "a" * 64), ("2", "b" * 64)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        write_json(sweep / job / "metrics.json", {**metrics, "feature_extractor": {"weights_sha256": sha}})
    settings = {r["run"]: r["setting"] for r in collect_runs(sweep)}
    assert settings["1"] == "eval.fid.extractor_sha256=" + "a" * 12
    assert settings["2"] == "eval.fid.extractor_sha256=" + "b" * 12
    metrics = json.loads((sweep / "2" / "metrics.json").read_text())
    write_json(sweep / "2" / "metrics.json", {**metrics, "feature_extractor": {"weights_sha256": "a" * 64}})
    assert {r["run"]: r["setting"] for r in collect_runs(sweep)}["2"] == ""


def test_canary_audits_get_their_own_table_not_a_generator_row(sweep):
    audit = sweep / "audit"
    write_json(audit / "metrics.json", {"method": "dpdm", "epsilon": 9.9, "delta": 1e-5, "canary_audit": {
        "epsilon_claimed": 9.9, "epsilon_lower_bound": 0.42, "epsilon_lower_bound_clopper_pearson": 0.3,
        "confidence": 0.95, "exceeds_claim": False, "canaries": 256, "canary_auc": 0.55}})
    assert "audit" not in {r["run"] for r in collect_runs(sweep)}
    write_report(sweep)
    md = (sweep / MD_NAME).read_text()
    assert "Canary audits" in md and "| dpdm | 9.9 | 0.42 | 0.3 | 0.95 | False | 256 | 0.55 | `audit` |" in md
    with open(sweep / AUDITS_CSV_NAME) as f:
        (row,) = list(csv.DictReader(f))
    assert row["run"] == "audit" and row["epsilon_lower_bound"] == "0.42" and row["canaries"] == "256"
    with pytest.raises(ReportError, match="only 1 canary audits"):
        collect_runs(audit)


def test_repeats_survive_a_resume_and_a_voided_twin_but_image_folders_and_rescoring_split(sweep):
    """A restarted repeat (`resume=`) and a CPSample resample of a repeat (another line: no formal
    DP) leave the repeats together; two image folders are two datasets, not two paths to one;
    a run re-scored by `python -m dpgen.evaluate` is compared on the eval config it was scored with."""
    cfg = OmegaConf.load(sweep / "2" / "run_config.yaml")
    cfg.resume = str(sweep / "2")
    OmegaConf.save(cfg, sweep / "2" / "run_config.yaml")
    voided = sweep / "1-cpsample"
    for name in ("privacy.json", "metrics.json"):
        write_json(voided / name, {**json.loads((sweep / "1" / name).read_text()), "formal_guarantee": False})
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(sweep / "1" / "run_config.yaml"),
                                   {"sampling": {"name": "cpsample", "scale": 2.0}}), voided / "run_config.yaml")
    cfg = OmegaConf.load(sweep / "1" / "run_config.yaml")
    cfg.trainer = {"strategy": "ddp", "devices": 2, "process_group_backend": "gloo"}  # another machine
    OmegaConf.save(cfg, sweep / "1" / "run_config.yaml")
    settings = {r["run"]: r["setting"] for r in collect_runs(sweep)}
    assert settings["1"] == settings["2"] == "" and settings["1-cpsample"] == ""
    for job, root in (("1", "/data/camelyon17"), ("2", "/data/chestxray")):
        OmegaConf.save(OmegaConf.merge(OmegaConf.load(sweep / job / "run_config.yaml"),
                                       {"data": {"name": "imagefolder", "root": root}}), sweep / job / "run_config.yaml")
    settings = {r["run"]: r["setting"] for r in collect_runs(sweep)}
    assert settings["1"] == "data.root=/data/camelyon17" and settings["2"] == "data.root=/data/chestxray"
    for job in ("1", "2"):
        OmegaConf.save(OmegaConf.merge(OmegaConf.load(sweep / job / "run_config.yaml"),
                                       {"data": {"name": "mnist", "root": f"/mnt/{job}/mnist"}}),
                       sweep / job / "run_config.yaml")
    OmegaConf.save({"downstream": {"epochs": 30}}, sweep / "2" / "evaluate_config.yaml")  # as older dpgen versions saved it
    settings = {r["run"]: r["setting"] for r in collect_runs(sweep)}
    assert settings["1"] == "eval.downstream.epochs=–" and settings["2"] == "eval.downstream.epochs=30"
    OmegaConf.save({"eval": {"downstream": {"epochs": 30}}, "audit": {"mia": {"max_examples": 50}}},
                   sweep / "2" / "evaluate_config.yaml")
    settings = {r["run"]: r["setting"] for r in collect_runs(sweep)}
    assert settings["2"] == "audit.mia.max_examples=50, eval.downstream.epochs=30"
