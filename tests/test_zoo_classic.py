"""The classic classification CNNs: parameter counts (the papers' and torchvision's numbers), the
depths of the architecture tables, clear errors on configurations that do not exist and on wrong
inputs, and the pooling helpers. All abstract (nnx.eval_shape): nothing large is allocated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnjax import models
from cnnjax.errors import ConfigError
from cnnjax.models.alexnet import adaptive_avg_pool, max_pool3
from cnnjax.models.resnet import resnet_backbone
from cnnjax.models.vgg import VGGBackbone
from cnnjax.models.wide_resnet import wide_resnet


def abstract(name, **kwargs):
  return nnx.eval_shape(lambda: models.build(name, **kwargs))


@pytest.mark.parametrize('name, exact', [
    ('alexnet', 61_100_840),
    ('vgg11', 132_863_336), ('vgg13', 133_047_848), ('vgg16', 138_357_544), ('vgg19', 143_667_240),
    ('vgg11_bn', 132_868_840), ('vgg16_bn', 138_365_992),
    ('resnet18', 11_689_512), ('resnet34', 21_797_672), ('resnet50', 25_557_032),
    ('resnet101', 44_549_160), ('resnet152', 60_192_808),
])
def test_imagenet_parameter_counts_match_torchvision(name, exact):
  assert models.count_params(name, num_classes=1000) == exact


def test_cifar_parameter_counts_match_the_papers():
  # Zagoruyko & Komodakis 2016, Table: WRN-28-10 36.5M
  wrn = models.count_params('wrn28_10', num_classes=10)
  assert wrn == 36_479_194 and abs(wrn - 36.5e6) / 36.5e6 < 0.02
  # PreAct ResNet-18 with the final BN: 11.17M
  preact = models.count_params('preact_resnet18', num_classes=10)
  assert preact == 11_172_170 and abs(preact - 11.17e6) / 11.17e6 < 0.005


def test_resnet_depth_counts_the_weighted_layers():
  """He et al. 2016, Table 1: stem conv + blocks x layers per block + the head."""
  from cnnjax.models.resnet import BLOCKS, CONFIGS
  for depth, (kind, blocks) in CONFIGS.items():
    assert 1 + {'basic': 2, 'bottleneck': 3}[kind] * sum(blocks) + 1 == depth
  backbone = abstract('resnet50', num_classes=1000).backbone
  assert [len(stage.blocks) for stage in backbone.stages] == [3, 4, 6, 3]
  assert all(isinstance(block, BLOCKS['bottleneck']) for stage in backbone.stages for block in stage.blocks)


def test_vgg_depth_counts_the_weighted_layers():
  for depth in (11, 13, 16, 19):
    backbone = abstract(f'vgg{depth}', num_classes=1000).backbone
    convs = sum(len(stage.convs) for stage in backbone.stages[:5])
    assert convs + 3 == depth  # 3 dense layers: fc6, fc7 and the head


@pytest.mark.parametrize('name, features', [
    ('alexnet', 4096), ('vgg16_bn', 4096), ('resnet50', 2048),
])
def test_imagenet_models_map_224_to_pooled_features_and_logits(name, features):
  model = abstract(name, num_classes=1000)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  assert jax.eval_shape(lambda m, x: m.features(x), model, x).shape == (2, features)
  assert jax.eval_shape(lambda m, x: m(x), model, x).shape == (2, 1000)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  model = abstract('resnet18', num_classes=10, dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}
  out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert out.dtype == jnp.float32


def test_configurations_that_do_not_exist_fail_clearly():
  for name in ('resnet26', 'vgg17', 'wrn28_11', 'preact_resnet19'):
    with pytest.raises(ConfigError, match=name):
      models.build(name, num_classes=10)
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match=r'18, 34, 50, 101, 152.*26'):
    nnx.eval_shape(lambda: resnet_backbone(26, 3, rngs=rngs, dtype=jnp.float32))
  with pytest.raises(ValueError, match=r'11, 13, 16, 19.*17'):
    nnx.eval_shape(lambda: VGGBackbone(17, 3, False, 4096, rngs=rngs, dtype=jnp.float32))
  with pytest.raises(ValueError, match=r'6n\+4.*27'):
    nnx.eval_shape(lambda: wide_resnet(27, 10, num_classes=10, rngs=rngs))
  wrn16_1 = nnx.eval_shape(lambda: wide_resnet(16, 1, num_classes=10, rngs=nnx.Rngs(0)))
  assert [len(stage.blocks) for stage in wrn16_1.backbone.stages] == [2, 2, 2]


@pytest.mark.parametrize('name, size', [
    ('alexnet', 224), ('vgg11_bn', 224), ('resnet18', 224),
    ('preact_resnet18', 32), ('wrn28_10', 32),
])
def test_wrong_input_channels_fail_naming_the_shape(name, size):
  model = abstract(name, num_classes=10)
  with pytest.raises(ValueError, match=rf'{name} expects .*3 channel.*\(1, {size}, {size}, 1\)'):
    jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))


def test_too_small_inputs_fail_clearly():
  with pytest.raises(ValueError, match=r'vgg16 needs .*32x32.*\(1, 16, 16, 3\)'):
    jax.eval_shape(lambda m, x: m(x), abstract('vgg16', num_classes=10),
                   jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  with pytest.raises(ValueError, match='3x3 max pooling'):
    jax.eval_shape(lambda m, x: m(x), abstract('alexnet', num_classes=10),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_max_pool3_matches_reduce_window():
  for size, padding in ((9, 1), (10, 1), (13, 0)):
    x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3)).astype(np.float32)
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    expected = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pads)
    np.testing.assert_array_equal(jax.jit(max_pool3, static_argnums=1)(x, padding), expected)


def test_adaptive_avg_pool_like_torch():
  x = np.random.default_rng(0).normal(size=(2, 14, 14, 3)).astype(np.float32)
  # an integer ratio: plain 2x2 average pooling
  np.testing.assert_allclose(adaptive_avg_pool(x, 7), x.reshape(2, 7, 2, 7, 2, 3).mean(axis=(2, 4)), atol=1e-6)
  # a 1x1 map is repeated; an unchanged size is the identity
  one = x[:, :1, :1]
  np.testing.assert_allclose(adaptive_avg_pool(one, 6), jnp.broadcast_to(one, (2, 6, 6, 3)), atol=1e-6)
  assert adaptive_avg_pool(x, 14) is x
  # overlapping bins (5 -> 3): [0, 2), [1, 4), [3, 5)
  y = adaptive_avg_pool(x[:, :5, :5], 3)
  np.testing.assert_allclose(y[:, 1, 1], x[:, 1:4, 1:4].mean(axis=(1, 2)), atol=1e-6)
  np.testing.assert_allclose(y[:, 2, 0], x[:, 3:5, 0:2].mean(axis=(1, 2)), atol=1e-6)
