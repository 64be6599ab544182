"""The contract: what algorithms, aggregators and upload transforms may import. What an algorithm
shares (`sharing.SharedSpec`) and what a rule needs of it (`sharing.Needs`), the training
objective, owner-weighted means of tensors, and the processes' collectives. It imports nothing
above `src.errors` and `src.data` (docs/architecture.md, "Layers")."""
