"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2).

A 3x3/16 stem, then three stages of n basic blocks with 16, 32 and 64 channels
(feature maps 32, 16, 8), global average pooling and a linear head: 6n+2 layers.
Shortcuts are the paper's option A (identity; stride-2 subsampling and zero-padded
channels where the shape changes), so ResNet-20/32/44/56/110 have 0.27M/0.46M/0.66M/
0.85M/1.7M parameters as in the paper's Table 6.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.registry import Classifier, check_images, register

DEPTHS = (20, 32, 44, 56, 110)


def conv_bn(cin, cout, stride, *, rngs, dtype):
  return (nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, dtype=dtype, rngs=rngs),
          nnx.BatchNorm(cout, momentum=0.9, dtype=dtype, rngs=rngs))


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers with an option-A identity shortcut."""

  def __init__(self, cin, cout, stride, *, rngs, dtype):
    self.conv1, self.norm1 = conv_bn(cin, cout, stride, rngs=rngs, dtype=dtype)
    self.conv2, self.norm2 = conv_bn(cout, cout, 1, rngs=rngs, dtype=dtype)
    self.stride, self.pad = stride, cout - cin

  def __call__(self, x):
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    shortcut = x[:, ::self.stride, ::self.stride, :]
    if self.pad:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (self.pad // 2, self.pad - self.pad // 2)))
    return nnx.relu(y + shortcut)


class Stage(nnx.Module):

  def __init__(self, cin, cout, blocks, stride, *, rngs, dtype):
    self.blocks = nnx.List([BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                       rngs=rngs, dtype=dtype) for i in range(blocks)])

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


class Stem(nnx.Module):

  def __init__(self, channels, *, rngs, dtype):
    self.conv, self.norm = conv_bn(channels, 16, 1, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return nnx.relu(self.norm(self.conv(x)))


class CifarBackbone(nnx.Module):

  def __init__(self, depth, channels, *, rngs, dtype):
    if depth not in DEPTHS and (depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2 (e.g. {DEPTHS}), got {depth}')
    n = (depth - 2) // 6
    self.channels, self.dtype = channels, dtype
    self.stem = Stem(channels, rngs=rngs, dtype=dtype)
    self.stages = nnx.List([Stage(16, 16, n, 1, rngs=rngs, dtype=dtype),
                            Stage(16, 32, n, 2, rngs=rngs, dtype=dtype),
                            Stage(32, 64, n, 2, rngs=rngs, dtype=dtype)])

  def __call__(self, x):
    check_images(x, self.channels, 'cifar_resnet')
    x = self.stem(x.astype(self.dtype))
    for stage in self.stages:
      x = stage(x)
    return x.mean(axis=(1, 2))


def register_depth(depth):
  @register(f'resnet{depth}_cifar', inputs=[(32, 32, 3)], num_classes=10)
  def cifar_resnet(*, num_classes, rngs, dtype=jnp.float32, channels=3):
    return Classifier(CifarBackbone(depth, channels, rngs=rngs, dtype=dtype), 64, num_classes,
                      rngs=rngs, dtype=dtype)
  cifar_resnet.__doc__ = f'CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts).'


for _depth in DEPTHS:
  register_depth(_depth)
