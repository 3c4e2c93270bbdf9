"""ImageNet ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", Table 1).

A 7x7/2 64-channel stem with batch norm and 3x3/2 max pooling, four stages (feature maps 56, 28,
14, 7 at 224x224) of basic blocks (two 3x3 convolutions; ResNet-18/34) or bottleneck blocks
(1x1, 3x3, 1x1 with 4x expansion; ResNet-50/101/152), global average pooling and the head.
Shortcuts are projections where the shape changes (the paper's option B: 1x1 conv + batch norm),
and bottlenecks stride on their 3x3 convolution as torchvision's "v1.5" (or dilate it: see
segmentation.py). ResNet-18/34/50/101/152
have 11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 / 60,192,808 parameters at 1000 classes.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.alexnet import max_pool3
from cnnjax.models.layers import Backbone, ConvBN, Sequence, residual_relu
from cnnjax.models.registry import Classifier, register

# Table 1: the block and the number of blocks in each stage
CONFIGS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)), 50: ('bottleneck', (3, 4, 6, 3)),
           101: ('bottleneck', (3, 4, 23, 3)), 152: ('bottleneck', (3, 8, 36, 3))}
WIDTHS = (64, 128, 256, 512)


class BasicBlock(nnx.Module):
  """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the shortcut, ReLU."""
  expansion = 1

  def __init__(self, cin, width, stride, *, rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype)
    self.conv1 = ConvBN(cin, width, 3, stride, **kw)
    self.conv2 = ConvBN(width, width, 3, act=None, **kw)
    self.shortcut = ConvBN(cin, width, 1, stride, act=None, **kw) if stride != 1 or cin != width else None

  def __call__(self, x):
    y = self.conv2(self.conv1(x))
    return residual_relu(y, self.shortcut(x) if self.shortcut is not None else x)


class Bottleneck(nnx.Module):
  """1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU (strided, or atrous at `rate`), 1x1 conv-BN to 4x width,
  plus the shortcut, ReLU."""
  expansion = 4

  def __init__(self, cin, width, stride, *, rate=1, rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype)
    cout = width * self.expansion
    self.conv1 = ConvBN(cin, width, 1, **kw)
    self.conv2 = ConvBN(width, width, 3, stride, rate=rate, **kw)
    self.conv3 = ConvBN(width, cout, 1, act=None, **kw)
    self.shortcut = ConvBN(cin, cout, 1, stride, act=None, **kw) if stride != 1 or cin != cout else None

  def __call__(self, x):
    y = self.conv3(self.conv2(self.conv1(x)))
    return residual_relu(y, self.shortcut(x) if self.shortcut is not None else x)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


def stage(block, cin, width, blocks, stride, *, rngs, dtype, **block_kwargs):
  """`blocks` blocks of `width`; the first takes `cin` channels and `stride`."""
  cout = width * block.expansion
  return Sequence([block(cin if i == 0 else cout, width, stride if i == 0 else 1, rngs=rngs, dtype=dtype,
                         **block_kwargs) for i in range(blocks)])


class Stem(nnx.Module):
  """7x7/2 conv-BN-ReLU, 3x3/2 max pooling: 224 -> 56."""

  def __init__(self, channels, width=64, *, rngs, dtype):
    self.conv = ConvBN(channels, width, 7, 2, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return max_pool3(self.conv(x), padding=1)


def resnet_backbone(depth, channels, *, rngs, dtype, blocks=None):
  """The stem and four stages of Table 1 (`blocks` per stage overrides the table), pooled."""
  if depth not in CONFIGS:
    raise ValueError(f'ImageNet ResNet depth must be one of {tuple(CONFIGS)}, got {depth}')
  kind, table = CONFIGS[depth]
  block = BLOCKS[kind]
  kw = dict(rngs=rngs, dtype=dtype)
  cins = (64, *(w * block.expansion for w in WIDTHS[:-1]))
  stages = [stage(block, cin, width, n, 1 if i == 0 else 2, **kw)
            for i, (cin, width, n) in enumerate(zip(cins, WIDTHS, blocks or table))]
  return Backbone(f'resnet{depth}', channels, Stem(channels, **kw), stages, WIDTHS[-1] * block.expansion,
                  dtype=dtype)


def resnet(depth, *, num_classes, rngs, dtype=jnp.float32, channels=3, blocks=None):
  """An ImageNet ResNet of `depth` 18, 34, 50, 101 or 152 (`blocks` per stage overrides Table 1)."""
  backbone = resnet_backbone(depth, channels, rngs=rngs, dtype=dtype, blocks=blocks)
  return Classifier(backbone, backbone.features, num_classes, rngs=rngs, dtype=dtype)


# The fast test builds of the deeper ResNets keep their block but not their depth (ResNet-18 runs
# whole): compiling the forward and backward pass of all 50 bottlenecks takes minutes on CPU. The
# full depth is checked abstractly (parameter counts, standard-size shapes).
SMALL_BLOCKS = {34: (1, 1, 2, 1), 50: (1, 1, 2, 1), 101: (1, 1, 2, 1), 152: (1, 1, 2, 1)}


def register_depth(depth):
  small = dict(num_classes=10, blocks=SMALL_BLOCKS[depth]) if depth in SMALL_BLOCKS else dict(num_classes=10)

  @register(f'resnet{depth}', inputs=[(224, 224, 3)], small_inputs=[(32, 32, 3)], num_classes=1000,
            small_kwargs=small)
  def build(*, num_classes, rngs, dtype=jnp.float32, channels=3, blocks=None):
    return resnet(depth, num_classes=num_classes, rngs=rngs, dtype=dtype, channels=channels, blocks=blocks)
  build.__doc__ = f'ResNet-{depth} for ImageNet (He et al. 2016, option-B shortcuts, v1.5 bottlenecks).'


for _depth in CONFIGS:
  register_depth(_depth)
