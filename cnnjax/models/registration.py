"""VoxelMorph (Balakrishnan et al. 2019, "VoxelMorph: A Learning Framework for Deformable Medical
Image Registration"): unsupervised deformable registration in 2D and 3D.

A U-Net over the moving and fixed images concatenated along channels predicts a dense
displacement field (one offset per pixel or voxel and spatial axis); a spatial transformer
(Jaderberg et al. 2015) warps the moving image by it with bilinear (2D) or trilinear (3D)
interpolation. The U-Net is the paper's VoxelMorph-2: 3x3(x3) convolutions with LeakyReLU(0.2),
an encoder of stride-2 convolutions with 16, 32, 32, 32 features, a decoder of 32, 32, 32, 32
features with x2 upsampling and skip connections, one more of 32 at half resolution, then 16, 16
at full resolution (after the skip from the input) and a convolution to the flow (initialised near zero). The model returns (warped moving image, flow).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.ndimage import map_coordinates

from cnnjax.models.layers import Conv
from cnnjax.models.registry import register


def warp(image, flow):
  """The moving `image` (B, *S, C) sampled at x + flow(x) for every location x (flow: (B, *S, ndim)).

  Multilinear interpolation; locations outside the image take the nearest border value.
  """
  spatial = image.shape[1:-1]
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in spatial], indexing='ij'))
  coords = grid + jnp.moveaxis(flow.astype(jnp.float32), -1, 1)  # (B, ndim, *S)

  def sample(channel, coords):
    return map_coordinates(channel, list(coords), order=1, mode='nearest')

  per_channel = jax.vmap(sample, in_axes=(-1, None), out_axes=-1)
  return jax.vmap(per_channel)(image.astype(jnp.float32), coords)


def upsample2(x):
  """Nearest-neighbour x2 upsampling of every spatial axis."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, 2, axis=axis)
  return x


class ConvBlock(nnx.Module):
  """3x3(x3) convolution (stride 1 or 2) -> LeakyReLU(0.2)."""

  def __init__(self, ndim, cin, cout, stride, *, rngs, dtype):
    self.conv = Conv(cin, cout, (3,) * ndim, strides=stride, padding='SAME', dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return nnx.leaky_relu(self.conv(x), 0.2)


class UNet(nnx.Module):
  """Encoder of stride-2 blocks; decoder of blocks, x2 upsampling and concatenated skips."""

  def __init__(self, ndim, cin, enc, dec, *, rngs, dtype):
    block = lambda a, b, s=1: ConvBlock(ndim, a, b, s, rngs=rngs, dtype=dtype)
    self.down = nnx.List([block(a, b, 2) for a, b in zip((cin, *enc[:-1]), enc)])
    skips = enc[-2::-1]  # the encoder outputs concatenated on the way up, deepest first
    self.up = nnx.List([block((dec[i - 1] + skips[i - 1]) if i else enc[-1], dec[i]) for i in range(len(enc))])
    n = len(enc)
    self.half = block(dec[n - 1], dec[n])  # one more block at half resolution
    self.full = nnx.List([block(a, b) for a, b in zip((dec[n] + cin, *dec[n + 1:-1]), dec[n + 1:])])

  def __call__(self, x):
    skips = [x]
    for block in self.down:
      skips.append(block(skips[-1]))
    y = skips.pop()
    for i, block in enumerate(self.up):
      y = block(y if i == 0 else jnp.concatenate([upsample2(y), skips.pop()], -1))
    y = self.half(y)
    y = jnp.concatenate([upsample2(y), skips.pop()], -1)
    for block in self.full:
      y = block(y)
    return y


class VoxelMorph(nnx.Module):
  """U-Net(moving, fixed) -> flow; spatial transformer(moving, flow) -> warped."""

  def __init__(self, ndim, channels, enc, dec, *, rngs, dtype):
    if len(dec) != len(enc) + 3:
      raise ValueError(f'voxelmorph needs len(dec) == len(enc) + 3, got {len(enc)} and {len(dec)}')
    self.ndim, self.channels, self.levels, self.dtype = ndim, channels, len(enc), dtype
    self.unet = UNet(ndim, 2 * channels, enc, dec, rngs=rngs, dtype=dtype)
    self.flow = Conv(dec[-1], ndim, (3,) * ndim, padding='SAME', dtype=dtype, rngs=rngs,
                         kernel_init=nnx.initializers.normal(1e-5), bias_init=nnx.initializers.zeros)

  def __call__(self, moving, fixed):
    name = f'voxelmorph{self.ndim}d'
    for x in (moving, fixed):
      if x.ndim != self.ndim + 2 or x.shape[-1] != self.channels:
        raise ValueError(f'{name} expects (batch, {self.ndim} spatial axes, {self.channels} channel(s)) '
                         f'images, got shape {x.shape}')
    if moving.shape != fixed.shape:
      raise ValueError(f'{name}: moving {moving.shape} and fixed {fixed.shape} images differ in shape')
    if any(n % 2 ** self.levels for n in moving.shape[1:-1]):
      raise ValueError(f'{name} needs spatial sizes divisible by {2 ** self.levels}, got {moving.shape[1:-1]}')
    x = jnp.concatenate([moving, fixed], -1).astype(self.dtype)
    flow = self.flow(self.unet(x)).astype(jnp.float32)
    return warp(moving, flow), flow


ENC, DEC = (16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16)
SMALL = dict(enc=(4, 4), dec=(4, 4, 4, 4, 4))  # few distinct shapes: eager initialisation compiles per shape


@register('voxelmorph2d', inputs=[(256, 256, 1)] * 2, small_inputs=[(8, 8, 1)] * 2, small_kwargs=SMALL)
def voxelmorph2d(*, rngs, dtype=jnp.float32, channels=1, enc=ENC, dec=DEC):
  """VoxelMorph-2 in 2D (0.10M parameters)."""
  return VoxelMorph(2, channels, enc, dec, rngs=rngs, dtype=dtype)


@register('voxelmorph3d', inputs=[(160, 192, 224, 1)] * 2, small_inputs=[(8, 8, 8, 1)] * 2,
          small_kwargs=SMALL)
def voxelmorph3d(*, rngs, dtype=jnp.float32, channels=1, enc=ENC, dec=DEC):
  """VoxelMorph-2 in 3D on 160x192x224 brain MRI (0.30M parameters)."""
  return VoxelMorph(3, channels, enc, dec, rngs=rngs, dtype=dtype)
