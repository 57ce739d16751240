"""Sweeps and scale: DDP inside a Hydra multirun, SLURM/submitit launchers, cache locks.

The DDP and submitit tests start real processes (spawned ranks, submitit tasks) and are
marked slow; they still run in `make test`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, tiny_overrides

from dpgen.pipeline import RunContext
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.stages.planning import plan_privacy
from dpgen.stages.training import pretrain_cache_path, pretrain_public


def _dpgen(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dpgen", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def _small_run(tmp: Path) -> list[str]:
    """The tiny run without evaluation: the processes, not the metrics, are under test."""
    return [*tiny_overrides(tmp), "method.stages=[pretrain_public,dp_train,sample]"]


def _expected_ledger(tmp: Path) -> list[dict]:
    """The events a single process records for the tiny run: every planned step, once."""
    cfg = compose_config(_small_run(tmp))
    ctx = RunContext(cfg=cfg, run_dir=tmp / "plan")
    ctx.run_dir.mkdir()
    planned: PrivacyLedger = plan_privacy(ctx)
    (event,) = planned.planned
    return [{"stage": "dp_train", "mechanism": event.mechanism, "noise_multiplier": event.noise_multiplier,
             "sample_rate": event.sample_rate, "steps": event.count}]


@pytest.mark.slow
def test_ddp_cpu_inside_multirun_keeps_one_ledger(tmp_path):
    """`-m trainer=ddp_cpu,cpu`: the 2-process job spawns its ranks under Hydra's multirun
    (no re-launch of the sweep), writes every file once, and its ledger equals the
    single-process job's."""
    sweep = tmp_path / "sweep"
    out = _dpgen("-m", "trainer=ddp_cpu,cpu", *_small_run(tmp_path), f"hydra.sweep.dir={sweep}", tmp=tmp_path)
    logs = out.stdout + out.stderr
    assert "Starting with 2 processes" in logs  # job 0 really ran on two ranks
    assert logs.count("Launching 2 jobs locally") == 1  # ...and did not start the sweep again
    ddp, single = (json.loads((sweep / job / "privacy.json").read_text()) for job in ("0", "1"))
    assert ddp["events"] == single["events"] == _expected_ledger(tmp_path)
    assert ddp["epsilon_by_accountant"] == single["epsilon_by_accountant"]
    for job in ("0", "1"):
        for name in ("model.pt", "samples.npz", "checkpoints/last.ckpt", "stages.json"):
            assert (sweep / job / name).exists(), (job, name)
        assert sorted(p.name for p in (sweep / job).iterdir() if p.suffix == ".json") == ["privacy.json", "stages.json"]
    # Public pretraining ran in job 0 only; job 1 found it in the cache.
    assert logs.count("pretrain_public: cached") == 1 and logs.count("pretrain_public: reusing cached") == 1


def test_slurm_launcher_matches_trainer_geometry(tmp_path):
    """hydra/launcher=slurm asks SLURM for one task per device, on trainer.num_nodes nodes.
    (``--cfg all``: the launcher reads trainer.*, which ``--cfg hydra`` alone cannot resolve.)"""
    out = _dpgen("--cfg", "all", "--resolve", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                 "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", tmp=tmp_path)
    launcher = out.stdout.split("  launcher:\n", 1)[1]
    for line in ("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 "partition: gpu", "tasks_per_node: 4", "nodes: 2", "gpus_per_node: 4",
                 "name: dpgen", "max_num_timeout: 3"):  # a job at its time limit is requeued
        assert line in launcher, line
    # CPU jobs ask SLURM for no GPU (a GPU request would queue them on GPU nodes, or be refused).
    out = _dpgen("--cfg", "all", "--resolve", "hydra/launcher=slurm", "trainer=ddp_cpu", "trainer.devices=3",
                 tmp=tmp_path)
    launcher = out.stdout.split("  launcher:\n", 1)[1]
    assert "tasks_per_node: 3" in launcher and "gpus_per_node: 0" in launcher


