"""VGG networks (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale
Image Recognition"), configurations A, B, D and E of Table 1: VGG-11/13/16/19.

Five stages of 3x3 convolutions (64, 128, 256, 512, 512 channels), each closed by 2x2/2 max
pooling, then (as in torchvision) adaptive average pooling to 7x7 so any input of 32x32 or more
works, two 4096-unit dense layers and the head. VGG-11/16/19 have 132,863,336 / 138,357,544 /
143,667,240 parameters at 1000 classes (Table 2: 133M/138M/144M). The `_bn` variants add
batch norm after every convolution (Ioffe & Szegedy 2015), keeping the conv biases as
torchvision does. No dropout.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.alexnet import DenseStage
from cnnjax.models.layers import BatchNorm, Conv
from cnnjax.models.pooling import max_pool2
from cnnjax.models.registry import Classifier, check_images, register

# Table 1: the number of 3x3 convolutions in each of the five stages
CONFIGS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)


class ConvStage(nnx.Module):
  """3x3 conv (-> batch norm) -> ReLU layers, then 2x2/2 max pooling."""

  def __init__(self, cin, cout, layers, batch_norm, *, rngs, dtype):
    self.convs = nnx.List([Conv(cin if i == 0 else cout, cout, (3, 3), padding=1, dtype=dtype, rngs=rngs)
                           for i in range(layers)])
    self.norms = nnx.List([BatchNorm(cout, dtype=dtype, rngs=rngs) for _ in range(layers)]
                          if batch_norm else [])

  def __call__(self, x):
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.norms:
        x = self.norms[i](x)
      x = nnx.relu(x)
    return max_pool2(x)


class VGGBackbone(nnx.Module):

  def __init__(self, depth, channels, batch_norm, hidden, *, rngs, dtype):
    if depth not in CONFIGS:
      raise ValueError(f'VGG depth must be one of {tuple(CONFIGS)} (configurations A, B, D, E), got {depth}')
    self.name = f'vgg{depth}' + ('_bn' if batch_norm else '')
    self.channels, self.dtype = channels, dtype
    cins = (channels, *WIDTHS[:-1])
    self.stages = nnx.List(
        [ConvStage(cin, cout, n, batch_norm, rngs=rngs, dtype=dtype)
         for cin, cout, n in zip(cins, WIDTHS, CONFIGS[depth])]
        + [DenseStage(7, (512 * 7 * 7, hidden, hidden), rngs=rngs, dtype=dtype)])

  def __call__(self, x):
    check_images(x, self.channels, self.name)
    if x.shape[1] < 32 or x.shape[2] < 32:
      raise ValueError(f'{self.name} needs images of at least 32x32 (five 2x2 poolings), got shape {x.shape}')
    x = x.astype(self.dtype)
    for stage in self.stages:
      x = stage(x)
    return x


def vgg(depth, batch_norm=False, *, num_classes, rngs, dtype=jnp.float32, channels=3, hidden=4096):
  """A VGG network of `depth` 11, 13, 16 or 19 (configurations A, B, D, E) with dense layers of
  `hidden` units (4096 in the paper)."""
  return Classifier(VGGBackbone(depth, channels, batch_norm, hidden, rngs=rngs, dtype=dtype), hidden,
                    num_classes, rngs=rngs, dtype=dtype)


def register_config(depth, batch_norm):
  name = f'vgg{depth}' + ('_bn' if batch_norm else '')

  @register(name, inputs=[(224, 224, 3)], small_inputs=[(32, 32, 3)], num_classes=1000,
            small_kwargs=dict(num_classes=10, hidden=64))
  def build(*, num_classes, rngs, dtype=jnp.float32, channels=3, hidden=4096):
    return vgg(depth, batch_norm, num_classes=num_classes, rngs=rngs, dtype=dtype, channels=channels,
               hidden=hidden)
  build.__doc__ = f'VGG-{depth} (Simonyan & Zisserman 2015{", with batch norm" if batch_norm else ""}).'


for _depth in CONFIGS:
  for _batch_norm in (False, True):
    register_config(_depth, _batch_norm)
