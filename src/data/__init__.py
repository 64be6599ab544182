"""Datasets (uint8 image tensors) and client partitioners."""

from src.data.datasets import (
    DataFileError,
    DatasetNotFoundError,
    ImageDataset,
    ImageSplit,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_mnist,
)
from src.data.partitioners import (
    ClientSplit,
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    Partitioner,
    ShardPartitioner,
    label_entropy,
    partition_summary,
)

__all__ = [
    "ClientSplit",
    "DataFileError",
    "DatasetNotFoundError",
    "DirichletPartitioner",
    "IidPartitioner",
    "NaturalPartitioner",
    "ImageDataset",
    "ImageSplit",
    "Partitioner",
    "ShardPartitioner",
    "label_entropy",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "partition_summary",
]
