"""make benchmark-table (dpgen/benchmark.py): same training seconds per method, table into README."""

from __future__ import annotations

import json
import re
import subprocess
import sys

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
from dpgen.benchmark_checks import check_profile
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


def _tiny_profile(tmp_path, **changes):
    """A profile of tiny runs (the ceiling and dpdm at two ε) as a file, with a README that has its
    markers; ``changes`` replace keys (None drops one)."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("method.train.steps")]
    profile = {"name": "tiny", "device": "cpu", "budget_s": 0.5, "min_steps": 2,
               "calibration": {"warmup": 1, "repeats": 1}, "eps": [1, 10], "methods": ["dpdm"],
               "ceiling": "nonprivate", "overrides": overrides, "method_overrides": {}}
    profile.update(changes)
    path = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create({k: v for k, v in profile.items() if v is not None}), path)
    (tmp_path / "README.md").write_text("# x\n<!-- benchmark:tiny:start -->\n<!-- benchmark:tiny:end -->\nend\n")
    return path


@pytest.fixture
def nothing_is_timed(monkeypatch):
    """Fails a test that gets as far as timing a step: every check must come before."""
    import dpgen.benchmark as benchmark

    monkeypatch.setattr(benchmark, "calibrate", lambda profile: pytest.fail("calibrated"))


@pytest.mark.parametrize("changes, message", [
    ({"eps": "1"}, "eps='1': must be a non-empty list of numbers"),
    ({"eps": []}, "eps=[]: must be a non-empty list of numbers"),
    ({"eps": [1, 1.0]}, "lists an ε twice"),
    ({"methods": ["dpdm", "nope"]}, "'nope' is no method"),
    ({"methods": ["dpdm", "nonprivate"]}, "lists the ceiling 'nonprivate'"),
    ({"ceiling": None}, "ceiling=None: is missing"),
    ({"calibration": {"warmup": 0, "repeats": 0}}, "calibration.repeats=0: must be an integer >= 1"),
    ({"calibration": {"warmup": 0}}, "calibration={'warmup': 0}: must set exactly warmup and repeats"),
    ({"budget_s": "fast"}, "budget_s='fast': must be a number of seconds > 0"),
    ({"min_steps": 0}, "min_steps=0: must be an integer >= 1"),
    ({"name": "a/b"}, "name='a/b'"),
    ({"device": "gpu"}, "device='gpu': unknown device"),
    ({"method_overrides": {"dpdmm": []}}, "method_overrides.dpdmm=[]: is for a method the profile does not run"),
    ({"method_overrides": {"dpdm": "model=unet_tiny"}}, "method_overrides.dpdm='model=unet_tiny': must be a list"),
    ({"budget": 10}, "budget=10: is no profile key"),
])
def test_a_profile_with_a_bad_key_is_refused_when_loaded(tmp_path, changes, message):
    path = _tiny_profile(tmp_path, **changes)
    with pytest.raises(SystemExit, match=rf"^dpgen\.benchmark: profile {re.escape(str(path))}: .*{re.escape(message)}.*\. Fix: "):
        load_profile(str(path))


def test_a_profile_may_leave_out_its_overrides():
    profile = load_profile(str(ROOT / "conf" / "benchmark" / "cpu.yaml"))
    bare = {k: v for k, v in OmegaConf.to_container(profile).items() if k not in ("overrides", "method_overrides")}
    assert method_overrides(OmegaConf.create(check_profile(bare)), "dpdm") == ["method=dpdm"]


@pytest.mark.parametrize("changes, message", [
    ({"eps": [1, -1]}, "run dpdm at ε=-1: privacy.eps=-1: must be a number > 0"),
    ({"method_overrides": {"dpdm": ["model=nope"]}}, "run dpdm at ε=1: model='nope': no such option"),
    ({"method_overrides": {"dpdm": ["method.train.batch_size=0"]}}, "method.train.batch_size=0: must be >= 1"),
    ({"method_overrides": {"nonprivate": ["+privacy.epss=1"]}}, "run the ceiling nonprivate: privacy.epss='1'"),
    ({"ceiling": "dpdm", "methods": ["privimage"]}, "ceiling='dpdm': trains with DP"),
])
def test_every_run_of_the_sweeps_is_validated_before_a_step_is_timed(tmp_path, nothing_is_timed, changes, message):
    """The dry run too: a bad ε used to be found by the multirun of its method, after the ceiling's had trained."""
    path = _tiny_profile(tmp_path, **changes)
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["--profile", str(path), "--readme", str(tmp_path / "README.md"), "--dry-run"])


@pytest.mark.parametrize("readme, message", [
    ("missing.md", "no such file"),
    ("other.md", "has no <!-- benchmark:tiny:start --> ... <!-- benchmark:tiny:end --> markers"),
    ("reversed.md", "markers (in that order)"),
])
def test_the_readme_is_checked_before_a_step_is_timed(tmp_path, nothing_is_timed, readme, message):
    """The table goes in after every sweep has run; the plots must not be copied beside a README without it."""
    path = _tiny_profile(tmp_path)
    (tmp_path / "other.md").write_text("# x\n<!-- benchmark:cpu:start -->\n<!-- benchmark:cpu:end -->\n")
    (tmp_path / "reversed.md").write_text("<!-- benchmark:tiny:end -->\n<!-- benchmark:tiny:start -->\n")
    with pytest.raises(SystemExit, match=rf"^dpgen\.benchmark: --readme='{re.escape(str(tmp_path / readme))}': .*{re.escape(message)}"):
        main(["--profile", str(path), "--readme", str(tmp_path / readme), "--sweep-dir", str(tmp_path / "sweep")])
    assert not (tmp_path / "docs").exists() and not (tmp_path / "sweep").exists()


def test_a_sweep_dir_that_is_a_file_is_refused_before_a_step_is_timed(tmp_path, nothing_is_timed):
    path, taken = _tiny_profile(tmp_path), tmp_path / "sweep"
    taken.write_text("notes")
    with pytest.raises(SystemExit, match=rf"--sweep-dir='{re.escape(str(taken))}': is a file"):
        main(["--profile", str(path), "--readme", str(tmp_path / "README.md"), "--sweep-dir", str(taken)])
    assert taken.read_text() == "notes"


def test_a_refused_profile_does_not_wait_for_the_training_libraries(tmp_path):
    """Its ε is refused after composing each run, before any model is built (Lightning, diffusers, Opacus)."""
    path = _tiny_profile(tmp_path, eps=[-1])
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "dpgen.benchmark", "--profile", str(path),
                          "--readme", str(tmp_path / "README.md"), "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "dpgen.benchmark: run dpdm at ε=-1: privacy.eps=-1" in out.stderr, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "dpgen.config" in imported
    assert not imported & {"lightning", "diffusers", "opacus", "matplotlib"}


@pytest.mark.slow
def test_benchmark_table_end_to_end(tmp_path, monkeypatch):
    """A tiny profile: the ceiling and dpdm at two ε, each run with the steps its budget bought,
    the report and the README table filled from the runs' own files."""
    path, readme = _tiny_profile(tmp_path), tmp_path / "README.md"
    sweep = tmp_path / "sweep"
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(["--profile", str(path), "--sweep-dir", str(sweep), "--readme", str(readme)])

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