@pytest.mark.slow
def test_submitit_local_job_runs_ddp_with_one_process_per_task(tmp_path):
    """hydra/launcher=slurm_local starts trainer.devices processes for the job, as srun would:
    both ranks train, rank 0 alone writes the run directory."""
    sweep = tmp_path / "sweep"
    _dpgen("-m", "hydra/launcher=slurm_local", "trainer=ddp_cpu", *_small_run(tmp_path),
           f"hydra.sweep.dir={sweep}", tmp=tmp_path)
    logs = {p.name: p.read_text() for p in sweep.glob(".submitit/*/*_log.*")}
    rank1 = next(text for name, text in logs.items() if name.endswith("_1_log.out"))
    assert "stage dp_train: rank 1 joins" in rank1 and "stage sample" not in rank1
    assert any("MEMBER: 2/2" in text for text in logs.values())
    privacy = json.loads((sweep / "0" / "privacy.json").read_text())
    assert privacy["events"] == _expected_ledger(tmp_path)
    assert (sweep / "0" / "samples.npz").exists() and (sweep / "0" / "model.pt").exists()


def test_concurrent_jobs_pretrain_once(tmp_path, caplog):
    """Two jobs that need the same public model at once: one trains it, the other waits for the
    cache lock and reuses the saved weights."""
    cfg = compose_config(tiny_overrides(tmp_path))
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def job(i: int) -> None:
        try:
            ctx = RunContext(cfg=cfg, run_dir=tmp_path / f"run{i}")
            start.wait()
            pretrain_public(ctx)
        except BaseException as err:  # surfaced below: a thread's exception would be lost
            errors.append(err)

    with caplog.at_level(logging.INFO, logger="dpgen"):
        threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("pretrain_public: cached") for m in messages) == 1
    assert sum(m.startswith("pretrain_public: reusing cached") for m in messages) == 1
    assert any("waiting for another job" in m for m in messages)
    assert pretrain_cache_path(cfg).exists()


def test_tune_config_selects_optuna_and_returns_the_objective(tmp_path, monkeypatch):
    """+tune=proxy puts Optuna in charge of the sweep, and a run returns its metric to it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import dpgen.__main__ as entry

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+tune=proxy"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert "method.train.lr" in cfg.hydra.sweeper.params
    (tmp_path / "metrics.json").write_text(json.dumps({"downstream_accuracy": {"mean": 0.875}}))
    assert entry.objective(cfg, tmp_path) == 0.875
    with open_dict(cfg):
        cfg.objective = None
    assert entry.objective(cfg, tmp_path) is None


def test_a_search_refuses_to_start_until_its_data_is_declared_a_proxy(tmp_path):
    """The objective is measured on data's held-out split; choosing among trials is uncharged."""
    import dpgen.__main__ as entry

    cfg = compose_config([*tiny_overrides(tmp_path), "+tune=proxy"])
    with pytest.raises(SystemExit, match="tune_data_is_proxy=False: a hyperparameter search selects on data=mnist5k"):
        entry.main(cfg)
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_a_search_refuses_an_objective_its_evaluation_does_not_write(tmp_path):
    """Found by a probe at stop 31: each trial ran in full, then failed reading the objective."""
    import dpgen.__main__ as entry
    from dpgen.errors import ConfigError
    from dpgen.eval import fidelity
    from dpgen.eval.config import METRIC_KEYS, check_objective

    cfg = compose_config([*tiny_overrides(tmp_path), "+tune=proxy", "tune_data_is_proxy=true",
                          "eval.downstream.classifiers=[]"])  # the default objective is downstream_accuracy.mean
    with pytest.raises(SystemExit, match="objective='downstream_accuracy.mean': is not a metric this evaluation"):
        entry.main(cfg)
    assert not (tmp_path / "cache").exists()  # refused before any work
    fid_only = compose_config([*tiny_overrides(tmp_path), "eval.fid.metrics=[fid]"]).eval
    check_objective("fid", fid_only)
    check_objective("train_wall_s", fid_only)
    with pytest.raises(ConfigError, match="objective='precision'"):
        check_objective("precision", fid_only)
    assert set().union(*METRIC_KEYS.values()) == set(fidelity._KEYS.values())  # what fidelity writes


