"""Every config option composes; bad input ends with one line naming the key and the fix,
before any work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, ROOT, compose_config, tiny_dpldm_overrides, tiny_overrides
from omegaconf import OmegaConf

from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.pipeline import run_pipeline

# Groups added with `+group=option` (global packages, not in the defaults list) have their own
# tests: experiment in test_experiments.py, tune in test_scale.py. conf/benchmark/ holds the
# profiles of `python -m dpgen.benchmark`, not run options (test_benchmark.py composes their runs).
ADDED_GROUPS = {"experiment", "tune"}
NOT_RUN_GROUPS = {"benchmark"}
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ADDED_GROUPS | NOT_RUN_GROUPS)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    # Drop the tiny overrides of the group under test (paths stay: ${hydra:runtime.cwd} only
    # resolves under the real entry point, which test_cli_* covers).
    prefixes = (f"{group}=",) if group == "paths" else (f"{group}=", f"{group}.")
    # Latent models and the latent method only go together.
    latent = (group, option) == ("method", "dpldm") or (group == "model" and option.startswith("ldm"))
    base = [o for o in (tiny_dpldm_overrides if latent else tiny_overrides)(tmp_path) if not o.startswith(prefixes)]
    extra = ["method.pretrain=none"] if (group, option) == ("public", "none") else []
    cfg = compose_config([*base, f"{group}={option}", *extra])
    assert cfg[group] is not None
    if group not in ("data",):  # local-root datasets need files; their validation is tested below
        validate_config(cfg)


def test_defaults_are_the_embedded_private_run(tmp_path):
    cfg = compose_config([f"paths.cache_dir={tmp_path}", f"paths.data_root={tmp_path}"])
    assert cfg.method.name == "dpdm" and cfg.method.pretrain == "public"
    assert cfg.privacy.eps == 10 and cfg.data.name == "mnist5k" and cfg.privacy.accountant == "pld"


@pytest.mark.parametrize("override,key", [
    ("privacy.eps=0", "privacy.eps"),
    ("privacy.eps=-1", "privacy.eps"),
    ("privacy.clip=0", "privacy.clip"),
    ("privacy.accountant=moments", "privacy.accountant"),
    ("method.train.steps=-5", "method.train.steps"),
    ("method.multiplicity=0", "method.multiplicity"),
    ("data.image_size=10", "data.image_size"),
    ("data.name=imagenet1k", "data.name"),
    ("eval.fid.metrics=[fid,lpips]", "eval.fid.metrics"),
    ("eval.fid.weights_path=/nonexistent/inception.pth", "eval.fid.weights_path"),
    ("eval.downstream.classifiers=[cnn,vit]", "eval.downstream.classifiers"),
    ("eval.downstream.val_fraction=0", "eval.downstream.val_fraction"),
    ("eval.num_samples=100000", "eval.num_samples"),
    ("privacy.log_train_loss=maybe", "privacy.log_train_loss"),
    ("privacy.log_every_n_steps=abc", "privacy.log_every_n_steps"),  # failed when the DP stage started
    ("privacy.log_every_n_steps=0", "privacy.log_every_n_steps"),
    ("trainer.precision=16-mixed", "trainer.precision"),
    ("trainer.precision=bf16-true", "trainer.precision"),
    (("trainer.precision=bf16-mixed", "privacy.clipping=ghost"), "privacy.clipping"),
    # Values that compare but are no numbers, or no finite ones (found by the input review):
    ("privacy.eps=abc", "privacy.eps"),
    ("privacy.eps=true", "privacy.eps"),     # ran at eps=1
    ("privacy.delta=abc", "privacy.delta"),
    ("privacy.clip=inf", "privacy.clip"),    # noise sigma*C infinite beside a stated eps
    ("privacy.clip=nan", "privacy.clip"),
    ("method.train.lr=0", "method.train.lr"),   # spends the budget on a model that never moves
    ("method.train.lr=abc", "method.train.lr"),  # failed only when dp_train started
    ("method.pretrain_public.lr=-1", "method.pretrain_public.lr"),
    ("method.ema_decay=1.5", "method.ema_decay"),
    ("method.label_dropout=1.5", "method.label_dropout"),
    ("method.hflip=maybe", "method.hflip"),
    ("sample.guidance_scale=abc", "sample.guidance_scale"),  # failed after dp_train had spent eps
    ("sample.guidance_scale=-1", "sample.guidance_scale"),
    (("method.label_dropout=0", "sample.guidance_scale=3"), "sample.guidance_scale"),
    ("diffusion.num_train_timesteps=0", "diffusion.num_train_timesteps"),  # was blamed on audit.*
    ("diffusion.beta_schedule=cosine", "diffusion.beta_schedule"),  # was diffusers' NotImplementedError
    # DDPM has it, DDIM and DPM-Solver++ do not: the run trained, spent ε, then failed to sample.
    ("diffusion.beta_schedule=sigmoid", "diffusion.beta_schedule"),
    ("method.timesteps.kind=foo", "method.timesteps.kind"),  # was blamed on the model
    # A bool is an int to Python: these ran as K=1, q=1 and one device.
    ("method.multiplicity=true", "method.multiplicity"),
    ("method.train.steps=true", "method.train.steps"),
    ("trainer.devices=true", "trainer.devices"),
    (("method=feta", "method.central.sample_rate=true"), "method.central.sample_rate"),
    (("method=feta", "method.central.class_proportions=[1,abc]"), "method.central.class_proportions"),
    (("method=privimage", "public=glyphs", "method.query_sigma=true"), "method.query_sigma"),
    # Found by a probe at stop 31: each was accepted, then failed (or did something else) after
    # the DP stages had spent the budget.
    ("sample.steps=1001", "sample.steps"),  # DDIM refuses more steps than training timesteps
    (("logger.sample_every_n_steps=2", "logger.grid_steps=1001"), "logger.grid_steps"),  # mid-dp_train
    ("seed=1.5", "seed"),  # Lightning trained with seed 1; sample's manual_seed refused 1.5
    ("seed=4294967296", "seed"),
    ("sampling.stages=[evaluate]", "sampling.stages"),  # evaluate before sample
    ("sampling.stages=[train]", "sampling.stages"),  # trained without privacy after spending ε
    (("sampling=cpsample", "sampling.stages=[]"), "sampling.stages"),  # no protection classifier to load
    ("sample.num_samples=2", "sample.num_samples"),  # precision/recall's k-th neighbour
    (("sample.num_samples=8", "eval.num_samples=1"), "eval.num_samples"),  # FID of one image
    ("audit.replication.pairs=0", "audit.replication.pairs"),
    (("method=feta", "method.warmup.augment.scale=[1.0]"), "method.warmup.augment.scale"),
    (("method=feta", "method.warmup.augment.degrees=abc"), "method.warmup.augment.degrees"),
    (("method=feta", "method.warmup.curriculum=[{steps:2,blurr:1.5}]"), "method.warmup.curriculum[0].blurr"),
    ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps"),  # silently no checkpoints
    ("trainer.log_every_n_steps=abc", "trainer.log_every_n_steps"),
    (("method=privimage", "public=glyphs", "method.query_classifier.num_threads=0"),
     "method.query_classifier.num_threads"),
    (("logger=wandb", "logger.tags=[[a]]"), "logger.tags"),
    # Refused before, but as a traceback from building the model inside validation.
    ("method.timesteps.intervals=[[0,2000,1]]", "method.timesteps.intervals"),
    ("diffusion.num_train_timesteps=10", "method.timesteps.intervals"),  # the default mixture spans 1000
    (("method.timesteps.kind=lognormal", "method.timesteps.p_std=-1"), "method.timesteps.p_std"),
])
def test_bad_config_is_refused_with_key_and_fix(tiny_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        overrides = (override,) if isinstance(override, str) else override
        validate_config(tiny_cfg("model=unet_small", *overrides))
    message = str(err.value)
    assert message.startswith(key) and "Fix:" in message and "\n" not in message


@pytest.mark.parametrize("overrides,reason", [
    (("method=privimage", "public=glyphs", "method.pretrain=public"), "privimage pretrains on the public selection"),
    (("model=ldm_tiny", "privacy.eps=-1"), "method dpdm denoises pixels, not latents"),
])
def test_a_method_setting_is_refused_with_the_methods_own_reason_first(tiny_cfg, overrides, reason):
    """The method's checks run before the generic ones that its wrong settings also trip (a
    generic "drop the selection stages" would only lead to the method's refusal next time)."""
    with pytest.raises(ConfigError, match=reason):
        validate_config(tiny_cfg(*overrides))


