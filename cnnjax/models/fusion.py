"""Two-modality image classifiers (e.g. RGB and depth): where the modalities are fused.

Inputs are two NHWC images of the same height and width, (B, H, W, C1) and (B, H, W, C2);
outputs logits (B, num_classes). Each modality branch is a small CNN: stages of 3x3 conv ->
batch norm -> ReLU -> 2x2 max pool, then global average pooling to a feature vector.

- early fusion (Snoek et al. 2005, "Early versus Late Fusion in Semantic Video Analysis"):
  the channels are concatenated and one CNN reads both;
- late fusion (ibid.): one CNN and classifier per modality, the logits averaged;
- intermediate fusion (Ngiam et al. 2011, "Multimodal Deep Learning"): the two branches'
  feature vectors are concatenated before one classifier;
- gated fusion, the Gated Multimodal Unit (Arevalo et al. 2017, "Gated Multimodal Units for
  Information Fusion"): h_i = tanh(W_i x_i), z = sigmoid(W_z [x_1, x_2]),
  h = z h_1 + (1 - z) h_2 before the classifier.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import BatchNorm, Conv
from cnnjax.models.pooling import max_pool2
from cnnjax.models.registry import check_images, register


class Branch(nnx.Module):
  """Conv-BN-ReLU-pool stages, then global average pooling: (B, H, W, C) -> (B, widths[-1])."""

  def __init__(self, channels, widths, *, rngs, dtype):
    self.convs = nnx.List([Conv(cin, cout, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
                           for cin, cout in zip((channels, *widths[:-1]), widths)])
    self.norms = nnx.List([BatchNorm(c, dtype=dtype, rngs=rngs) for c in widths])

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms):
      x = max_pool2(nnx.relu(norm(conv(x))))
    return x.mean(axis=(1, 2))


class TwoModalities(nnx.Module):
  """Input checks and casting shared by the fusion models."""

  def __init__(self, name, channels, dtype):
    self.name, self.channels, self.dtype = name, tuple(channels), dtype

  def check(self, a, b):
    check_images(a, self.channels[0], self.name)
    check_images(b, self.channels[1], self.name)
    if a.shape[:3] != b.shape[:3]:
      raise ValueError(f'{self.name} expects both modalities at the same batch and size, got {a.shape} and {b.shape}')
    return a.astype(self.dtype), b.astype(self.dtype)


class EarlyFusion(TwoModalities):
  """concat channels -> one CNN -> linear."""

  def __init__(self, channels, widths, num_classes, *, rngs, dtype):
    super().__init__('fusion_early', channels, dtype)
    self.branch = Branch(sum(channels), widths, rngs=rngs, dtype=dtype)
    self.head = nnx.Linear(widths[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, a, b):
    a, b = self.check(a, b)
    return self.head(self.branch(jnp.concatenate([a, b], -1))).astype(jnp.float32)


class LateFusion(TwoModalities):
  """A CNN and linear classifier per modality; the mean of their logits."""

  def __init__(self, channels, widths, num_classes, *, rngs, dtype):
    super().__init__('fusion_late', channels, dtype)
    self.branches = nnx.List([Branch(c, widths, rngs=rngs, dtype=dtype) for c in channels])
    self.heads = nnx.List([nnx.Linear(widths[-1], num_classes, dtype=dtype, rngs=rngs) for _ in channels])

  def __call__(self, a, b):
    a, b = self.check(a, b)
    logits = [head(branch(x)) for branch, head, x in zip(self.branches, self.heads, (a, b))]
    return ((logits[0] + logits[1]) / 2).astype(jnp.float32)


class IntermediateFusion(TwoModalities):
  """A CNN per modality; concatenated features -> linear."""

  def __init__(self, channels, widths, num_classes, *, rngs, dtype):
    super().__init__('fusion_intermediate', channels, dtype)
    self.branches = nnx.List([Branch(c, widths, rngs=rngs, dtype=dtype) for c in channels])
    self.head = nnx.Linear(2 * widths[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, a, b):
    a, b = self.check(a, b)
    features = [branch(x) for branch, x in zip(self.branches, (a, b))]
    return self.head(jnp.concatenate(features, -1)).astype(jnp.float32)


class GatedMultimodalUnit(nnx.Module):
  """h = z tanh(W_a x_a) + (1 - z) tanh(W_b x_b), z = sigmoid(W_z [x_a, x_b])."""

  def __init__(self, features, hidden, *, rngs, dtype):
    self.proj_a = nnx.Linear(features, hidden, use_bias=False, dtype=dtype, rngs=rngs)
    self.proj_b = nnx.Linear(features, hidden, use_bias=False, dtype=dtype, rngs=rngs)
    self.gate = nnx.Linear(2 * features, hidden, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x_a, x_b):
    z = jax.nn.sigmoid(self.gate(jnp.concatenate([x_a, x_b], -1)))
    return z * jnp.tanh(self.proj_a(x_a)) + (1 - z) * jnp.tanh(self.proj_b(x_b))


class GatedFusion(TwoModalities):
  """A CNN per modality; a gated multimodal unit weighting the two feature vectors -> linear."""

  def __init__(self, channels, widths, num_classes, *, rngs, dtype):
    super().__init__('fusion_gated', channels, dtype)
    self.branches = nnx.List([Branch(c, widths, rngs=rngs, dtype=dtype) for c in channels])
    self.gmu = GatedMultimodalUnit(widths[-1], widths[-1], rngs=rngs, dtype=dtype)
    self.head = nnx.Linear(widths[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, a, b):
    a, b = self.check(a, b)
    return self.head(self.gmu(*(branch(x) for branch, x in zip(self.branches, (a, b))))).astype(jnp.float32)


def fusion_model(cls, name, description):
  @register(name, inputs=[(64, 64, 3), (64, 64, 1)], small_inputs=[(8, 8, 3), (8, 8, 1)], num_classes=10,
            small_kwargs=dict(widths=(4, 8)))
  def build(*, num_classes, rngs, dtype=jnp.float32, channels=(3, 1), widths=(32, 64, 128)):
    return cls(channels, widths, num_classes, rngs=rngs, dtype=dtype)
  build.__name__ = name
  build.__doc__ = f'{description} over RGB (3 channels) and depth (1 channel).'
  return build


fusion_early = fusion_model(EarlyFusion, 'fusion_early', 'Early fusion')
fusion_late = fusion_model(LateFusion, 'fusion_late', 'Late fusion')
fusion_intermediate = fusion_model(IntermediateFusion, 'fusion_intermediate', 'Intermediate fusion')
fusion_gated = fusion_model(GatedFusion, 'fusion_gated', 'Gated (GMU) fusion')
