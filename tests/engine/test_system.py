"""system=...: devices, availability, simulated time and the server's waiting policies."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from src.config_checks import validate_config
from src.engine.sampling import sample_clients
from src.engine.system import SystemModel, read_trace
from src.errors import ConfigError
from src.run import build_module, train
from tests.conftest import refusal

# every device alike: a client's simulated time is then a function of its bytes and samples
SAME_DEVICES = [
    "system=heavy_tail",
    "system.speed.median=100.0",
    "system.speed.sigma=0",
    "system.bandwidth.median=1.0e6",
    "system.bandwidth.sigma=0",
]


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _run(make_digits_config, *overrides):
    cfg = make_digits_config(*overrides)
    summary = train(cfg)
    out = Path(cfg.paths.output_dir)
    return cfg, summary, _rows(out / "metrics.csv"), _rows(out / "clients.csv")


def _client_seconds(cfg, row, client: int) -> float:
    """t_k = down/b + samples/v + up/b, written out: every client of a round receives and sends
    the same bytes (fedavg: the whole model), and trains fl.local_epochs passes over its data."""
    sampled = int(float(row["clients/sampled"]))
    down = float(row["comm/down_bytes"]) / sampled
    up = float(row["comm/up_bytes"]) / sampled
    samples = cfg.fl.local_epochs * int(_train_samples(cfg)[client])
    return down / 1.0e6 + samples / 100.0 + up / 1.0e6


def _train_samples(cfg) -> list[int]:
    return build_module(cfg, Path(cfg.paths.output_dir) / "probe").federation.summary[
        "train_samples"
    ]


def test_wait_all_lasts_as_long_as_the_slowest_client(make_digits_config):
    cfg, _, metrics, clients = _run(make_digits_config, *SAME_DEVICES)
    total = 0.0
    for row in metrics:
        trained = [
            int(c["client"]) for c in clients if c["round"] == row["round"] and c["trained"] == "1"
        ]
        expected = max(_client_seconds(cfg, row, k) for k in trained)
        assert float(row["time/sim_round_s"]) == pytest.approx(expected, rel=1e-12)
        total += expected
        assert float(row["time/sim_total_s"]) == pytest.approx(total, rel=1e-12)
        assert float(row["clients/late"]) == 0


def test_a_deadline_drops_exactly_the_clients_later_than_it(make_digits_config):
    probe_cfg, _, probe, probe_clients = _run(make_digits_config, *SAME_DEVICES, "fl.rounds=1")
    first = [int(c["client"]) for c in probe_clients if c["trained"] == "1"]
    seconds = sorted(_client_seconds(probe_cfg, probe[0], k) for k in first)
    deadline = (seconds[1] + seconds[2]) / 2  # two clients make it, the others do not
    cfg, summary, metrics, clients = _run(
        make_digits_config, *SAME_DEVICES, "fl.rounds=1",
        "system.policy=deadline", f"system.deadline_s={deadline}", "resume=never",
    )  # fmt: skip
    row = metrics[0]
    late = [c for c in clients if c["dropped"].startswith("missed the deadline")]
    assert float(row["clients/late"]) == len(late) == len(first) - 2
    assert float(row["time/sim_round_s"]) == pytest.approx(deadline)
    assert float(row["clients/dropped"]) == 0  # late is not failed
    for c in late:
        assert _client_seconds(cfg, row, int(c["client"])) > deadline
    # the late clients' uploads were sent, so counted (the next test: never aggregated)
    assert float(row["comm/up_bytes"]) == float(probe[0]["comm/up_bytes"])
    assert {d["client"] for d in summary["dropped_clients"]} == {int(c["client"]) for c in late}


def test_a_round_in_which_every_client_is_late_changes_nothing(make_digits_config):
    cfg = make_digits_config(
        *SAME_DEVICES, "fl.rounds=1", "system.policy=deadline", "system.deadline_s=1e-6"
    )
    module = build_module(cfg, Path(cfg.paths.output_dir))
    before = {n: t.clone() for n, t in module.model.state_dict().items()}
    summary = train(cfg)
    assert summary["status"] == "completed"
    rows = _rows(Path(cfg.paths.output_dir) / "metrics.csv")
    assert float(rows[0]["clients/late"]) == cfg.fl.clients_per_round
    after = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    saved = {n: after["model." + n] for n in before if "model." + n in after}
    assert len(saved) == len(before) > 0  # the whole model (fedavg trains all of it)
    assert all(torch.equal(before[n], saved[n]) for n in saved)


def test_over_selection_keeps_the_clients_predicted_to_finish_first(make_digits_config):
    cfg, _, metrics, clients = _run(
        make_digits_config, *SAME_DEVICES, "fl.rounds=1",
        "system.policy=over_select", "system.over_selection=1.6",
    )  # fmt: skip
    m = cfg.fl.clients_per_round
    sampled = sample_clients(cfg.fl.num_clients, math.ceil(1.6 * m), cfg.seed, 0)
    sizes = _train_samples(cfg)
    # same devices and bytes: first to finish = fewest samples (ties: lower id)
    expected = sorted(sorted(sampled, key=lambda k: (sizes[k], k))[:m])
    trained = sorted(int(c["client"]) for c in clients if c["trained"] == "1")
    assert trained == expected
    over = [c for c in clients if c["dropped"].startswith("over-selected")]
    assert sorted(int(c["client"]) for c in over) == sorted(set(sampled) - set(expected))
    assert float(metrics[0]["clients/over_selected"]) == len(over)


def test_only_available_clients_are_sampled():
    system = SystemModel(
        "heavy_tail",
        speed={"distribution": "lognormal", "median": 1.0, "sigma": 0.0},
        bandwidth={"distribution": "lognormal", "median": 1.0, "sigma": 0.0},
        availability=0.5,
    )
    system.configure(40, seed=3)
    for round_idx in range(5):
        available = system.available(round_idx, 0.0)
        assert available == system.available(round_idx, 0.0)  # seeded
        assert 5 < len(available) < 35
        sampled = sample_clients(40, 5, 3, round_idx, among=available)
        assert set(sampled) <= set(available) and len(sampled) == 5


def test_sampling_without_among_is_unchanged():
    """system=none samples exactly as before `among` existed (runs keep their clients)."""
    rng = np.random.default_rng([7, 2, 0x5A3])
    assert sample_clients(30, 6, 7, 2) == sorted(rng.choice(30, size=6, replace=False).tolist())


def test_devices_are_drawn_from_the_seed():
    def devices(seed):
        system = SystemModel(
            "heavy_tail",
            speed={"distribution": "lognormal", "median": 20.0, "sigma": 1.0},
            bandwidth={"distribution": "pareto", "median": 1e6, "shape": 1.5},
        )
        system.configure(2000, seed)
        return system.devices

    first = devices(0)
    assert first == devices(0) and first != devices(1)
    speeds = np.array([d.speed for d in first])
    assert np.median(speeds) == pytest.approx(20.0, rel=0.1)  # lognormal's median
    bandwidths = np.array([d.bandwidth for d in first])
    assert np.median(bandwidths) == pytest.approx(1e6, rel=0.1)  # pareto scaled to its median
    assert bandwidths.min() >= 1e6 * 2 ** (-1 / 1.5)  # and its minimum x_m


def test_a_trace_gives_devices_and_windows(tmp_path):
    trace = tmp_path / "devices.csv"
    trace.write_text(
        "client,speed,bandwidth,availability\n0,10,1e6,\n1,5,2e6,0-100;200-300\n2,1,1e5,150-160\n"
    )
    devices = read_trace(trace, 3)
    assert devices[1].speed == 5 and devices[1].windows == ((0, 100), (200, 300))
    system = SystemModel("trace", trace=str(trace))
    system.configure(3, seed=0)
    assert system.available(0, 50.0) == [0, 1]
    assert system.available(0, 155.0) == [0, 2]
    assert system.available(0, 250.0) == [0, 1]


@pytest.mark.parametrize(
    "body, named",
    [
        ("0,10,1e6,\n1,abc,1e6,\n", "line 3: speed 'abc' is not a number"),
        ("0,10,1e6,\n1,10,-5,\n", "line 3: bandwidth '-5' must be a number > 0"),
        ("0,10,1e6,\n0,10,1e6,\n", "line 3: client 0 appears twice"),
        ("0,10,1e6,\n1,10,1e6,5-2\n", "line 3: availability window '5-2'"),
        ("0,10,1e6,\n7,10,1e6,\n", "line 3: client 7 is not in [0, 2)"),
        ("0,10,1e6,\n", "no row for clients [1]"),
    ],
)
def test_a_malformed_trace_is_refused_with_one_line_naming_the_row(tmp_path, body, named):
    trace = tmp_path / "devices.csv"
    trace.write_text("client,speed,bandwidth,availability\n" + body)
    with pytest.raises(ConfigError) as info:
        read_trace(trace, 2)
    assert named in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["system.policy=fastest"], "system.policy='fastest'"),
        (["system.policy=deadline"], "system.deadline_s=None"),
        (["system.deadline_s=5"], "only system.policy=deadline has a deadline"),
        (["system.policy=over_select"], "system.over_selection=1.0"),
        (["system.availability=0"], "system.availability=0"),
        (["system.speed.distribution=normal"], "system.speed.distribution='normal'"),
        (["system.speed.sigma=-1"], "system.speed.sigma=-1"),
        (["system.speed.distribution=pareto"], "system.speed.sigma=1.0: distribution pareto"),
        (["alg=perfed", "alg.d=64"], "trains every client every round"),
        (["privacy=dp_fedavg"], "the accountant assumes"),
    ],
)
def test_bad_system_settings_are_refused_before_training(make_digits_config, overrides, named):
    cfg = make_digits_config("system=heavy_tail", *overrides)
    validate_config(cfg)  # each key passes on its own: the system refuses the combination
    assert named in refusal(cfg, cfg.paths.output_dir)


def test_the_simulated_clock_continues_across_a_resume(make_digits_config):
    whole = make_digits_config(*SAME_DEVICES, "fl.rounds=3", "system.availability=0.7")
    expected = train(whole)["final"]["time/sim_total_s"]
    part = make_digits_config(
        *SAME_DEVICES,
        "fl.rounds=2",
        "system.availability=0.7",
        "paths.output_dir=" + str(Path(whole.paths.output_dir).parent / "resumed"),
    )
    train(part)
    rest = make_digits_config(
        *SAME_DEVICES, "fl.rounds=3", "system.availability=0.7", "resume=auto",
        "paths.output_dir=" + str(Path(whole.paths.output_dir).parent / "resumed"),
    )  # fmt: skip
    assert train(rest)["final"]["time/sim_total_s"] == pytest.approx(expected, rel=1e-12)


def test_the_report_shows_simulated_time(make_digits_config, tmp_path):
    from src.report.cli import write_report

    for seed in (0, 1):
        train(make_digits_config(*SAME_DEVICES, f"seed={seed}",
                                 f"paths.output_dir={tmp_path / 'sweep' / f'seed{seed}'}"))  # fmt: skip
    report = write_report([tmp_path / "sweep"], target="val/global_acc=0.0").read_text()
    assert "![accuracy_vs_sim_time.png](accuracy_vs_sim_time.png)" in report
    assert (tmp_path / "sweep" / "accuracy_vs_sim_time.png").stat().st_size > 0
    header = next(line for line in report.splitlines() if line.startswith("| group | reached"))
    assert "simulated s" in header


def test_partial_work_trains_what_fits_so_nobody_is_late(make_digits_config, tmp_path):
    # the deadline fits every client's download and upload, not every client's full work
    probe_cfg, _, probe, probe_clients = _run(make_digits_config, *SAME_DEVICES, "fl.rounds=1")
    first = [int(c["client"]) for c in probe_clients if c["trained"] == "1"]
    seconds = sorted(_client_seconds(probe_cfg, probe[0], k) for k in first)
    deadline = (seconds[0] + seconds[1]) / 2
    common = [
        *SAME_DEVICES,
        "fl.rounds=1",
        "system.policy=deadline",
        f"system.deadline_s={deadline}",
    ]
    _, _, strict, _ = _run(make_digits_config, *common, f"paths.output_dir={tmp_path / 'strict'}")
    assert float(strict[0]["clients/late"]) == len(first) - 1
    _, _, partial, _ = _run(
        make_digits_config, *common, "system.partial_work=true",
        f"paths.output_dir={tmp_path / 'partial'}",
    )  # fmt: skip
    assert float(partial[0]["clients/late"]) == 0
    assert float(partial[0]["time/sim_round_s"]) <= deadline


def test_a_stragglers_budget_is_what_fits_before_the_deadline():
    from src.algorithms.base import ClientRun

    system = SystemModel(
        "heavy_tail",
        speed={"distribution": "lognormal", "median": 10.0, "sigma": 0.0},
        bandwidth={"distribution": "lognormal", "median": 100.0, "sigma": 0.0},
        policy="deadline",
        deadline_s=5.0,
        partial_work=True,
    )
    system.configure(2, seed=0)
    # 5 s - 2 x 100 bytes / 100 B/s = 3 s of compute at 10 samples/s
    assert system.samples_within_deadline(0, 100) == 30
    assert system.samples_within_deadline(0, 1000) == 0  # the transfers alone take 20 s
    batches = [(torch.zeros(8, 1), torch.zeros(8)) for _ in range(10)]
    run = ClientRun(0, 0, 2, None, None, lambda: iter(batches), max_samples=30)
    assert len(list(run.batches())) == 3  # 3 batches of 8 fit in 30, a fourth does not


def test_a_straggler_with_no_batch_before_the_deadline_is_late_not_a_crash(make_digits_config):
    """SCAFFOLD divides by its local steps: a client that could take none must not train."""
    cfg, _, metrics, clients = _run(
        make_digits_config, *SAME_DEVICES, "fl.rounds=1", "alg=scaffold",
        "system.policy=deadline", "system.deadline_s=0.05", "system.partial_work=true",
    )  # fmt: skip
    late = [c for c in clients if c["dropped"].startswith("missed the deadline: not one batch")]
    assert len(late) == float(metrics[0]["clients/late"]) == cfg.fl.clients_per_round
    assert float(metrics[0]["clients/dropped"]) == 0
