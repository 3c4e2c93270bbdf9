"""ConvLSTM (Shi et al. 2015, "Convolutional LSTM Network: A Machine Learning Approach for
Precipitation Nowcasting"): an LSTM whose input-to-state and state-to-state transitions are
convolutions, so inputs, hidden states and cells are all (H, W, C) maps.

The cell is the paper's equation (3), with Hadamard peepholes from the cell to the gates:
  i = sigmoid(W_xi * X_t + W_hi * H_{t-1} + W_ci o C_{t-1} + b_i)
  f = sigmoid(W_xf * X_t + W_hf * H_{t-1} + W_cf o C_{t-1} + b_f)
  C_t = f o C_{t-1} + i o tanh(W_xc * X_t + W_hc * H_{t-1} + b_c)
  o = sigmoid(W_xo * X_t + W_ho * H_{t-1} + W_co o C_t + b_o)
  H_t = o o tanh(C_t)
(* a 'same'-padded convolution, o the Hadamard product; the peepholes W_c are (H, W, C) maps, so
a model is built for one frame size). The input convolutions of all time steps run as one batched
convolution; the recurrence is a jax.lax.scan over time from zero states. A model is a stack of
ConvLSTM layers, each reading the hidden-state sequence of the one before; it maps a sequence
(B, T, H, W, C) to the last layer's hidden states (B, T, H, W, hidden). The standard build is
the paper's Moving MNIST network: 64x64 frames as 16x16 maps of 4x4 patches, three layers of 128,
64 and 64 hidden maps with 5x5 kernels.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax.models.layers import Conv
from cnnjax.models.registry import register


class ConvLSTMCell(nnx.Module):
  """The gate convolutions and peepholes of one layer: input, forget, cell and output gates."""

  def __init__(self, cin, hidden, kernel, size, *, rngs, dtype):
    self.hidden, self.dtype = hidden, dtype
    conv = lambda c, bias: Conv(c, 4 * hidden, (kernel, kernel), padding='SAME', use_bias=bias,
                                    dtype=dtype, rngs=rngs)
    self.input_conv = conv(cin, True)      # W_x* and the biases b_*, the four gates stacked
    self.hidden_conv = conv(hidden, False)  # W_h*
    peephole = lambda: nnx.Param(jnp.zeros((*size, hidden), jnp.float32))
    self.w_ci, self.w_cf, self.w_co = peephole(), peephole(), peephole()

  def step(self, h, c, x_gates):
    """One time step from (H_{t-1}, C_{t-1}) and the input convolution W_x* X_t + b_*."""
    i, f, g, o = jnp.split(x_gates + self.hidden_conv(h), 4, axis=-1)
    w_ci, w_cf, w_co = (w[...].astype(self.dtype) for w in (self.w_ci, self.w_cf, self.w_co))
    i = jax.nn.sigmoid(i + w_ci * c)
    f = jax.nn.sigmoid(f + w_cf * c)
    c = f * c + i * jnp.tanh(g)
    o = jax.nn.sigmoid(o + w_co * c)
    return o * jnp.tanh(c), c


class ConvLSTMLayer(nnx.Module):
  """The cell scanned over time: (B, T, H, W, C) -> hidden states (B, T, H, W, hidden)."""

  def __init__(self, cin, hidden, kernel, size, *, rngs, dtype):
    self.cell = ConvLSTMCell(cin, hidden, kernel, size, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    b, t, height, width, c = x.shape
    x_gates = self.cell.input_conv(x.reshape(b * t, height, width, c)).reshape(b, t, height, width, -1)
    graphdef, state = nnx.split(self.cell)

    def step(carry, x_gates_t):
      h, c = nnx.merge(graphdef, state).step(*carry, x_gates_t)
      return (h, c), h

    zeros = jnp.zeros((b, height, width, self.cell.hidden), x_gates.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.moveaxis(x_gates, 1, 0))
    return jnp.moveaxis(hs, 0, 1)


class ConvLSTM(nnx.Module):
  """A stack of ConvLSTM layers returning the last layer's hidden-state sequence."""

  def __init__(self, channels, hidden, kernel, size, *, rngs, dtype):
    self.channels, self.size, self.dtype = channels, tuple(size), dtype
    self.layers = nnx.List([ConvLSTMLayer(cin, h, kernel, size, rngs=rngs, dtype=dtype)
                            for cin, h in zip((channels, *hidden[:-1]), hidden)])

  def __call__(self, x):
    if x.ndim != 5 or x.shape[2:4] != self.size or x.shape[-1] != self.channels:
      raise ValueError(f'convlstm expects sequences (batch, time, {self.size[0]}, {self.size[1]}, '
                       f'{self.channels}), got shape {x.shape}')
    x = x.astype(self.dtype)
    for layer in self.layers:
      x = layer(x)
    return x.astype(jnp.float32)


@register('convlstm', inputs=[(10, 16, 16, 16)], small_inputs=[(4, 8, 8, 2)],
          small_kwargs=dict(channels=2, hidden=(8,), kernel=3, size=(8, 8)))
def convlstm(*, rngs, dtype=jnp.float32, channels=16, hidden=(128, 64, 64), kernel=5, size=(16, 16)):
  """The encoding network of the paper's Moving MNIST ConvLSTM, 128-64-64 with 5x5 kernels (4.09M parameters)."""
  return ConvLSTM(channels, hidden, kernel, size, rngs=rngs, dtype=dtype)
