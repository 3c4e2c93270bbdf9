"""AlexNet (Krizhevsky et al. 2012, "ImageNet Classification with Deep Convolutional Neural Networks").

The single-tower variant of torchvision (Krizhevsky 2014, "One weird trick"): five convolutions
(11x11/4 64, 5x5 192, 3x3 384, 3x3 256, 3x3 256) with 3x3/2 max pooling after the first, second
and fifth, adaptive average pooling to 6x6, two 4096-unit dense layers and the head:
61,100,840 parameters at 1000 classes. No dropout and no local response normalisation.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnnjax.models.layers import Conv
from cnnjax.models.registry import Classifier, check_images, register


def max_pool3(x, padding=0):
  """3x3/2 max pooling as a max of nine strided slices (its gradient is a select, not
  XLA:CPU's slow select-and-scatter); `padding` pads with -inf like torch's MaxPool2d."""
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
  b, h, w, c = x.shape
  oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
  if oh < 1 or ow < 1:
    raise ValueError(f'3x3 max pooling needs a feature map of at least 3x3, got shape {x.shape}')
  out = None
  for i in range(3):
    for j in range(3):
      window = x[:, i:i + 2 * oh - 1:2, j:j + 2 * ow - 1:2]
      out = window if out is None else jnp.maximum(out, window)
  return out


def pool_matrix(size, out):
  """Averaging weights of torch's AdaptiveAvgPool over one axis: bin i covers [floor(i*size/out),
  ceil((i+1)*size/out)), so a smaller input is repeated and a larger one averaged."""
  weights = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = i * size // out, -(-(i + 1) * size // out)
    weights[i, start:end] = 1 / (end - start)
  return weights


def adaptive_avg_pool(x, out):
  """Average pooling of an NHWC batch to out x out, for any input size."""
  _, h, w, _ = x.shape
  if (h, w) == (out, out):
    return x
  rows, cols = (jnp.asarray(pool_matrix(n, out), x.dtype) for n in (h, w))
  return jnp.einsum('bhwc,oh,pw->bopc', x, rows, cols)


class ConvStage(nnx.Module):
  """conv -> ReLU layers, then (optionally) 3x3/2 max pooling."""

  def __init__(self, layers, pool, *, rngs, dtype):
    # layers: (cin, cout, kernel, stride, padding)
    self.convs = nnx.List([Conv(cin, cout, (k, k), strides=s, padding=p, dtype=dtype, rngs=rngs)
                           for cin, cout, k, s, p in layers])
    self.pool = pool

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return max_pool3(x) if self.pool else x


class DenseStage(nnx.Module):
  """Adaptive average pooling to size x size, flatten, then dense -> ReLU layers."""

  def __init__(self, size, widths, *, rngs, dtype):
    self.size = size
    self.denses = nnx.List([nnx.Linear(cin, cout, dtype=dtype, rngs=rngs)
                            for cin, cout in zip(widths, widths[1:])])

  def __call__(self, x):
    x = adaptive_avg_pool(x, self.size)
    x = x.reshape(x.shape[0], -1)
    for dense in self.denses:
      x = nnx.relu(dense(x))
    return x


class AlexNetBackbone(nnx.Module):

  def __init__(self, channels, hidden, *, rngs, dtype):
    self.channels, self.dtype = channels, dtype
    self.stages = nnx.List([
        ConvStage([(channels, 64, 11, 4, 2)], True, rngs=rngs, dtype=dtype),
        ConvStage([(64, 192, 5, 1, 2)], True, rngs=rngs, dtype=dtype),
        ConvStage([(192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)], True,
                  rngs=rngs, dtype=dtype),
        DenseStage(6, (256 * 6 * 6, hidden, hidden), rngs=rngs, dtype=dtype),
    ])

  def __call__(self, x):
    check_images(x, self.channels, 'alexnet')
    x = x.astype(self.dtype)
    for stage in self.stages:
      x = stage(x)
    return x


@register('alexnet', inputs=[(224, 224, 3)], small_inputs=[(64, 64, 3)], num_classes=1000,
          small_kwargs=dict(num_classes=10, hidden=64))
def alexnet(*, num_classes, rngs, dtype=jnp.float32, channels=3, hidden=4096):
  """AlexNet, torchvision's single tower (61.1M parameters at 1000 classes; inputs of 63x63 or more),
  with dense layers of `hidden` units (4096 in the paper)."""
  return Classifier(AlexNetBackbone(channels, hidden, rngs=rngs, dtype=dtype), hidden, num_classes,
                    rngs=rngs, dtype=dtype)
