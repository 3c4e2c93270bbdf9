"""2x2 (2x2x2) max pooling with stride 2, written for a fast gradient on CPU.

The derivative is JAX's own for a max over each window (the incoming gradient shared equally among
the window's maxima), so values and gradients of every order are the same to the bit as
`x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))`. The difference is in what XLA:CPU gets:
the max, and the count of maxima in each window, come from elementwise ops on the window's
corners (strided slices), not from reductions over two axes of length 2 (each a slow pass of its
own there), and the gradient is the pooled gradient over the count, broadcast onto the maxima.
XLA fuses the ops around it otherwise, so a whole training run may still sum in another order.
The digit CNN's train step at batch 128 on 2 Xeon cores: 27-30 -> 24-25 ms/step, Conv-4's 27-29 -> 23-24
(results/benchmark/NOTES.md, "Max pooling").
"""

import functools
import itertools

import jax
import jax.numpy as jnp


def _cropped(x):
  """`x` without the last row (column, slice) of every odd spatial size, which no window covers."""
  return x[(slice(None), *(slice(n // 2 * 2) for n in x.shape[1:-1]))]


def _corners(x):
  """The 4 (8) elements of every window as strided slices of `x`, each of the pooled shape."""
  spatial = x.ndim - 2
  return [_cropped(x)[(slice(None), *(slice(offset, None, 2) for offset in offsets))]
          for offsets in itertools.product((0, 1), repeat=spatial)]


def _windows(x):
  """`x` as (b, n1 // 2, 2, n2 // 2, 2, ..., c): each window spread over the axes 2, 4, ..."""
  b, *spatial, c = x.shape
  return _cropped(x).reshape(b, *(s for n in spatial for s in (n // 2, 2)), c)


def _window_axes(x):
  return tuple(range(2, 2 * (x.ndim - 2) + 1, 2))


@jax.custom_jvp
def max_pool2(x):
  """2x2/2 max pooling of NHWC images (2x2x2/2 of NDHWC volumes); odd sizes drop their last row."""
  return functools.reduce(jnp.maximum, _corners(x))


@max_pool2.defjvp
def _max_pool2_jvp(primals, tangents):
  """As JAX differentiates a max over each window: the tangents at the maxima, averaged."""
  (x,), (dx,) = primals, tangents
  y = max_pool2(x)
  count = sum((corner == y).astype(x.dtype) for corner in _corners(x))
  y_windows = jnp.expand_dims(y, _window_axes(x))
  hits = (_windows(x) == y_windows).astype(x.dtype)
  return y, (_windows(dx) * hits).sum(axis=_window_axes(x)) / count
