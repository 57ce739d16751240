"""Loggers: CSV by default, W&B offline (what `wandb sync` would upload is checked on disk)."""

from __future__ import annotations

import csv
import json
import struct
import time

import pytest
from hydra.types import RunMode

from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.pipeline import run_pipeline


def read_wandb_records(path) -> list:
    """Records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header, then LevelDB-style
    32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending, pos = path.read_bytes(), 32 * 1024, [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            pos += left - 7
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _complete_records(run_dir) -> list:
    """The run's records once its log is closed: ``finish()`` can return a moment before
    wandb-core's writer has flushed and closed the file, whose last record is ``exit``."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    path = next(offline.glob("run-*.wandb"))
    for _ in range(100):
        records = read_wandb_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        time.sleep(0.1)
    raise AssertionError(f"{path} has no exit record")


def _kinds(records, kind):
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    from conftest import compose_config, tiny_overrides

    tmp = tmp_path_factory.mktemp("wandb")
    cfg = compose_config(tiny_overrides(tmp) + [
        "privacy.eps=5", "logger=wandb", "logger.mode=offline", "logger.tags=[test]", "logger.group=sweep-x",
        "logger.sample_every_n_steps=2", "logger.grid_per_class=1", "logger.grid_steps=2"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        run_pipeline(cfg, tmp / "run")
    return tmp / "run"


def test_wandb_offline_run_holds_config_curves_images_and_metrics(wandb_run):
    records = _complete_records(wandb_run)

    (run,) = _kinds(records, "run")
    assert run.run_group == "sweep-x" and run.display_name == "dpdm-eps5"
    assert list(run.tags) == ["test", "dpdm", "eps=5", "formal-dp"]
    assert "outside the guarantee" in run.notes
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"]["name"] == "dpdm" and config["privacy"]["eps"] == 5.0  # resolved config

    history = {"/".join(item.nested_key) or item.key for h in _kinds(records, "history") for item in h.item}
    for key in ("dp_train-privacy/epsilon", "dp_train-privacy/epsilon_rdp", "dp_train-lr-Adam",
                "trainer/global_step"):
        assert key in history, (key, sorted(history))
    assert "dp_train-train/loss" not in history  # un-noised: only with privacy.log_train_loss=true
    assert any(k.startswith("dp_train-samples") for k in history)  # grids during training
    assert any(k.startswith("samples/") for k in history)  # the final samples.png

    summary = {}
    for s in _kinds(records, "summary"):
        for item in s.update:
            summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    metrics = json.loads((wandb_run / "metrics.json").read_text())
    assert summary["fid"] == pytest.approx(metrics["fid"])
    assert summary["fid_feature_extractor"] == "glyphnet-v1"
    assert summary["downstream_accuracy"] == pytest.approx(metrics["downstream_accuracy"])
    assert summary["privacy"]["epsilon_spent"] == pytest.approx(metrics["epsilon"])
    assert "training split" in summary["outside_dp_guarantee"]
    # The last ε point is the ε of privacy.json, plotted at the DP step it was spent after.
    eps = [(h_items["trainer/global_step"], h_items["dp_train-privacy/epsilon"]) for h_items in (
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item} for h in _kinds(records, "history"))
        if "dp_train-privacy/epsilon" in h_items]
    privacy = json.loads((wandb_run / "privacy.json").read_text())
    assert eps[-1] == (privacy["events"][-1]["steps"], pytest.approx(privacy["epsilon_spent"]))

    # The console (an un-noised loss under privacy.log_train_loss) is not uploaded by default.
    assert not list((wandb_run / "wandb").glob("offline-run-*/files/output.log"))
    images = list((wandb_run / "wandb").glob("offline-run-*/files/media/images/*.png"))
    assert len(images) >= 3  # two training grids (steps 2 and 4) and the final grid
    assert _kinds(records, "exit")[0].exit_code == 0


def test_training_grids_and_curves_in_the_run_directory(wandb_run):
    grids = sorted(p.name for p in (wandb_run / "logs" / "dp_train" / "grids").glob("*.png"))
    assert grids == ["step_000002.png", "step_000004.png"]
    with open(wandb_run / "logs" / "dp_train" / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"privacy/epsilon", "lr-Adam"} <= columns and "train/loss" not in columns


def test_a_resumed_run_logs_to_the_w_and_b_run_it_started(wandb_run, tmp_path):
    """Offline, W&B cannot resume: the second attempt writes its own directory, under the same run
    id, name and group (online, the same id resumes the run)."""
    from conftest import compose_config, tiny_overrides

    before = {p.name for p in (wandb_run / "wandb").glob("offline-run-*")}
    cfg = compose_config(tiny_overrides(wandb_run.parent) + [
        "privacy.eps=5", "logger=wandb", "logger.mode=offline", "logger.tags=[test]", "logger.group=sweep-x",
        "logger.sample_every_n_steps=2", "logger.grid_per_class=1", "logger.grid_steps=2"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        run_pipeline(cfg, wandb_run)  # every stage done: the attempt only opens and closes the run
    runs = sorted((wandb_run / "wandb").glob("offline-run-*"))
    assert len(runs) == len(before) + 1
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert ids == {json.loads((wandb_run / "wandb-run.json").read_text())["id"]}


def test_the_sensitive_training_loss_is_logged_only_when_asked_for(tiny_cfg, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING"):
        run_pipeline(tiny_cfg("privacy.eps=5", "method.pretrain=none", "privacy.log_train_loss=true"), run_dir,
                     stages=["dp_train"])
    assert "outside the DP guarantee" in caplog.text
    with open(run_dir / "logs" / "dp_train" / "metrics.csv") as f:
        assert "train/loss" in next(csv.reader(f))


def test_a_stages_curves_reach_the_disk_as_they_are_logged(tiny_cfg, tmp_path, monkeypatch):
    """A SIGKILLed stage keeps the curves it logged (as metrics-attempt<n>.csv on resume) only if
    they were on disk: Lightning's CSVLogger held 100 steps in memory by default."""
    from lightning.pytorch import Callback

    from dpgen.stages import trainer

    on_disk = []

    class ReadTheFile(Callback):
        def on_train_batch_end(self, trainer, *args):
            path = tmp_path / "run" / "logs" / "dp_train" / "metrics.csv"
            on_disk.append(len(path.read_text().splitlines()) if path.exists() else 0)

    callbacks = trainer.stage_callbacks
    monkeypatch.setattr(trainer, "stage_callbacks", lambda *a: [*callbacks(*a), ReadTheFile()])
    run_pipeline(tiny_cfg("privacy.eps=5", "method.pretrain=none", "privacy.log_every_n_steps=1"),
                 tmp_path / "run", stages=["dp_train"])
    assert len(on_disk) == 4 and on_disk[2] > 1  # a header and rows before the stage ended


def test_multirun_groups_by_sweep_directory(tiny_cfg, monkeypatch, tmp_path):
    from dpgen.loggers import run as loggers

    class _Hydra:
        mode = RunMode.MULTIRUN
        sweep = type("Sweep", (), {"dir": "multirun/2026-11-23/10-00-00"})
        job = type("Job", (), {"num": 3})

    monkeypatch.setattr(loggers.HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(loggers.HydraConfig, "get", staticmethod(lambda: _Hydra))
    assert loggers._sweep_group() == "multirun/2026-11-23/10-00-00"
    cfg = tiny_cfg("privacy.eps=4", "logger=wandb", "privacy.log_train_loss=true")
    first = loggers._run_identity(cfg, tmp_path)
    assert (first["name"], first["group"]) == ("dpdm-eps4-job3", "multirun/2026-11-23/10-00-00")
    assert "unnoised-train-loss" in loggers._tags(cfg) and "formal-dp" in loggers._tags(cfg)
    # The job resumed alone (+resume, not a multirun) keeps its id, group and job number; its name
    # follows what the attempt does (CPSample sampling voids the guarantee).
    monkeypatch.setattr(loggers.HydraConfig, "initialized", staticmethod(lambda: False))
    again = loggers._run_identity(tiny_cfg("privacy.eps=4", "logger=wandb", "sampling=cpsample"), tmp_path)
    assert again == {**first, "name": "dpdm-eps4-cpsample-no-formal-dp-job3"}


@pytest.mark.parametrize("override,key", [
    ("logger.mode=cloud", "logger.mode"),
    ("logger.sample_every_n_steps=-1", "logger.sample_every_n_steps"),
])
def test_bad_logger_config_is_refused(tiny_cfg, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        validate_config(tiny_cfg("logger=wandb", override))
