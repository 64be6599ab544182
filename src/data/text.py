"""Instruction data for the causal LMs: one prompt template, response-only loss,
tokenised once into padded int64 tensors.

The template (the "### Context" block only when the row has a context):

    ### Instruction:
    {instruction}

    ### Context:
    {context}

    ### Response:
    {response}<eos>

`labels` follow the Hugging Face convention: the token itself on response tokens (and the final
end-of-sequence), -100 on the prompt and on padding. Sequences are cut at `max_length` tokens;
a row with no response token left is dropped (and counted in the log).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from src.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt, padding)
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"


def format_prompt(row: dict) -> str:
    """Everything before the response, in the template above."""
    prompt = f"### Instruction:\n{row['instruction'].strip()}\n\n"
    context = (row.get("context") or "").strip()
    if context:
        prompt += f"### Context:\n{context}\n\n"
    return prompt + "### Response:\n"


def encode_example(
    tokenizer, row: dict, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row, at most `max_length` tokens (None: all of them); labels
    are -100 on the prompt."""
    prompt = tokenizer(format_prompt(row), add_special_tokens=False)["input_ids"]
    response = tokenizer(row["response"].strip(), add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return input_ids, labels


@dataclass
class TokenSplit:
    input_ids: torch.Tensor  # int64 [N, max_length], right-padded
    labels: torch.Tensor  # int64 [N, max_length], -100 outside the response
    lengths: torch.Tensor  # int64 [N], tokens before the padding
    categories: torch.Tensor  # int64 [N], index into TextDataset.categories

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def partition_labels(self) -> torch.Tensor:
        """What partitioners split by: the category (dolly) or department."""
        return self.categories


@dataclass
class TextDataset:
    name: str
    train: TokenSplit  # the pool that gets partitioned over clients
    test: TokenSplit  # the global test set
    categories: list[str]
    pad_token_id: int

    @property
    def num_classes(self) -> int:  # categories play the role of classes for the partitioners
        return len(self.categories)


@dataclass
class Cuts:
    """What data.max_length cost: rows whose response was cut short, rows dropped because the
    prompt alone filled it, and the longest row before cutting (tokens)."""

    rows: int = 0
    cut: int = 0
    dropped: int = 0
    longest: int = 0

    def add(self, other: Cuts) -> Cuts:
        return Cuts(
            self.rows + other.rows,
            self.cut + other.cut,
            self.dropped + other.dropped,
            max(self.longest, other.longest),
        )


def tokenize_rows(
    rows: list[dict], tokenizer, max_length: int, categories: list[str]
) -> tuple[TokenSplit, Cuts]:
    """The rows as padded token tensors, each cut at `max_length` tokens (a row whose prompt
    alone fills them is dropped: nothing to learn from), and what the cutting cost."""
    if int(max_length) < 8:
        raise ConfigError(f"data.max_length must be >= 8 tokens, got {max_length}")
    encoded, cats, cuts = [], [], Cuts(rows=len(rows))
    index = {name: i for i, name in enumerate(categories)}
    for row in rows:
        ids, labels = encode_example(tokenizer, row)
        cuts.longest = max(cuts.longest, len(ids))
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            cuts.cut += 1
        if all(label == IGNORE_INDEX for label in labels):
            cuts.dropped += 1
            continue
        encoded.append((ids, labels))
        cats.append(index[row["category"]])
    if not encoded:
        raise ConfigError(f"no usable rows: every prompt exceeds data.max_length={max_length}")
    n = len(encoded)
    input_ids = torch.full((n, int(max_length)), tokenizer.pad_token_id, dtype=torch.int64)
    labels = torch.full((n, int(max_length)), IGNORE_INDEX, dtype=torch.int64)
    lengths = torch.empty(n, dtype=torch.int64)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        lengths[i] = len(ids)
    split = TokenSplit(input_ids, labels, lengths, torch.tensor(cats, dtype=torch.int64))
    return split, cuts


def build_text_dataset(name, train_rows, test_rows, tokenizer, max_length) -> TextDataset:
    categories = sorted({row["category"] for row in train_rows + test_rows})
    train, train_cuts = tokenize_rows(train_rows, tokenizer, max_length, categories)
    test, test_cuts = tokenize_rows(test_rows, tokenizer, max_length, categories)
    cuts = train_cuts.add(test_cuts)
    if cuts.cut:  # one warning for the whole data set
        log.warning(
            "data.max_length=%d: %d of %d rows cut short (%d of them dropped: the prompt alone "
            "fills it); the longest row has %d tokens",
            max_length,
            cuts.cut,
            cuts.rows,
            cuts.dropped,
            cuts.longest,
        )
    log.info(
        "%s: %d train / %d test sequences, %d categories, mean length %.0f tokens",
        name,
        len(train),
        len(test),
        len(categories),
        train.lengths.float().mean().item(),
    )
    return TextDataset(name, train, test, categories, int(tokenizer.pad_token_id))


def _held_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): a seeded `fraction` of every category held out as the global test set."""
    if not 0 < fraction < 1:
        raise ConfigError(f"data.loader.test_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for category in sorted({row["category"] for row in rows}):
        members = [row for row in rows if row["category"] == category]
        order = rng.permutation(len(members))
        n_test = max(1, int(round(fraction * len(members))))
        test += [members[i] for i in order[:n_test]]
        train += [members[i] for i in order[n_test:]]
    return train, test


# --------------------------------------------------------------------------- dolly


def _read_json_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _dolly_files(path: str | None) -> tuple[list[str], str | None]:
    """(train files, global test file or None) for a Shepherd folder, a jsonl/json file, or the hub."""
    if path is None:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(DOLLY_HUB_ID, "databricks-dolly-15k.jsonl", repo_type="dataset")
        except Exception as error:  # noqa: BLE001 - offline, no cache: one clear line
            raise ConfigError(
                f"data.loader.path is null and {DOLLY_HUB_ID} could not be fetched from the hub "
                f"({type(error).__name__}); set data.loader.path to a Dolly jsonl file or a "
                "folder of local_training_*.json + global_test.json"
            ) from None
    if os.path.isdir(path):
        shards = sorted(
            glob.glob(os.path.join(path, "local_training_*.json")),
            key=lambda f: int(Path(f).stem.rsplit("_", 1)[1]),
        )
        if shards:
            test = os.path.join(path, "global_test.json")
            return shards, test if os.path.exists(test) else None
        single = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        if single:
            return single[:1], None
        raise ConfigError(
            f"data.loader.path={path!r} has neither local_training_*.json files nor a .jsonl file"
        )
    if os.path.isfile(path):
        return [path], None
    raise ConfigError(f"data.loader.path={path!r} does not exist")


def load_dolly(
    tokenizer,
    path: str | None = None,
    max_length: int = 256,
    max_rows: int | None = None,
    max_test_rows: int | None = None,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> TextDataset:
    """Dolly-15k rows {instruction, context, response, category}: a Shepherd-layout folder
    (local_training_*.json are pooled; global_test.json is the global test set), one .jsonl/.json
    file (a seeded `test_fraction` per category is held out), or the hub (`path=null`).
    `max_rows` / `max_test_rows`: a seeded subset, for CPU runs."""
    train_files, test_file = _dolly_files(path)
    rows = [row for f in train_files for row in _read_json_rows(f)]
    for key in ("instruction", "response", "category"):
        if rows and key not in rows[0]:
            raise ConfigError(
                f"data.loader.path: rows have no '{key}' field (keys: {sorted(rows[0])})"
            )
    if test_file is None:
        train, test = _held_out(rows, test_fraction, seed)
    else:
        train, test = rows, _read_json_rows(test_file)
    rng = np.random.default_rng(seed)
    if max_rows is not None and max_rows < len(train):
        train = [train[i] for i in np.sort(rng.choice(len(train), int(max_rows), replace=False))]
    if max_test_rows is not None and max_test_rows < len(test):
        test = [test[i] for i in np.sort(rng.choice(len(test), int(max_test_rows), replace=False))]
    return build_text_dataset("dolly", train, test, tokenizer, max_length)


# --------------------------------------------------------------------------- departments


def load_departments(
    tokenizer,
    max_length: int = 224,
    samples_per_department: int = 300,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TextDataset:
    """The generated four-department instruction set (src/data/departments.py); a seeded
    `test_fraction` of every department is the global test set."""
    from src.data.departments import generate_departments

    rows = generate_departments(samples_per_department, seed)
    train, test = _held_out(rows, test_fraction, seed)
    return build_text_dataset("departments", train, test, tokenizer, max_length)
