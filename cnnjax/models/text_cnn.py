"""Convolutional text classifiers over integer token ids (B, length) -> logits (B, num_classes).

Kim CNN (Kim 2014, "Convolutional Neural Networks for Sentence Classification"): 300-d word
embeddings, convolutions of widths 3, 4 and 5 with 100 feature maps each and ReLU, max-over-time
pooling, and a linear softmax layer over the 300 pooled features (the paper's CNN-rand; its
dropout of 0.5 before the head is left to the training recipe, so the model is deterministic).

Character-level CNN (Zhang, Zhao & LeCun 2015, "Character-level Convolutional Networks for Text
Classification"), the small model: 1014 characters one-hot over a 70-letter alphabet (id 0 is a
character outside the alphabet or padding: the zero vector), six convolutions of 256 features
(kernels 7, 7, 3, 3, 3, 3, non-overlapping max pooling of 3 after the 1st, 2nd and 6th), two
fully connected layers of 1024 and the output layer (dropout again left to the recipe).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import Conv
from cnnjax.models.registry import register


def check_tokens(tokens, model, length=None):
  """Fail with a clear message on anything but a (batch, length) array of integer ids."""
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'{model} expects integer token ids of shape (batch, length), got {tokens.dtype} {tokens.shape}')
  if length is not None and tokens.shape[1] != length:
    raise ValueError(f'{model} was built for length {length}, got token ids of shape {tokens.shape}')


def max_pool3(x):
  """Non-overlapping max pooling of 3 over time by reshape (B, L, C) -> (B, L // 3, C)."""
  b, n, c = x.shape
  return x[:, :n // 3 * 3].reshape(b, n // 3, 3, c).max(axis=2)


class KimCNN(nnx.Module):
  """Embedding -> parallel convolutions of several widths -> max over time -> linear."""

  def __init__(self, vocab_size, num_classes, embed_dim, widths, maps, *, rngs, dtype):
    self.widths, self.dtype = tuple(widths), dtype
    self.embed = nnx.Embed(vocab_size, embed_dim, dtype=dtype, rngs=rngs)
    self.convs = nnx.List([Conv(embed_dim, maps, (w,), padding='VALID', dtype=dtype, rngs=rngs)
                           for w in widths])
    self.head = nnx.Linear(maps * len(widths), num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    check_tokens(tokens, 'kim_cnn')
    if tokens.shape[1] < max(self.widths):
      raise ValueError(f'kim_cnn needs sentences of at least {max(self.widths)} tokens, got {tokens.shape[1]}')
    x = self.embed(tokens)
    pooled = [nnx.relu(conv(x)).max(axis=1) for conv in self.convs]
    return self.head(jnp.concatenate(pooled, -1)).astype(jnp.float32)


@register('kim_cnn', inputs=[(56,)], input_dtype='int32', vocab_size=18765, num_classes=2,
          small_kwargs=dict(vocab_size=32, embed_dim=16, maps=8), small_inputs=[(12,)])
def kim_cnn(*, vocab_size, num_classes, rngs, dtype=jnp.float32, embed_dim=300, widths=(3, 4, 5), maps=100):
  """Kim CNN on MR (vocabulary 18,765, sentences padded to 56): 5.99M parameters, 0.36M without the embedding."""
  return KimCNN(vocab_size, num_classes, embed_dim, widths, maps, rngs=rngs, dtype=dtype)


class CharCNN(nnx.Module):
  """One-hot characters -> 6 temporal convolutions with 3 max pools -> 3 fully connected layers."""

  KERNELS, POOLED = (7, 7, 3, 3, 3, 3), (True, True, False, False, False, True)

  def __init__(self, length, alphabet, num_classes, features, hidden, *, rngs, dtype):
    self.length, self.alphabet, self.dtype = length, alphabet, dtype
    self.convs = nnx.List([Conv(alphabet if i == 0 else features, features, (k,), padding='VALID',
                                    dtype=dtype, rngs=rngs) for i, k in enumerate(self.KERNELS)])
    n = length
    for k, pooled in zip(self.KERNELS, self.POOLED):
      n = (n - k + 1) // 3 if pooled else n - k + 1
    if n < 1:
      raise ValueError(f'char_cnn needs a longer input than {length} characters')
    self.fcs = nnx.List([nnx.Linear(n * features, hidden, dtype=dtype, rngs=rngs),
                         nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs)])
    self.head = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, chars):
    check_tokens(chars, 'char_cnn', self.length)
    x = jax.nn.one_hot(chars - 1, self.alphabet, dtype=self.dtype)  # id 0 -> the zero vector
    for conv, pooled in zip(self.convs, self.POOLED):
      x = nnx.relu(conv(x))
      x = max_pool3(x) if pooled else x
    x = x.reshape(x.shape[0], -1)
    for fc in self.fcs:
      x = nnx.relu(fc(x))
    return self.head(x).astype(jnp.float32)


@register('char_cnn', inputs=[(1014,)], input_dtype='int32', num_classes=4,
          small_inputs=[(123,)], small_kwargs=dict(length=123, features=16, hidden=32))
def char_cnn(*, num_classes, rngs, dtype=jnp.float32, length=1014, alphabet=70, features=256, hidden=1024):
  """The small character-level CNN (11.3M parameters with 4 classes, AG's News)."""
  return CharCNN(length, alphabet, num_classes, features, hidden, rngs=rngs, dtype=dtype)
