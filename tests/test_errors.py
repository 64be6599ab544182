"""Bad input stops before any training with one line naming the key, the value and what is
allowed: exit code != 0 and no traceback. Run in-process through the real Hydra entry point
(tests/test_cli.py runs one case as a subprocess)."""

from __future__ import annotations

import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from src.run import main

QUICK = ["experiment=quickstart", "logger=none", "trainer.enable_progress_bar=false"]

# (overrides, what the error line must contain)
BAD_INPUTS = [
    (["alg=fedsgd"], ["Could not find 'alg/fedsgd'", "fedavg", "fedsa-flora", "perfed"]),
    (["partitioner.alpha=0"], ["partitioner.alpha must be > 0, got 0"]),
    (["partitioner.alpha=-1"], ["partitioner.alpha must be > 0, got -1"]),
    (
        ["fl.clients_per_round=11"],
        ["fl.clients_per_round must be in [1, fl.num_clients=10], got 11"],
    ),
    (["fl.num_clients=5000"], ["fl.num_clients=5000 exceeds the", "training samples"]),
    (["partitioner.min_partition_size=200"], ["partitioner.min_partition_size=200 exceeds"]),
    (["alg=fedlora", "alg.lora.r=0"], ["alg.lora.r must be >= 1, got 0"]),
    (["alg=fedlora", "alg.lora.r=1000"], ["alg.lora.r=1000 exceeds the width", "<= 128"]),
    (
        ["alg=fedlora", "alg.lora.target_modules=[nope]"],
        ["alg.lora.target_modules: 'nope' matches no", "blocks.0.attn.qkv"],
    ),
    (["attack=sign_flip", "attack.fraction=1.0"], ["attack.fraction must be in [0, 1), got 1.0"]),
    (["attack=sign_flip", "attack.fraction=-0.1"], ["attack.fraction must be in [0, 1)"]),
    (
        ["aggregator=krum", "aggregator.num_byzantine=2"],
        [
            "aggregator=krum needs at least 7 uploads per round (Krum's guarantee with "
            "aggregator.num_byzantine=2 needs K > 2 * 2 + 2), but receives 5 (fl.clients_per_round)"
        ],
    ),
    (["server_opt.lr=0"], ["server_opt.lr must be > 0, got 0"]),
    (
        ["alg=fedlora", "aggregator=exact", "server_opt=adam"],
        ["aggregator=exact takes server_opt=sgd without momentum", "got server_opt=adam"],
    ),
    (["fault.nan_fraction=2"], ["fault.nan_fraction must be in [0, 1], got 2"]),
    (["data=mnist", "data.loader.download=false"], ["MNIST", "not found"]),
    (
        ["model=qwen", "data=departments", "model.path=/nonexistent/qwen"],
        ["model.path='/nonexistent/qwen'", "model.config_path"],
    ),
    (
        ["paths.output_dir=/proc/fedsweep-out"],
        ["paths.output_dir=/proc/fedsweep-out is not writable"],
    ),
    (["resume=/nonexistent/last.ckpt"], ["resume=/nonexistent/last.ckpt: no such checkpoint"]),
]


@pytest.mark.parametrize("overrides, expected", BAD_INPUTS, ids=lambda v: " ".join(v)[:60])
def test_bad_input_gives_one_clear_line(overrides, expected, tmp_path, monkeypatch, capfd):
    GlobalHydra.instance().clear()
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["src.run", *QUICK, f"hydra.run.dir={tmp_path}", f"paths.data_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv + overrides)
    with pytest.raises(SystemExit) as stopped:
        main()
    output = "\n".join(capfd.readouterr())
    assert stopped.value.code not in (0, None)
    assert "Traceback" not in output
    if overrides[0].startswith("alg="):  # Hydra's own message: the choices, one per line
        message = output
    else:
        (message,) = [line for line in output.splitlines() if "ERROR" in line]
    for part in expected:
        assert part in message, output[-1500:]
    assert not (tmp_path / "metrics.csv").exists()  # stopped before any training
