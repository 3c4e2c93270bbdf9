"""U-Nets: per-pixel (per-voxel) class logits from an encoder-decoder with skip connections.

2D U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", Fig. 1): a contracting path of four levels of two 3x3 conv + ReLU and a 2x2 max
pool (64, 128, 256, 512 channels) down to 1024 channels, and an expanding path of four 2x2
up-convolutions (halving the channels), concatenation with the skip at the same level and two
3x3 conv + ReLU, then a 1x1 conv to class logits. No batch norm, as in the paper. Unlike the
paper, convolutions use 'same' padding for convenience, so the output has the input's size
(which must be divisible by 16) and no cropping is needed: 31,030,658 parameters at 2 classes.

3D U-Net (Cicek et al. 2016, "3D U-Net: Learning Dense Volumetric Segmentation from Sparse
Annotation", Fig. 1): the same on NDHWC volumes with 3x3x3 convs, batch norm before each ReLU,
three 2x2x2 poolings, widths doubling inside each analysis level (32->64, 64->128, 128->256,
256->512) and up-convolutions that keep their channels; 'same' padding again, so sizes divisible
by 8: 19,071,459 parameters at 3 classes (paper: 19,069,955).

Both return float32 logits of shape (B, *spatial, num_classes). For transfer, `backbone.stages`
are the encoder levels and `head` the final 1x1 classifier; `decoder` trains only with 'all'.
"""

import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import BatchNorm, Conv
from cnnjax.models.pooling import max_pool2
from cnnjax.models.registry import register


class DoubleConv(nnx.Module):
  """Two 3x3 ('same') convolutions, each followed by (batch norm and) ReLU."""

  def __init__(self, cin, mid, cout, nd, norm, *, rngs, dtype):
    self.convs = nnx.List([Conv(a, b, (3,) * nd, padding=1, use_bias=not norm, dtype=dtype, rngs=rngs)
                           for a, b in ((cin, mid), (mid, cout))])
    self.norms = nnx.List([BatchNorm(c, dtype=dtype, rngs=rngs) for c in (mid, cout)]
                          if norm else [])

  def __call__(self, x):
    for i, conv in enumerate(self.convs):
      x = conv(x)
      x = nnx.relu(self.norms[i](x) if self.norms else x)
    return x


class Down(nnx.Module):
  """One encoder level: (max pool unless first) -> double conv."""

  def __init__(self, cin, mid, cout, nd, norm, pool, *, rngs, dtype):
    self.pool, self.block = pool, DoubleConv(cin, mid, cout, nd, norm, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.block(max_pool2(x) if self.pool else x)


class Encoder(nnx.Module):
  """The contracting path; returns the features of every level (the last is the bottom)."""

  def __init__(self, channels, levels, nd, norm, *, rngs, dtype):
    stages, cin = [], channels
    for i, (mid, cout) in enumerate(levels):
      stages.append(Down(cin, mid, cout, nd, norm, i > 0, rngs=rngs, dtype=dtype))
      cin = cout
    self.stages = nnx.List(stages)

  def __call__(self, x):
    features = []
    for stage in self.stages:
      x = stage(x)
      features.append(x)
    return features


class Up(nnx.Module):
  """One decoder level: 2x up-convolution -> concatenate the skip -> double conv."""

  def __init__(self, cin, up, skip, nd, norm, *, rngs, dtype):
    self.up = nnx.ConvTranspose(cin, up, (2,) * nd, strides=(2,) * nd, padding='VALID', dtype=dtype, rngs=rngs)
    self.block = DoubleConv(up + skip, skip, skip, nd, norm, rngs=rngs, dtype=dtype)

  def __call__(self, x, skip):
    return self.block(jnp.concatenate([self.up(x), skip], axis=-1))


class UNet(nnx.Module):

  def __init__(self, name, channels, num_classes, levels, nd, norm, halve_up, *, rngs, dtype):
    self.name, self.channels, self.nd, self.dtype = name, channels, nd, dtype
    self.backbone = Encoder(channels, levels, nd, norm, rngs=rngs, dtype=dtype)
    ups, cin = [], levels[-1][1]
    for _, skip in reversed(levels[:-1]):
      ups.append(Up(cin, cin // 2 if halve_up else cin, skip, nd, norm, rngs=rngs, dtype=dtype))
      cin = skip
    self.decoder = nnx.List(ups)
    self.head = Conv(cin, num_classes, (1,) * nd, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    factor = 2 ** len(self.decoder)
    layout = 'NHWC images' if self.nd == 2 else 'NDHWC volumes'
    if x.ndim != self.nd + 2 or x.shape[-1] != self.channels:
      raise ValueError(f'{self.name} expects {layout} with {self.channels} channel(s), got shape {x.shape}')
    if any(n % factor for n in x.shape[1:-1]):
      raise ValueError(f'{self.name} needs spatial sizes divisible by {factor}, got shape {x.shape}')
    *skips, x = self.backbone(x.astype(self.dtype))
    for up, skip in zip(self.decoder, reversed(skips)):
      x = up(x, skip)
    return self.head(x).astype(jnp.float32)


@register('unet', inputs=[(256, 256, 1)], small_inputs=[(32, 32, 1)], num_classes=2,
          small_kwargs=dict(width=8))
def unet(*, num_classes, rngs, dtype=jnp.float32, channels=1, width=64, depth=4):
  """2D U-Net with 'same' padding (31.0M parameters at width 64, 2 classes)."""
  levels = [(width * 2 ** i,) * 2 for i in range(depth + 1)]
  return UNet('unet', channels, num_classes, levels, 2, False, True, rngs=rngs, dtype=dtype)


@register('unet3d', inputs=[(128, 128, 128, 1)], small_inputs=[(16, 16, 16, 1)], num_classes=3,
          small_kwargs=dict(width=4))
def unet3d(*, num_classes, rngs, dtype=jnp.float32, channels=1, width=32, depth=3):
  """3D U-Net with batch norm and 'same' padding (19.1M parameters at width 32, 3 classes)."""
  levels = [(width * 2 ** i, width * 2 ** (i + 1)) for i in range(depth + 1)]
  return UNet('unet3d', channels, num_classes, levels, 3, True, False, rngs=rngs, dtype=dtype)
