"""imgcls: train, compare and understand image classifiers."""

__version__ = "0.1.0"
