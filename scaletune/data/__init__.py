"""Datasets by name: ``get_dataset`` gives deterministic CPU batches, ``dataset_spec`` the shapes, cheaply."""

from scaletune.data.base import DataError, Dataset, DataSpec
from scaletune.data.registry import dataset_names, dataset_spec, get_dataset

__all__ = ["DataError", "DataSpec", "Dataset", "dataset_names", "dataset_spec", "get_dataset"]
