"""2-D convolutions on oneDNN for XLA:CPU: a drop-in `lax.conv_general_dilated`.

XLA:CPU runs convolutions on Eigen's tensor contractions, and their weight gradients on transposed
(batch-minor) copies of both operands. oneDNN (Intel's deep-learning kernels, which PyTorch's CPU
convolutions also use) runs the same convolutions 2-4x faster on 2 AVX-512 cores: for a CIFAR
ResNet-20 layer at batch 128 (32x32x16), forward, input and weight gradient take 8.6, 6.5 and 12.2 ms
on XLA against 3.2, 3.9 and 4.2 ms on oneDNN. `conv_general_dilated` sends float32 2-D convolutions in
NHWC/HWIO layout, without feature groups or input dilation, on a single CPU device, to oneDNN
through XLA FFI custom calls (onednn_conv.cc, compiled on first use: cnnjax/ops/native.py);
everything else (accelerators, several devices, where XLA partitions the batch; other dtypes,
1-D and 3-D, grouped and transposed convolutions) goes to XLA unchanged. Gradients of any order:
the forward, input-gradient and weight-gradient convolutions are bilinear, and the VJP of each is
made of the others. Where the library cannot be built (no compiler, no oneDNN wheels), a warning
says why once and XLA runs every convolution.

Models use oneDNN where it beats XLA: on CPUs where oneDNN has direct kernels for NHWC convolutions
(AVX-512; on AVX2 XLA's are faster: `onednn_faster()`). `CNNJAX_ONEDNN=0` or `1` turns oneDNN off
or on for a process; `xla_convolutions()` and `onednn_convolutions()` for the models built inside
them (cnnjax.models.layers.Conv picks the function when it is constructed). A convolution runs on
all cores, one at a time; traced inside `threads_per_call(n)`, on n threads, beside other such calls
(ensemble members trained on threads of their own: cnnjax/train/steps.py). Measurements: results/benchmark/NOTES.md.
"""

import contextlib
import functools
import os
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.ops import native

SOURCE = Path(__file__).with_name('onednn_conv.cc')
TARGETS = {'cnnjax_conv_forward': 'ConvForward', 'cnnjax_conv_input_grad': 'ConvInputGrad',
           'cnnjax_conv_weight_grad': 'ConvWeightGrad'}  # custom-call target: handler symbol
NHWC = ('NHWC', 'HWIO', 'NHWC')
INSTALL_HINT = 'onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0 (in pyproject.toml on Linux x86-64)'

_state = threading.local()


def onednn_enabled():
  """Whether models built now use oneDNN where it applies: as `xla_convolutions()` or
  `onednn_convolutions()` say inside them, else as `CNNJAX_ONEDNN` says (0 or 1), else where it is
  faster (`onednn_faster()`)."""
  enabled = getattr(_state, 'enabled', None)
  if enabled is None:
    setting = os.environ.get('CNNJAX_ONEDNN', '')
    if setting not in ('', '0', '1'):
      raise ValueError(f'CNNJAX_ONEDNN={setting!r}: set it to 0 (XLA\'s convolutions), 1 (oneDNN\'s) or '
                       'leave it unset (oneDNN\'s where they are faster)')
    enabled = onednn_faster() if setting == '' else setting == '1'
  return enabled


@contextlib.contextmanager
def _convolutions(enabled):
  before = getattr(_state, 'enabled', None)
  _state.enabled = enabled
  try:
    yield
  finally:
    _state.enabled = before


def xla_convolutions():
  """Models built inside run every convolution on XLA (e.g. to compare the two)."""
  return _convolutions(False)


def onednn_convolutions():
  """Models built inside run their convolutions on oneDNN where it applies, on any CPU."""
  return _convolutions(True)


@contextlib.contextmanager
def threads_per_call(threads):
  """oneDNN convolutions traced inside run on `threads` OpenMP threads each (0: all cores, one call at
  a time), so that calls from several threads at once share the cores instead of taking turns."""
  before = getattr(_state, 'threads', 0)
  _state.threads = threads
  try:
    yield
  finally:
    _state.threads = before


@functools.cache
def library():
  """The custom calls' library, built, loaded and registered once per process; None (with a warning)
  if that fails."""
  try:
    library = native.load(SOURCE, 'dnnl', 'oneapi/dnnl/dnnl.hpp', INSTALL_HINT)
  except native.BuildError as error:
    warnings.warn(f'cnnjax: oneDNN convolutions unavailable, XLA runs them: {error}', RuntimeWarning, stacklevel=2)
    return None
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return library


