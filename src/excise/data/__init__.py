"""Offline data sources, registered by name, and forgetting splits."""

from .forget import ForgetSpec, Splits, flip_labels, make_splits, with_wrong_labels
from .registry import dataset_names, get_dataset, has_coarse, load_dataset, register_dataset
from .sources import (FASHION_MNIST_CLASSES, FASHION_MNIST_COARSE, ArrayDataset, load_cifar, load_digits,
                      load_fashion_mnist)

__all__ = ["ForgetSpec", "Splits", "flip_labels", "make_splits", "with_wrong_labels", "ArrayDataset", "load_cifar",
           "load_dataset", "load_digits", "load_fashion_mnist", "FASHION_MNIST_CLASSES", "FASHION_MNIST_COARSE",
           "register_dataset", "dataset_names", "get_dataset", "has_coarse"]
