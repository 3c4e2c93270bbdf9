"""Models: parameter counts (the papers' numbers), traced builds in linear time, a jitted
forward/backward pass, the residual ReLU, clear shape errors, the registry's error and the
transfer parameter groups."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cnnjax import metrics, models, ops
from cnnjax.errors import ConfigError
from cnnjax.methods.classification import cross_entropy
from cnnjax.methods.transfer import path_str, startswith_any
from cnnjax.models.cifar_resnet import cifar_backbone
from cnnjax.models.layers import BatchNorm, RunningStat, residual_relu
from cnnjax.models.pooling import max_pool2
from cnnjax.train import state as train_state, steps


def abstract(name, **kwargs):
  """The model with shapes only: nothing is allocated or initialised."""
  return nnx.eval_shape(lambda: models.build(name, num_classes=kwargs.pop('num_classes', 10), **kwargs))


def param_count(model):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_paths(model):
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
  return [path_str(path) for path, _ in leaves]


# Parameter counts -------------------------------------------------------------------------------

def test_digit_cnn_parameter_count():
  # conv 3*3*1*32 + bn 2*32, conv 3*3*32*64 + bn 2*64, dense 7*7*64*128 + 128, head 128*10 + 10
  expected = 288 + 64 + 18432 + 128 + 3136 * 128 + 128 + 1290
  assert expected == 421_738
  assert param_count(abstract('digit_cnn')) == expected


@pytest.mark.parametrize('depth, exact, paper', [
    (20, 269_722, 0.27e6), (56, 853_018, 0.85e6), (110, 1_727_962, 1.7e6),
])
def test_cifar_resnet_parameter_counts_match_the_paper(depth, exact, paper):
  """He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M (option-A shortcuts)."""
  count = param_count(abstract(f'resnet{depth}_cifar'))
  assert count == exact
  assert abs(count - paper) / paper < 0.02


def test_cifar_resnet_depths_are_six_n_plus_two():
  assert 'resnet21_cifar' not in models.MODELS
  with pytest.raises(ConfigError, match='resnet21_cifar'):
    models.build('resnet21_cifar', num_classes=10)
  with pytest.raises(ValueError, match=r'6n\+2.*21'):
    nnx.eval_shape(lambda: cifar_backbone(21, 3, rngs=nnx.Rngs(0), dtype=jnp.float32))
  backbone = nnx.eval_shape(lambda: cifar_backbone(8, 3, rngs=nnx.Rngs(0), dtype=jnp.float32))
  assert [len(stage.blocks) for stage in backbone.stages] == [1, 1, 1]


def test_parameters_stay_float32_with_bfloat16_compute():
  model = abstract('resnet20_cifar', dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}


def test_batch_norm_updates_running_statistics_like_flax():
  """Inside a jitted train step (where its updates skip Flax's costly sharding check) and outside,
  cnnjax's BatchNorm normalises and moves its running statistics exactly as nnx.BatchNorm with
  torchvision's momentum does."""
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 2 + 1
  ours = BatchNorm(3, dtype=jnp.float32, rngs=nnx.Rngs(0))
  flax = nnx.BatchNorm(3, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
  assert isinstance(ours.mean, RunningStat) and isinstance(ours.mean, nnx.BatchStat)

  @jax.jit
  def twice(state, graphdef, x):
    module = nnx.merge(graphdef, state)
    y = module(module(x))
    return y, nnx.state(module)

  outputs = []
  for module in (ours, flax):
    graphdef, state = nnx.split(module)
    y, state = twice(state, graphdef, x)
    nnx.update(module, state)
    outputs.append(np.asarray(y))
  np.testing.assert_array_equal(*outputs)
  for stat in ('mean', 'var'):
    np.testing.assert_array_equal(getattr(ours, stat)[...], getattr(flax, stat)[...])
  assert float(jnp.abs(ours.mean[...]).sum()) > 0  # the statistics moved
  ours(x)  # eagerly too
  flax(x)
  np.testing.assert_array_equal(ours.var[...], flax.var[...])


def test_unknown_model_lists_the_models():
  with pytest.raises(ConfigError) as info:
    models.build('vgg_tiny', num_classes=10)
  assert info.value.key == 'model' and info.value.value == 'vgg_tiny'
  assert info.value.allowed == models.MODELS.names()
  for name in ('digit_cnn', 'resnet20_cifar', 'resnet110_cifar', "'vgg_tiny'"):
    assert name in str(info.value)


@pytest.mark.parametrize('name, kwargs, shape, allowed', [
    ('unet', {}, (32, 32, 1), r'a classifier: a backbone of stages and a linear head.*unet builds a UNet'),
    ('kim_cnn', {'channels': 1}, (28, 28, 1), r"a model whose builder takes this experiment's arguments.*'channels'"),
    ('alexnet', {'channels': 1}, (28, 28, 1), r'a classifier of \(28, 28, 1\) images.*3x3 max pooling'),
])
def test_experiments_refuse_models_they_cannot_take_apart_or_feed(name, kwargs, shape, allowed):
  """Transfer, adaptation and meta-learning split a `Classifier` into backbone and head."""
  with pytest.raises(ConfigError, match=rf"config.model = '{name}' is not allowed; allowed: {allowed}"):
    models.check_classifier(name, lambda: models.build(name, num_classes=3, **kwargs), shape)
  models.check_classifier('digit_cnn', lambda: models.build('digit_cnn', num_classes=3), (28, 28, 1))


def test_traced_builds_do_not_walk_the_trace_for_each_parameter(monkeypatch):
  """flax probes `.sharding` on every value it assigns; JAX's answer on a tracer walks every
  equation traced so far (quadratic construction under nnx.eval_shape). `models.build` answers
  without the walk, and puts JAX's property back afterwards, also when the build fails. If the
  plain construction stops walking, JAX has fixed it and the workaround can go."""
  tracer_type = []
  jax.eval_shape(lambda x: tracer_type.append(type(x)) or x, 1.0)
  walks = []
  origin_msg = tracer_type[0]._origin_msg
  monkeypatch.setattr(tracer_type[0], '_origin_msg', lambda self: walks.append(1) or origin_msg(self))
  original = jax.core.Tracer.__dict__['sharding']

  nnx.eval_shape(lambda: models.build('digit_cnn', num_classes=10))
  assert not walks
  with pytest.raises(TypeError):
    models.build('digit_cnn', num_classes=10, no_such_argument=1)
  assert jax.core.Tracer.__dict__['sharding'] is original
  nnx.eval_shape(lambda: models.MODELS.get('digit_cnn')(rngs=nnx.Rngs(0), dtype=jnp.float32, num_classes=10))
  assert walks


# Forward and backward ---------------------------------------------------------------------------

CASES = {
    # name: (build kwargs, input shape (small), classes)
    'digit_cnn': (dict(size=12, width=8), (3, 12, 12, 1), 7),
    'resnet20_cifar': (dict(), (2, 8, 8, 3), 5),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_jitted_forward_and_backward_are_finite(name):
  kwargs, shape, classes = CASES[name]
  model = models.build(name, num_classes=classes, seed=0, **kwargs)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.uniform(jax.random.key(1), shape)
  y = jnp.arange(shape[0]) % classes

  @jax.jit
  def forward_backward(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest)
    model.train()

    def loss_fn(model):
      logits = model(x)
      return metrics.nll(logits, y).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    model.eval()
    return loss, logits, grads, model(x), nnx.state(model, nnx.BatchStat)

  loss, logits, grads, eval_logits, stats = forward_backward(params, rest, x, y)
  assert logits.shape == eval_logits.shape == (shape[0], classes)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(loss)) and np.all(np.isfinite(logits)) and np.all(np.isfinite(eval_logits))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  grad_norms = [np.linalg.norm(g) for g in jax.device_get(jax.tree.leaves(grads))]  # on the host: no compile per shape
  assert all(np.isfinite(grad_norms)) and sum(grad_norms) > 0
  assert all(np.abs(g).sum() > 0 for g in jax.device_get(jax.tree.leaves(grads['head'])))
  # Training mode updated the batch statistics (the running means moved off their zero start).
  means = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(stats) if 'mean' in path_str(path)]
  assert means and any(np.abs(m).sum() > 0 for m in jax.device_get(means))


def test_residual_relu_is_the_relu_of_the_sum_in_value_and_gradient():
  rng = np.random.default_rng(0)
  y, shortcut = (jnp.asarray(rng.normal(size=(4, 5, 5, 3)).astype(np.float32)) for _ in range(2))
  y = y.at[0].set(-shortcut[0]).at[1].set(0.0)  # ties at zero, with and without a zero shortcut
  shortcut = shortcut.at[1, :, :, 0].set(0.0)
  weights = jnp.arange(1.0, 4.0)
  ours = lambda y, s: (residual_relu(y, s) * weights).sum()
  plain = lambda y, s: (nnx.relu(y + s) * weights).sum()
  np.testing.assert_array_equal(residual_relu(y, shortcut), nnx.relu(y + shortcut))
  for a, b in zip(jax.grad(ours, (0, 1))(y, shortcut), jax.grad(plain, (0, 1))(y, shortcut)):
    np.testing.assert_array_equal(a, b)


def window_max(x):
  """2x2(x2)/2 max pooling as a max over reshaped windows: JAX's own derivative of it is the reference."""
  b, *spatial, c = x.shape
  x = x[(slice(None), *(slice(n // 2 * 2) for n in spatial))]
  return x.reshape(b, *(s for n in spatial for s in (n // 2, 2)), c).max(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


@pytest.mark.parametrize('shape', [(3, 7, 9, 4), (2, 4, 6, 5, 3)], ids=['2d_odd_sizes', '3d'])
def test_max_pool2_is_a_window_max_in_value_and_derivatives(shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 3, size=shape).astype(np.float32))  # many windows with 2-8 tied maxima
  x = x.at[0].set(1.0)  # every element of every window a maximum
  pooled_shape = window_max(x).shape
  cotangent, tangent = jnp.asarray(rng.normal(size=pooled_shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)
  gradient = lambda pool: jax.grad(lambda x: jnp.vdot(pool(x), cotangent))
  second_order = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(gradient(pool)(x) * x) ** 2))
  for derivative in (lambda pool: pool, gradient, second_order, lambda pool: lambda x: jax.jvp(pool, (x,), (tangent,))[1]):
    np.testing.assert_array_equal(jax.jit(derivative(max_pool2))(x), jax.jit(derivative(window_max))(x))


def test_max_pool2_and_its_gradient_take_no_reductions_over_windows():
  """XLA:CPU runs each reduction over a window's two axes as a slow pass of its own (cnnjax/models/pooling.py)."""
  x = jnp.zeros((2, 8, 8, 3))
  program = jax.make_jaxpr(jax.value_and_grad(lambda x: jnp.vdot(max_pool2(x), jnp.ones((2, 4, 4, 3)))))(x)
  assert 'reduce_' not in str(program), program  # nested programs included


def test_resnet_training_computes_each_block_output_once():
  """No transpose of the compiled ResNet-20 train step (XLA:CPU's weight-gradient convolutions read
  their input transposed) rebuilds the residual stream: each reads at most two activations (one
  block's). With relu(y + shortcut) XLA recomputed earlier blocks inside it: up to four
  (layers.residual_relu). With XLA's convolutions (the CPU default is oneDNN's, cnnjax.ops)."""
  with ops.xla_convolutions():
    model = models.build('resnet20_cifar', num_classes=5, seed=0)
  tx = optax.sgd(0.1)
  step = steps.make_train_step(train_state.split_model(model)[0], tx, cross_entropy)
  batch = {'image': np.zeros((4, 16, 16, 3), np.float32), 'label': np.arange(4, dtype=np.int32)}
  hlo = jax.jit(step).lower(train_state.create(model, tx, 0), batch).compile().as_text()
  fused = [c for c in hlo.split('\n\n') if c.startswith('%fused') and ' transpose(' in c]
  activations_read = [len(re.findall(r': f32\[4,\d+,\d+,\d+\]', c.split('\n')[0])) for c in fused]
  assert fused and max(activations_read) <= 2


@pytest.mark.parametrize('name, family, right, wrong', [
    ('digit_cnn', 'digit_cnn', (2, 28, 28, 1), (2, 28, 28, 3)),
    ('digit_cnn', 'digit_cnn', (2, 28, 28, 1), (2, 28, 28)),
    ('resnet20_cifar', 'cifar_resnet', (2, 32, 32, 3), (2, 32, 32, 1)),
])
def test_wrong_input_shape_names_the_shape(name, family, right, wrong):
  def forward(shape):  # traced only (jax.eval_shape): nothing is initialised or compiled
    return jax.eval_shape(lambda: models.build(name, num_classes=10)(jnp.zeros(shape)))
  assert forward(right).shape == (2, 10)
  with pytest.raises(ValueError) as info:
    forward(wrong)
  message = str(info.value)
  assert str(wrong) in message and family in message and f'{right[-1]} channel' in message


def test_digit_cnn_needs_size_divisible_by_four():
  with pytest.raises(ValueError, match='divisible by 4.*30'):
    abstract('digit_cnn', size=30)


# Transfer parameter groups ----------------------------------------------------------------------

@pytest.mark.parametrize('name', ['digit_cnn', 'resnet20_cifar'])
def test_trainable_paths_select_head_last_stage_and_all(name):
  model = abstract(name)
  paths = param_paths(model)
  last = len(model.backbone.stages) - 1
  assert models.trainable_paths(model, 'head') == ('head',)
  assert models.trainable_paths(model, 'last_stage') == (f'backbone/stages/{last}', 'head')
  assert models.trainable_paths(model, 'all') == ('',)

  selected = {part: [p for p in paths if startswith_any(p, models.trainable_paths(model, part))]
              for part in ('head', 'last_stage', 'all')}
  assert sorted(selected['head']) == ['head/bias', 'head/kernel']
  assert selected['all'] == paths
  expected_last = [p for p in paths if p.startswith(f'backbone/stages/{last}/') or p.startswith('head/')]
  assert selected['last_stage'] == expected_last
  assert len(selected['head']) < len(selected['last_stage']) < len(selected['all'])
  # Earlier stages and the stem are never in the last stage.
  assert not any(p.startswith('backbone/stages/0/') or p.startswith('backbone/stem/')
                 for p in selected['last_stage'])


def test_unknown_trainable_part_fails():
  with pytest.raises(KeyError):
    models.trainable_paths(abstract('digit_cnn'), 'middle')
