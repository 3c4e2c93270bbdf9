"""Building blocks that several model families share: batch norm, conv-BN, a residual ReLU, a sequence of
blocks, a pooled backbone."""

import jax.numpy as jnp
from flax import nnx
from jax import lax

from cnnjax import ops
from cnnjax.models.registry import check_images


class Conv(nnx.Conv):
  """nnx.Conv whose 2-D float32 convolutions run on oneDNN on a single CPU device where it is faster than
  XLA, or as `ops.xla_convolutions()`, `ops.onednn_convolutions()` or CNNJAX_ONEDNN say when the model is
  built (cnnjax/ops/conv.py)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('conv_general_dilated',
                      ops.conv_general_dilated if ops.onednn_enabled() else lax.conv_general_dilated)
    super().__init__(*args, **kwargs)


class RunningStat(nnx.BatchStat):
  """A batch-norm running statistic whose whole-array update (`stat[...] = x`) replaces the value.

  Flax's generic update compares the new value's `sharding`, and on a tracer JAX answers that by
  building an error message that walks everything traced so far: 40% of the time to trace the
  digit CNN's 10-step chunk when each step was traced in turn, growing with everything traced."""

  def __setitem__(self, index, value):
    current = self.get_value()
    if index is Ellipsis and value.shape == current.shape and value.dtype == current.dtype:
      self.set_value(value)
    else:
      super().__setitem__(index, value)


class BatchNorm(nnx.BatchNorm):
  """Batch norm (Ioffe & Szegedy 2015) as torchvision's: momentum 0.1 (0.9 in Flax's convention),
  epsilon 1e-5; running statistics are `RunningStat`s."""

  def __init__(self, features, *, epsilon=1e-5, dtype, rngs):
    super().__init__(features, epsilon=epsilon, momentum=0.9, dtype=dtype, rngs=rngs)
    self.mean, self.var = RunningStat(self.mean[...]), RunningStat(self.var[...])


class ConvBN(nnx.Module):
  """A bias-free convolution with 'same' padding (`groups` groups, dilation `rate`), batch norm,
  then `act` (None: linear)."""

  def __init__(self, cin, cout, kernel, stride=1, *, groups=1, rate=1, act=nnx.relu, epsilon=1e-5, rngs, dtype):
    self.conv = Conv(cin, cout, (kernel, kernel), strides=stride, padding=rate * (kernel // 2),
                         kernel_dilation=rate, feature_group_count=groups, use_bias=False, dtype=dtype, rngs=rngs)
    self.norm = BatchNorm(cout, epsilon=epsilon, dtype=dtype, rngs=rngs)
    self.act = act

  def __call__(self, x):
    x = self.norm(self.conv(x))
    return self.act(x) if self.act else x


def residual_relu(y, shortcut):
  """relu(y + shortcut), the output of a post-activation residual block (He et al. 2016), written as
  where(y > -shortcut, y, -shortcut) + shortcut: the same values and gradients, and an addition of two
  full-size operands, which XLA:CPU computes once. With the ReLU last, XLA treats the block output as
  free to recompute and rebuilds the residual stream back to the stage's first block inside every
  consumer, among them the transposes that feed the weight-gradient convolutions (~half the ResNet-20
  step on 2 CPU cores). Measurements: results/benchmark/NOTES.md."""
  return jnp.where(y > -shortcut, y, -shortcut) + shortcut


class Sequence(nnx.Module):
  """Blocks applied in order (a backbone stage)."""

  def __init__(self, blocks):
    self.blocks = nnx.List(blocks)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


class Backbone(nnx.Module):
  """Checks the input, casts it to the compute dtype, runs a stem and stages, and pools globally:
  the `features`-wide vectors a `Classifier` head reads. Transfer recipes address `stages`."""

  def __init__(self, name, channels, stem, stages, features, *, dtype):
    self.name, self.channels, self.dtype, self.features = name, channels, dtype, features
    self.stem, self.stages = stem, nnx.List(stages)

  def __call__(self, x):
    check_images(x, self.channels, self.name)
    x = self.stem(x.astype(self.dtype))
    for stage in self.stages:
      x = stage(x)
    return x.mean(axis=(1, 2))
