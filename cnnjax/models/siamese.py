"""SiamFC (Bertinetto et al. 2016, "Fully-Convolutional Siamese Networks for Object Tracking").

One fully convolutional embedding, AlexNet-like (Krizhevsky et al. 2012) without padding or
fully connected layers, is applied to an exemplar image z (127x127) and a search image x
(255x255); the score map is the cross-correlation of the exemplar embedding (6x6x256) over the
search embedding (22x22x256), f(z, x) = phi(z) * phi(x) + b, 17x17 with a total stride of 8.
The embedding: conv 11x11/2 96 -> max pool 3/2 -> conv 5x5 256 (2 groups) -> max pool 3/2 ->
conv 3x3 384 -> conv 3x3 384 (2 groups) -> conv 3x3 256 (2 groups), batch norm and ReLU after
every convolution but the last (2.33M parameters). As in the paper's code the score is scaled
by 1e-3 before the learned bias b. The model returns score maps (B, 17, 17, 1).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax.models.alexnet import max_pool3
from cnnjax.models.layers import BatchNorm, Conv
from cnnjax.models.registry import check_images, register


def cross_correlate(z, x):
  """Per example, the exemplar features z (B, h, w, C) slid over the search features x (B, H, W, C).

  -> (B, H - h + 1, W - w + 1, 1): out[b, i, j] = sum(z[b] * x[b, i:i + h, j:j + w]).
  """
  def one(z, x):
    return jax.lax.conv_general_dilated(x[None], z[..., None], (1, 1), 'VALID',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))[0]
  return jax.vmap(one)(z, x)


class Embedding(nnx.Module):
  """Five convolutions without padding, max pooling 3/2 after the first two, BN-ReLU but after the last."""

  def __init__(self, channels, widths, kernels, groups, *, rngs, dtype):
    self.channels, self.dtype = channels, dtype
    cins = (channels, *widths[:-1])
    self.convs = nnx.List([Conv(cin, cout, (k, k), strides=2 if i == 0 else 1, padding='VALID',
                                    feature_group_count=g, dtype=dtype, rngs=rngs)
                           for i, (cin, cout, k, g) in enumerate(zip(cins, widths, kernels, groups))])
    self.norms = nnx.List([BatchNorm(c, dtype=dtype, rngs=rngs) for c in widths[:-1]])

  def __call__(self, x):
    check_images(x, self.channels, 'siamfc')
    x = x.astype(self.dtype)
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i < len(self.norms):
        x = nnx.relu(self.norms[i](x))
      if i < 2:
        x = max_pool3(x)
    return x


class SiamFC(nnx.Module):
  """score(z, x) = 1e-3 * phi(z) * phi(x) + b, one embedding phi for both images."""

  def __init__(self, channels, widths, kernels, groups, *, rngs, dtype):
    self.embed = Embedding(channels, widths, kernels, groups, rngs=rngs, dtype=dtype)
    self.bias = nnx.Param(jnp.zeros((), jnp.float32))
    self.scale = 1e-3

  def __call__(self, exemplar, search):
    z, x = self.embed(exemplar), self.embed(search)
    if z.shape[1] > x.shape[1] or z.shape[2] > x.shape[2]:
      raise ValueError(f'siamfc needs a search image larger than the exemplar, got {search.shape} and {exemplar.shape}')
    score = cross_correlate(z.astype(jnp.float32), x.astype(jnp.float32))
    return self.scale * score + self.bias[...]


@register('siamfc', inputs=[(127, 127, 3), (255, 255, 3)], small_inputs=[(31, 31, 3), (63, 63, 3)],
          small_kwargs=dict(widths=(8, 8, 8, 8, 8), kernels=(3, 3, 1, 1, 1)))
def siamfc(*, rngs, dtype=jnp.float32, channels=3, widths=(96, 256, 384, 384, 256), kernels=(11, 5, 3, 3, 3),
           groups=(1, 2, 1, 2, 2)):
  """SiamFC with the AlexNet-like embedding (2.33M parameters): 17x17 score maps at 127/255."""
  return SiamFC(channels, widths, kernels, groups, rngs=rngs, dtype=dtype)
