"""Semantic segmentation heads on a dilated ResNet-50: FCN and DeepLabv3.

Backbone: ResNet-50 (He et al. 2016; torchvision's v1.5 bottlenecks, projection shortcuts)
without pooling or classifier, whose last stages trade their stride for atrous (dilated)
convolutions (Chen et al. 2017, section 3.1), so the feature map is 1/16 (or 1/8) of the input.
Every block of an atrous stage uses the stage's rate (torchvision keeps the previous rate in the
first block; the parameter count is the same). `blocks` and `width` shrink it for fast tests.

FCN (Long et al. 2015, "Fully Convolutional Networks for Semantic Segmentation"), torchvision's
`fcn_resnet50` layout at output stride 8: a 3x3 conv 512 + BN + ReLU, a 1x1 conv classifier and
bilinear upsampling of the logits to the input size: 32,957,013 parameters at 21 classes
(torchvision's 35,322,218 includes its auxiliary head, which is left out here).

DeepLabv3 (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic Image Segmentation",
section 3.3): atrous spatial pyramid pooling on the backbone's output (a 1x1 conv, three 3x3
convs with rates 6/12/18 at output stride 16, doubled at 8, and image-level pooling, each 256
channels with BN), concatenated and projected by a 1x1 conv, then torchvision's 3x3 conv, a 1x1
classifier and bilinear upsampling: 39,638,869 parameters at 21 classes (torchvision's
42,004,074 includes its auxiliary head). No dropout in either head.

Both return float32 logits (B, H, W, num_classes) at the input's resolution.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import Conv, ConvBN
from cnnjax.models.registry import check_images, register
from cnnjax.models.resnet import WIDTHS, Bottleneck, Stem, stage

BLOCKS = (3, 4, 6, 3)   # ResNet-50


class DilatedResNet(nnx.Module):
  """ResNet-50 features at output stride 16 (stage 4 atrous, rate 2) or 8 (stages 3 and 4, rates 2 and 4)."""

  def __init__(self, channels, output_stride, blocks, width, *, rngs, dtype):
    if output_stride not in (8, 16):
      raise ValueError(f'output_stride must be 8 or 16, got {output_stride}')
    widths = [width * w // 64 for w in WIDTHS]
    strides = (1, 2, 2, 1) if output_stride == 16 else (1, 2, 1, 1)
    rates = (1, 1, 1, 2) if output_stride == 16 else (1, 1, 2, 4)
    self.stem = Stem(channels, width, rngs=rngs, dtype=dtype)
    cins = (width, *(w * Bottleneck.expansion for w in widths[:-1]))
    self.stages = nnx.List([stage(Bottleneck, cin, w, n, s, rate=r, rngs=rngs, dtype=dtype)
                            for cin, w, n, s, r in zip(cins, widths, blocks, strides, rates)])
    self.features = widths[-1] * Bottleneck.expansion

  def __call__(self, x):
    x = self.stem(x)
    for stage in self.stages:
      x = stage(x)
    return x


class FCNHead(nnx.Module):
  """3x3 conv (features/4) + BN + ReLU, then a 1x1 conv classifier."""

  def __init__(self, cin, num_classes, *, rngs, dtype):
    self.conv = ConvBN(cin, cin // 4, 3, rngs=rngs, dtype=dtype)
    self.classifier = Conv(cin // 4, num_classes, (1, 1), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.classifier(self.conv(x))


class ImagePooling(nnx.Module):
  """Global average pooling -> 1x1 conv + BN + ReLU -> broadcast back to the feature map."""

  def __init__(self, cin, cout, *, rngs, dtype):
    self.conv = ConvBN(cin, cout, 1, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    y = self.conv(x.mean(axis=(1, 2), keepdims=True))
    return jnp.broadcast_to(y, (*x.shape[:3], y.shape[-1]))


class ASPP(nnx.Module):
  """Atrous spatial pyramid pooling: 1x1 | 3x3 at three rates | image pooling, concatenated, 1x1 projection."""

  def __init__(self, cin, cout, rates, *, rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype)
    self.branches = nnx.List([ConvBN(cin, cout, 1, **kw)] + [ConvBN(cin, cout, 3, rate=r, **kw) for r in rates]
                             + [ImagePooling(cin, cout, **kw)])
    self.project = ConvBN(cout * (len(rates) + 2), cout, 1, **kw)

  def __call__(self, x):
    return self.project(jnp.concatenate([branch(x) for branch in self.branches], axis=-1))


class DeepLabHead(nnx.Module):
  """ASPP -> 3x3 conv + BN + ReLU -> 1x1 conv classifier."""

  def __init__(self, cin, num_classes, rates, width, *, rngs, dtype):
    self.aspp = ASPP(cin, width, rates, rngs=rngs, dtype=dtype)
    self.conv = ConvBN(width, width, 3, rngs=rngs, dtype=dtype)
    self.classifier = Conv(width, num_classes, (1, 1), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.classifier(self.conv(self.aspp(x)))


class Segmenter(nnx.Module):
  """backbone features -> head logits -> bilinear upsampling to the input size."""

  def __init__(self, name, channels, backbone, head, *, dtype):
    self.name, self.channels, self.dtype = name, channels, dtype
    self.backbone, self.head = backbone, head

  def __call__(self, x):
    check_images(x, self.channels, self.name)
    logits = self.head(self.backbone(x.astype(self.dtype))).astype(jnp.float32)
    return jax.image.resize(logits, (*x.shape[:3], logits.shape[-1]), 'bilinear')


SMALL = dict(blocks=(1, 1, 1, 1), width=8)


@register('fcn_resnet50', inputs=[(512, 512, 3)], small_inputs=[(32, 32, 3)], num_classes=21,
          small_kwargs=SMALL)
def fcn_resnet50(*, num_classes, rngs, dtype=jnp.float32, channels=3, output_stride=8, blocks=BLOCKS, width=64):
  """FCN on a dilated ResNet-50 (32,957,013 parameters at 21 classes)."""
  backbone = DilatedResNet(channels, output_stride, blocks, width, rngs=rngs, dtype=dtype)
  head = FCNHead(backbone.features, num_classes, rngs=rngs, dtype=dtype)
  return Segmenter('fcn_resnet50', channels, backbone, head, dtype=dtype)


@register('deeplabv3', inputs=[(512, 512, 3)], small_inputs=[(32, 32, 3)], num_classes=21,
          small_kwargs=dict(SMALL, aspp_width=16))
def deeplabv3(*, num_classes, rngs, dtype=jnp.float32, channels=3, output_stride=16, blocks=BLOCKS, width=64,
              aspp_width=256):
  """DeepLabv3 on a dilated ResNet-50, ASPP rates 6/12/18 at output stride 16 (39,638,869 parameters at 21 classes)."""
  backbone = DilatedResNet(channels, output_stride, blocks, width, rngs=rngs, dtype=dtype)
  rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
  head = DeepLabHead(backbone.features, num_classes, rates, aspp_width, rngs=rngs, dtype=dtype)
  return Segmenter('deeplabv3', channels, backbone, head, dtype=dtype)
