from src.aggregators.base import Aggregator
from src.aggregators.lora_product import ExactAggregator, StackAggregator, SvdAggregator
from src.aggregators.mean import MeanAggregator, RankAwareMeanAggregator, ZeroPadAggregator
from src.aggregators.robust import KrumAggregator, MedianAggregator, TrimmedMeanAggregator

__all__ = [
    "Aggregator",
    "ExactAggregator",
    "KrumAggregator",
    "MeanAggregator",
    "MedianAggregator",
    "RankAwareMeanAggregator",
    "StackAggregator",
    "SvdAggregator",
    "TrimmedMeanAggregator",
    "ZeroPadAggregator",
]
