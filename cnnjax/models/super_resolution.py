"""Single-image super-resolution CNNs: low-res NHWC images (B, h, w, C) -> (B, h*s, w*s, C).

SRCNN (Dong et al. 2014, "Learning a Deep Convolutional Network for Image Super-Resolution"):
bicubic upscaling, then 9x9/64 patch extraction, 1x1/32 non-linear mapping and 5x5
reconstruction (the 9-1-5 network; 8,129 parameters on the luminance channel). The paper
convolves without padding; here 'SAME' padding keeps the output at h*s x w*s.

ESPCN (Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution Using an Efficient
Sub-Pixel Convolutional Neural Network"): 5x5/64 -> 3x3/32 -> 3x3/(C s^2) with tanh in
low-resolution space, then the periodic shuffle (sub-pixel convolution) to h*s x w*s.

EDSR (Lim et al. 2017, "Enhanced Deep Residual Networks for Single Image Super-Resolution"):
mean shift, a 3x3 head, residual blocks conv-ReLU-conv without batch norm (scaled by
`res_scale`), a 3x3 body conv with a global skip, a sub-pixel upsampler (one x2/x3 shuffle, or
two x2 for x4) and a 3x3 tail. The baseline has 16 blocks of 64 features (1.37M parameters at x2,
1.52M at x4: the paper's 1.5M); EDSR 32 blocks of 256 features and res_scale 0.1 (43.1M at x4:
the paper's 43M).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import Conv
from cnnjax.models.registry import check_images, register

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean of the EDSR code, for images in [0, 1]


def pixel_shuffle(x, r):
  """(B, h, w, C r^2) -> (B, h r, w r, C): out[b, h r + i, w r + j, c] = x[b, h, w, c r^2 + i r + j]."""
  b, h, w, c = x.shape
  c //= r * r
  x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, c)


def check_upscale(upscale, allowed, model):
  if upscale not in allowed:
    raise ValueError(f'{model} supports upscale factors {allowed}, got {upscale}')


class SRCNN(nnx.Module):
  """Bicubic upscaling -> patch extraction -> non-linear mapping -> reconstruction."""

  def __init__(self, channels, upscale, f1, f2, f3, n1, n2, *, rngs, dtype):
    self.channels, self.upscale, self.dtype = channels, upscale, dtype
    conv = lambda cin, cout, k: Conv(cin, cout, (k, k), padding='SAME', dtype=dtype, rngs=rngs)
    self.extract = conv(channels, n1, f1)
    self.map = conv(n1, n2, f2)
    self.reconstruct = conv(n2, channels, f3)

  def __call__(self, x):
    check_images(x, self.channels, 'srcnn')
    b, h, w, c = x.shape
    x = jax.image.resize(x.astype(jnp.float32), (b, h * self.upscale, w * self.upscale, c), 'bicubic')
    x = nnx.relu(self.extract(x.astype(self.dtype)))
    x = nnx.relu(self.map(x))
    return self.reconstruct(x).astype(jnp.float32)


@register('srcnn', inputs=[(32, 32, 1)], small_inputs=[(8, 8, 1)], upscale=3)
def srcnn(*, rngs, dtype=jnp.float32, channels=1, upscale=3, f1=9, f2=1, f3=5, n1=64, n2=32):
  """SRCNN 9-1-5 on the luminance channel (8,129 parameters, as in the paper)."""
  return SRCNN(channels, upscale, f1, f2, f3, n1, n2, rngs=rngs, dtype=dtype)


class ESPCN(nnx.Module):
  """Three convolutions in low-resolution space with tanh, then the periodic shuffle."""

  def __init__(self, channels, upscale, n1, n2, *, rngs, dtype):
    self.channels, self.upscale, self.dtype = channels, upscale, dtype
    conv = lambda cin, cout, k: Conv(cin, cout, (k, k), padding='SAME', dtype=dtype, rngs=rngs)
    self.conv1 = conv(channels, n1, 5)
    self.conv2 = conv(n1, n2, 3)
    self.conv3 = conv(n2, channels * upscale ** 2, 3)

  def __call__(self, x):
    check_images(x, self.channels, 'espcn')
    x = jnp.tanh(self.conv1(x.astype(self.dtype)))
    x = jnp.tanh(self.conv2(x))
    return pixel_shuffle(self.conv3(x), self.upscale).astype(jnp.float32)


@register('espcn', inputs=[(32, 32, 1)], small_inputs=[(8, 8, 1)], upscale=3)
def espcn(*, rngs, dtype=jnp.float32, channels=1, upscale=3, n1=64, n2=32):
  """ESPCN (5,64)-(3,32)-(3,C s^2) on the luminance channel (22,729 parameters at x3)."""
  return ESPCN(channels, upscale, n1, n2, rngs=rngs, dtype=dtype)


def conv3(cin, cout, *, rngs, dtype):
  return Conv(cin, cout, (3, 3), padding='SAME', dtype=dtype, rngs=rngs)


class ResBlock(nnx.Module):
  """x + res_scale * conv(ReLU(conv(x))): no batch norm, no ReLU after the addition."""

  def __init__(self, features, res_scale, *, rngs, dtype):
    self.conv1 = conv3(features, features, rngs=rngs, dtype=dtype)
    self.conv2 = conv3(features, features, rngs=rngs, dtype=dtype)
    self.res_scale = res_scale

  def __call__(self, x):
    return x + self.res_scale * self.conv2(nnx.relu(self.conv1(x)))


class Upsampler(nnx.Module):
  """Sub-pixel upsampling: conv to features * r^2 then shuffle, once for x2/x3, twice x2 for x4."""

  def __init__(self, features, upscale, *, rngs, dtype):
    check_upscale(upscale, (2, 3, 4), 'edsr')
    self.factors = (2, 2) if upscale == 4 else (upscale,)
    self.convs = nnx.List([conv3(features, features * r * r, rngs=rngs, dtype=dtype) for r in self.factors])

  def __call__(self, x):
    for conv, r in zip(self.convs, self.factors):
      x = pixel_shuffle(conv(x), r)
    return x


class EDSR(nnx.Module):
  """Mean shift -> head -> residual blocks -> body conv (+ global skip) -> upsampler -> tail."""

  def __init__(self, channels, upscale, num_blocks, features, res_scale, *, rngs, dtype):
    self.channels, self.dtype = channels, dtype
    self.mean = RGB_MEAN if channels == 3 else (0.5,) * channels  # a constant, not a parameter
    self.head = conv3(channels, features, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([ResBlock(features, res_scale, rngs=rngs, dtype=dtype) for _ in range(num_blocks)])
    self.body = conv3(features, features, rngs=rngs, dtype=dtype)
    self.upsample = Upsampler(features, upscale, rngs=rngs, dtype=dtype)
    self.tail = conv3(features, channels, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    check_images(x, self.channels, 'edsr')
    mean = jnp.array(self.mean, jnp.float32)
    x = self.head((x - mean).astype(self.dtype))
    y = x
    for block in self.blocks:
      y = block(y)
    x = x + self.body(y)
    return self.tail(self.upsample(x)).astype(jnp.float32) + mean


@register('edsr_baseline', inputs=[(48, 48, 3)], small_inputs=[(8, 8, 3)], upscale=2,
          small_kwargs=dict(num_blocks=2, features=16))
def edsr_baseline(*, rngs, dtype=jnp.float32, channels=3, upscale=2, num_blocks=16, features=64, res_scale=1.0):
  """The EDSR baseline (1.37M parameters at x2, 1.52M at x4)."""
  return EDSR(channels, upscale, num_blocks, features, res_scale, rngs=rngs, dtype=dtype)


@register('edsr', inputs=[(48, 48, 3)], small_inputs=[(8, 8, 3)], upscale=4,
          small_kwargs=dict(num_blocks=2, features=16))
def edsr(*, rngs, dtype=jnp.float32, channels=3, upscale=4, num_blocks=32, features=256, res_scale=0.1):
  """EDSR (43.1M parameters at x4)."""
  return EDSR(channels, upscale, num_blocks, features, res_scale, rngs=rngs, dtype=dtype)
