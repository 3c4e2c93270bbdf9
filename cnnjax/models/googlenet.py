"""GoogLeNet (Szegedy et al. 2015, "Going Deeper with Convolutions"), Inception-v1.

The paper's Table 1 with the torchvision layout: every convolution is a bias-free conv
followed by batch norm (eps 1e-3) and ReLU, and the "5x5" branch of each Inception module is
a 3x3 convolution (as in torchvision's port). Stem: conv 7x7/2 64 -> max pool 3x3/2 -> conv 1x1
64 -> conv 3x3 192 -> max pool; Inception 3a-3b, max pool, 4a-4e, max pool, 5a-5b; global
average pooling and a linear head. No auxiliary classifiers and no dropout before the head.
(The fast zoo test builds one Inception module per stage; the full network is checked abstractly.)
6,624,904 parameters at 1000 classes (torchvision: 6,624,904; the paper's BN-free net: ~6.8M).
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import Backbone, ConvBN
from cnnjax.models.registry import Classifier, register

# Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per module.
INCEPTION = {
    '3a': (64, 96, 128, 16, 32, 32), '3b': (128, 128, 192, 32, 96, 64),
    '4a': (192, 96, 208, 16, 48, 64), '4b': (160, 112, 224, 24, 64, 64),
    '4c': (128, 128, 256, 24, 64, 64), '4d': (112, 144, 288, 32, 64, 64),
    '4e': (256, 160, 320, 32, 128, 128),
    '5a': (256, 160, 320, 32, 128, 128), '5b': (384, 192, 384, 48, 128, 128),
}


BasicConv = functools.partial(ConvBN, epsilon=1e-3)  # torchvision's BasicConv2d: conv, BN (eps 1e-3), ReLU


def max_pool(x, size=3, stride=2):
  """Max pooling with 'same' padding (torchvision's ceil mode at the standard sizes)."""
  return nn.max_pool(x, (size, size), strides=(stride, stride), padding='SAME')


class Inception(nnx.Module):
  """Four parallel branches concatenated: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 ("5x5") | pool 3x3 -> 1x1."""

  def __init__(self, cin, c1, r3, c3, r5, c5, pool, *, rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype)
    self.branch1 = BasicConv(cin, c1, 1, **kw)
    self.branch3 = nnx.Sequential(BasicConv(cin, r3, 1, **kw), BasicConv(r3, c3, 3, **kw))
    self.branch5 = nnx.Sequential(BasicConv(cin, r5, 1, **kw), BasicConv(r5, c5, 3, **kw))
    self.branch_pool = BasicConv(cin, pool, 1, **kw)
    self.features = c1 + c3 + c5 + pool

  def __call__(self, x):
    return jnp.concatenate([self.branch1(x), self.branch3(x), self.branch5(x),
                            self.branch_pool(max_pool(x, 3, 1))], axis=-1)


class Stage(nnx.Module):
  """An optional 3x3/2 max pool, then Inception modules."""

  def __init__(self, cin, names, pool, *, rngs, dtype):
    blocks = []
    for name in names:
      blocks.append(Inception(cin, *INCEPTION[name], rngs=rngs, dtype=dtype))
      cin = blocks[-1].features
    self.blocks, self.pool, self.features = nnx.List(blocks), pool, cin

  def __call__(self, x):
    if self.pool:
      x = max_pool(x)
    for block in self.blocks:
      x = block(x)
    return x


class Stem(nnx.Module):
  """conv 7x7/2 64 -> max pool 3x3/2 -> conv 1x1 64 -> conv 3x3 192 -> max pool 3x3/2."""

  def __init__(self, channels, *, rngs, dtype):
    self.conv1 = BasicConv(channels, 64, 7, 2, rngs=rngs, dtype=dtype)
    self.conv2 = BasicConv(64, 64, 1, rngs=rngs, dtype=dtype)
    self.conv3 = BasicConv(64, 192, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    x = max_pool(self.conv1(x))
    return max_pool(self.conv3(self.conv2(x)))


def googlenet_backbone(channels, modules, *, rngs, dtype):
  """The stem, then stages 3, 4 and 5 with their first `modules` Inception modules, pooled."""
  stages, cin = [], 192
  for names, pool, n in zip((('3a', '3b'), ('4a', '4b', '4c', '4d', '4e'), ('5a', '5b')), (False, True, True),
                            modules):
    stages.append(Stage(cin, names[:n], pool, rngs=rngs, dtype=dtype))
    cin = stages[-1].features
  return Backbone('googlenet', channels, Stem(channels, rngs=rngs, dtype=dtype), stages, cin, dtype=dtype)


@register('googlenet', inputs=[(224, 224, 3)], small_inputs=[(32, 32, 3)], num_classes=1000,
          small_kwargs=dict(num_classes=10, modules=(1, 1, 1)))
def googlenet(*, num_classes, rngs, dtype=jnp.float32, channels=3, modules=(2, 5, 2)):
  """GoogLeNet / Inception-v1 with batch norm (6.62M parameters at 1000 classes).

  `modules`: the first 1-2, 1-5 and 1-2 Inception modules of stages 3, 4 and 5 (fewer for fast tests).
  """
  backbone = googlenet_backbone(channels, modules, rngs=rngs, dtype=dtype)
  return Classifier(backbone, backbone.features, num_classes, rngs=rngs, dtype=dtype)
