"""Evaluation of a round: the global model on the global test set, and every client's deployed
model on its own local test split (val/personal_acc and its spread). With `fl.eval_clients=N`
the personal metrics score a seeded sample of N honest clients, the same at every evaluation,
so the cost of an evaluation grows with N, not with the federation.

Accuracy is per sample for images and per response token for text (which also gets val/ppl and
val/token_acc). Malicious clients (attacks) are not evaluated: they are not the federation's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from src.contract.objective import score

_EVAL_STREAM = 0xE7A


def evaluable_clients(federation, malicious) -> list[int]:
    """The clients val/personal_acc can score: honest, with a local test split."""
    return [i for i, c in enumerate(federation.clients) if i not in malicious and len(c.test) > 0]


class Evaluator:
    def __init__(self, module, eval_batch_size: int, malicious=frozenset(), eval_clients="all"):
        self.module = module  # the FederatedModule: its model, federation, server and ranks
        self.eval_batch_size = eval_batch_size
        self.malicious = set(malicious)
        # the clients whose deployed models are scored: every evaluable one, or a seeded sample
        # of fl.eval_clients of them, chosen once
        self.scored = evaluable_clients(module.federation, self.malicious)
        if eval_clients != "all":
            rng = np.random.default_rng([module.seed, _EVAL_STREAM])
            self.scored = sorted(rng.choice(self.scored, int(eval_clients), replace=False).tolist())
        # per client, of the last evaluation (NaN for a client without local test data or not
        # among the scored ones)
        self.per_client_acc: list[float] = []

    @property
    def device(self) -> torch.device:
        return self.module.device

    def evaluate(self) -> dict[str, float]:
        """val/global_acc and val/loss on the global test set; val/personal_acc (target-weighted
        over the honest clients, with its std, unweighted mean and 10th percentile) of each
        client's deployed model on its own local test split."""
        module = self.module
        if module.algorithm.personalized:
            metrics, hits, counts = self._evaluate_personal_models()
        else:
            module.deploy(None)
            metrics, hits, counts = self._evaluate_global_model()
        if module.federation.is_text:
            loss = metrics["val/loss"]  # exp overflows a float past 709: the perplexity is inf
            metrics["val/ppl"] = math.exp(loss) if loss <= 709 else math.inf
            metrics["val/token_acc"] = metrics["val/global_acc"]
        has_test = counts > 0  # the scored clients: honest, with a local test split
        per_client = hits[has_test] / counts[has_test]
        metrics["val/personal_acc"] = (hits.sum() / counts.sum()).item()
        metrics["val/personal_acc_std"] = per_client.std(unbiased=False).item()
        metrics["val/personal_acc_unweighted"] = per_client.mean().item()
        metrics["val/personal_acc_p10"] = torch.quantile(per_client, 0.1).item()  # the worst-off
        self.per_client_acc = [
            (hits[i] / counts[i]).item() if has_test[i] else math.nan for i in range(len(counts))
        ]
        return metrics

    @torch.no_grad()
    def _predict(self, data, index: torch.Tensor):
        """Per sample of `data[index]`, for the resident model: (summed loss, correct predictions,
        counted targets); a sample is one target for images, its response tokens for text. With
        several CPU processes evaluating at once (they share the machine's memory) each takes its
        share of fl.eval_batch_size, so the run holds the activations of one such batch at a time,
        as in one process."""
        model = self.module.model
        model.eval()
        sharing = self.module.ranks.working if self.device.type == "cpu" else 1
        batch_size = max(1, self.eval_batch_size // sharing)
        parts = [
            score(model(inputs), targets)
            for inputs, targets in data.batches(index, data.eval_batch_size(batch_size))
        ]
        if not parts:
            empty = torch.empty(0, device=self.device)
            return empty, empty.long(), empty.long()
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    @staticmethod
    def _totals(losses, correct, counts) -> torch.Tensor:
        """(summed loss, correct, counted targets) of per-sample results, in float64."""
        return torch.stack([part.double().sum() for part in (losses, correct, counts)])

    @staticmethod
    def _global_metrics(totals: torch.Tensor) -> dict[str, float]:
        """val/global_acc and val/loss from the summed (loss, correct, counted targets)."""
        loss, correct, counted = totals.tolist()
        return {"val/global_acc": correct / max(counted, 1), "val/loss": loss / max(counted, 1)}

    def _evaluate_global_model(self):
        """Every client deploys the global model, so one pass over the global test set and one
        over all local test splits; with several processes each scores its share of both."""
        federation, ranks = self.module.federation, self.module.ranks
        test, clients = federation.test, federation.clients
        on_global = self._totals(
            *self._predict(test, ranks.part(torch.arange(len(test), device=self.device)))
        )
        index = torch.cat([clients[i].test for i in self.scored])
        owner = torch.cat([torch.full_like(clients[i].test, i) for i in self.scored])
        _, correct, counted = self._predict(federation.train, ranks.part(index))
        owner = ranks.part(owner)
        counts = torch.bincount(owner, weights=counted.double(), minlength=len(clients))
        hits = torch.bincount(owner, weights=correct.double(), minlength=len(clients))
        for total in (on_global, hits, counts):
            ranks.sum_(total)
        return self._global_metrics(on_global), hits.cpu(), counts.cpu()

    def _evaluate_personal_models(self):
        """Client by client: load its deployed model, score its local test split and its share of
        the global test set. The global test set is cut into one fixed random share per client, so
        val/global_acc (how well the personal models do on the whole distribution, averaged over
        clients) costs one pass over the test set, not one per client. Under DDP each rank scores
        its share of the clients and the sums are combined."""
        module = self.module
        test, clients, ranks = module.federation.test, module.federation.clients, module.ranks
        shares = self._global_test_shares()
        hits = torch.zeros(len(clients), dtype=torch.float64, device=self.device)
        counts = torch.zeros(len(clients), dtype=torch.float64, device=self.device)
        # summed loss, correct and counted targets of the personal models on the global test set
        on_global = torch.zeros(3, dtype=torch.float64, device=self.device)
        mine = ranks.shard(self.scored, [len(clients[i].test) for i in self.scored])
        for client_id in mine:
            module.deploy(client_id)
            _, correct, counted = self._predict(module.federation.train, clients[client_id].test)
            hits[client_id], counts[client_id] = correct.sum(), counted.sum()
            on_global += self._totals(*self._predict(test, shares[client_id]))
        for total in (hits, counts, on_global):
            ranks.sum_(total)
        return self._global_metrics(on_global), hits.cpu(), counts.cpu()

    def _global_test_shares(self) -> dict[int, torch.Tensor]:
        """One fixed random share of the global test set per scored client."""
        test = self.module.federation.test
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(self.module.seed))
        shares = order.tensor_split(len(self.scored))
        return {client: s.to(self.device) for client, s in zip(self.scored, shares, strict=True)}
