"""Conv-4: the few-shot embedding network of Vinyals et al. 2016 ("Matching Networks for One Shot
Learning"), used by Prototypical Networks (Snell et al. 2017), MAML (Finn et al. 2017) and Reptile
(Nichol et al. 2018) on Omniglot: four blocks of conv 3x3 (64 filters) -> batch norm -> ReLU ->
2x2 max pool; at 28x28 the embedding is 1x1x64. The linear head makes it an N-way classifier
(MAML, Baseline); ProtoNets use `features` only.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import BatchNorm, Conv
from cnnjax.models.pooling import max_pool2
from cnnjax.models.registry import Classifier, check_images, register


class ConvBlock(nnx.Module):
  """conv 3x3 (same padding, with bias) -> batch norm -> ReLU -> 2x2 max pool."""

  def __init__(self, cin, cout, *, rngs, dtype):
    self.conv = Conv(cin, cout, (3, 3), dtype=dtype, rngs=rngs)
    self.norm = BatchNorm(cout, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return max_pool2(nnx.relu(self.norm(self.conv(x))))


class Conv4Backbone(nnx.Module):

  def __init__(self, channels, size, width, *, rngs, dtype):
    self.channels, self.dtype = channels, dtype
    stages = []
    for i in range(4):
      stages.append(ConvBlock(channels if i == 0 else width, width, rngs=rngs, dtype=dtype))
      size //= 2
    if size < 1:
      raise ValueError(f'conv4 halves its input four times: it needs at least 16x16, got {size}')
    self.stages = nnx.List(stages)
    self.features = size * size * width

  def __call__(self, x):
    check_images(x, self.channels, 'conv4')
    x = x.astype(self.dtype)
    for stage in self.stages:
      x = stage(x)
    return x.reshape(x.shape[0], -1)


@register('conv4', inputs=[(28, 28, 1)], num_classes=5)
def conv4(*, num_classes, rngs, dtype=jnp.float32, channels=1, size=28, width=64):
  """Conv-4 (~112k parameters at width 64, 28x28x1, 5 ways); `width` filters per block."""
  backbone = Conv4Backbone(channels, size, width, rngs=rngs, dtype=dtype)
  return Classifier(backbone, backbone.features, num_classes, rngs=rngs, dtype=dtype)
