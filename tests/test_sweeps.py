"""Ready-made sweeps (experiment presets) and the Optuna hyper-parameter search."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF_DIR, run_cli


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(
    "preset, swept, data",
    [
        (
            "compare_algorithms",
            {"alg": "fedavg,fedlora,fedsa-flora,perfed", "seed": "0,1,2"},
            "cifar10",
        ),
        (
            "compare_algorithms_cpu",
            {"alg": "fedavg,fedlora,fedsa-flora,perfed", "seed": "0,1,2"},
            "digits",
        ),
        ("alpha_sweep", {"partitioner.alpha": "0.1,0.5,1,100", "seed": "0,1,2"}, "cifar10"),
        ("alpha_sweep_cpu", {"partitioner.alpha": "0.1,0.5,1,100", "seed": "0,1,2"}, "digits"),
        ("rank_sweep", {"aggregator": "stack,svd,zeropad", "seed": "0,1,2"}, "cifar10"),
        ("rank_sweep_cpu", {"aggregator": "stack,svd,zeropad", "seed": "0,1,2"}, "digits"),
    ],
)
def test_sweep_presets_define_their_grid(preset, swept, data):
    cfg = _compose(f"experiment={preset}")
    assert dict(cfg.hydra.sweeper.params) == swept
    assert cfg.data.name == data
    if preset.startswith("rank_sweep"):
        assert cfg.alg.name == "fedlora" and list(cfg.alg.client_ranks) == [2, 4, 8]


@pytest.mark.slow
def test_three_trial_optuna_search_on_digits_completes(tmp_path):
    done = run_cli(
        "hparams_search=optuna",
        "experiment=quickstart",
        "logger=none",
        "fl.rounds=2",
        "fl.eval_every=1",
        "trainer.enable_progress_bar=false",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={tmp_path}",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.lr", "fl.local_epochs"}
    assert 0.0 < results["best_value"] <= 1.0  # the best trial's final val/personal_acc
    jobs = [p for p in tmp_path.iterdir() if (p / "summary.json").exists()]
    assert len(jobs) == 3
