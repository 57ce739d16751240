"""make benchmark-table (dpgen/benchmark.py): same training seconds per method, table into README."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, compose_config, tiny_dpldm_overrides, tiny_overrides
from omegaconf import OmegaConf

from dpgen.benchmark import (
    TrainingStep,
    compose_run_config,
    load_profile,
    main,
    method_overrides,
    replace_between_markers,
    sweep_commands,
)
from dpgen.privacy.guarantee import has_formal_guarantee


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_every_run_of_the_shipped_profiles_composes_and_validates(name):
    profile = load_profile(name)
    for method in [profile.ceiling, *profile.methods]:
        cfg = compose_run_config(method_overrides(profile, method))
        assert cfg.method.name == method
        assert has_formal_guarantee(cfg) == (method != profile.ceiling)


@pytest.mark.parametrize("method", ["nonprivate", "dpdm", "dpldm", "privimage", "feta"])
def test_every_method_training_step_can_be_timed(method, tmp_path):
    """The calibration step gets the inputs the method trains on (DP-LDM: latents)."""
    overrides = tiny_dpldm_overrides(tmp_path) if method == "dpldm" else [*tiny_overrides(tmp_path), f"method={method}"]
    seconds = TrainingStep(compose_config(overrides), torch.device("cpu")).median_seconds(warmup=0, repeats=1)
    assert 0 < seconds < 60


def test_the_step_is_timed_at_the_precision_the_run_trains_at(tmp_path):
    """The GPU profile trains in bf16-mixed; steps bought from an fp32 timing would not fit its budget."""
    steps = {p: TrainingStep(compose_config([*tiny_overrides(tmp_path), f"trainer.precision={p}"]), torch.device("cpu"))
             for p in ("32-true", "bf16-mixed")}
    assert not steps["32-true"].pair.autocast and steps["bf16-mixed"].pair.autocast
    assert steps["32-true"].signature != steps["bf16-mixed"].signature


def test_calibration_times_training_chunks_and_each_distinct_step_once():
    """dpdm, PrivImage and DP-FETA run one computation and share one timing; DP-LDM's
    attention-only step on latents and the ceiling's plain step are timed apart; the DP step
    is split into privacy.max_physical_batch chunks, as training splits it."""
    profile = load_profile("cpu")
    cfgs = {m: compose_run_config(method_overrides(profile, m)) for m in [profile.ceiling, *profile.methods]}
    steps = {m: TrainingStep(cfg, torch.device("cpu")) for m, cfg in cfgs.items()}
    signatures = {m: s.signature for m, s in steps.items()}
    assert signatures["dpdm"] == signatures["privimage"] == signatures["feta"]
    assert len({signatures["dpdm"], signatures["dpldm"], signatures["nonprivate"]}) == 3
    dpldm = cfgs["dpldm"]
    assert steps["dpldm"].pair.config.max_physical_batch == dpldm.privacy.max_physical_batch < dpldm.method.train.batch_size
    assert steps["nonprivate"].pair.config.max_physical_batch == cfgs["nonprivate"].method.train.batch_size


def test_commands_give_each_method_its_calibrated_steps_and_one_sweep_dir(tmp_path):
    profile = load_profile("cpu")
    calibration = {m: {"steps": 100 + i, "step_s": 1.0} for i, m in enumerate([profile.ceiling, *profile.methods])}
    commands = sweep_commands(profile, calibration, tmp_path)
    assert [c[4] for c in commands] == [f"method={m}" for m in calibration]  # ceiling first
    for command, (method, cal) in zip(commands, calibration.items()):
        assert command[1:4] == ["-m", "dpgen", "-m"]
        assert f"method.train.steps={cal['steps']}" in command
        assert f"hydra.sweep.dir={tmp_path}" in command
        assert ("privacy.eps=1,10" in command) == (method != profile.ceiling)


def test_markers_are_required_and_only_their_content_changes():
    text = "intro\n<!-- benchmark:cpu:start -->\nold\n<!-- benchmark:cpu:end -->\nrest\n"
    assert replace_between_markers(text, "cpu", "new") == (
        "intro\n<!-- benchmark:cpu:start -->\nnew\n<!-- benchmark:cpu:end -->\nrest\n")
    with pytest.raises(SystemExit, match="markers"):
        replace_between_markers(text, "gpu", "new")


@pytest.mark.slow
def test_benchmark_table_end_to_end(tmp_path, monkeypatch):
    """A tiny profile: the ceiling and dpdm at two ε, each run with the steps its budget bought,
    the report and the README table filled from the runs' own files."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("method.train.steps")]
    profile = {"name": "tiny", "device": "cpu", "budget_s": 0.5, "min_steps": 2,
               "calibration": {"warmup": 1, "repeats": 1}, "eps": [1, 10], "methods": ["dpdm"],
               "ceiling": "nonprivate", "overrides": overrides, "method_overrides": {}}
    OmegaConf.save(OmegaConf.create(profile), tmp_path / "tiny.yaml")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- benchmark:tiny:start -->\n<!-- benchmark:tiny:end -->\nend\n")
    sweep = tmp_path / "sweep"
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(["--profile", str(tmp_path / "tiny.yaml"), "--sweep-dir", str(sweep), "--readme", str(readme)])

    calibration = json.loads((sweep / "calibration.json").read_text())["methods"]
    runs = {p.name for p in sweep.iterdir() if (p / "metrics.json").exists()}
    assert runs == {"nonprivate", "dpdm_eps1", "dpdm_eps10"}
    for run in runs:
        method = run.split("_")[0]  # nonprivate, dpdm
        cfg = OmegaConf.load(sweep / run / "run_config.yaml")
        assert cfg.method.train.steps == calibration[method]["steps"] >= 2
    assert json.loads((sweep / "dpdm_eps1" / "privacy.json").read_text())["epsilon_spent"] <= 1.0
    assert (sweep / "report.md").exists() and (sweep / "accuracy_vs_epsilon.png").exists()
    table = readme.read_text()
    assert table.startswith("# x\n<!-- benchmark:tiny:start -->\nCommand: `make benchmark-table")
    assert table.endswith("<!-- benchmark:tiny:end -->\nend\n")
    rows = [line for line in table.splitlines() if line.startswith("| nonprivate") or line.startswith("| dpdm")]
    assert len(rows) == 3 and all(r.endswith(" s |") for r in rows)
    # The plots are committed beside README (the sweep directory is not) and shown in the table.
    for name in ("accuracy_vs_epsilon.png", "fid_vs_epsilon.png"):
        assert (tmp_path / "docs" / "benchmark" / "tiny" / name).read_bytes() == (sweep / name).read_bytes()
        assert f"](docs/benchmark/tiny/{name})" in table
