"""Wide residual networks (Zagoruyko & Komodakis 2016, "Wide Residual Networks"), CIFAR.

WRN-d-k (Table 1): a 3x3/16 stem, three groups of n = (d-4)/6 pre-activation basic blocks
B(3,3) with 16k, 32k and 64k channels (feature maps 32, 16, 8), a 1x1 conv shortcut where the
shape changes, a final BN-ReLU, global average pooling and the head. WRN-28-10 has 36,479,194
parameters at 10 classes (the paper's 36.5M). No dropout (the paper's dropout is an option).
"""

import jax.numpy as jnp

from cnnjax.models.preact_resnet import preact_backbone
from cnnjax.models.registry import Classifier, register


def wide_resnet(depth, width, *, num_classes, rngs, dtype=jnp.float32, channels=3):
  """WRN-depth-width: depth 6n+4, widening factor `width`."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f'wide ResNet depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth}')
  n = (depth - 4) // 6
  stages = ((n, 16 * width, 1), (n, 32 * width, 2), (n, 64 * width, 2))
  backbone = preact_backbone(16, stages, channels, f'wrn{depth}_{width}', rngs=rngs, dtype=dtype)
  return Classifier(backbone, 64 * width, num_classes, rngs=rngs, dtype=dtype)


@register('wrn28_10', inputs=[(32, 32, 3)], small_inputs=[(16, 16, 3)], num_classes=10)
def wrn28_10(*, num_classes, rngs, dtype=jnp.float32, channels=3):
  """WRN-28-10 for CIFAR (Zagoruyko & Komodakis 2016; 36.5M parameters)."""
  return wide_resnet(28, 10, num_classes=num_classes, rngs=rngs, dtype=dtype, channels=channels)
