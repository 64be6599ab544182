"""fedavg: every parameter is shared and the new global model is the sample-weighted mean."""

import torch

from src.run import build_module, build_trainer
from tests.conftest import RecordingMean


def test_round_result_is_the_sample_weighted_mean_of_the_uploads(make_digits_config, tmp_path):
    cfg = make_digits_config("alg=fedavg", "fl.rounds=1", "fl.clients_per_round=4")
    module = build_module(cfg, tmp_path)
    module.aggregator = RecordingMean()
    trainer = build_trainer(cfg, logger=False, enable_checkpointing=False)
    trainer.fit(module)

    uploads, weights = module.aggregator.uploads, module.aggregator.weights
    assert len(uploads) == 4
    params = dict(module.model.named_parameters())
    assert set(uploads[0]) == set(params)  # fedavg shares every parameter
    # the weights are the clients' local train sample counts
    sampled_sizes = sorted(len(c.train) for c in module.federation.clients)
    assert all(w in sampled_sizes for w in weights)
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for name, param in params.items():
        expected = sum(p[k] * uploads[k][name].double() for k in range(len(uploads)))
        torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-6)
    # and the clients really trained to different models
    assert not torch.equal(uploads[0]["head.weight"], uploads[1]["head.weight"])
