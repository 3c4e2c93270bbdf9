"""syn_digits: 5,000 synthetic digits (28x28x3 uint8, 10 classes) rendered from matplotlib's fonts.

Made the way SynDigits is made (Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by
Backpropagation", section 5: digits rendered from fonts "varying the text, positioning,
orientation, background and stroke colors, and the amount of blur"): every image draws a font,
a scale, a rotation, a translation, a background and a stroke colour (at least a fixed contrast
apart), a Gaussian blur and, 30% of the time, neighbouring digits cut by the image border as in
SVHN crops. At MNIST's size (28x28), so that it is a source for mnist_5k.

Source: the TrueType fonts in `matplotlib/mpl-data/fonts/ttf/` that draw the ten digits as ten
different glyphs (22 of them; cmex10, cmsy10 and LastResortHE map digits to other symbols and are
left out). License: matplotlib PSF-based; DejaVu and STIX fonts OFL-like; BaKoMa cm fonts free.
Splits: `train` 4,000 (400 per class), `test` 1,000 (100 per class); every random choice comes
from a fixed seed, so every machine builds the same images. No network.
"""

import importlib.util
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from cnnjax.data.builders import EmbeddedImageBuilder

PER_CLASS = 500
SIZE = 28
GLYPH = 64                     # glyphs are rasterised once at 64x64, then warped down to 28x28
EXCLUDED = ('cmex10', 'cmsy10', 'LastResortHE-Regular')
SEED = 2015


def font_paths():
  """matplotlib's TrueType fonts, found without importing matplotlib."""
  spec = importlib.util.find_spec('matplotlib')
  if spec is None:
    raise FileNotFoundError('syn_digits needs matplotlib: pip install matplotlib')
  folder = Path(spec.submodule_search_locations[0]) / 'mpl-data' / 'fonts' / 'ttf'
  return sorted(p for p in folder.glob('*.ttf') if p.stem not in EXCLUDED)


def digit_glyphs():
  """(fonts, 10, 64, 64) float masks in [0, 1] of the fonts that draw ten distinct digits."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  glyphs = []
  for path in font_paths():
    font = ImageFont.truetype(str(path), 52)
    masks = []
    for digit in range(10):
      image = Image.new('L', (GLYPH, GLYPH))
      ImageDraw.Draw(image).text((GLYPH / 2, GLYPH / 2), str(digit), font=font, fill=255, anchor='mm')
      masks.append(np.asarray(image, np.float32) / 255)
    if len({m.tobytes() for m in masks}) == 10 and min(m.sum() for m in masks) > 0:
      glyphs.append(masks)
  return np.asarray(glyphs)


def warp(glyph, scale, angle, shift):
  """The 64x64 glyph scaled, rotated (radians) and shifted (pixels) into a 28x28 image."""
  cos, sin = np.cos(angle), np.sin(angle)
  # Output pixel o maps to glyph pixel centre + A (o - centre_out - shift), A = R(angle) / scale.
  matrix = np.array([[cos, -sin], [sin, cos]]) * (GLYPH / SIZE / scale)
  centre_out = np.array([SIZE / 2 - 0.5, SIZE / 2 - 0.5]) + shift
  offset = np.array([GLYPH / 2 - 0.5, GLYPH / 2 - 0.5]) - matrix @ centre_out
  return ndimage.affine_transform(glyph, matrix, offset, output_shape=(SIZE, SIZE), order=1)


def colours(rng):
  """A background and a stroke colour (RGB in [0, 1]) whose grey levels differ by >= 0.35."""
  while True:
    background, stroke = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    grey = np.array([0.299, 0.587, 0.114])
    if abs(grey @ (background - stroke)) >= 0.35:
      return background, stroke


def render(glyphs, labels, rng):
  """One image per label: random font, scale, rotation, translation, colours, blur, neighbours."""
  images = np.empty((len(labels), SIZE, SIZE, 3), np.uint8)
  for i, label in enumerate(labels):
    font = rng.integers(len(glyphs))
    scale = rng.uniform(1.0, 1.3)  # digit heights 17..22 pixels, MNIST's 20x20 box
    angle = np.deg2rad(rng.uniform(-15, 15))
    shift = rng.uniform(-2.5, 2.5, 2)
    mask = warp(glyphs[font, label], scale, angle, shift)
    if rng.random() < 0.3:  # SVHN-like crops: parts of the digits to the left and right
      step = 0.7 * SIZE * scale
      for side in (-1, 1):
        neighbour = glyphs[font, rng.integers(10)]
        mask = np.maximum(mask, warp(neighbour, scale, angle, shift + np.array([0.0, side * step])))
    mask = ndimage.gaussian_filter(mask, rng.uniform(0.0, 1.0))
    background, stroke = colours(rng)
    image = background * (1 - mask[..., None]) + stroke * mask[..., None]
    image += rng.normal(0, 0.02, image.shape)
    images[i] = np.clip(np.round(255 * image), 0, 255).astype(np.uint8)
  return images


class Builder(EmbeddedImageBuilder):
  """syn_digits: 5,000 font-rendered digits like SynDigits, 100 per class held out for test."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'Larger digits (MNIST-sized), fewer neighbours, more contrast: learnable in 200 steps.'}
  IMAGE_SHAPE = (SIZE, SIZE, 3)
  NUM_CLASSES = 10
  TEST_PER_CLASS = 100
  HOMEPAGE = 'https://matplotlib.org/stable/users/explain/text/fonts.html'

  def load(self):
    """Images (5000, 28, 28, 3) uint8 and labels (5000,) int64, 500 per class."""
    rng = np.random.default_rng(SEED)
    labels = rng.permutation(np.repeat(np.arange(10), PER_CLASS))
    return render(digit_glyphs(), labels, rng), labels.astype(np.int64)
