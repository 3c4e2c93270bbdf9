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

_TEST_PER_CLASS = 50
_SPLIT_SEED = 0


def _load():
  """Images (N, 8, 8, 1) uint8 in 0..255 and labels (N,) int64."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int64)


def _test_mask(labels, per_class, seed):
  """True for `per_class` examples of each class drawn with a fixed seed: a stratified test split."""
  rng = np.random.default_rng(seed)
  mask = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    mask[rng.permutation(np.flatnonzero(labels == c))[:per_class]] = True
  return mask


class Builder(tfds.core.GeneratorBasedBuilder):
  """sklearn_digits: 1,797 8x8 digits from scikit-learn, 50 per class held out for test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    images, labels = _load()
    test = _test_mask(labels, _TEST_PER_CLASS, _SPLIT_SEED)
    return {
        'train': self._generate_examples(images, labels, np.flatnonzero(~test)),
        'test': self._generate_examples(images, labels, np.flatnonzero(test)),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}
