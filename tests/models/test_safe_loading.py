"""No file a user points fedsweep at runs code when loaded: weights (model.weights), checkpoints
(resume, src.convert_checkpoint) and dataset files are read as data only (src/safe_load.py).
Each case plants a pickle that would create a file when unpickled without restriction, and checks
that the load is refused with one line naming the file and that nothing was written. The report
(src/report) reads only CSV and JSON, which cannot run code."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from src.convert_checkpoint import main as convert_main
from src.engine.checkpoint import read_saved_run
from src.errors import ConfigError
from src.models.vit import build_vit
from src.run import train
from tests.conftest import ONE_BLOCK_VIT, WritesAFile, run_main


@pytest.fixture
def planted(tmp_path):
    """(a torch file that would create `written` when loaded, `written`)"""
    written = tmp_path / "written-by-the-pickle"
    path = tmp_path / "shared.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": WritesAFile(written)}, path)
    return path, written


@pytest.fixture
def bare_pickle(tmp_path):
    written = tmp_path / "written-by-the-bare-pickle"
    path = tmp_path / "bare.pt"
    path.write_bytes(pickle.dumps({"w": WritesAFile(written)}, protocol=2))
    return path, written


def _vit(weights):
    return build_vit(
        None,
        16,
        1,
        10,
        weights=str(weights),
        patch_size=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        mlp_ratio=2.0,
    )


@pytest.mark.parametrize("which", ["planted", "bare_pickle"])
def test_model_weights_that_would_run_code_are_refused(which, request):
    path, written = request.getfixturevalue(which)
    with pytest.raises(ConfigError) as refused:
        _vit(path)
    message = str(refused.value)
    assert message.startswith(f"model.weights={path}: {path} holds ") and "\n" not in message
    assert "state_dict()" in message  # how to save weights that load
    assert not written.exists()


def test_a_resume_checkpoint_that_would_run_code_is_refused(planted):
    path, written = planted
    with pytest.raises(ConfigError) as refused:
        read_saved_run(path)
    assert str(refused.value).startswith(f"resume={path}: {path} holds the Python object(s) ")
    assert not written.exists()


def test_the_command_line_refuses_it_with_exit_code_2_before_training(
    planted, tmp_path, monkeypatch, capfd
):
    path, written = planted
    args = ["experiment=quickstart", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    code, output = run_main([*args, f"resume={path}"], monkeypatch, capfd)
    assert code == 2, output[-1500:]
    assert "Traceback" not in output and "round 1" not in output
    (line,) = [line for line in output.splitlines() if "ERROR" in line]
    assert f"resume={path}" in line
    assert not written.exists()


def test_fedsweeps_own_checkpoint_loads_as_weights_only_and_old_ones_convert(
    make_digits_config, tmp_path
):
    train(make_digits_config("fl.rounds=1", *ONE_BLOCK_VIT))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)  # nothing but tensors and plain values
    assert read_saved_run(checkpoint)["rounds_done"] == 1
    _vit(checkpoint)  # a checkpoint also serves as model.weights

    # a checkpoint of an older fedsweep: numpy's RNG state as an array
    keys = saved["fedsweep"]["rng"]["numpy"][1]
    saved["fedsweep"]["rng"]["numpy"][1] = keys.numpy().astype(np.uint32)
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    with pytest.raises(ConfigError, match="python -m src.convert_checkpoint"):
        read_saved_run(old)
    assert convert_main([str(old)]) == 0
    converted = torch.load(old, weights_only=True)
    assert torch.equal(converted["fedsweep"]["rng"]["numpy"][1], keys)
    assert (tmp_path / "old.ckpt.old").is_file()


def test_the_converter_refuses_a_file_that_would_run_code(planted, capsys):
    path, written = planted
    assert convert_main([str(path)]) == 2
    assert "holds the Python object(s)" in capsys.readouterr().err
    assert not written.exists()