@functools.cache
def onednn_faster():
  """Whether oneDNN's convolutions beat XLA's here: where they can run (`onednn_available()`) and
  oneDNN has direct kernels for NHWC convolutions (brgemm, on AVX-512 CPUs). On 2 AVX2 cores it falls
  back to im2col + GEMM for them (4x slower), and in its blocked layouts it loses to XLA on the
  small default models and is about even on ResNet-20 (results/benchmark/NOTES.md)."""
  return onednn_available() and bool(library().cnnjax_onednn_direct_nhwc())


class Geometry(NamedTuple):
  strides: tuple
  padding: tuple  # ((low, high), (low, high))
  dilation: tuple

  def attributes(self):
    ints = lambda values: np.asarray(values, np.int64)
    return dict(strides=ints(self.strides), pad_lo=ints([p[0] for p in self.padding]),
                pad_hi=ints([p[1] for p in self.padding]), dilation=ints(self.dilation))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
  """`lax.conv_general_dilated`, on oneDNN where it applies (module docstring)."""
  if out_sharding is not None or not on_onednn(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count,
                                               batch_group_count, preferred_element_type):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type, out_sharding)
  strides, dilation = tuple(window_strides), tuple(rhs_dilation or (1, 1))
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
  return conv(lhs, rhs, Geometry(strides, tuple(tuple(int(p) for p in pair) for pair in padding), dilation))


def on_onednn(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
              preferred_element_type):
  return (lhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32
          and preferred_element_type in (None, jnp.float32)
          and feature_group_count == batch_group_count == 1 and all(d == 1 for d in (lhs_dilation or ()))
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC) and onednn_available())


def onednn_available():
  """Whether oneDNN can run convolutions here: one CPU device, and the library built."""
  return jax.default_backend() == 'cpu' and jax.device_count() == 1 and library() is not None


def _call(target, like, *operands, geometry):
  out = jax.ShapeDtypeStruct(like.shape, like.dtype)
  return jax.ffi.ffi_call(target, out, vmap_method='broadcast_all')(
      *operands, **geometry.attributes(), threads=np.int64(getattr(_state, 'threads', 0)))


# The convolution y = F(x, w) is bilinear; its VJP at cotangent g is (Fx(g, w), Fw(x, g)), the input and
# weight gradients, defined by <g, F(a, w)> = <Fx(g, w), a> and <g, F(x, b)> = <Fw(x, g), b>. Those are
# bilinear too, with VJPs made of F, Fx and Fw again: gradients of any order stay on oneDNN.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x, w, geometry):
  """F(x, w)."""
  out = jax.eval_shape(lambda x, w: lax.conv_general_dilated(x, w, geometry.strides, geometry.padding,
                                                             rhs_dilation=geometry.dilation,
                                                             dimension_numbers=NHWC), x, w)
  return _call('cnnjax_conv_forward', out, x, w, geometry=geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def input_grad(g, w, x_like, geometry):
  """Fx(g, w), shaped like x (`x_like`: a ShapeDtypeStruct)."""
  return _call('cnnjax_conv_input_grad', x_like, g, w, geometry=geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def weight_grad(x, g, w_like, geometry):
  """Fw(x, g), shaped like w."""
  return _call('cnnjax_conv_weight_grad', w_like, x, g, geometry=geometry)


def like(array):
  return jax.ShapeDtypeStruct(array.shape, array.dtype)


conv.defvjp(lambda x, w, geometry: (conv(x, w, geometry), (x, w)),
            lambda geometry, res, g: (input_grad(g, res[1], like(res[0]), geometry),
                                      weight_grad(res[0], g, like(res[1]), geometry)))
# <Fx(g, w), a> = <g, F(a, w)>: in g, F(a, w); in w, Fw(a, g).
input_grad.defvjp(lambda g, w, x_like, geometry: (input_grad(g, w, x_like, geometry), (g, w)),
                  lambda x_like, geometry, res, a: (conv(a, res[1], geometry),
                                                    weight_grad(a, res[0], like(res[1]), geometry)))
# <Fw(x, g), b> = <g, F(x, b)>: in x, Fx(g, b); in g, F(x, b).
weight_grad.defvjp(lambda x, g, w_like, geometry: (weight_grad(x, g, w_like, geometry), (x, g)),
                   lambda w_like, geometry, res, b: (input_grad(res[1], b, like(res[0]), geometry),
                                                     conv(res[0], b, geometry)))
