"""Domains for adaptation: a dataset (optionally rotated) brought to one input shape, checks that two
domains share labels and shapes, and a sampler of (source, target) batch pairs.

A domain is named `NAME` or `NAME@A1,A2,...`: the dataset NAME, each example rotated by one of the
angles (degrees; example i by angle i mod len), as DomainBed's RotatedMNIST rotates MNIST
(Gulrajani & Lopez-Paz 2021): `mnist@0,15,30,45,60` is five source rotations, `mnist@75` a target.
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from cnnjax.data import sources, transforms
from cnnjax.data.pipeline import device_batch
from cnnjax.errors import ConfigError, DataError

GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights


def parse_domain(spec):
  """'mnist@0,15' -> ('mnist', (0.0, 15.0)); 'mnist_5k' -> ('mnist_5k', ())."""
  name, _, angles = spec.partition('@')
  try:
    return name, tuple(float(a) for a in angles.split(',')) if angles else ()
  except ValueError as e:
    raise ConfigError('shifts', spec, 'NAME or NAME@ANGLE,ANGLE,... (rotations in degrees) on either side of ->') from None


def parse_shift(spec):
  """'syn_digits->mnist_5k' -> ('syn_digits', 'mnist_5k')."""
  source, arrow, target = spec.partition('->')
  if not arrow or not source or not target:
    raise ConfigError('shifts', spec, 'SOURCE->TARGET, e.g. syn_digits->mnist_5k')
  return source.strip(), target.strip()


def rotate(images, angles):
  """Example i rotated by angles[i % len(angles)] degrees about its centre (bilinear, zero fill)."""
  if not angles:
    return images
  out = np.empty_like(images)
  for i, image in enumerate(images):
    angle = angles[i % len(angles)]
    out[i] = image if angle == 0 else ndimage.rotate(image, angle, axes=(0, 1), reshape=False, order=1)
  return out


def to_shape(images, image_size, fit_size, channels):
  """uint8 NHWC images at `image_size` with `channels` channels.

  Another size is resized to `fit_size` and centred on an `image_size` canvas (MNIST centres its
  digits in a 20x20 box of 28x28; fit_size == image_size resizes the whole image). One channel
  becomes three by repetition (DANN feeds MNIST to its SVHN network so), three become one by luma.
  0 keeps the size or channels as they are."""
  if image_size:
    images = transforms.fit_and_centre(images, image_size, fit_size)
  if channels and images.shape[-1] != channels:
    if (images.shape[-1], channels) == (1, 3):
      images = np.repeat(images, 3, axis=-1)
    elif (images.shape[-1], channels) == (3, 1):
      images = np.round(images.astype(np.float32) @ np.asarray(GREY, np.float32))[..., None].astype(np.uint8)
    else:
      raise DataError(f'cannot turn {images.shape[-1]}-channel images into {channels} channels')
  return images


def load_domain(spec, split, *, image_size, fit_size, channels, data_dir=None):
  """One split of a domain as {'image': uint8 NHWC, 'label': int32}, rotated and reshaped."""
  name, angles = parse_domain(spec)
  arrays = sources.load_arrays(name, split, data_dir)
  images = to_shape(rotate(arrays['image'], angles), image_size, fit_size, channels)
  return {'image': images, 'label': arrays['label']}


def label_names(spec, data_dir=None):
  """The class names of a domain's dataset (its ClassLabel names, '0'..'9' when unnamed)."""
  return list(sources.builder(parse_domain(spec)[0], data_dir).info.features['label'].names)


def check_pair(source_spec, source_labels, source_shape, target_spec, target_labels, target_shape):
  """DataError unless the two domains share the label set (names, in order) and the image shape
  (after preprocessing): adaptation assumes one label space and one network input."""
  if list(source_labels) != list(target_labels):
    raise DataError(f'domains {source_spec} and {target_spec} have different label sets '
                    f'({len(source_labels)} classes {_short(source_labels)} vs {len(target_labels)} classes '
                    f'{_short(target_labels)}): unsupervised domain adaptation needs one label space')
  if tuple(source_shape) != tuple(target_shape):
    raise DataError(f'domains {source_spec} and {target_spec} have images of shape {tuple(source_shape)} and '
                    f'{tuple(target_shape)} after preprocessing: set config.image_size and config.channels '
                    'so that both become one shape')


def _short(names):
  return names if len(names) <= 12 else names[:10] + ['...']


def split_off(arrays, fraction, seed):
  """(rest, held out): a fixed-seed random `fraction` of the examples held out (e.g. validation)."""
  n = len(arrays['label'])
  order = np.random.default_rng(seed).permutation(n)
  held = max(1, int(round(fraction * n)))
  take = lambda idx: {k: v[np.sort(idx)] for k, v in arrays.items()}
  return take(order[held:]), take(order[:held])


def pad_to(arrays, capacity):
  """Arrays padded with zeros along axis 0 to `capacity`, and the count of real examples: splits
  of different sizes then share one compiled program (`device_batch` samples the first count)."""
  n = len(next(iter(arrays.values())))
  if n > capacity:
    raise ValueError(f'{n} examples do not fit a capacity of {capacity}')
  padded = {k: np.concatenate([v, np.zeros((capacity - n, *v.shape[1:]), v.dtype)]) for k, v in arrays.items()}
  return padded, np.int32(n)


def pair_batch(source, target, key, step, batch_size):
  """Batch `step` of a (source, target) pair: {'source': ..., 'target': ...}, each drawn by
  `device_batch` from {'split': arrays, 'count': n} with its own key, so the two domains are
  shuffled independently and a resumed run sees the batches an uninterrupted one sees."""
  source_key, target_key = jax.random.split(key)
  draw = lambda domain, k: device_batch(domain['split'], k, step, batch_size, domain['count'])
  return {'source': draw(source, source_key), 'target': draw(target, target_key)}


def standardize(images, eps=1.0 / 255):
  """uint8 NHWC images -> float32 with zero mean and unit variance per image (over its pixels and
  channels, like tf.image.per_image_standardization): the network sees contrast, not the global
  brightness or colour cast of a domain. Applied alike to every domain and method."""
  x = transforms.to_float(images)
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  std = x.std(axis=(1, 2, 3), keepdims=True)
  return (x - mean) / jnp.maximum(std, eps)


def to_float(batch):
  """uint8 images of a batch (any nesting) -> standardized float32; other leaves unchanged."""
  return jax.tree.map(lambda x: standardize(x) if x.dtype == jnp.uint8 else x, batch)
