from src.algorithms.base import Algorithm
from src.algorithms.fedavg import FedAvg
from src.algorithms.fedlora import FedLoRA, FFALoRA
from src.algorithms.fedsa_flora import FedSAFLoRA
from src.algorithms.perfed import PerFed

__all__ = ["Algorithm", "FFALoRA", "FedAvg", "FedLoRA", "FedSAFLoRA", "PerFed"]
