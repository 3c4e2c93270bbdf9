"""MobileNets: depthwise separable (v1) and inverted residual (v2) convolutions.

MobileNet v1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications", Table 1): conv 3x3/2 32, then 13 depthwise separable layers
(depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU) up to 1024 channels, global average
pooling and a linear head: 4.23M parameters at width 1.0 and 1000 classes (paper: 4.2M).

MobileNet v2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
Table 2), torchvision layout: conv 3x3/2 32, seventeen inverted residual blocks (1x1 expansion
by t -> depthwise 3x3 -> linear 1x1 projection, ReLU6, residual where shapes match), conv 1x1
1280, global average pooling and a linear head (no dropout): 3,504,872 parameters at 1000
classes (torchvision: 3,504,872; paper: 3.4M). Widths are rounded to multiples of 8.
Depthwise convolutions are grouped convolutions with one group per channel.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import Backbone, ConvBN, Sequence
from cnnjax.models.registry import Classifier, register

# v1, Table 1: (pointwise output channels, depthwise stride) of each separable layer.
V1_LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# v1 stages (for transfer): layers up to 56x56, 28x28, 14x14 and 7x7 at 224.
V1_STAGES = ((0, 3), (3, 5), (5, 11), (11, 13))
# v2, Table 2: (expansion t, output channels c, repeats n, first stride s).
V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))


def make_divisible(value, divisor=8):
  """Round a width to a multiple of 8, never below 90% of it (the reference implementation)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


# MobileNet v1 -------------------------------------------------------------------------------------

def separable(cin, cout, stride, *, rngs, dtype):
  """Depthwise 3x3 (one filter per channel) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU."""
  return Sequence([ConvBN(cin, cin, 3, stride, groups=cin, rngs=rngs, dtype=dtype),
                   ConvBN(cin, cout, 1, rngs=rngs, dtype=dtype)])


@register('mobilenet_v1', inputs=[(224, 224, 3)], small_inputs=[(32, 32, 3)], num_classes=1000,
          small_kwargs=dict(num_classes=10, width=0.25))
def mobilenet_v1(*, num_classes, rngs, dtype=jnp.float32, channels=3, width=1.0):
  """MobileNet v1 with width multiplier `width` (4.23M parameters at 1.0 and 1000 classes)."""
  kw = dict(rngs=rngs, dtype=dtype)
  widths = [int(32 * width)] + [int(c * width) for c, _ in V1_LAYERS]
  layers = [separable(widths[i], widths[i + 1], stride, **kw) for i, (_, stride) in enumerate(V1_LAYERS)]
  stages = [Sequence(layers[a:b]) for a, b in V1_STAGES]
  stem = ConvBN(channels, widths[0], 3, 2, **kw)
  backbone = Backbone('mobilenet_v1', channels, stem, stages, widths[-1], dtype=dtype)
  return Classifier(backbone, widths[-1], num_classes, **kw)


# MobileNet v2 -------------------------------------------------------------------------------------

class InvertedResidual(nnx.Module):
  """1x1 expansion (ReLU6) -> depthwise 3x3 (ReLU6) -> linear 1x1 projection, + input if shapes match."""

  def __init__(self, cin, cout, stride, expand, *, rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype)
    hidden = cin * expand
    layers = [ConvBN(cin, hidden, 1, act=nnx.relu6, **kw)] if expand != 1 else []
    layers += [ConvBN(hidden, hidden, 3, stride, groups=hidden, act=nnx.relu6, **kw),
               ConvBN(hidden, cout, 1, act=None, **kw)]
    self.layers = nnx.List(layers)
    self.residual = stride == 1 and cin == cout

  def __call__(self, x):
    y = x
    for layer in self.layers:
      y = layer(y)
    return x + y if self.residual else y


# The fast test build keeps every row of Table 2 and one residual block (the second of row 2).
@register('mobilenet_v2', inputs=[(224, 224, 3)], small_inputs=[(32, 32, 3)], num_classes=1000,
          small_kwargs=dict(num_classes=10, width=0.25, repeats=(1, 2, 1, 1, 1, 1, 1)))
def mobilenet_v2(*, num_classes, rngs, dtype=jnp.float32, channels=3, width=1.0, repeats=None):
  """MobileNet v2 with width multiplier `width` (3,504,872 parameters at 1.0 and 1000 classes) and
  `repeats` blocks per row of Table 2 (default: the paper's n, 1, 2, 3, 4, 3, 3, 1)."""
  kw = dict(rngs=rngs, dtype=dtype)
  repeats = tuple(n for _, _, n, _ in V2_BLOCKS) if repeats is None else tuple(repeats)
  if len(repeats) != len(V2_BLOCKS) or min(repeats) < 1:
    raise ValueError(f'mobilenet_v2 needs {len(V2_BLOCKS)} repeats of at least 1 (one per row of Table 2), '
                     f'got {repeats}')
  cin = make_divisible(32 * width)
  stem = ConvBN(channels, cin, 3, 2, act=nnx.relu6, **kw)
  stages = []
  for (t, c, _, s), n in zip(V2_BLOCKS, repeats):  # one stage per row of Table 2
    cout, blocks = make_divisible(c * width), []
    for i in range(n):
      blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, **kw))
      cin = cout
    stages.append(Sequence(blocks))
  features = make_divisible(1280 * max(1.0, width))
  stages.append(ConvBN(cin, features, 1, act=nnx.relu6, **kw))
  backbone = Backbone('mobilenet_v2', channels, stem, stages, features, dtype=dtype)
  return Classifier(backbone, features, num_classes, **kw)
