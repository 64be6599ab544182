"""The client state store under a memory budget: the least recently used clients' tensors go to
disk and come back identical; checkpoints refer to immutable versions by name, which are deleted
only once no checkpoint can refer to them; a run killed after a checkpoint with most clients on
disk resumes to the same metrics; the budget key is checked."""

from __future__ import annotations

import pytest
import torch

from src.config_checks import validate_config
from src.engine.client_state import ClientStateStore
from src.errors import ConfigError
from tests.conftest import compose_config, run_main

CLIENT_BYTES = 2 * 100 * 8  # two float64 tensors of 100 numbers


def _state(client_id: int, round_idx: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * round_idx + client_id)
    return {
        "w": torch.randn(10, 10, generator=g, dtype=torch.float64),
        "b": torch.randn(100, generator=g, dtype=torch.float64),
    }


def _store(tmp_path, clients_in_memory: float = 3) -> ClientStateStore:
    store = ClientStateStore(memory_gb=clients_in_memory * CLIENT_BYTES / 1e9, folder=tmp_path)
    store.set_initial({n: torch.zeros_like(t) for n, t in _state(0).items()})
    return store


def _versions(folder) -> set[str]:
    return {p.name for p in folder.glob("client_*")}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name], b[name])


def test_store_spills_beyond_its_budget_and_loads_back_identical_tensors(tmp_path):
    store = _store(tmp_path)
    for c in range(10):
        store.save(c, _state(c))
        assert store.resident_bytes <= 3 * CLIENT_BYTES
    assert list(store.saved) == [7, 8, 9]  # the most recently used stay in memory
    assert len(store) == 10 and len(_versions(tmp_path)) == 7  # one file per spilled client
    for c in range(10):
        _assert_same(store.load(c), _state(c))
        assert store.resident_bytes <= 3 * CLIENT_BYTES
    assert store.load(10) is store.initial  # never trained: the initial tensors, not a file
    assert store.written == 10  # the 7, then 7, 8, 9 pushed out by the reads
    for c in range(10):
        _assert_same(store.load(c), _state(c))
    assert store.written == 10  # unchanged since written: evicted again without a rewrite


def test_a_client_larger_than_the_budget_stays_until_the_next_one(tmp_path):
    store = _store(tmp_path, clients_in_memory=0.5)
    store.save(0, _state(0))
    assert list(store.saved) == [0] and store.written == 0
    store.save(1, _state(1))
    assert list(store.saved) == [1] and store.written == 1
    _assert_same(store.load(0), _state(0))


def test_checkpoints_refer_to_versions_deleted_only_when_no_checkpoint_can_refer_to_them(
    tmp_path,
):
    store = _store(tmp_path)
    for c in range(5):
        store.save(c, _state(c))
    first = store.state_dict()  # clients 0, 1 spilled; 2, 3, 4 written now: all by name
    assert first["saved"] == {} and sorted(first["files"]) == [0, 1, 2, 3, 4]
    store.save(0, _state(0, round_idx=1))  # a new state: its next version, later
    store.save(0, _state(0, round_idx=2))
    second = store.state_dict()
    assert first["files"][0] != second["files"][0]
    assert first["files"][0] in _versions(tmp_path)  # the first checkpoint is on disk still
    store.state_dict()  # the second checkpoint replaced the first: its version can go
    assert first["files"][0] not in _versions(tmp_path)
    assert second["files"][0] in _versions(tmp_path)
    assert len(_versions(tmp_path)) == 5  # no version was written that is not referred to


def test_resumed_store_reads_the_checkpoints_files_and_continues_their_versions(tmp_path):
    store = _store(tmp_path)
    for c in range(6):
        store.save(c, _state(c))
    state = store.state_dict()
    resumed = _store(tmp_path)
    resumed.load_state_dict(state)
    assert resumed.resident_bytes == 0  # nothing read until a client is loaded
    for c in range(6):
        _assert_same(resumed.load(c), _state(c))
    resumed.save(3, _state(3, round_idx=1))
    resumed.state_dict()
    assert resumed.version == store.version + 1  # no version name is used twice


def test_a_run_resumed_from_another_runs_checkpoint_never_deletes_that_runs_files(tmp_path):
    store = _store(tmp_path / "first")
    for c in range(6):
        store.save(c, _state(c))
    state = store.state_dict()
    before = _versions(tmp_path / "first")
    other = _store(tmp_path / "second")
    other.load_state_dict(state)
    for c in range(6):
        other.save(c, _state(c, round_idx=1))
        for _ in range(3):
            other.state_dict()
    assert _versions(tmp_path / "first") == before
    for c in range(6):
        _assert_same(other.load(c), _state(c, round_idx=1))


