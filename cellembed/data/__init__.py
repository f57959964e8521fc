"""Data: the loaders (the course folder, named data sets, files) and the one validation of an AnnData."""

from cellembed.data.checks import BATCH_KEY, COUNTS_LAYER, LABEL_KEY, LABEL_KEYS, DataError, DataWarning
from cellembed.data.course import (BATCH_COLUMN, COURSE_FILES, ID_COLUMN, LABEL_COLUMN, load_course_data,
                                   safe_load_pickle)
from cellembed.data.datasets import DATA_ROOT_ENV, DATASETS, default_data_root, load_dataset
from cellembed.data.validate import MOD2_KEY, setup_anndata

__all__ = ["BATCH_COLUMN", "BATCH_KEY", "COUNTS_LAYER", "COURSE_FILES", "DATASETS", "DATA_ROOT_ENV", "DataError",
           "DataWarning", "ID_COLUMN", "LABEL_COLUMN", "LABEL_KEY", "LABEL_KEYS", "MOD2_KEY", "default_data_root",
           "load_course_data", "load_dataset", "safe_load_pickle", "setup_anndata"]
