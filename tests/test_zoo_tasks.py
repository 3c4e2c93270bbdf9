"""Task-family CNNs of the model zoo: super-resolution, registration, text, ConvLSTM, SiamFC, fusion.

The generic forward/backward test of every registered model is in test_zoo.py; these check
what is particular to each family: published parameter counts, output shapes and the exact
identities of warps, sub-pixel shuffles and cross-correlation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models


def small(name, **kwargs):
  spec = models.SPECS[name]
  return models.build(name, **{**spec.kwargs, **spec.small_kwargs, **kwargs})


def images(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape)


# Super-resolution

def test_srcnn_has_the_papers_8129_parameters():
  assert models.count_params('srcnn') == 9 * 9 * 64 + 64 + 64 * 32 + 32 + 5 * 5 * 32 + 1 == 8129


def test_edsr_parameter_counts_match_the_paper():
  assert round(models.count_params('edsr_baseline', upscale=4) / 1e6, 1) == 1.5
  assert round(models.count_params('edsr', upscale=4) / 1e6) == 43


@pytest.mark.parametrize('name,upscale', [('srcnn', 2), ('srcnn', 3), ('espcn', 2), ('espcn', 4),
                                          ('edsr_baseline', 2), ('edsr_baseline', 3), ('edsr', 4)])
def test_super_resolution_upscales(name, upscale):
  channels = models.SPECS[name].small_inputs[0][-1]
  out = jax.eval_shape(lambda x: small(name, upscale=upscale)(x), jax.ShapeDtypeStruct((2, 6, 5, channels), jnp.float32))
  assert out.shape == (2, 6 * upscale, 5 * upscale, channels)


def test_pixel_shuffle_places_subpixels():
  from cnnjax.models.super_resolution import pixel_shuffle
  r, c = 2, 3
  x = jnp.arange(1 * 2 * 2 * c * r * r).reshape(1, 2, 2, c * r * r)
  y = pixel_shuffle(x, r)
  for h, w, i, j, k in np.ndindex(2, 2, r, r, c):
    assert y[0, h * r + i, w * r + j, k] == x[0, h, w, k * r * r + i * r + j]


def test_super_resolution_rejects_wrong_channels():
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(lambda x: small('edsr_baseline')(x), jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  with pytest.raises(ValueError, match='upscale'):
    small('edsr', upscale=5)
