"""The model registry and the shared pieces every model family uses."""

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax.errors import ConfigError
from cnnjax.registry import Registry

MODELS = Registry('model')
SPECS = {}  # name -> Spec: how to call the model at its standard and at a small test size


class Spec(NamedTuple):
  """The inputs of a model (per example, without the batch axis) and its standard build arguments.

  `inputs`: shapes at the paper's standard size (used for the parameter and FLOP table);
  `small_inputs`: shapes for fast tests; `input_dtype`: 'float32' for images, 'int32' for tokens;
  `kwargs`: arguments of the standard build (e.g. num_classes=1000); `small_kwargs`: of the
  fast-test build (e.g. fewer classes), merged over `kwargs`.
  """
  inputs: tuple
  small_inputs: tuple
  input_dtype: str = 'float32'
  kwargs: dict = {}
  small_kwargs: dict = {}

  def example(self, batch, small=True, dtype=None):
    """Abstract example inputs (jax.ShapeDtypeStruct) for a batch."""
    shapes = self.small_inputs if small else self.inputs
    return tuple(jax.ShapeDtypeStruct((batch, *shape), dtype or self.input_dtype) for shape in shapes)


def register(name, *, inputs, small_inputs=None, input_dtype='float32', small_kwargs=None, **kwargs):
  """Register a model builder `fn(*, rngs, dtype, **kwargs) -> nnx.Module` with its input spec."""
  def add(fn):
    SPECS[name] = Spec(tuple(map(tuple, inputs)), tuple(map(tuple, small_inputs or inputs)), input_dtype,
                       kwargs, small_kwargs or {})
    return MODELS.register(name)(fn)
  return add


def build(name, *, seed=0, dtype='float32', **kwargs):
  """A model by name with parameters initialised from `seed` (arguments: the model's builder).

  `dtype` is the compute dtype (e.g. 'bfloat16' on accelerators); parameters stay float32.
  """
  builder = MODELS.get(name, key='model')
  with brief_tracer_sharding_errors():
    return builder(rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype), **kwargs)


def _no_tracer_sharding(tracer):
  raise AttributeError(f"The 'sharding' attribute is not available on {tracer._error_repr()}.")


@contextlib.contextmanager
def brief_tracer_sharding_errors():
  """Traced model construction in linear time: flax NNX's Variable.set_value probes `.sharding` on
  every assigned value (each draw from an Rngs stream), and on a tracer JAX raises an AttributeError
  whose message walks every equation traced so far (jax-ml/jax#40041). Within this context the
  same AttributeError comes without that walk: every standard-size model under nnx.eval_shape,
  built and called, 42 -> 24 s on 2 CPU cores (ResNet-152's construction alone 7.0 -> 1.4 s)."""
  tracer, original = jax.core.Tracer, jax.core.Tracer.__dict__.get('sharding')
  tracer.sharding = property(_no_tracer_sharding)
  try:
    yield
  finally:
    if original is None:
      del tracer.sharding
    else:
      tracer.sharding = original


def check_classifier(name, build, image_shape, key='model'):
  """`build()`, the model `name` as an experiment builds it, makes a `Classifier` (which transfer
  and adaptation take apart into backbone and head) that takes images of `image_shape`; else a
  ConfigError, before any compute. On abstract shapes: nothing is allocated or compiled."""
  try:
    model = nnx.eval_shape(build)
  except TypeError as error:  # an argument this model's builder does not take
    raise ConfigError(key, name, "a model whose builder takes this experiment's arguments", str(error)) from None
  if not isinstance(model, Classifier):
    raise ConfigError(key, name, 'a classifier: a backbone of stages and a linear head (cnnjax.models.Classifier)',
                      f'{name} builds a {type(model).__name__}')
  try:
    jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
  except (TypeError, ValueError) as error:
    raise ConfigError(key, name, f'a classifier of {tuple(image_shape)} images', str(error)) from None


def count_params(name, **kwargs):
  """Parameters of a model from abstract shapes: nothing is allocated or compiled."""
  model = nnx.eval_shape(lambda: build(name, **kwargs))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def check_images(x, channels, model):
  """Fail with a clear message on an input that is not an NHWC batch with `channels` channels."""
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f'{model} expects NHWC images with {channels} channel(s), got shape {x.shape}')


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
