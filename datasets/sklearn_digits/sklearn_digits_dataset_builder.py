"""sklearn_digits: scikit-learn's 1,797 handwritten digits (8x8x1 uint8, 10 classes).

Source: `sklearn.datasets.load_digits()`, the test part of UCI Optical Recognition of Handwritten
Digits (Alpaydin & Kaynak, 1998), other writers than MNIST. Pixel counts 0..16 are scaled to
0..255 (x * 255 // 16) so the images look like any other uint8 image.
License: scikit-learn BSD-3-Clause.
Splits: `test` 500 (50 per class), `train` the other 1,297; stratified with a fixed seed, so
every machine builds the same split. Reads a file from an installed package: no network.
"""

import numpy as np
import tensorflow_datasets as tfds

from cnnjax.data.builders import EmbeddedImageBuilder


class Builder(EmbeddedImageBuilder):
  """sklearn_digits: 1,797 8x8 digits from scikit-learn, 50 per class held out for test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  IMAGE_SHAPE = (8, 8, 1)
  NUM_CLASSES = 10
  TEST_PER_CLASS = 50
  HOMEPAGE = 'https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset'

  def load(self):
    """Images (N, 8, 8, 1) uint8 in 0..255 and labels (N,) int64."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    return images[..., None], digits.target.astype(np.int64)
