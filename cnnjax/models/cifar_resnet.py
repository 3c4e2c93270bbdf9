"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2).

A 3x3/16 stem, then three stages of n basic blocks with 16, 32 and 64 channels
(feature maps 32, 16, 8), global average pooling and a linear head: 6n+2 layers.
Shortcuts are the paper's option A (identity; stride-2 subsampling and zero-padded
channels where the shape changes), so ResNet-20/32/44/56/110 have 0.27M/0.46M/0.66M/
0.85M/1.7M parameters as in the paper's Table 6.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import Backbone, ConvBN, Sequence, residual_relu
from cnnjax.models.registry import Classifier, register

DEPTHS = (20, 32, 44, 56, 110)


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers with an option-A identity shortcut."""

  def __init__(self, cin, cout, stride, *, rngs, dtype):
    self.conv1 = ConvBN(cin, cout, 3, stride, rngs=rngs, dtype=dtype)
    self.conv2 = ConvBN(cout, cout, 3, act=None, rngs=rngs, dtype=dtype)
    self.stride, self.pad = stride, cout - cin

  def __call__(self, x):
    y = self.conv2(self.conv1(x))
    shortcut = x[:, ::self.stride, ::self.stride, :]
    if self.pad:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (self.pad // 2, self.pad - self.pad // 2)))
    return residual_relu(y, shortcut)


def cifar_backbone(depth, channels, *, rngs, dtype, blocks=None):
  """The 3x3/16 stem and three stages of n = (depth - 2) / 6 basic blocks (16, 32, 64 channels;
  `blocks` overrides n)."""
  if depth not in DEPTHS and (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n+2 (e.g. {DEPTHS}), got {depth}')
  n = blocks or (depth - 2) // 6
  kw = dict(rngs=rngs, dtype=dtype)
  stages = [Sequence([BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, **kw) for i in range(n)])
            for cin, cout, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2))]
  return Backbone('cifar_resnet', channels, ConvBN(channels, 16, 3, **kw), stages, 64, dtype=dtype)


def register_depth(depth):
  # The fast test builds of the deeper members keep one block per stage (ResNet-20 runs whole); the
  # full depth is checked abstractly (parameter counts, standard-size shapes).
  @register(f'resnet{depth}_cifar', inputs=[(32, 32, 3)], num_classes=10,
            small_kwargs=dict(blocks=1) if depth > 20 else None)
  def cifar_resnet(*, num_classes, rngs, dtype=jnp.float32, channels=3, blocks=None):
    return Classifier(cifar_backbone(depth, channels, rngs=rngs, dtype=dtype, blocks=blocks), 64, num_classes,
                      rngs=rngs, dtype=dtype)
  cifar_resnet.__doc__ = f'CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts).'


for _depth in DEPTHS:
  register_depth(_depth)
