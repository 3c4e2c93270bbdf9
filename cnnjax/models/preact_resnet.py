"""Pre-activation ResNets (He et al. 2016b, "Identity Mappings in Deep Residual Networks"), CIFAR.

Every block is BN-ReLU-conv 3x3, BN-ReLU-conv 3x3 added to a clean identity path (Fig. 4e);
where the shape changes the shortcut is a 1x1 conv of the pre-activated input. PreAct
ResNet-18 for 32x32 images: a 3x3/64 stem, four stages of two blocks with 64, 128, 256 and 512
channels (feature maps 32, 16, 8, 4), a final BN-ReLU (the last block's output is not
activated), global average pooling and the head: 11,172,170 parameters at 10 classes.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import Backbone, BatchNorm, Conv
from cnnjax.models.registry import Classifier, register


def bn_conv(cin, cout, stride, *, rngs, dtype):
  return (BatchNorm(cin, dtype=dtype, rngs=rngs),
          Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, dtype=dtype, rngs=rngs))


class PreActBlock(nnx.Module):
  """BN-ReLU-conv 3x3 (strided), BN-ReLU-conv 3x3, plus the shortcut; nothing after the addition."""

  def __init__(self, cin, cout, stride, *, rngs, dtype):
    self.norm1, self.conv1 = bn_conv(cin, cout, stride, rngs=rngs, dtype=dtype)
    self.norm2, self.conv2 = bn_conv(cout, cout, 1, rngs=rngs, dtype=dtype)
    self.shortcut = (Conv(cin, cout, (1, 1), strides=stride, use_bias=False, dtype=dtype, rngs=rngs)
                     if stride != 1 or cin != cout else None)

  def __call__(self, x):
    y = nnx.relu(self.norm1(x))
    shortcut = self.shortcut(y) if self.shortcut is not None else x
    y = self.conv1(y)
    y = self.conv2(nnx.relu(self.norm2(y)))
    return y + shortcut


class Stage(nnx.Module):
  """Pre-activation blocks; the last stage ends with the network's final BN-ReLU."""

  def __init__(self, cin, cout, blocks, stride, last, *, rngs, dtype):
    self.blocks = nnx.List([PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                        rngs=rngs, dtype=dtype) for i in range(blocks)])
    self.norm = BatchNorm(cout, dtype=dtype, rngs=rngs) if last else None

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return nnx.relu(self.norm(x)) if self.norm is not None else x


def preact_backbone(stem, layout, channels, name, *, rngs, dtype):
  """A 3x3 stem conv of `stem` channels, stages of (blocks, width, stride), global average pooling."""
  kw = dict(rngs=rngs, dtype=dtype)
  cins = (stem, *(width for _, width, _ in layout[:-1]))
  stages = [Stage(cin, width, n, stride, i == len(layout) - 1, **kw)
            for i, (cin, (n, width, stride)) in enumerate(zip(cins, layout))]
  stem_conv = Conv(channels, stem, (3, 3), padding=1, use_bias=False, **kw)
  return Backbone(name, channels, stem_conv, stages, layout[-1][1], dtype=dtype)


@register('preact_resnet18', inputs=[(32, 32, 3)], num_classes=10)
def preact_resnet18(*, num_classes, rngs, dtype=jnp.float32, channels=3):
  """PreAct ResNet-18 for CIFAR (He et al. 2016b; 11.17M parameters at 10 classes)."""
  stages = ((2, 64, 1), (2, 128, 2), (2, 256, 2), (2, 512, 2))
  backbone = preact_backbone(64, stages, channels, 'preact_resnet18', rngs=rngs, dtype=dtype)
  return Classifier(backbone, 512, num_classes, rngs=rngs, dtype=dtype)
