from src.algorithms.base import Algorithm
from src.algorithms.fedavg import FedAvg
from src.algorithms.fedlora import FedLoRA, FFALoRA

__all__ = ["Algorithm", "FFALoRA", "FedAvg", "FedLoRA"]
