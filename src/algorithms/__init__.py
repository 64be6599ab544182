from src.algorithms.base import Algorithm
from src.algorithms.fedavg import FedAvg
from src.algorithms.fedlora import FedLoRA

__all__ = ["Algorithm", "FedAvg", "FedLoRA"]
