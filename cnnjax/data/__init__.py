"""Data for cnnjax: dataset sources (embedded + TFDS catalog), batch loaders and augmentations."""

from cnnjax.data import transforms
from cnnjax.data.pipeline import device_batch, grain_batches, put_on_device
from cnnjax.data.sources import (CATALOG, DATASETS, builder, data_source, default_data_dir,
                                 image_shape, load_arrays, num_classes)

__all__ = [
    'CATALOG', 'DATASETS', 'builder', 'data_source', 'default_data_dir', 'device_batch',
    'grain_batches', 'image_shape', 'load_arrays', 'num_classes', 'put_on_device', 'transforms',
]
