"""The generated department instruction dataset: determinism, shape, fixed facts, distinct vocab."""

import re
from collections import defaultdict
from itertools import combinations

import pytest

from src.data.departments import DEPARTMENTS, generate_departments
from src.errors import ConfigError
from tests.conftest import ROOT

KEYS = ("instruction", "context", "response", "category")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _by_department(rows):
    grouped = defaultdict(list)
    for row in rows:
        grouped[row["category"]].append(row)
    return grouped


def test_same_seed_gives_equal_lists_and_different_seed_differs():
    assert generate_departments(50, seed=3) == generate_departments(50, seed=3)
    assert generate_departments(50, seed=3) != generate_departments(50, seed=4)


def test_four_departments_with_samples_per_department_rows_each_and_str_keys():
    rows = generate_departments(samples_per_department=37, seed=0)
    assert DEPARTMENTS == ("engineering", "finance", "hr", "customer_support")
    assert len(rows) == 4 * 37
    assert all(tuple(row) == KEYS and all(isinstance(v, str) for v in row.values()) for row in rows)
    assert all(row["instruction"] and row["response"] for row in rows)
    # department order: a block of 37 rows per department, in DEPARTMENTS order
    assert [row["category"] for row in rows] == [d for d in DEPARTMENTS for _ in range(37)]


def test_same_instruction_and_context_always_map_to_the_same_response():
    # facts are constants: one answer per question within a seed and across seeds
    answers = defaultdict(set)
    for seed in (0, 1):
        for row in generate_departments(300, seed=seed):
            answers[(row["instruction"], row["context"])].add(row["response"])
    assert all(len(responses) == 1 for responses in answers.values())
    # and the mapping is worth learning: many questions repeat, many distinct answers
    rows = generate_departments(300, seed=0)
    assert len({(r["instruction"], r["context"]) for r in rows}) < len(rows) // 2
    for department_rows in _by_department(rows).values():
        assert len({r["response"] for r in department_rows}) >= 10


def test_departments_use_different_vocabulary():
    grouped = _by_department(generate_departments(300, seed=0))
    instructions = {d: {r["instruction"] for r in grouped[d]} for d in DEPARTMENTS}
    vocab = {d: set().union(*(_words(r["instruction"]) for r in grouped[d])) for d in DEPARTMENTS}
    for a, b in combinations(DEPARTMENTS, 2):
        assert not instructions[a] & instructions[b]  # no question is shared
        jaccard = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
        assert jaccard < 0.3, (a, b, jaccard)
    # every department has words no other department uses
    for d in DEPARTMENTS:
        others = set().union(*(vocab[o] for o in DEPARTMENTS if o != d))
        assert len(vocab[d] - others) >= 10, d


def test_rows_are_short_ascii_and_some_have_context():
    rows = generate_departments(300, seed=0)
    lengths = [len(r["instruction"]) + len(r["context"]) + len(r["response"]) for r in rows]
    assert all(40 <= n <= 220 for n in lengths)
    assert all(v.isascii() for r in rows for v in r.values())
    for department_rows in _by_department(rows).values():
        with_context = sum(bool(r["context"]) for r in department_rows) / len(department_rows)
        assert 0.1 < with_context < 0.5  # some rows have context, most do not


@pytest.mark.parametrize("bad", [0, -1, 2.5, "10", None, True])
def test_bad_samples_per_department_raises_config_error(bad):
    with pytest.raises(ConfigError, match=r"data\.loader\.samples_per_department") as info:
        generate_departments(samples_per_department=bad)
    assert "\n" not in str(info.value)


def test_the_default_max_length_fits_every_row_and_a_shorter_one_warns_once(caplog):
    from omegaconf import OmegaConf

    from src.data.text import load_departments
    from src.models.tokenizers import ByteTokenizer

    default = OmegaConf.load(ROOT / "conf" / "data" / "departments.yaml").max_length
    with caplog.at_level("WARNING"):
        for seed in (0, 1, 2):
            data = load_departments(ByteTokenizer(), max_length=default, seed=seed)
            assert len(data.train) + len(data.test) == 4 * 300  # none dropped
    assert not caplog.records  # none cut
    with caplog.at_level("WARNING"):
        load_departments(ByteTokenizer(), max_length=128, seed=0)
    (warning,) = [r.getMessage() for r in caplog.records]
    cut, dropped = re.search(
        r"(\d+) of 1200 rows cut short \((\d+) of them dropped", warning
    ).groups()
    assert 0 < int(dropped) < int(cut) < 1200