def test_delta_at_least_one_over_n_is_refused_before_any_stage(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"privacy\.delta.*1/N"):
        run_pipeline(tiny_cfg("privacy.delta=0.001"), tmp_path / "run")
    assert not (tmp_path / "run" / "stages.json").exists()


def test_unreachable_budget_is_refused_before_any_stage(tiny_cfg, tmp_path):
    from dpgen.errors import BudgetError

    with pytest.raises(BudgetError):
        # (0, delta)-DP is reachable with PLD at huge sigma, but not under RDP below sigma=1e4.
        run_pipeline(tiny_cfg("privacy.eps=1e-6", "privacy.accountant=rdp"), tmp_path / "run")
    assert not (tmp_path / "run" / "stages.json").exists()


@pytest.mark.parametrize("norm", ["trainable", "frozen", "affine_free", "instance_tracking"])
def test_batchnorm_is_refused_under_dp(tiny_cfg, norm):
    """Frozen or affine-free, a BatchNorm still mixes the examples of a batch in training mode
    and saves their running statistics un-noised (Opacus's validator checks trainable ones only)."""
    from dp_helpers import TinyDPModule, make_batch, one_dp_step

    from dpgen.privacy.strategy import DPSGDConfig

    module = TinyDPModule(1)
    layer = {"trainable": torch.nn.BatchNorm2d(4), "frozen": torch.nn.BatchNorm2d(4).requires_grad_(False),
             "affine_free": torch.nn.BatchNorm2d(4, affine=False),
             "instance_tracking": torch.nn.InstanceNorm2d(4, track_running_stats=True)}[norm]
    module.net.norm = layer
    cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, dataset_size=40)
    with pytest.raises(ValueError, match="BatchNorm|InstanceNorm"):
        one_dp_step(module, make_batch(4), cfg)


