"""Data: dataset loading, splits, and batch transforms."""

from imgcls.data.datasets import Dataset, Split, load_dataset
from imgcls.data.presets import TrainAugment, normalize

__all__ = ["Dataset", "Split", "TrainAugment", "load_dataset", "normalize"]
