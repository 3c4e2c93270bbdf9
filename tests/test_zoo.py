"""Every registered model: a jitted forward and backward pass at its small test size.

Runs through `SPECS`, so a model registered with `cnnjax.models.registry.register` is tested
here without a line of its own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnjax import models


def small_build(name, seed=0):
  spec = models.SPECS[name]
  return models.build(name, seed=seed, **{**spec.kwargs, **spec.small_kwargs})


def example_inputs(name, batch=2):
  spec = models.SPECS[name]
  keys = jax.random.split(jax.random.key(0), len(spec.small_inputs))
  if spec.input_dtype.startswith('int'):
    return tuple(jax.random.randint(k, a.shape, 0, 20, a.dtype) for k, a in zip(keys, spec.example(batch)))
  return tuple(jax.random.uniform(k, a.shape, a.dtype) for k, a in zip(keys, spec.example(batch)))


@pytest.mark.parametrize('name', models.MODELS.names())
def test_forward_and_backward_are_finite(name):
  model = small_build(name)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  inputs = example_inputs(name)

  @jax.jit
  def loss_and_grads(params, rest, inputs):
    def loss(model):
      outputs = model(*inputs)
      return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(outputs)), outputs
    return nnx.value_and_grad(loss, has_aux=True)(nnx.merge(graphdef, params, rest))

  (loss, outputs), grads = loss_and_grads(params, rest, inputs)
  assert all(x.shape[0] == 2 for x in jax.tree.leaves(outputs)), f'{name}: the batch axis is lost'
  assert np.isfinite(float(loss))
  norms = [np.linalg.norm(g) for g in jax.device_get(jax.tree.leaves(grads))]  # on the host: no compile per shape
  assert all(np.isfinite(norms)) and sum(norms) > 0, f'{name}: gradients are not finite or all zero'


@pytest.mark.parametrize('name', models.MODELS.names())
def test_standard_size_runs_abstractly(name):
  """The standard-size build accepts its standard input (shapes only: nothing is allocated)."""
  spec = models.SPECS[name]
  model = nnx.eval_shape(lambda: models.build(name, **spec.kwargs))
  outputs = jax.eval_shape(lambda m, *x: m(*x), model, *spec.example(1, small=False))
  assert all(x.shape[0] == 1 for x in jax.tree.leaves(outputs))


def test_zoo_table_lists_parameters_and_flops(tmp_path):
  from cnnjax.models.__main__ import main
  main(['--out', str(tmp_path / 'models.md'), '--models', 'digit_cnn', 'resnet20_cifar'])
  text = (tmp_path / 'models.md').read_text()
  assert '| resnet20_cifar | 32x32x3 | num_classes=10 | 269,722 | 0.075 |' in text  # ~41M multiply-adds
  assert '| digit_cnn |' in text and 'Made by' in text
