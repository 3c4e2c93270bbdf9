"""ImageNet ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", Table 1).

A 7x7/2 64-channel stem with batch norm and 3x3/2 max pooling, four stages (feature maps 56, 28,
14, 7 at 224x224) of basic blocks (two 3x3 convolutions; ResNet-18/34) or bottleneck blocks
(1x1, 3x3, 1x1 with 4x expansion; ResNet-50/101/152), global average pooling and the head.
Shortcuts are projections where the shape changes (the paper's option B: 1x1 conv + batch norm),
and bottlenecks stride on their 3x3 convolution as torchvision's "v1.5". ResNet-18/34/50/101/152
have 11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 / 60,192,808 parameters at 1000 classes.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.alexnet import max_pool3
from cnnjax.models.registry import Classifier, check_images, register

# Table 1: the block and the number of blocks in each stage
CONFIGS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)), 50: ('bottleneck', (3, 4, 6, 3)),
           101: ('bottleneck', (3, 4, 23, 3)), 152: ('bottleneck', (3, 8, 36, 3))}
WIDTHS = (64, 128, 256, 512)


def conv_bn(cin, cout, kernel, stride, *, rngs, dtype):
  return (nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=kernel // 2, use_bias=False,
                   dtype=dtype, rngs=rngs),
          nnx.BatchNorm(cout, momentum=0.9, dtype=dtype, rngs=rngs))


class Projection(nnx.Module):
  """Option-B shortcut: 1x1 conv (strided) + batch norm."""

  def __init__(self, cin, cout, stride, *, rngs, dtype):
    self.conv, self.norm = conv_bn(cin, cout, 1, stride, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
  """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the shortcut, ReLU."""
  expansion = 1

  def __init__(self, cin, width, stride, *, rngs, dtype):
    self.conv1, self.norm1 = conv_bn(cin, width, 3, stride, rngs=rngs, dtype=dtype)
    self.conv2, self.norm2 = conv_bn(width, width, 3, 1, rngs=rngs, dtype=dtype)
    self.shortcut = (Projection(cin, width, stride, rngs=rngs, dtype=dtype)
                     if stride != 1 or cin != width else None)

  def __call__(self, x):
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return nnx.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class Bottleneck(nnx.Module):
  """1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU (strided), 1x1 conv-BN to 4x width, plus the shortcut, ReLU."""
  expansion = 4

  def __init__(self, cin, width, stride, *, rngs, dtype):
    cout = width * self.expansion
    self.conv1, self.norm1 = conv_bn(cin, width, 1, 1, rngs=rngs, dtype=dtype)
    self.conv2, self.norm2 = conv_bn(width, width, 3, stride, rngs=rngs, dtype=dtype)
    self.conv3, self.norm3 = conv_bn(width, cout, 1, 1, rngs=rngs, dtype=dtype)
    self.shortcut = (Projection(cin, cout, stride, rngs=rngs, dtype=dtype)
                     if stride != 1 or cin != cout else None)

  def __call__(self, x):
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = nnx.relu(self.norm2(self.conv2(y)))
    y = self.norm3(self.conv3(y))
    return nnx.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class Stage(nnx.Module):

  def __init__(self, block, cin, width, blocks, stride, *, rngs, dtype):
    cout = width * block.expansion
    self.blocks = nnx.List([block(cin if i == 0 else cout, width, stride if i == 0 else 1, rngs=rngs, dtype=dtype)
                            for i in range(blocks)])

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


class Stem(nnx.Module):
  """7x7/2 conv-BN-ReLU, 3x3/2 max pooling: 224 -> 56."""

  def __init__(self, channels, *, rngs, dtype):
    self.conv, self.norm = conv_bn(channels, 64, 7, 2, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return max_pool3(nnx.relu(self.norm(self.conv(x))), padding=1)


class ResNetBackbone(nnx.Module):

  def __init__(self, depth, channels, *, rngs, dtype, blocks=None):
    if depth not in CONFIGS:
      raise ValueError(f'ImageNet ResNet depth must be one of {tuple(CONFIGS)}, got {depth}')
    kind, table = CONFIGS[depth]
    blocks = blocks or table
    block = BLOCKS[kind]
    self.depth, self.channels, self.dtype = depth, channels, dtype
    self.features = WIDTHS[-1] * block.expansion
    self.stem = Stem(channels, rngs=rngs, dtype=dtype)
    cins = (64, *(w * block.expansion for w in WIDTHS[:-1]))
    self.stages = nnx.List([Stage(block, cin, width, n, 1 if i == 0 else 2, rngs=rngs, dtype=dtype)
                            for i, (cin, width, n) in enumerate(zip(cins, WIDTHS, blocks))])

  def __call__(self, x):
    check_images(x, self.channels, f'resnet{self.depth}')
    x = self.stem(x.astype(self.dtype))
    for stage in self.stages:
      x = stage(x)
    return x.mean(axis=(1, 2))


def resnet(depth, *, num_classes, rngs, dtype=jnp.float32, channels=3, blocks=None):
  """An ImageNet ResNet of `depth` 18, 34, 50, 101 or 152 (`blocks` per stage overrides Table 1)."""
  backbone = ResNetBackbone(depth, channels, rngs=rngs, dtype=dtype, blocks=blocks)
  return Classifier(backbone, backbone.features, num_classes, rngs=rngs, dtype=dtype)


# The fast test builds of the deepest ResNets keep their block but not their depth: compiling the
# forward and backward pass of all 50 bottlenecks takes minutes on CPU. The full depth is checked
# abstractly (parameter counts, standard-size shapes).
SMALL_BLOCKS = {101: (1, 1, 2, 1), 152: (1, 1, 2, 1)}


def register_depth(depth):
  small = dict(num_classes=10, blocks=SMALL_BLOCKS[depth]) if depth in SMALL_BLOCKS else dict(num_classes=10)

  @register(f'resnet{depth}', inputs=[(224, 224, 3)], small_inputs=[(32, 32, 3)], num_classes=1000,
            small_kwargs=small)
  def build(*, num_classes, rngs, dtype=jnp.float32, channels=3, blocks=None):
    return resnet(depth, num_classes=num_classes, rngs=rngs, dtype=dtype, channels=channels, blocks=blocks)
  build.__doc__ = f'ResNet-{depth} for ImageNet (He et al. 2016, option-B shortcuts, v1.5 bottlenecks).'


for _depth in CONFIGS:
  register_depth(_depth)
