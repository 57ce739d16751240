"""``python -m dpgen.release`` on finished tiny runs written in the real run-directory formats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import compose_config, finished_run, tiny_overrides
from omegaconf import OmegaConf
from torchvision.datasets import ImageFolder

import dpgen.release.make as make
from dpgen.io import write_json
from dpgen.release import ReleaseSpec, class_counts, release_labels
from dpgen.release.__main__ import main
from dpgen.release.shards import class_folders

N, SHARD = 25, 10  # three shards, the last one short


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("private"))


def _release(run, out, fmt="imagefolder", *extra):
    main([str(run), "--num-samples", str(N), "--format", fmt, "--out", str(out), "--shard-size", str(SHARD),
          "--batch-size", str(SHARD), *extra])


@pytest.fixture(scope="module")
def released(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "imagefolder"
    _release(run_dir, out)
    return out


def _pngs(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_imagefolder_release_loads_with_a_card_copied_from_privacy_json(run_dir, released):
    data = ImageFolder(str(released))
    assert len(data) == N and data.classes == [f"{c}_{c}" for c in range(10)]
    assert data[0][0].size == (8, 8)
    assert np.bincount(data.targets).tolist() == [3] * 5 + [2] * 5
    privacy = json.loads((run_dir / "privacy.json").read_text())
    card = json.loads((released / "datacard.json").read_text())
    assert card["epsilon_spent"] == privacy["epsilon_spent"] and card["epsilon_target"] == 5.0
    assert card["epsilon_scope"] is None  # the ε is the samples' guarantee
    assert card["events"] == privacy["events"] and card["delta"] == privacy["delta"]
    assert card["per_class_counts"] == {str(c): 3 if c < 5 else 2 for c in range(10)}
    assert card["sensitive_dataset"]["training_split_size"] == 4000 and card["num_samples"] == N
    assert card["model"]["trainable_parameters"] > 0 and card["sampler"]["steps"] == 2
    assert card["public_data"]["name"] == "glyphs" and card["dpgen"]["version"]
    assert any("chosen by comparing runs on this dataset" in line for line in card["not_covered"])  # MNIST-5k
    first_lines = [(released / f).read_text().splitlines()[0] for f in ("datacard.json", "DATACARD.md")]
    assert all("Differentially private" in line and "ε = " in line for line in first_lines)
    assert json.loads((released / "manifest.json").read_text())["complete"]
    assert not list(released.rglob("*.tmp"))


def test_npz_shards_follow_the_samples_contract_and_depend_on_the_seed(run_dir, tmp_path):
    def load(out):
        files = sorted(out.glob("samples-*.npz"))
        assert [f.name for f in files] == [f"samples-{i:05d}-of-00003.npz" for i in range(3)]
        arrays = [np.load(f) for f in files]
        return np.concatenate([a["images"] for a in arrays]), np.concatenate([a["labels"] for a in arrays])

    _release(run_dir, tmp_path / "a", "npz")
    _release(run_dir, tmp_path / "b", "npz", "--seed", "1")
    (images, labels), (other, _) = load(tmp_path / "a"), load(tmp_path / "b")
    assert images.dtype == np.uint8 and images.shape == (N, 8, 8, 1) and labels.dtype == np.int64
    assert labels.tolist() == release_labels(N, 10).tolist()
    # Same seed, same bytes: the resume test compares two executions; another seed differs.
    assert not np.array_equal(images, other)


class _Killed(BaseException):
    """Like a kill: nothing after it runs, and no ``except Exception`` catches it."""


def test_a_killed_release_resumes_without_redoing_finished_shards(run_dir, released, tmp_path, monkeypatch):
    out, sampled = tmp_path / "resumed", []
    original = make.sample_shard

    def sample(*args, **kwargs):
        if len(sampled) == 2 and kill:
            raise _Killed
        sampled.append(args[1].tolist())
        return original(*args, **kwargs)

    monkeypatch.setattr(make, "sample_shard", sample)
    kill = True
    with pytest.raises(_Killed):
        _release(run_dir, out)
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert len(first) == 2 * SHARD and not (out / "datacard.json").exists()
    kill = False
    _release(run_dir, out)
    assert len(sampled) == 3, "a finished shard was sampled again"
    assert all(p.stat().st_mtime_ns == t for p, t in first.items()), "a finished shard was rewritten"
    assert _pngs(out) == _pngs(released), "the resumed release differs from an uninterrupted one"


def _refused(argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    message = str(exc.value.code)
    assert exc.value.code not in (0, None) and message.startswith("dpgen.release: ") and "\n" not in message
    return message


def _ledger_without(key):
    def edit(privacy):
        del privacy[key]
        return privacy
    return edit


# How a run directory is broken (file, new content or an edit of privacy.json), and what the
# refusal says. A private run's privacy.json without its numbers states no guarantee, as none does.
BROKEN_RUNS = {
    "not_a_run": ("run_config.yaml", None, "not a dpgen run"),
    "unfinished": ("stages.json", '{"completed": ["pretrain_public", "dp_train"], "wall_s": {}}',
                   "not a finished dpgen run"),
    "no_privacy_json": ("privacy.json", None, "no privacy.json, so the guarantee of method dpdm cannot be stated"),
    "overspent": ("privacy.json", lambda p: {**p, "epsilon_spent": p["epsilon_target"] * 1.01}, "above its target"),
    "corrupt_config": ("run_config.yaml", "seed: 0\nmethod: [unclosed\n", "run_config.yaml: unreadable (expected"),
    "empty_config": ("run_config.yaml", "", "run_config.yaml: empty"),
    "partial_config": ("run_config.yaml", "seed: 0\n", "run_config.yaml: not a whole dpgen run config (it lacks data"),
    "corrupt_stages": ("stages.json", "", "stages.json: unreadable"),
    "stages_list": ("stages.json", "[]", "stages.json: holds a JSON array"),
    "truncated_weights": ("model.pt", b"PK\x03\x04", "model.pt: not loadable weights (PytorchStreamReader"),
    "privacy_list": ("privacy.json", "[]", "privacy.json: holds a JSON array, not the object dpgen writes"),
    "privacy_string": ("privacy.json", lambda p: {**p, "epsilon_spent": "1.0"},
                       "privacy.json: epsilon_spent='1.0' is not a finite number"),
    "privacy_empty": ("privacy.json", lambda p: {},
                      "privacy.json: no epsilon_target, so the guarantee of method dpdm cannot be stated"),
    "privacy_without_delta": ("privacy.json", _ledger_without("delta"), "privacy.json: no delta"),
    "privacy_nan": ("privacy.json", lambda p: {**p, "epsilon_spent": float("nan")}, "epsilon_spent=nan"),
    "guarantee_as_text": ("privacy.json", lambda p: {**p, "formal_guarantee": "false"},
                          "formal_guarantee='false' is not true or false"),
}


@pytest.mark.parametrize("case", BROKEN_RUNS)
def test_refuses_a_run_it_cannot_release(case, run_dir, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    name, content, expected = BROKEN_RUNS[case]
    if content is None:
        (bad / name).unlink()
    elif callable(content):
        (bad / name).write_text(json.dumps(content(json.loads((bad / name).read_text()))))
    elif isinstance(content, bytes):
        (bad / name).write_bytes(content)
    else:
        (bad / name).write_text(content)
    message = _refused([bad, "--num-samples", 5, "--format", "npz", "--out", tmp_path / "out"])
    assert expected in message and "Fix: " in message
    assert not (tmp_path / "out").exists()


def test_a_ledger_that_gave_its_guarantee_up_is_still_released(run_dir, tmp_path):
    """CPSample voids the guarantee in privacy.json and keeps the numbers: released, and the card says so."""
    from dpgen.release import open_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    privacy = json.loads((run / "privacy.json").read_text())
    write_json(run / "privacy.json", {**privacy, "formal_guarantee": False, "note": "CPSample"})
    assert open_run(run).formal_guarantee is False


@pytest.mark.parametrize(("num", "fmt", "extra", "expected"), [
    (0, "npz", [], "must be > 0"), (-3, "imagefolder", [], "must be > 0"), (5, "tfrecord", [], "unknown format"),
    (5, "npz", ["--precision", "fp8"], "--precision=fp8: unknown"),
    # numpy's SeedSequence takes no negative seed: it failed at the first shard, after the manifest
    (5, "npz", ["--seed", "-1"], "--seed=-1: must be an integer >= 0"),
    # torch failed when the generator moved there, with a traceback
    (5, "npz", ["--device", "foo"], "--device=foo: not a device"),
    (5, "npz", ["--device", "cuda:99"], "--device=cuda:99: no CUDA device")])
def test_refuses_a_bad_request(num, fmt, extra, expected, run_dir, tmp_path):
    assert expected in _refused([run_dir, "--num-samples", num, "--format", fmt, "--out", tmp_path / "out", *extra])
    assert not (tmp_path / "out").exists()


def test_refuses_an_output_directory_holding_another_release(run_dir, released, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in released.rglob("*")}
    message = _refused([run_dir, "--num-samples", N + 1, "--format", "imagefolder", "--out", released,
                        "--shard-size", SHARD, "--batch-size", SHARD])
    assert "holds another release" in message and "num_samples 25 vs 26" in message
    assert {p: p.stat().st_mtime_ns for p in released.rglob("*")} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a release")
    assert "not a dpgen release" in _refused([run_dir, "--num-samples", 5, "--format", "npz", "--out",
                                              tmp_path / "mine"])
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_non_private_run_says_so_on_the_first_line(tmp_path):
    run = finished_run(tmp_path, "method=nonprivate", private=False)
    out = tmp_path / "out"
    main([str(run), "--num-samples", "4", "--format", "npz", "--out", str(out), "--batch-size", "4"])
    for name in ("datacard.json", "DATACARD.md"):
        assert "NO FORMAL PRIVACY GUARANTEE" in (out / name).read_text().splitlines()[0]
    card = json.loads((out / "datacard.json").read_text())
    assert card["formal_guarantee"] is False and card["epsilon_spent"] is None and card["events"] == []
    assert card["epsilon_scope"] is None  # no ε to qualify
    assert card["sensitive_dataset"]["training_split_size"] == 4000


def test_class_counts_use_equal_shares_or_a_public_prior_only():
    assert class_counts(25, 10) == [3] * 5 + [2] * 5
    assert class_counts(10, 3, prior=[2, 0, 2]) == [5, 0, 5]
    assert class_counts(7, 2, prior=[0.75, 0.25]) == [5, 2]
    labels = release_labels(1000, 10, prior=[1] * 5 + [3] * 5)
    assert np.bincount(labels).tolist() == [50] * 5 + [150] * 5
    # spread evenly: each shard of 100 holds every class in proportion
    assert all(np.bincount(labels[a:a + 100], minlength=10).min() >= 4 for a in range(0, 1000, 100))
    for bad in ((1.0, -1.0), (float("nan"), 1.0), (float("inf"), 1.0)):
        with pytest.raises(ValueError, match="finite, non-negative"):
            ReleaseSpec(5, "npz", class_prior=bad).check(2)
    ReleaseSpec(5, "npz", class_prior=(1.0, 0.0, 1.0)).check(3)
    with pytest.raises(ValueError, match="number later classes one lower"):
        ReleaseSpec(5, "imagefolder", class_prior=(1.0, 0.0, 1.0)).check(3)


def test_class_folders_sort_in_label_order_and_are_valid_names():
    """ImageFolder numbers classes by the folders' sorted names: they must give dpgen's labels."""
    celeba = class_folders(["not_Male", "Male"])
    fashion = class_folders(["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                             "Bag", "Ankle boot"])
    many = class_folders([str(c) for c in range(12)])
    for folders in (celeba, fashion, many):
        assert sorted(folders) == folders and all("/" not in f and " " not in f for f in folders)
    assert celeba == ["0_not_Male", "1_Male"] and fashion[0] == "0_T-shirt_top" and many[10] == "10_10"


def test_the_card_names_the_public_data_of_every_pretraining_method(tmp_path):
    from dpgen.release.datacard import NOT_COVERED, _public_data, not_covered
    from dpgen.release.source import SourceRun

    def public(*overrides):
        cfg = compose_config([f"paths.cache_dir={tmp_path}", f"paths.data_root={tmp_path}", *overrides])
        return _public_data(SourceRun(tmp_path, cfg, {}, []))

    privimage = public("method=privimage")
    assert privimage["name"] == "glyphs" and "DP semantic query" in privimage["pretrained_on"]
    assert "pretrained_on" not in public("method=privimage", "method.selection=all")  # no query
    assert public("method=dpldm")["name"] == "glyphs" and "pretrained_on" not in public("method=dpldm")
    assert public("method=dpdm")["name"] == "glyphs"
    assert public("method=dpdm", "method.pretrain=none", "method.stages=[dp_train,sample,evaluate]") is None
    assert any("N of the sensitive training split is treated as public" in line for line in NOT_COVERED)
    # The defaults were tuned on MNIST-5k (README): a card for a run on it says so, others do not.
    assert any("were chosen by comparing runs on this dataset" in line for line in not_covered("mnist5k"))
    assert not_covered("cifar10") == NOT_COVERED


def test_a_release_continues_only_with_the_same_sampler_and_protection(run_dir, tmp_path, monkeypatch):
    """`python -m dpgen.sampling` copies a DP run's weights into a CPSample twin: shards of the twin
    must never be finished under the DP run's card (or the other way round), nor shards of another
    solver setting under one card."""
    out, args = tmp_path / "out", ["--num-samples", N, "--format", "npz", "--shard-size", SHARD,
                                   "--batch-size", SHARD]
    monkeypatch.setattr(make, "sample_shard", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):  # the DP run's release dies before its first shard: a manifest only
        main([str(run_dir), *map(str, args), "--out", str(out)])
    assert json.loads((out / "manifest.json").read_text())["shards"] == {}
    steps = tmp_path / "steps"
    shutil.copytree(run_dir, steps)
    cfg = OmegaConf.load(steps / "run_config.yaml")
    cfg.sample.steps += 1
    OmegaConf.save(cfg, steps / "run_config.yaml")
    assert "holds another release" in _refused([steps, *args, "--out", out])
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)
    cfg = OmegaConf.load(twin / "run_config.yaml")
    cfg.sampling = compose_config(tiny_overrides(tmp_path / "work") + ["sampling=cpsample"]).sampling
    OmegaConf.save(cfg, twin / "run_config.yaml")
    (twin / "protection_classifier.pt").write_bytes(b"a classifier trained on the sensitive images")
    assert "holds another release" in _refused([twin, *args, "--out", out])


def test_a_cpsample_card_says_what_its_epsilon_covers(run_dir, monkeypatch):
    """CPSample keeps the ε of the DP training beside formal_guarantee: false; a tool reading only
    the number learns from epsilon_scope that it covers the generator's training only."""
    import dpgen.release.datacard as datacard
    from dpgen.release.source import SourceRun

    cfg = OmegaConf.load(run_dir / "run_config.yaml")
    cfg.sampling = compose_config(tiny_overrides(run_dir / "work") + ["sampling=cpsample"]).sampling
    privacy = {**json.loads((run_dir / "privacy.json").read_text()), "formal_guarantee": False}
    monkeypatch.setattr(datacard, "_parameters", lambda run: {})
    card = datacard.build_datacard(SourceRun(run_dir, cfg, privacy, []), ReleaseSpec(4, "npz"), [1] * 4 + [0] * 6,
                                   4000, "cpu", "npz")
    assert card["formal_guarantee"] is False and card["epsilon_spent"] == privacy["epsilon_spent"]
    assert card["epsilon_scope"].startswith("generator training only; the samples carry no formal guarantee")
    assert "CPSample's protection classifier" in card["epsilon_scope"]


def test_a_card_without_a_guarantee_never_calls_sampling_free(tmp_path):
    run = finished_run(tmp_path, "method=nonprivate", private=False)
    out = tmp_path / "out"
    main([str(run), "--num-samples", "4", "--format", "npz", "--out", str(out), "--batch-size", "4"])
    card = (out / "DATACARD.md").read_text()
    assert "costs no privacy" not in card and "No formal guarantee covers these samples" in card


def test_a_release_from_an_older_dpgen_is_not_continued(run_dir, tmp_path):
    out = tmp_path / "old"
    write_json(out / "manifest.json", {"release": {"num_samples": N}, "shards": {}, "complete": False})
    assert "started by an older dpgen" in _refused([run_dir, "--num-samples", N, "--format", "npz", "--out", out])
