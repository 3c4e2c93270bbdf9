"""The model registry and the shared pieces every model family uses."""

import jax.numpy as jnp
from flax import nnx

from cnnjax.registry import Registry

MODELS = Registry('model')


def build(name, *, num_classes, seed=0, dtype='float32', **kwargs):
  """A model by name with parameters initialised from `seed`.

  `dtype` is the compute dtype (e.g. 'bfloat16' on accelerators); parameters stay float32.
  """
  return MODELS.get(name, key='model')(num_classes=num_classes, rngs=nnx.Rngs(seed),
                                       dtype=jnp.dtype(dtype), **kwargs)


def check_images(x, channels, model):
  """Fail with a clear message on an input that is not an NHWC batch with `channels` channels."""
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f'{model} expects NHWC images with {channels} channel(s), got shape {x.shape}')


def max_pool2(x):
  """2x2/2 max pooling by reshape: its gradient is a select, not XLA:CPU's slow select-and-scatter."""
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def trainable_paths(model, part):
  """Parameter path prefixes that train under a transfer `part`.

  'all' trains everything, 'head' only the classifier, 'last_stage' the last backbone stage and the head.
  """
  last = f'backbone/stages/{len(model.backbone.stages) - 1}'
  return {'all': ('',), 'head': ('head',), 'last_stage': (last, 'head')}[part]


class Classifier(nnx.Module):
  """A backbone (a list of stages) followed by a linear head."""

  def __init__(self, backbone, features, num_classes, *, rngs, dtype):
    self.backbone = backbone
    self.head = nnx.Linear(features, num_classes, dtype=dtype, rngs=rngs)

  def features(self, x):
    return self.backbone(x)

  def __call__(self, x):
    return self.head(self.features(x)).astype(jnp.float32)
