"""A small LeNet-style CNN for 28x28 digits: the default backbone of the CPU presets.

LeCun et al. 1998 ("Gradient-based learning applied to document recognition") with
the modern touches of batch norm (Ioffe & Szegedy 2015), ReLU and max pooling:
conv 3x3/32 -> pool -> conv 3x3/64 -> pool -> dense 128 -> head.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import BatchNorm, Conv
from cnnjax.models.pooling import max_pool2
from cnnjax.models.registry import Classifier, check_images, register


class ConvStage(nnx.Module):
  """conv 3x3 -> batch norm -> ReLU -> 2x2 max pool."""

  def __init__(self, cin, cout, *, rngs, dtype):
    self.conv = Conv(cin, cout, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
    self.norm = BatchNorm(cout, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return max_pool2(nnx.relu(self.norm(self.conv(x))))


class DenseStage(nnx.Module):
  """flatten -> dense -> ReLU."""

  def __init__(self, cin, cout, *, rngs, dtype):
    self.dense = nnx.Linear(cin, cout, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.dense(x.reshape(x.shape[0], -1)))


class DigitBackbone(nnx.Module):

  def __init__(self, channels, size, width, *, rngs, dtype):
    if size % 4:
      raise ValueError(f'digit_cnn needs an input size divisible by 4, got {size}')
    self.channels, self.dtype = channels, dtype
    self.stages = nnx.List([
        ConvStage(channels, width, rngs=rngs, dtype=dtype),
        ConvStage(width, 2 * width, rngs=rngs, dtype=dtype),
        DenseStage((size // 4) ** 2 * 2 * width, 128, rngs=rngs, dtype=dtype),
    ])

  def __call__(self, x):
    check_images(x, self.channels, 'digit_cnn')
    x = x.astype(self.dtype)
    for stage in self.stages:
      x = stage(x)
    return x


@register('digit_cnn', inputs=[(28, 28, 1)], num_classes=10)
def digit_cnn(*, num_classes, rngs, dtype=jnp.float32, channels=1, size=28, width=32):
  """The default CPU-preset CNN (~0.42M parameters at 28x28, 10 classes)."""
  backbone = DigitBackbone(channels, size, width, rngs=rngs, dtype=dtype)
  return Classifier(backbone, 128, num_classes, rngs=rngs, dtype=dtype)
