"""fedsweep: federated learning experiments on one resident model (docs/architecture.md)."""

from src.threads import bound_spin_wait

# before anything imports torch, whose OpenMP runtime reads its wait settings once when it loads
bound_spin_wait()
