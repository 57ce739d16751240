"""make bench (dpgen/bench.py): the DP step against the non-private step, as rows and a table.

Structure and arithmetic of the rows only; the timings themselves are what the benchmark
measures, not something a test can assert on a shared 2-core machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import on_cuda
from omegaconf import OmegaConf

from dpgen.bench import format_table, run_bench

REQUIRED = {"config", "K", "dp_step_s", "nonprivate_step_s", "time_ratio", "dp_peak_mb", "nonprivate_peak_mb",
            "memory_ratio"}


def _tiny(**overrides):
    cfg = {"device": "cpu", "precision": "32", "models": ["unet_tiny"], "trainable": ["full", "attention_only"],
           "clipping": ["mixed"], "multiplicities": [1, 2], "batch_size": 4, "image_size": 8, "channels": 1,
           "num_classes": 3, "warmup": 0, "repeats": 3}
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def test_bench_rows_carry_the_issue_fields_and_consistent_ratios():
    rows = run_bench(_tiny())
    assert [(r["config"], r["K"]) for r in rows] == [
        ("unet_tiny/full/mixed", 1), ("unet_tiny/full/mixed", 2),
        ("unet_tiny/attention_only/mixed", 1), ("unet_tiny/attention_only/mixed", 2)]
    for r in rows:
        assert r.keys() >= REQUIRED
        assert r["time_ratio_min"] <= r["time_ratio"] <= r["time_ratio_max"]
        assert r["dp_step_min_s"] <= r["dp_step_s"] <= r["dp_step_max_s"]
        assert r["memory_ratio"] == pytest.approx(r["dp_peak_mb"] / r["nonprivate_peak_mb"])
        assert r["dp_peak_mb"] > 0 and r["nonprivate_peak_mb"] > 0
    full, attention = rows[0], rows[2]
    assert attention["trainable_parameters"] < full["trainable_parameters"] == full["total_parameters"]
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "unet_tiny/attention_only/mixed" in table


def test_the_dp_step_timed_is_a_runs_step_charged_and_journaled_before_its_noise(monkeypatch):
    """The bench must time what training pays, ledger and fsynced journal included."""
    import dpgen.bench as bench
    import dpgen.privacy.strategy as strategy
    from dpgen.privacy.journal import read_spend

    cfg = _tiny()
    module = bench.build_module("unet_tiny", "full", 2, cfg, torch.device("cpu"))
    pair = bench.StepPair(module, bench.bench_batch("unet_tiny", cfg, torch.device("cpu")), "32", "mixed")
    drawn = []
    noise = strategy.add_gaussian_noise

    def add_noise(grad_sum, std, generator):
        drawn.append((pair.ledger.steps_spent("dp_train"), read_spend(pair.journal)["events"][0]["steps"], std))
        noise(grad_sum, std, generator)

    monkeypatch.setattr(strategy, "add_gaussian_noise", add_noise)
    pair.private()
    pair.private()
    assert drawn == [(1, 1, 1.0), (2, 2, 1.0)]
    assert pair.config.expected_batch_size == pytest.approx(len(pair.batch[0]))


def test_a_latent_model_benches_dpldm_on_latents_with_its_default_trainable_set(monkeypatch):
    import dpgen.bench as bench
    from dpgen.methods.dpldm import trainable_parameter_names

    shapes = []
    measured = bench.measure

    def measure(pair, *args):
        shapes.append(tuple(pair.batch[0].shape))
        return measured(pair, *args)

    monkeypatch.setattr(bench, "measure", measure)
    rows = run_bench(_tiny(models=["ldm_tiny"], multiplicities=[2], repeats=1))
    assert [r["config"] for r in rows] == ["ldm_tiny/full/mixed", "ldm_tiny/attention_only/mixed"]
    assert shapes == [(4, 2, 4, 4)] * 2  # 8x8 images -> the autoencoder's 2x4x4 latents
    module = bench.build_module("ldm_tiny", "attention_only", 2, _tiny(), torch.device("cpu"))
    sizes = {n: p.numel() for n, p in module.unet.named_parameters()}
    assert rows[0]["trainable_parameters"] == sum(sizes.values())  # the denoiser; the autoencoder is frozen
    assert rows[1]["trainable_parameters"] == sum(sizes[n] for n in trainable_parameter_names(module.unet, "attention"))
    assert rows[1]["trainable_parameters"] < rows[0]["trainable_parameters"] < rows[0]["total_parameters"]


@pytest.mark.parametrize(("device", "precision"), [("cpu", "bf16"), on_cuda("cuda", "32"), on_cuda("cuda", "bf16")])
def test_bench_runs_on_each_device_and_precision(device, precision):
    (row,) = run_bench(_tiny(device=device, precision=precision, trainable=["full"], multiplicities=[2]))
    assert row["device"] == device and row["precision"] == precision
    assert row["dp_peak_mb"] > 0 and row["nonprivate_peak_mb"] > 0 and row["time_ratio"] > 0


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_an_out_of_memory_size_gets_its_row_and_the_rest_is_still_measured(error, monkeypatch):
    import dpgen.bench as bench

    measured = bench.measure

    def measure(pair, *args):
        if pair.module.multiplicity == 2:
            raise error
        return measured(pair, *args)

    monkeypatch.setattr(bench, "measure", measure)
    rows = run_bench(_tiny(trainable=["full"]))
    assert [r.get("out_of_memory", False) for r in rows] == [False, True]
    assert "time_ratio" in rows[0] and "time_ratio" not in rows[1]
    table = format_table(rows).splitlines()
    assert "out of memory" in table[-1] and table[-1].count("|") == table[0].count("|")


def test_rows_are_handed_on_as_measured_so_a_failure_keeps_the_earlier_ones(monkeypatch):
    """On a lent GPU a later row can hit the time limit or a bug; what was measured must survive."""
    import dpgen.bench as bench

    measured = bench.measure

    def measure(pair, *args):
        if pair.module.multiplicity == 2:
            raise RuntimeError("a bug, not memory")
        return measured(pair, *args)

    monkeypatch.setattr(bench, "measure", measure)
    saved = []
    with pytest.raises(RuntimeError, match="a bug, not memory"):
        run_bench(_tiny(trainable=["full"]), on_row=lambda rows: saved.append([r["K"] for r in rows]))
    assert saved == [[1]]


def test_bench_refuses_an_unknown_clipping_mode_before_measuring(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "dpgen.bench", "bench.clipping=[fast]", f"bench.output={out}"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "bench.clipping: unknown 'fast'" in result.stderr + result.stdout
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ({"device": "gpu"}, "bench.device: unknown 'gpu'"),
    ({"batch_size": 0}, "bench.batch_size=0"),
    ({"repeats": 0}, "bench.repeats=0"),
    ({"multiplicities": [0]}, "bench.multiplicities=[0]"),
    # An empty list measured nothing, printed an empty table and said "written to" a file it never wrote.
    ({"models": []}, "bench.models=[]: must be a non-empty list"),
    ({"trainable": []}, "bench.trainable=[]: must be a non-empty list"),
    ({"clipping": []}, "bench.clipping=[]: must be a non-empty list"),
    ({"multiplicities": []}, "bench.multiplicities=[]: must be a non-empty list"),
    ({"models": "unet_tiny"}, "bench.models='unet_tiny': must be a non-empty list"),
    ({"threads": 0}, "bench.threads=0: must be >= 1"),
    # Every model's size before the first is measured, under the bench's own key (was data.image_size,
    # and for a UNet a Hydra traceback after the models before it had been measured).
    ({"models": ["unet_tiny", "unet_small"], "image_size": 6},
     "bench.image_size=6: model unet_small downsamples 4x and needs a multiple of 4. Fix: use bench.image_size=4"),
    ({"models": ["ldm_tiny"], "image_size": 7}, "bench.image_size=7: model ldm_tiny (autoencoder"),
])
def test_bad_bench_settings_are_refused_before_measuring(override, message, monkeypatch):
    import dpgen.bench as bench

    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_bench(_tiny(**override))


@pytest.mark.parametrize("argument, message", [
    ("bench.output={tmp}", "bench.output='{tmp}': is a directory"),  # was an IsADirectoryError after measuring
    ("bench.threads=-1", "bench.threads=-1: must be >= 1"),  # was a RuntimeError from torch.set_num_threads
])
def test_make_bench_refuses_an_output_or_threads_it_cannot_use_before_measuring(tmp_path, argument, message):
    args = ["bench.models=[unet_tiny]", "bench.trainable=[full]", "bench.clipping=[materialize]",
            "bench.multiplicities=[1]", "bench.batch_size=2", "bench.image_size=8", "bench.num_classes=3",
            "bench.warmup=0", "bench.repeats=1", f"bench.output={tmp_path / 'bench.json'}", argument.format(tmp=tmp_path)]
    result = subprocess.run([sys.executable, "-m", "dpgen.bench", *args], capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dpgen.bench: {message.format(tmp=tmp_path)}. Fix: "), result.stderr[-2000:]
    assert "unet_tiny/full/materialize" not in result.stdout + result.stderr  # nothing was measured
    assert not list(tmp_path.iterdir())


def test_make_bench_writes_its_rows_as_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench.models=[unet_tiny]", "bench.trainable=[full]", "bench.clipping=[materialize]",
            "bench.multiplicities=[1]", "bench.batch_size=2", "bench.image_size=8", "bench.num_classes=3",
            "bench.warmup=0", "bench.repeats=1", f"bench.output={out}"]
    result = subprocess.run([sys.executable, "-m", "dpgen.bench", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0].keys() >= REQUIRED
    assert "unet_tiny/full/materialize" in result.stdout
