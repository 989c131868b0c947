"""Data: dataset loading, splits, augmentation and batch mixing."""

from imgcls.data.datasets import Dataset, Split, load_dataset
from imgcls.data.preprocessing import Preprocessing, normalize
from imgcls.data.presets import AUGMENTATIONS, TrainTransform, per_image_transform

__all__ = ["AUGMENTATIONS", "Dataset", "Preprocessing", "Split", "TrainTransform", "load_dataset", "normalize",
           "per_image_transform"]
