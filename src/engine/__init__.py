"""The engine: the federated LightningModule (`orchestrator`), one round's client loop and its
batched form, the server, evaluation, DDP and forked processes, checkpoints, sampling, the client
state store and the compatibility checks. It drives the algorithm, the aggregator and the upload
transforms through the contract; none of them imports it (docs/architecture.md, "Layers")."""
