"""``python -m dpgen.sampling``: what it refuses before the new run directory exists, and what a
resumed resampling takes from its source run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import finished_run

from dpgen.errors import ConfigError
from dpgen.io import save_torch, write_json
from dpgen.privacy.composition import SOURCE_RUN
from dpgen.sampling.__main__ import main, prepare, resampling_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("source"))


@pytest.fixture
def run(source, tmp_path):
    """A copy of the finished run, for a test to break or change."""
    return shutil.copytree(source, tmp_path / "run")


def _refused(argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    message = str(exc.value.code)
    assert message.startswith("dpgen.sampling: ") and "\n" not in message
    return message


def test_truncated_weights_are_refused_before_the_new_directory_is_made(run, tmp_path):
    """They used to be copied and fail only at the sample stage, leaving the copy to be resumed."""
    (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:1000])
    message = _refused([run, "--out", tmp_path / "out", "sampling=default"])
    assert f"{run}/model.pt: not loadable weights" in message and "Fix: " in message
    assert not (tmp_path / "out").exists()


def test_a_source_without_its_ledger_is_refused_with_a_fix_for_sampling(run, tmp_path):
    (run / "privacy.json").unlink()
    message = _refused([run, "--out", tmp_path / "out", "sampling=default"])
    assert "no privacy.json, so the guarantee" in message and "Fix: restore privacy.json" in message
    assert "release only" not in message  # the release tool's wording
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", ["sub", "."])
def test_the_new_directory_may_not_lie_inside_the_source(run, inside):
    """Reports would list it as one more run below the source, which resampling leaves untouched."""
    before = sorted(p.name for p in run.iterdir())
    message = _refused([run, "--out", run / inside, "sampling=default"])
    assert f"lies inside the source run {run}" in message
    assert sorted(p.name for p in run.iterdir()) == before


def test_the_default_directory_of_a_run_given_as_the_working_directory(run, tmp_path, monkeypatch):
    """``cd <run> && python -m dpgen.sampling .``: '.' has no name to extend (a ValueError before);
    the default lies beside the run. An existing one is refused, which shows where it lies."""
    beside = tmp_path / "run-default"
    beside.mkdir()
    monkeypatch.chdir(run)
    assert f"--out='{beside}': exists already" in _refused([".", "sampling=default"])


def test_a_resumed_resampling_copies_a_changed_source_again_until_it_has_sampled(run, tmp_path):
    cfg = resampling_config(run, ["sampling=default"])
    out = tmp_path / "out"
    prepare(run, out, cfg)
    # What an earlier dpgen left after the source's truncated model.pt failed at the sample stage:
    # that copy, and no hashes recorded. The source has been repaired since.
    (out / "model.pt").write_bytes(b"truncated")
    write_json(out / SOURCE_RUN, {"source_run": str(run.resolve())})
    prepare(run, out, cfg)
    assert (out / "model.pt").read_bytes() == (run / "model.pt").read_bytes()
    # The source's ledger changed before anything was sampled: copied again too.
    privacy = json.loads((run / "privacy.json").read_text())
    write_json(run / "privacy.json", {**privacy, "epsilon_spent": privacy["epsilon_spent"] / 2})
    prepare(run, out, cfg)
    assert json.loads((out / "privacy.json").read_text()) == json.loads((run / "privacy.json").read_text())
    # Once samples were drawn from the copies, a changed source is refused: they are not its samples.
    state = json.loads((out / "stages.json").read_text())
    write_json(out / "stages.json", {**state, "completed": [*state["completed"], "sample"]})
    copied = (out / "model.pt").read_bytes()
    weights = torch.load(run / "model.pt")
    first = next(iter(weights))
    save_torch(run / "model.pt", {**weights, first: weights[first] + 1})
    with pytest.raises(ConfigError, match=r"^--out=.*: an unfinished resampling of .* that sampled from copies of "
                                          r"its model\.pt, which changed .* since\. Fix: pass a new directory"):
        prepare(run, out, cfg)
    assert (out / "model.pt").read_bytes() == copied
    # The source as it was copied: resumed as it stands.
    (run / "model.pt").write_bytes(copied)
    prepare(run, out, cfg)
    assert (out / "model.pt").read_bytes() == copied
