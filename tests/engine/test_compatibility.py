"""The compatibility matrix (tests/compat_matrix.py): every alg x aggregator x attack cell runs one
tiny round with no dropped client, or is refused before training with one line. The full matrix
is slow; a representative subset (every refusal rule and the combinations that used to fail
quietly) runs in `make test`."""

from pathlib import Path

import pytest

from tests.compat_matrix import cells, check_cell, read_table, run_cell, system_cells

SUBSET = {
    # (cell label, expected status, a part of the reason)
    "fedlora | stack | sign_flip": ("ok", ""),  # used to drop every attacker (no received A)
    "fedlora (ranks [2,4]) | svd | sign_flip": ("ok", ""),
    "fedsa-flora (groups 2) | krum | none": ("refused", "2 group-level uploads"),
    "fedsa-flora (groups 2) | median | none": ("refused", "the median of 2 uploads is their mean"),
    "fedsa-flora (groups 3) | median | label_flip": ("ok", ""),
    "fedsa-flora (clusters) | trimmed_mean | sign_flip": ("ok", ""),
    "fedavg | mean | gaussian": ("refused", "use aggregator=median, trimmed_mean or krum"),
    "fedavg | median | same_value": ("ok", ""),
    "fedlora (ranks [2,4]) | exact | none": ("refused", "aggregator=exact needs uploads of equal"),
    "ffa-lora | stack | none": ("refused", "does not upload lora_A"),
    "perfed | krum | sign_flip": ("ok", ""),
    "perfed | svd | none": ("refused", "trains no LoRA adapters"),
    "scaffold (lora) | stack | none": ("refused", "uploads differences"),
    "scaffold | trimmed_mean | sign_flip": ("ok", ""),
    "ditto (lora) | stack | sign_flip": ("ok", ""),
    "fedprox (lora) | rank_aware | label_flip": ("ok", ""),
}
BY_LABEL = {cell.label: cell for cell in cells()}
TABLE_PATH = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"
TABLE = read_table(TABLE_PATH)
REGENERATE = "regenerate it: python -m tests.compat_matrix docs/compatibility.md"


def _agrees_with_the_checks(
    label: str, tmp_path: Path, by_label=BY_LABEL, table=TABLE, regenerate=REGENERATE
) -> None:
    """The docs table says what the checks say before training: the same refusal line, or
    accepted."""
    status, found = check_cell(by_label[label], tmp_path)
    reason = found if status == "refused" else ""
    doc = regenerate.rsplit(" ", 1)[1]
    assert table[label] == (status, reason), (
        f"{doc} is stale for {label}: it says {table[label]}, the checks say "
        f"{(status, reason)}; {regenerate}"
    )


def test_the_table_lists_every_cell():
    assert set(TABLE) == set(BY_LABEL), f"docs/compatibility.md lists other cells; {REGENERATE}"


# Every fourth (algorithm variant, aggregator) pair, with the attacks taken in turn: each variant
# meets two or three aggregators, every aggregator and attack is met about equally often; about
# 54 cells, 15 s (the pre-training checks of every cell: slow, below).
PAIRS = sorted({label.rsplit(" | ", 1)[0] for label in BY_LABEL})
ATTACKS = sorted({label.rsplit(" | ", 1)[1] for label in BY_LABEL})
ROTATION = [f"{pair} | {ATTACKS[i % len(ATTACKS)]}" for i, pair in enumerate(PAIRS)][::4]


@pytest.mark.parametrize("label", ROTATION)
def test_the_table_agrees_with_the_checks(label, tmp_path):
    _agrees_with_the_checks(label, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(set(BY_LABEL) - set(ROTATION)))
def test_the_whole_table_agrees_with_the_checks(label, tmp_path):
    _agrees_with_the_checks(label, tmp_path)


def test_the_subset_names_existing_cells():
    assert set(SUBSET) <= set(BY_LABEL)


@pytest.mark.parametrize("label", sorted(SUBSET))
def test_representative_cells(label, tmp_path):
    status, reason = run_cell(BY_LABEL[label], tmp_path)
    expected_status, expected_reason = SUBSET[label]
    assert status == expected_status, reason
    assert expected_reason in reason


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(set(BY_LABEL) - set(SUBSET)))
def test_every_cell_runs_or_is_refused_up_front(label, tmp_path):
    status, reason = run_cell(BY_LABEL[label], tmp_path)
    assert status in ("ok", "refused")


# The second table: algorithm variants x system policy x compression (docs/compatibility_system.md)
SYSTEM_BY_LABEL = {cell.label: cell for cell in system_cells()}
SYSTEM_TABLE = read_table(TABLE_PATH.with_name("compatibility_system.md"))
SYSTEM_REGENERATE = (
    "regenerate it: python -m tests.compat_matrix --system docs/compatibility_system.md"
)
# every sixteenth cell, 28 (each algorithm variant meets one setting), the rest slow
SYSTEM_ROTATION = sorted(SYSTEM_BY_LABEL)[::16]


def test_the_system_table_lists_every_cell():
    assert set(SYSTEM_TABLE) == set(SYSTEM_BY_LABEL), (
        f"docs/compatibility_system.md lists other cells; {SYSTEM_REGENERATE}"
    )


def _system_cell_agrees(label: str, tmp_path: Path) -> None:
    _agrees_with_the_checks(label, tmp_path, SYSTEM_BY_LABEL, SYSTEM_TABLE, SYSTEM_REGENERATE)


@pytest.mark.parametrize("label", SYSTEM_ROTATION)
def test_the_system_table_agrees_with_the_checks(label, tmp_path):
    _system_cell_agrees(label, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(set(SYSTEM_BY_LABEL) - set(SYSTEM_ROTATION)))
def test_the_whole_system_table_agrees_with_the_checks(label, tmp_path):
    _system_cell_agrees(label, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(SYSTEM_BY_LABEL))
def test_every_system_cell_runs_or_is_refused_up_front(label, tmp_path):
    status, reason = run_cell(SYSTEM_BY_LABEL[label], tmp_path)
    assert status in ("ok", "refused")