def test_a_checkpoint_whose_files_are_gone_is_refused_in_one_line(tmp_path):
    store = _store(tmp_path / "run")
    for c in range(6):
        store.save(c, _state(c))
    state = store.state_dict()
    gone = tmp_path / "run" / state["files"][0]
    gone.unlink()
    with pytest.raises(ConfigError, match=f"missing file.*{gone.name}.*client_state/"):
        _store(tmp_path / "run").load_state_dict(state)


def test_without_a_spill_the_checkpoint_holds_the_tensors(tmp_path):
    store = _store(tmp_path, clients_in_memory=10)
    for c in range(3):
        store.save(c, _state(c))
    state = store.state_dict()
    assert state["files"] == {} and sorted(state["saved"]) == [0, 1, 2]
    assert not tmp_path.exists() or not _versions(tmp_path)
    resumed = ClientStateStore()
    resumed.load_state_dict({"initial": state["initial"], "saved": state["saved"]})  # old format
    _assert_same(resumed.load(1), _state(1))


def test_many_states_in_memory_go_to_the_checkpoint_by_name_and_only_when_changed(tmp_path):
    store = _store(tmp_path, clients_in_memory=10)
    store.inline_bytes = 2 * CLIENT_BYTES
    for c in range(3):
        store.save(c, _state(c))
    state = store.state_dict()
    assert state["saved"] == {} and sorted(state["files"]) == [0, 1, 2]
    assert list(store.saved) == [0, 1, 2] and store.written == 3  # still in memory
    store.save(1, _state(1, round_idx=1))
    again = store.state_dict()
    assert store.written == 4  # only the changed client
    assert {c: n for c, n in again["files"].items() if c != 1} == {
        c: n for c, n in state["files"].items() if c != 1
    }
    resumed = _store(tmp_path, clients_in_memory=10)
    resumed.load_state_dict(again)
    _assert_same(resumed.load(1), _state(1, round_idx=1))
    _assert_same(resumed.load(2), _state(2))


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "lots", "true"])
def test_budget_key_refusal_names_key_value_and_what_is_allowed(value, tmp_path):
    cfg = compose_config(["experiment=quickstart", f"fl.client_state_memory_gb={value}"], tmp_path)
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("fl.client_state_memory_gb")
    assert "> 0 (finite)" in message or "a number (float)" in message


def test_budget_refusal_on_the_command_line_is_one_line(tmp_path, monkeypatch, capfd):
    args = ["experiment=quickstart", f"hydra.run.dir={tmp_path}", "fl.client_state_memory_gb=0"]
    code, output = run_main(args, monkeypatch, capfd)
    assert code == 2 and "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "ERROR" in line]
    assert "fl.client_state_memory_gb must be > 0 (finite), got 0" in line


def test_run_with_clients_on_disk_killed_after_a_checkpoint_resumes_to_identical_metrics(
    tmp_path,
):
    from tests.conftest import ONE_BLOCK_VIT
    from tests.engine.test_resume import _kill_after_first_checkpoint, _metrics, _run_in_process

    # ditto keeps a whole personal model per client (about 40 kB here): a 10 kB budget keeps one
    overrides = ["alg=ditto", "fl.client_state_memory_gb=0.00001", *ONE_BLOCK_VIT]
    killed = tmp_path / "killed"
    rounds_saved = _kill_after_first_checkpoint(killed, *overrides)
    assert 1 <= rounds_saved < 4
    saved = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    clients = saved["fedsweep"]["clients"]
    assert clients["saved"] == {} and len(clients["files"]) >= 3  # every trained client by name
    resumed = _run_in_process(killed, *overrides)
    uninterrupted = _run_in_process(tmp_path / "whole", *overrides)

    rows = _metrics(killed)
    assert [row["round"] for row in rows] == ["1", "2", "3", "4"]
    assert rows == _metrics(tmp_path / "whole")
    assert resumed["per_client"] == uninterrupted["per_client"]
    final = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    referred = set(final["fedsweep"]["clients"]["files"].values())
    on_disk = {p.name for p in (killed / "client_state").glob("client_*")}
    assert referred <= on_disk and len(on_disk) <= 2 * len(referred)  # old versions cleaned up
