"""A checkpoint holds what changes, not the model: the frozen weights (a LoRA run's base model)
are left out, rebuilt from config and seed at resume and checked against their fingerprint; a
base weight the server changes (aggregator=stack, exact) comes back from the server state. A
resumed run still equals the uninterrupted one, a checkpoint of other frozen weights is refused
with one line, and a checkpoint that holds the whole model (before this, or fedavg) still
resumes."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch

from src.run import build_base_model, build_module, build_trainer, train
from tests.conftest import ONE_BLOCK_VIT, digits_config, run_main

# trainer.threads=auto counts idle cores at start: under load two runs could differ
THREADS = "trainer.threads=1"
# one wide block (7.1 M parameters) with rank-1 adapters: LoRA and the head are 0.2 % of it
WIDE_BLOCK = [
    "model.embed_dim=768",
    "model.num_heads=4",
    "model.mlp_ratio=4",
    "model.patch_size=8",
    "alg.lora.r=1",
    "fl.num_clients=4",
    "fl.clients_per_round=1",
]


def _checkpoint(folder: Path) -> Path:
    return folder / "run" / "checkpoints" / "last.ckpt"


def _metrics(folder: Path) -> list[dict]:
    """metrics.csv without its wall-clock columns (the only ones allowed to differ)."""
    with (folder / "run" / "metrics.csv").open() as f:
        return [
            {k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)
        ]


def test_a_lora_checkpoint_holds_no_frozen_weight_and_under_one_percent_of_the_model(tmp_path):
    cfg = digits_config(tmp_path, "alg=fedlora", "fl.rounds=1", *WIDE_BLOCK, THREADS)
    train(cfg)
    saved = torch.load(_checkpoint(tmp_path), weights_only=True)
    model = build_module(cfg, tmp_path / "fresh").state_dict(keep_vars=True)
    trained = {name for name, t in model.items() if t.requires_grad}
    assert {n.split(".")[-3] for n in trained} >= {"lora_A", "lora_B"}
    assert set(saved["state_dict"]) == trained  # the LoRA factors and the head
    frozen = saved["fedsweep"]["frozen"]
    assert frozen["names"] == sorted(set(model) - trained)
    assert frozen["built_from"] == "model=vit_small32 seed=0"
    model_bytes = sum(t.numel() * t.element_size() for t in model.values())
    assert _checkpoint(tmp_path).stat().st_size <= 0.01 * model_bytes


def test_a_whole_model_checkpoint_is_as_before(tmp_path):
    cfg = digits_config(tmp_path, "alg=fedavg", "fl.rounds=1", THREADS)
    train(cfg)
    saved = torch.load(_checkpoint(tmp_path), weights_only=True)
    assert set(saved["state_dict"]) == set(build_module(cfg, tmp_path / "fresh").state_dict())
    assert "frozen" not in saved["fedsweep"]


# stack and exact merge the clients' products into the base weights, which the checkpoint's
# model copy no longer holds: the server state has them and every download loads them
@pytest.mark.parametrize(
    "overrides",
    [
        ["alg=fedlora"],
        ["alg=fedlora", "aggregator=stack"],
        ["alg=fedlora", "aggregator=exact"],
        ["alg=ffa-lora"],  # its frozen A, drawn at set-up, is rebuilt too
    ],
    ids=lambda overrides: " ".join(overrides),
)
def test_a_resumed_lora_run_equals_the_uninterrupted_one(overrides, tmp_path):
    first = train(digits_config(tmp_path / "first", *overrides, "fl.rounds=1", THREADS))
    resume = f"resume={_checkpoint(tmp_path / 'first')}"
    saved = torch.load(_checkpoint(tmp_path / "first"), weights_only=True)["fedsweep"]
    started = time.perf_counter()
    resumed = train(digits_config(tmp_path / "resumed", *overrides, resume, THREADS))
    second_part = time.perf_counter() - started
    whole = train(digits_config(tmp_path / "whole", *overrides, THREADS))
    assert [row["round"] for row in _metrics(tmp_path / "resumed")] == ["1", "2"]
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "whole")
    assert resumed["per_client"] == whole["per_client"]
    # clients.csv: the first run's rows, then the resumed rounds', as uninterrupted
    clients = (tmp_path / "resumed" / "run" / "clients.csv").read_text()
    assert clients == (tmp_path / "whole" / "run" / "clients.csv").read_text()
    # the wall time of a resumed run counts both parts: the first (as its checkpoint recorded
    # it, at most the first run's own) and this one
    assert 0 < saved["wall_time_s"] <= first["wall_time_s"]
    assert resumed["wall_time_s"] == pytest.approx(saved["wall_time_s"] + second_part, abs=1.0)
    assert resumed["wall_time_s"] > saved["wall_time_s"]


# every LoRA algorithm, and the aggregators that merge into the base weights
@pytest.mark.parametrize(
    "overrides",
    [
        *(
            [f"alg={alg}"]
            for alg in ("fedlora", "ffa-lora", "rolora", "feddpa", "fedsa-flora", "lora-fair")
        ),
        *(["alg=fedlora", f"aggregator={rule}"] for rule in ("stack", "svd", "exact")),
    ],
    ids=lambda overrides: " ".join(overrides),
)
def test_frozen_weights_change_only_through_the_servers_payload(overrides, tmp_path):
    """What leaving them out of checkpoints rests on: the rest stay as built, and those the
    payload carries are loaded by every download (docs/architecture.md, Checkpoints)."""
    cfg = digits_config(tmp_path, *overrides, "fl.num_clients=4", "fl.clients_per_round=2")
    built = build_module(cfg, tmp_path / "built").state_dict()
    module = build_module(cfg, tmp_path)
    build_trainer(cfg, logger=False, callbacks=[]).fit(module)
    after = module.state_dict()
    changed = {n for n in module._frozen_weights()["names"] if not torch.equal(after[n], built[n])}
    assert changed <= {f"model.{name}" for name in module.server.payload(None)}
    assert bool(changed) == any(o.startswith("aggregator=") for o in overrides)  # the merged bases


def test_a_checkpoint_with_the_whole_model_in_it_still_resumes(tmp_path):
    """As fedsweep wrote them before: every frozen weight in the state dict, no fingerprint."""
    cfg = digits_config(tmp_path / "first", "alg=fedlora", "fl.rounds=1", THREADS)
    train(cfg)
    saved = torch.load(_checkpoint(tmp_path / "first"), weights_only=True)
    names = saved["fedsweep"].pop("frozen")["names"]
    model = build_module(cfg, tmp_path / "fresh").state_dict()
    saved["state_dict"] |= {name: model[name] for name in names}
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    train(digits_config(tmp_path / "resumed", "alg=fedlora", f"resume={old}", THREADS))
    train(digits_config(tmp_path / "whole", "alg=fedlora", THREADS))
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "whole")


def test_a_checkpoint_of_other_frozen_weights_is_refused_with_one_line(
    tmp_path, monkeypatch, capfd
):
    """The config is the same (model.weights names the same file), the file is not."""
    weights = tmp_path / "backbone.pt"
    run = ["experiment=quickstart", "alg=fedlora", *ONE_BLOCK_VIT]
    run += ["fl.eval_every=1", "fl.local_epochs=1", THREADS]
    backbone = build_base_model(digits_config(tmp_path, *run)).state_dict()
    torch.save(backbone, weights)
    run.append(f"model.weights={weights}")
    train(digits_config(tmp_path / "first", *run, "fl.rounds=1"))
    checkpoint = _checkpoint(tmp_path / "first")
    torch.save({name: t + 0.01 for name, t in backbone.items()}, weights)  # another pretraining

    args = [*run, "fl.rounds=2", "logger=none", "trainer.enable_progress_bar=false"]
    args += [f"hydra.run.dir={tmp_path / 'resumed'}", f"resume={checkpoint}"]
    code, output = run_main(args, monkeypatch, capfd)
    assert code == 2, output[-1500:]
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "ERROR" in line]
    assert line.endswith(
        f"resume={checkpoint}: the frozen base weights differ from the ones the checkpoint was "
        f"made with (model=vit_small32 seed=0 model.weights={weights}); rebuild them the same "
        "way (same model config, weights file and seed) or resume=never"
    )

    torch.save(backbone, weights)  # the same weights again: the run goes on
    resumed = train(digits_config(tmp_path / "again", *run, f"resume={checkpoint}"))
    assert resumed["rounds_done"] == 2
