from src.aggregators.base import Aggregator
from src.aggregators.mean import MeanAggregator

__all__ = ["Aggregator", "MeanAggregator"]