# -- the command line, as users run it ------------------------------------------------------
def _cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPGEN_CACHE_DIR": str(tmp / "cache"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "dpgen", *args, f"hydra.run.dir={tmp / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_cfg_job_and_help(tmp_path):
    out = _cli("--cfg", "job", "privacy.eps=1", tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "eps: 1" in out.stdout and "name: dpdm" in out.stdout
    helped = _cli("--help", tmp=tmp_path)
    assert helped.returncode == 0 and "method: dpdm, dpldm, feta, feta_privimage, nonprivate, privimage" in helped.stdout


@pytest.mark.parametrize("override,key", [
    ("data.name=svhn", "data.name"),
    ("data=cifar10", "data.root"),
    ("method.train.steps=-1", "method.train.steps"),
    ("data.image_size=18", "data.image_size"),
    ("+privacy.epss=1", "privacy.epss"),  # Hydra suggests the '+' for a mistyped key; the run would ignore it
    ("+resume=/nonexistent/dpgen-run", "resume"),  # a mistyped path would start a new run there
    ("trainer.accelerator=gpuu", "trainer.accelerator"),  # trained on the CPU without a word
    ("public=none", "public"),  # dpdm pretrains on public data: refused only at that stage, after planning
])
def test_cli_validation_error_is_one_line(override, key, tmp_path):
    extra = [f"data.root={tmp_path / 'missing'}"] if override == "data=cifar10" else []
    out = _cli(override, *extra, tmp=tmp_path)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dpgen: {key}=") and "Fix:" in last, out.stderr[-2000:]
    assert not (tmp_path / "run" / "stages.json").exists()


@pytest.mark.parametrize("command, refusal", [
    (["dpgen", "privacy.eps=-1"], "dpgen: privacy.eps=-1: must be a number > 0"),
    (["dpgen.audit", "privacy.eps=-1"], "dpgen.audit: privacy.eps=-1: must be a number > 0"),
    (["dpgen.sampling", "{tmp}/no-run"], "dpgen.sampling: {tmp}/no-run: not a dpgen run"),
    (["dpgen.evaluate", "{tmp}/no-run"], "dpgen.evaluate: run_dir='{tmp}/no-run': is not a dpgen run"),
    (["dpgen.release", "{tmp}/no-run", "--num-samples", "5", "--format", "npz", "--out", "{tmp}/out"],
     "dpgen.release: {tmp}/no-run: not a dpgen run"),
    (["dpgen.benchmark", "--profile", "nope"], "dpgen.benchmark: --profile='nope': no such profile"),
])
def test_a_refusal_does_not_wait_for_the_training_libraries(tmp_path, command, refusal):
    """Validation imports only what it checks with: a refused config (for ``dpgen``, one that
    passes every check before the privacy group's, which comes last but for the method's own) or
    run directory ends before Lightning, diffusers, Opacus, dp-accounting or torchvision are
    imported (seconds each)."""
    env = {**os.environ, "DPGEN_CACHE_DIR": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"}
    args = [a.format(tmp=tmp_path) for a in command]
    if "=" in args[-1]:  # the Hydra commands: keep their run directory out of the checkout
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and refusal.format(tmp=tmp_path) in out.stderr, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "dpgen.errors" in imported  # the probe sees dpgen's own imports
    assert not imported & {"lightning", "diffusers", "opacus", "dp_accounting", "torchvision", "torch_fidelity",
                            "matplotlib"}


def test_the_tools_progress_lines_survive_opacus_setting_up_logging_first():
    """Opacus calls logging.basicConfig on import; the tools' INFO lines used to vanish after it."""
    code = ("import logging, opacus.utils.module_utils\n"
            "from dpgen.cli import log_info_to_stderr\n"
            "log_info_to_stderr()\n"
            "logging.getLogger('dpgen.release').info('release: 2 samples')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "release: 2 samples" in out.stderr, out.stderr[-2000:]


def test_method_and_data_names_are_those_of_their_registries():
    """Validation checks names against lists that do not import the modules; a name missing from
    a list would be refused, one missing from a registry would fail after the config was accepted."""
    from dpgen.data.registry import DATA_NAMES, data_spec
    from dpgen.methods import METHOD_NAMES
    from dpgen.methods.registry import METHODS

    assert sorted(METHOD_NAMES) == sorted(METHODS)
    assert [data_spec(name).name for name in DATA_NAMES] == list(DATA_NAMES)
    assert set(DATA_NAMES) == {OmegaConf.load(p).name for p in (CONF / "data").glob("*.yaml")}


def test_each_attempt_in_a_run_directory_keeps_its_own_hydra_record(tmp_path):
    """A refused resume must not overwrite the overrides the run was started with."""
    import time

    for eps in ("abc", "-1"):
        assert _cli(f"privacy.eps={eps}", tmp=tmp_path).returncode != 0
        time.sleep(1.1)  # the records are named by the second
    records = sorted((tmp_path / "run" / ".hydra").iterdir())
    assert [(r / "overrides.yaml").read_text().split("privacy.eps=")[1].split("\n")[0] for r in records] == ["abc", "-1"]


def test_launch_mistakes_that_would_train_in_the_wrong_place_are_refused(tmp_path):
    """A cluster launcher without -m trains here (a login node); +resume beside another
    hydra.run.dir starts a new run there that only records ``resume``."""
    out = _cli("hydra/launcher=slurm_local", tmp=tmp_path)
    assert out.returncode != 0 and "dpgen: hydra/launcher='slurm_local': a launcher starts the jobs of a sweep" in \
        out.stderr, out.stderr[-2000:]
    old = tmp_path / "old"
    old.mkdir()
    (old / "run_config.yaml").write_text("seed: 0\n")
    out = _cli(f"+resume={old}", tmp=tmp_path)  # _cli sets hydra.run.dir to tmp/run
    assert out.returncode != 0 and "names another directory than hydra.run.dir" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run" / "run_config.yaml").exists()
    out = _cli("-m", f"+resume={old}", f"hydra.sweep.dir={tmp_path / 'sweep'}", tmp=tmp_path)
    assert out.returncode != 0 and "a sweep's jobs run in the sweep's own directories" in out.stderr, \
        out.stderr[-2000:]
    assert not (tmp_path / "sweep" / "0" / "run_config.yaml").exists()


@pytest.mark.parametrize("varied", ["trainer.devices=1,2", "trainer.accelerator=cpu,gpu"])
def test_a_cluster_sweep_over_the_job_geometry_is_refused_before_any_job(tmp_path, varied):
    """submitit resolves tasks_per_node=${trainer.devices} once: every job would get the first
    job's processes and all but that one be refused after their start (found by the ops review).
    Likewise gpus_per_node, from trainer.accelerator: a GPU job would get a CPU job's request."""
    out = _cli("-m", "hydra/launcher=slurm_local", "trainer=ddp_cpu", varied,
               f"hydra.sweep.dir={tmp_path / 'sweep'}", tmp=tmp_path)
    key = varied.split("=")[0]
    assert out.returncode != 0 and f"dpgen: {key} varies across the sweep" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())


def test_a_config_error_survives_the_pickling_a_cluster_launcher_does():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("privacy.eps", "abc", "must be a number", "set it")))
    assert isinstance(err, ConfigError) and err.key == "privacy.eps"
    assert str(err) == "privacy.eps='abc': must be a number. Fix: set it"


def test_a_run_asking_for_more_gpus_than_the_machine_has_is_refused_before_work(monkeypatch):
    """Validation passes (a config may be composed here to run elsewhere); the run's start refuses
    instead of failing at its first GPU stage after the privacy plan and public pretraining."""
    from dpgen.distributed import check_devices_present

    gpu = OmegaConf.create({"accelerator": "gpu", "devices": 2})
    for present in (0, 1):
        monkeypatch.setattr(torch.cuda, "device_count", lambda present=present: present)
        with pytest.raises(ConfigError, match=f"2 CUDA device\\(s\\) asked for, this machine has {present}"):
            check_devices_present(gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_devices_present(gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_devices_present(OmegaConf.create({"accelerator": "cpu", "devices": 2}))


@pytest.mark.parametrize(("sweep", "refusal"), [
    ("privacy.eps=1,abc", "dpgen: sweep job 1 (privacy.eps=abc): privacy.eps='abc'"),
    # A mistyped added key is ignored by every job, which a single run refuses; so must the sweep.
    ("+privacy.epss=1,2", "dpgen: sweep job 0 (+privacy.epss=1): privacy.epss='1': no dpgen config defines"),
])
def test_a_local_sweep_with_one_bad_value_starts_no_job(tmp_path, sweep, refusal):
    """Each job validates itself as it starts, so job 1's bad value would surface only after
    job 0's whole run; the sweep checks every job's config first (dpgen/sweep.py)."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("paths.")]
    env = {**os.environ, "DPGEN_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "dpgen", "-m", sweep, *overrides,
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(refusal)
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_cli_multirun_over_epsilon(tmp_path):
    """`python -m dpgen -m privacy.eps=...` runs one job per value, each with its own ledger. A
    job refused by its privacy plan fails alone: the others run, the report covers them, and the
    sweep exits non-zero."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("paths.")]
    env = {**os.environ, "DPGEN_CACHE_DIR": str(tmp_path / "cache")}
    # eps=1e-9 passes validation; its privacy plan (which needs N) cannot be met under RDP.
    out = subprocess.run(
        [sys.executable, "-m", "dpgen", "-m", "privacy.eps=2,1e-9,8", "privacy.accountant=rdp", *overrides,
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "privacy.eps=1e-09 cannot be met" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "sweep" / "1" / "privacy.json").exists()
    spent = {}
    for job in ("0", "2"):
        privacy = json.loads((tmp_path / "sweep" / job / "privacy.json").read_text())
        spent[privacy["epsilon_target"]] = privacy["epsilon_spent"]
        assert (tmp_path / "sweep" / job / "metrics.json").exists()
        # Hydra's own layout holds the accepted attempt's record (DESIGN.md: `.hydra/`).
        assert "privacy.eps=" in (tmp_path / "sweep" / job / ".hydra" / "overrides.yaml").read_text()
    assert not (tmp_path / "sweep" / "1" / ".hydra" / "config.yaml").exists()  # refused by its plan
    assert list((tmp_path / "sweep" / "1" / ".hydra").glob("*/config.yaml"))  # its attempt's own record
    assert set(spent) == {2.0, 8.0} and spent[2.0] <= 2.0 < spent[8.0] <= 8.0
    # The sweep ends with its report (SweepReport, a Hydra callback).
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert report.count("| dpdm |") == 2
    for name in ("report.csv", "accuracy_vs_epsilon.png", "fid_vs_epsilon.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0, name


def test_a_mistyped_resume_path_is_refused_before_hydra_creates_it(tmp_path):
    """hydra.run.dir follows +resume: Hydra would create the mistyped directory before the run's check."""
    typo = tmp_path / "outputs" / "10-00-0"
    env = {**os.environ, "DPGEN_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "dpgen", f"+resume={typo}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith("dpgen: resume="), out.stderr[-2000:]
    assert not typo.exists() and not (tmp_path / "outputs").exists()
    out = subprocess.run([sys.executable, "-m", "dpgen.audit", f"+resume={typo}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith("dpgen.audit: resume="), \
        out.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()


def test_the_resume_pre_check_reads_the_path_as_hydra_does(tmp_path):
    """Quoting, escapes and interpolations are Hydra's to read: the pre-check must not refuse a path Hydra accepts."""
    from dpgen.config import refuse_missing_resume

    run = tmp_path / "a b,c"
    run.mkdir()
    (run / "run_config.yaml").write_text("seed: 0\n")
    for argv in ([f"+resume='{run}'"], [f"+resume={tmp_path}/a\\ b\\,c"], ["+resume=${oc.env:HOME}/x"],
                 [f"+resume={tmp_path}/typo", "--cfg", "job"]):
        refuse_missing_resume(argv, "dpgen")
    with pytest.raises(SystemExit, match="dpgen: resume=.*no run_config.yaml"):
        refuse_missing_resume([f"+resume='{tmp_path}/a b'"], "dpgen")
    # an attempt killed before its first stage (after its plan wrote privacy.json) starts afresh there
    stopped = tmp_path / "stopped"
    (stopped / ".hydra").mkdir(parents=True)
    (stopped / "privacy.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"stopped before its first stage.*hydra.run.dir={stopped}"):
        refuse_missing_resume([f"+resume={stopped}"], "dpgen")
    # a folder of runs (a date's) is no attempt: not advised as a place to start one
    (tmp_path / "date" / "10-00-00").mkdir(parents=True)
    with pytest.raises(SystemExit, match="is not a dpgen run directory"):
        refuse_missing_resume([f"+resume={tmp_path / 'date'}"], "dpgen")
