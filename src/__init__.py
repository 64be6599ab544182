"""fedsweep: federated learning experiments on one resident model (docs/architecture.md)."""

from src.threads import default_to_passive_wait

# before anything imports torch, whose OpenMP runtime reads the wait policy once when it loads
default_to_passive_wait()
