"""Transforms of NHWC batches: resizing and layout (`fit_and_centre`, on the host) and augmentations as
pure jax functions (random ones take an explicit key)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def to_float(x):
  """uint8 images -> float32 in [0, 1]."""
  return jnp.asarray(x, jnp.float32) / 255.0


def normalize(x, mean, std):
  """(x - mean) / std, with per-channel mean and std broadcast over the last axis."""
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def resize(x, size):
  """Bilinear resize to `size` (int or (H, W)), e.g. 8x8 digits -> 28x28; keeps the dtype (ints rounded)."""
  h, w = (size, size) if isinstance(size, int) else size
  out = jax.image.resize(jnp.asarray(x, jnp.float32), (x.shape[0], h, w, x.shape[3]), 'bilinear')
  if jnp.issubdtype(x.dtype, jnp.integer):
    info = jnp.iinfo(x.dtype)
    out = jnp.clip(jnp.round(out), info.min, info.max)
  return out.astype(x.dtype)


def fit_and_centre(images, image_size, fit_size):
  """uint8 NHWC images of another size than `image_size`, resized to `fit_size` and centred on an
  `image_size` canvas (MNIST centres its digits in a 20x20 box of 28x28; fit_size == image_size
  resizes the whole image). Images already at `image_size` come back unchanged."""
  if images.shape[1:3] == (image_size, image_size):
    return images
  margin = image_size - fit_size
  images = np.asarray(resize(images, fit_size))
  return np.pad(images, [(0, 0), (margin // 2, margin - margin // 2), (margin // 2, margin - margin // 2), (0, 0)])


def random_crop(key, x, padding):
  """Zero-pad each image by `padding` pixels, then crop it back to its size at a random offset."""
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
  crop = lambda image, o: lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(key, x):
  """Mirror each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1], x)


def random_translate(key, x, max_shift):
  """Shift each image by up to `max_shift` pixels in each direction, filling with zeros."""
  return random_crop(key, x, max_shift)
