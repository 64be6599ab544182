"""Text: prompt template and loss masking, the dolly and departments loaders,
the natural partition, qwen_tiny end to end, and the offline error of model=qwen."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel

from src.config_checks import validate_config
from src.data import NaturalPartitioner
from src.data.departments import DEPARTMENTS
from src.data.text import (
    IGNORE_INDEX,
    encode_example,
    format_prompt,
    load_departments,
    load_dolly,
    tokenize_rows,
)
from src.engine.data import DeviceTokens
from src.errors import ConfigError
from src.export import export_models, load_exported
from src.models.tokenizers import ByteTokenizer
from src.run import build_module, build_trainer
from tests.conftest import ROOT, RecordingMean, compose_config

BYTES = ByteTokenizer()


def _row(instruction, response, category="qa", context=""):
    return {
        "instruction": instruction,
        "context": context,
        "response": response,
        "category": category,
    }


def test_prompt_template_and_response_only_labels():
    row = _row("Say hi", "Hi!")
    prompt = "### Instruction:\nSay hi\n\n### Response:\n"
    assert format_prompt(row) == prompt
    assert "### Context:\nabc\n\n### Response:" in format_prompt(
        _row("Say hi", "Hi!", context="abc")
    )

    input_ids, labels = encode_example(BYTES, row, max_length=100)
    expected = list(prompt.encode()) + list(b"Hi!") + [BYTES.eos_token_id]
    assert input_ids == expected
    assert labels == [IGNORE_INDEX] * len(prompt) + list(b"Hi!") + [BYTES.eos_token_id]

    cut_ids, cut_labels = encode_example(BYTES, row, max_length=len(prompt) + 1)
    assert cut_ids == expected[: len(prompt) + 1] and cut_labels[-1] == ord("H")


def test_targets_are_the_next_response_token_and_batches_are_cut_to_the_longest():
    rows = [_row("Say hi", "Hi!"), _row("Say a longer greeting", "Good morning!")]
    split, _ = tokenize_rows(rows, BYTES, max_length=64, categories=["qa"])
    served = DeviceTokens(split)
    inputs, targets = served.batch(torch.tensor([0]))
    n = int(split.lengths[0])
    assert inputs.shape == (1, n) and n < int(split.lengths[1])  # cut to its own length
    assert torch.equal(targets[0, :-1], split.labels[0, 1:n])  # position t predicts token t + 1
    assert targets[0, -1] == IGNORE_INDEX
    assert (targets[0] != IGNORE_INDEX).sum() == len(b"Hi!") + 1  # the response + end of sequence
    assert served.served_tokens == n
    both, _ = served.batch(torch.tensor([0, 1]))
    assert both.shape == (2, int(split.lengths[1]))  # padded to the longest in the batch


def _dolly_rows(category, n):
    return [_row(f"{category} question {i}", f"answer {i}", category) for i in range(n)]


def test_dolly_loader_reads_the_shepherd_layout(tmp_path):
    for i, category in enumerate(["open_qa", "summarization"]):
        (tmp_path / f"local_training_{i}.json").write_text(json.dumps(_dolly_rows(category, 6)))
    (tmp_path / "global_test.json").write_text(json.dumps(_dolly_rows("classification", 3)))
    data = load_dolly(BYTES, path=str(tmp_path), max_length=64)
    assert len(data.train) == 12 and len(data.test) == 3
    assert data.categories == ["classification", "open_qa", "summarization"]
    assert data.train.categories.tolist() == [1] * 6 + [2] * 6
    assert data.test.categories.tolist() == [0, 0, 0]


def test_dolly_loader_reads_one_jsonl_and_holds_out_part_of_every_category(tmp_path):
    path = tmp_path / "dolly.jsonl"
    rows = _dolly_rows("brainstorming", 10) + _dolly_rows("open_qa", 10)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dolly(BYTES, path=str(path), max_length=64, test_fraction=0.2)
    assert len(data.train) == 16 and len(data.test) == 4
    assert data.categories == ["brainstorming", "open_qa"]
    assert sorted(data.test.categories.tolist()) == [0, 0, 1, 1]


def test_departments_are_deterministic_and_natural_clients_see_one_department():
    first = load_departments(BYTES, samples_per_department=40, seed=3)
    again = load_departments(BYTES, samples_per_department=40, seed=3)
    assert torch.equal(first.train.input_ids, again.train.input_ids)
    assert first.categories == sorted(DEPARTMENTS) and len(first.categories) == 4

    labels = first.train.partition_labels.numpy()
    clients = NaturalPartitioner()(labels, 8, seed=0)
    seen = [set(labels[c.train.numpy()]) | set(labels[c.test.numpy()]) for c in clients]
    assert all(len(s) == 1 for s in seen)  # each client: one department
    assert set().union(*seen) == {0, 1, 2, 3}
    assert [c.group for c in clients] == [0, 0, 1, 1, 2, 2, 3, 3]
    two = NaturalPartitioner()(labels, 2, seed=0)  # fewer clients than departments
    assert [set(labels[c.train.numpy()]) for c in two] == [{0, 2}, {1, 3}]


TEXT_RUN = [
    "model=qwen_tiny",
    "data=departments",
    "data.max_length=128",  # the learning margins below were measured at 128 tokens
    "partitioner=natural",
    "optim=adamw",
    "optim.lr=0.01",
    "fl.num_clients=4",
    "fl.clients_per_round=4",
    "fl.batch_size=16",
    "fl.eval_every=1",
]


def _fit_recording(tmp_path, *overrides):
    cfg = compose_config([*TEXT_RUN, *overrides], tmp_path)
    module = build_module(cfg, tmp_path)
    module.aggregator = RecordingMean()
    trainer = build_trainer(cfg, logger=False, enable_checkpointing=False)
    trainer.fit(module)
    return module


# val/loss over 3 rounds falls by 0.364-0.409 (fedlora) and 0.184-0.251 (fedsa-flora) over seeds
# 0-2 x trainer.threads 1, 2 (2026-12-06, AMD EPYC, about 5 s per run; e.g. fedlora 4.95 -> 4.54 at
# seed 0; uniform over the 258 byte tokens would be 5.55): the test asks for 0.1.
@pytest.mark.parametrize(
    ("alg", "uploaded"), [("fedlora", (".lora_A.", ".lora_B.")), ("fedsa-flora", (".lora_A.",))]
)
@pytest.mark.learning
def test_qwen_tiny_lora_lowers_the_loss_and_uploads_only_adapters(tmp_path, alg, uploaded):
    module = _fit_recording(tmp_path, f"alg={alg}", "fl.rounds=3")
    losses = [row["val/loss"] for row in module.recorder.rows]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses
    for upload in module.aggregator.uploads:
        assert upload and all(any(key in name for key in uploaded) for name in upload), upload
    last = module.recorder.rows[-1]
    assert last["val/ppl"] == pytest.approx(torch.tensor(last["val/loss"]).exp().item())
    assert last["train/tokens_per_s"] > 0 and 0 < last["val/token_acc"] < 1


def test_fedavg_and_perfed_run_on_qwen_tiny(tmp_path):
    fedavg = _fit_recording(tmp_path / "fedavg", "alg=fedavg", "fl.rounds=1")
    assert any("embed_tokens" in name for name in fedavg.aggregator.uploads[0])  # everything
    perfed = _fit_recording(
        tmp_path / "perfed", "alg=perfed", "alg.steps=2", "alg.local_rounds=1", "fl.rounds=1"
    )
    assert all(set(upload) == {"x"} for upload in perfed.aggregator.uploads)
    personal = perfed.algorithm.private_names(perfed.model)
    assert personal and all("lora_" in name for name in personal)  # the personal model is LoRA


def test_qwen_without_network_fails_fast_with_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), WANDB_MODE="offline")
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.run",
            "model=qwen",
            "data=departments",
            "logger=none",
            "trainer=cpu",
            f"paths.output_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "model.path='Qwen/Qwen2.5-0.5B'" in output
    assert "Traceback" not in output
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize(
    ("model", "data", "needs"),
    [("qwen_tiny", "digits", "an image model"), ("vit_small32", "departments", "a language model")],
)
def test_text_data_and_image_models_do_not_mix(tmp_path, model, data, needs):
    cfg = compose_config([f"model={model}", f"data={data}"], tmp_path)
    with pytest.raises(ConfigError, match=needs):
        validate_config(cfg)


@pytest.mark.parametrize("alg", ["fedsa-flora", "fedavg"])
def test_exported_qwen_loads_as_a_plain_hugging_face_model(alg, tmp_path):
    """fedsa-flora: a peft adapter per client on the plain transformers model; fedavg (the whole
    model trained): a save_pretrained folder."""
    module = _fit_recording(tmp_path, f"alg={alg}", "fl.rounds=1")
    module.run_config = OmegaConf.to_container(
        compose_config([*TEXT_RUN, f"alg={alg}"], tmp_path), resolve=True
    )
    export_models(module, tmp_path / "export")
    which = 1 if alg == "fedsa-flora" else "global"
    loaded = load_exported(tmp_path / "export", which)
    assert isinstance(loaded, PeftModel) == (alg == "fedsa-flora")
    module.deploy(None if which == "global" else which)
    module.model.eval()
    tokens = module.federation.test.input_ids[:2, :20]
    with torch.no_grad():
        expected = module.model(tokens)
        got = loaded(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
