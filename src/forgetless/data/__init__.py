"""Training data: formats, loading and tokenization."""

from .examples import IGNORE, Datasets, DataStats, build_examples, calibration_examples, load_datasets
from .loading import Record, load_records, read_file

__all__ = ["IGNORE", "Datasets", "DataStats", "Record", "build_examples", "calibration_examples", "load_datasets",
           "load_records", "read_file"]