def test_the_pretraining_cache_is_keyed_by_the_sensitive_class_names(tmp_path):
    """Public glyphs are labelled by matching the sensitive class names, so MNIST and
    FashionMNIST (10 classes each) need different pretrained UNets, and MNIST and its embedded
    5k subset (the same digit names) can share one."""
    from data_fixtures import make_mnist_root

    make_mnist_root(tmp_path, "MNIST")
    make_mnist_root(tmp_path, "FashionMNIST")
    base = [*tiny_overrides(tmp_path), "data.image_size=8"]
    path = {name: pretrain_cache_path(compose_config([*base, f"data={name}", f"data.root={tmp_path}"]))
            for name in ("mnist", "fashion_mnist")}
    path["mnist5k"] = pretrain_cache_path(compose_config([*base, "data=mnist5k"]))
    assert path["mnist"] != path["fashion_mnist"]
    assert path["mnist"] == path["mnist5k"]


@pytest.mark.parametrize("trainer", ["trainer=cpu", "trainer=ddp_cpu"])
def test_processes_started_by_a_launcher_must_match_a_ddp_geometry(trainer, tmp_path, monkeypatch):
    """torchrun/srun with two processes and no DDP would run two DP-SGDs on the sensitive data and
    charge one: refused before any work. With DDP over two devices it is the external launch mode."""
    from dpgen.config import validate_config
    from dpgen.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = compose_config([*tiny_overrides(tmp_path), trainer, *(["trainer.devices=2"] if "ddp" in trainer else [])])
    if "ddp" in trainer:
        validate_config(cfg)
    else:
        with pytest.raises(ConfigError, match="started 2 processes"):
            validate_config(cfg)


def test_a_seeded_poisson_sampler_is_refused_across_ranks():
    """A generator would be copied into every rank, which would all draw the same uniforms."""
    import torch

    from dpgen.privacy.poisson import PoissonBatchSampler

    PoissonBatchSampler(10, 0.5, 1, generator=torch.Generator().manual_seed(0))  # one process: fine
    with pytest.raises(ValueError, match="DDP ranks"):
        PoissonBatchSampler(10, 0.5, 1, rank=0, world_size=2, generator=torch.Generator().manual_seed(0))


def test_a_joining_rank_waits_for_rank_zeros_ledger(tmp_path):
    """A DP stage first in line has no earlier stage to wait for; rank 0's privacy.json may not exist yet."""
    from dpgen.io import write_json
    from dpgen.pipeline import _wait_for_rank_zero

    write_json(tmp_path / "stages.json", {"completed": [], "wall_s": {}})
    ledger = tmp_path / "privacy.json"
    writer = threading.Timer(0.3, lambda: write_json(ledger, {"events": []}))
    writer.start()
    _wait_for_rank_zero(tmp_path, [], since=1.0, poll_s=0.05, file=ledger)
    assert ledger.exists()
    writer.join()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_are_written_atomically_with_the_mode_open_would_give(umask, tmp_path):
    from dpgen.io import write_json

    saved = os.umask(umask)
    try:
        write_json(tmp_path / "metrics.json", {"fid": 1.0})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(saved)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"fid": 1.0}
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "plain"]  # no temporary file left


def test_a_cache_entry_built_after_a_killed_build_leaves_no_partial_file(tmp_path):
    """A killed build leaves atomic_write's temporary beside the entry; under the entry's lock the
    next build removes it, and leaves other entries' (perhaps being written) alone."""
    from dpgen.io import build_once, write_json

    killed, other = tmp_path / ".model.pt.k1.tmp", tmp_path / ".other.pt.k2.tmp"
    killed.write_bytes(b"partial"), other.write_bytes(b"in progress")
    build_once(tmp_path / "model.pt", "test", "entry", lambda: write_json(tmp_path / "model.pt", {}))
    assert (tmp_path / "model.pt").exists() and not killed.exists() and other.exists()


def test_one_process_of_a_multi_task_slurm_allocation_is_one_process(monkeypatch):
    """A batch script runs once in an allocation of several tasks; srun steps say their own count."""
    from dpgen.distributed import external_world

    for k in ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert external_world() == (0, 4)  # no step count: the job's, as Lightning reads it
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert external_world() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert external_world() == (0, 4)


def test_a_failure_before_any_stage_releases_the_waiting_ranks(tmp_path, monkeypatch):
    """Rank 0 failing in planning (or W&B) records it, so ranks waiting for it stop instead of
    polling until the job's time limit."""
    import time

    import dpgen.pipeline as pipeline

    def broken(ctx):
        raise RuntimeError("planning failed")

    monkeypatch.setattr(pipeline, "plan_privacy", broken)
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 of two, started by a launcher
    monkeypatch.setenv("RANK", "0")
    start = time.time()
    with pytest.raises(RuntimeError, match="planning failed"):
        pipeline.run_pipeline(compose_config(tiny_overrides(tmp_path)), tmp_path / "run")
    state = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert state["failed"] == "outside a stage" and state["failed_at"] >= start  # checked first: no hang
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        pipeline._wait_for_rank_zero(tmp_path / "run", ["pretrain_public"], since=start, poll_s=0.01)


def _torchrun_rank(monkeypatch, rank: int, port: str) -> None:
    """This process as one rank of a two-rank torchrun launch (its rendezvous at ``port``)."""
    for k in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RUN_ID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)


@pytest.mark.timeout(60)  # the failure this guards against is a wait without end
def test_a_refused_launch_stops_its_other_ranks(tiny_cfg, tmp_path, monkeypatch):
    """A second srun/torchrun on a running run directory: its rank 0 is refused the lock; its other
    ranks must stop too, not join the DP stage of the first launch's finished stages and files
    and wait there, for a rank 0 that never comes, until the process group times out."""
    import time

    from filelock import FileLock

    import dpgen.pipeline as pipeline
    from dpgen.distributed import launch_id
    from dpgen.errors import ConfigError
    from dpgen.io import write_json
    from dpgen.pipeline import (
        LAUNCH_HOLDING,
        LAUNCH_REFUSED,
        RUN_LOCK,
        _wait_for_rank_zero,
        run_pipeline,
    )

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json(run_dir / "stages.json", {"completed": ["pretrain_public"], "wall_s": {}})
    write_json(run_dir / "privacy.json", {"events": []})
    _torchrun_rank(monkeypatch, 0, "29500")  # the first launch, running
    write_json(run_dir / LAUNCH_HOLDING, {"launch": launch_id(), "at": time.time()})
    _torchrun_rank(monkeypatch, 0, "29501")  # the second launch
    second = launch_id()
    start = time.time()
    with FileLock(run_dir / RUN_LOCK), pytest.raises(ConfigError, match="another dpgen process is running"):
        run_pipeline(tiny_cfg("privacy.eps=5"), run_dir)
    with pytest.raises(RuntimeError, match=f"rank 0 of this launch \\({second}\\) was refused"):
        _wait_for_rank_zero(run_dir, ["pretrain_public"], since=start, poll_s=0.01,
                            file=run_dir / "privacy.json", launch=second)
    # Relaunched under the same name (plain torchrun) once the first launch ended: its rank 0 holds
    # the directory and clears the old refusal, and its other ranks join.
    monkeypatch.setattr(pipeline, "plan_privacy", lambda ctx: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        run_pipeline(tiny_cfg("privacy.eps=5"), run_dir)
    assert not (run_dir / LAUNCH_REFUSED.format(second)).exists()
    write_json(run_dir / "stages.json", {"completed": ["pretrain_public"], "wall_s": {}})  # no failure
    _wait_for_rank_zero(run_dir, ["pretrain_public"], since=start, poll_s=0.01, file=run_dir / "privacy.json",
                        launch=second)


def test_other_ranks_join_once_their_own_rank_zero_holds_the_run_directory(tmp_path, monkeypatch):
    """Everything a joining rank waits for is already there, from an earlier launch's rank 0; it
    still waits until its own rank 0 has the run directory."""
    import time

    from dpgen.distributed import launch_id
    from dpgen.io import write_json
    from dpgen.pipeline import LAUNCH_HOLDING, _wait_for_rank_zero

    write_json(tmp_path / "stages.json", {"completed": ["pretrain_public"], "wall_s": {}})
    write_json(tmp_path / "privacy.json", {"events": []})
    write_json(tmp_path / LAUNCH_HOLDING, {"launch": "torch---127.0.0.1-29500", "at": time.time()})
    _torchrun_rank(monkeypatch, 1, "29501")
    ours = launch_id()
    assert ours != "torch---127.0.0.1-29500"
    start = time.time()
    writer = threading.Timer(0.3, lambda: write_json(tmp_path / LAUNCH_HOLDING, {"launch": ours, "at": time.time()}))
    writer.start()
    _wait_for_rank_zero(tmp_path, ["pretrain_public"], since=start, poll_s=0.02, file=tmp_path / "privacy.json",
                        launch=ours)
    assert time.time() - start >= 0.3
    writer.join()
    # A record of this launch's name from long before it started is an earlier launch's.
    write_json(tmp_path / LAUNCH_HOLDING, {"launch": ours, "at": start - 3600})
    timer = threading.Timer(0.3, lambda: write_json(tmp_path / LAUNCH_HOLDING, {"launch": ours, "at": time.time()}))
    t0 = time.time()
    timer.start()
    _wait_for_rank_zero(tmp_path, [], since=start, poll_s=0.02, launch=ours)
    assert time.time() - t0 >= 0.3
    timer.join()


def test_a_launch_is_named_alike_in_every_rank_and_apart_from_the_next(monkeypatch):
    from dpgen.distributed import launch_id

    for k in ("WORLD_SIZE", "RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    assert launch_id() is None  # one process: no launcher
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    names = set()
    for rank in ("0", "1"):
        monkeypatch.setenv("SLURM_PROCID", rank)
        names.add(launch_id())
    assert names == {"slurm-812-0-0"}
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued
    assert launch_id() == "slurm-812-0-1"


def test_dp_training_runs_on_the_configured_device_of_a_gpu_machine(tiny_cfg, tmp_path, monkeypatch):
    """trainer=cpu on a machine with a GPU: Lightning's "auto" accelerator would be CUDA, which
    refuses a CPU strategy. trainer=gpu: Lightning's CUDA set-up needs the device's index."""
    import lightning.pytorch.trainer.connectors.accelerator_connector as connector
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    from dpgen.stages.trainer import build_trainer
    from dpgen.stages.training import dp_strategy

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))  # a GPU machine
    monkeypatch.setattr(connector, "_select_auto_accelerator", lambda *a, **k: "cuda")
    ctx = RunContext(tiny_cfg("privacy.eps=5"), tmp_path)
    ctx.ledger = plan_privacy(ctx)
    trainer = build_trainer(ctx, "dp_train", 1, [], strategy=dp_strategy(ctx))
    assert isinstance(trainer.accelerator, CPUAccelerator)
    on_gpu = RunContext(tiny_cfg("privacy.eps=5", "trainer=gpu"), tmp_path)
    on_gpu.ledger = ctx.ledger
    assert dp_strategy(on_gpu).root_device == torch.device("cuda", 0)


@pytest.mark.parametrize("trainer, backend", [("trainer=gpu", "nccl"), ("trainer=cpu", "gloo")])
def test_ddp_over_a_single_device_trainer_config_gets_its_accelerators_backend(trainer, backend, tmp_path):
    from dpgen.distributed import ddp_strategy_kwargs

    cfg = compose_config([*tiny_overrides(tmp_path), trainer, "trainer.strategy=ddp", "trainer.devices=2"])
    assert ddp_strategy_kwargs(cfg.trainer)["process_group_backend"] == backend
