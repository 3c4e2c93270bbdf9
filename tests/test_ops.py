"""cnnjax.ops: oneDNN's 2-D convolutions against XLA's (values, gradients of first and second order,
vmapped members), what stays on XLA, the switch per model, and a library that cannot be built."""

import concurrent.futures
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax import models, ops
from cnnjax.ops import conv as onednn, native

NHWC = onednn.NHWC


def on_onednn(fn, *args):
  return 'cnnjax_conv_forward' in jax.jit(fn).lower(*args).as_text()


def loss(conv, strides, padding, dilation):
  return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC)))


def close(a, b, tol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=tol * float(jnp.max(jnp.abs(x))), rtol=0)


def inputs(n, size, cin, cout, kernel, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, size, size, cin)), jax.random.normal(kw, (kernel, kernel, cin, cout))


GEOMETRIES = [  # n, size, cin, cout, kernel, stride, padding, dilation
    (4, 8, 3, 5, 3, 1, 'SAME', 1),
    (4, 9, 6, 5, 3, 2, ((1, 1), (1, 1)), 1),  # odd size, stride 2: the last row unused
    (3, 8, 4, 4, 3, 1, 'SAME', 2),            # dilated (DeepLab's atrous convolutions)
    (2, 10, 1, 6, 3, 2, 'VALID', 2),          # one input channel
    (4, 14, 8, 8, 1, 2, 'SAME', 1),           # 1x1 projection shortcut
    (2, 30, 3, 8, 7, 2, ((3, 2), (1, 3)), 1), # ResNet stem kernel, uneven padding
]


@pytest.mark.parametrize('n,size,cin,cout,kernel,stride,padding,dilation', GEOMETRIES)
def test_onednn_convolution_and_gradients_equal_xla(n, size, cin, cout, kernel, stride, padding, dilation):
  x, w = inputs(n, size, cin, cout, kernel)
  args = (stride, stride), padding, (dilation, dilation)
  ours, xla = loss(ops.conv_general_dilated, *args), loss(lax.conv_general_dilated, *args)
  assert on_onednn(ours, x, w) and not on_onednn(xla, x, w)
  close(jax.jit(jax.value_and_grad(xla, (0, 1)))(x, w), jax.jit(jax.value_and_grad(ours, (0, 1)))(x, w))


def test_second_order_gradients_equal_xla():
  # MAML's second-order meta-gradient differentiates the inner loop's gradient again.
  x, w = inputs(4, 9, 3, 5, 3)
  args = (2, 2), 'SAME', (1, 1)

  def meta(conv):
    inner = jax.grad(loss(conv, *args), 1)
    return jax.jit(jax.grad(lambda x, w: jnp.sum(inner(x, w - 0.1 * inner(x, w)) ** 2), (0, 1)))

  close(meta(lax.conv_general_dilated)(x, w), meta(ops.conv_general_dilated)(x, w), tol=1e-4)


def test_vmapped_members_equal_one_by_one():
  xs, ws = zip(*[inputs(4, 8, 3, 5, 3, seed) for seed in range(3)])
  grad = jax.grad(loss(ops.conv_general_dilated, (1, 1), 'SAME', (1, 1)), (0, 1))
  together = jax.jit(jax.vmap(grad))(jnp.stack(xs), jnp.stack(ws))
  close(together, jax.tree.map(lambda *g: jnp.stack(g), *[jax.jit(grad)(x, w) for x, w in zip(xs, ws)]), tol=1e-6)


def test_calls_on_one_thread_each_at_once_equal_calls_on_all_cores():
  """threads_per_call(1): the three custom calls carry threads = 1 and, run from 4 threads at once
  (as ensemble members on threads are), give the gradients of one call at a time on all cores."""
  args = [inputs(4, 16, 8, 8, 3, seed) for seed in range(4)]
  grad = jax.grad(loss(ops.conv_general_dilated, (2, 2), 'SAME', (1, 1)), (0, 1))

  def one_thread(x, w):
    with ops.threads_per_call(1):
      return grad(x, w)
  one_thread = jax.jit(one_thread)
  assert jax.jit(grad).lower(*args[0]).as_text().count('threads = 0 : i64') == 3
  assert one_thread.lower(*args[0]).as_text().count('threads = 1 : i64') == 3
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    at_once = list(pool.map(lambda a: jax.block_until_ready(one_thread(*a)), args))
  close(at_once, [jax.jit(grad)(*a) for a in args], tol=1e-6)


@pytest.mark.parametrize('case', ['grouped', 'bfloat16', '1-D', 'transposed'])
def test_what_oneDNN_does_not_take_stays_on_xla(case):
  x, w = inputs(2, 8, 4, 4, 3)
  kwargs = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=NHWC)
  if case == 'grouped':
    w, kwargs['feature_group_count'] = w[:, :, :2], 2
  elif case == 'bfloat16':
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  elif case == '1-D':
    x, w, kwargs = x[:, 0], w[0], dict(window_strides=(1,), padding='SAME', dimension_numbers=('NWC', 'WIO', 'NWC'))
  else:
    kwargs.update(lhs_dilation=(2, 2), padding=((1, 1), (1, 1)))
  ours = lambda x, w: ops.conv_general_dilated(x, w, **kwargs)
  assert not on_onednn(ours, x, w)
  np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(lambda x, w: lax.conv_general_dilated(x, w, **kwargs))(x, w))


def test_models_built_inside_xla_convolutions_keep_xla():
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))

  def input_gradient(model):
    model.eval()
    return lambda x: jax.grad(lambda x: jnp.sum(model(x) ** 2))(x)

  fast = input_gradient(models.build('digit_cnn', num_classes=10, seed=0, channels=1))
  with ops.xla_convolutions():
    assert not ops.onednn_enabled()
    slow = input_gradient(models.build('digit_cnn', num_classes=10, seed=0, channels=1))
  assert ops.onednn_enabled()
  assert on_onednn(fast, x) and not on_onednn(slow, x)
  close(jax.jit(slow)(x), jax.jit(fast)(x))


def cpu_flags():
  return next(set(line.split(':')[1].split()) for line in Path('/proc/cpuinfo').read_text().splitlines()
              if line.startswith('flags'))


@pytest.mark.skipif(not Path('/proc/cpuinfo').exists(), reason='reads the CPU flags from /proc/cpuinfo')
def test_models_take_onednn_by_default_only_on_avx512_cpus(monkeypatch):
  """oneDNN 2023.2 has direct NHWC kernels (brgemm) on AVX-512 CPUs only; elsewhere XLA's convolutions
  are faster and models take them, unless CNNJAX_ONEDNN or a context says otherwise."""
  avx512 = {'avx512f', 'avx512bw', 'avx512vl', 'avx512dq'} <= cpu_flags()
  assert ops.onednn_faster() == avx512
  monkeypatch.delenv('CNNJAX_ONEDNN', raising=False)
  assert ops.onednn_enabled() == avx512
  for setting in ('0', '1'):
    monkeypatch.setenv('CNNJAX_ONEDNN', setting)
    assert ops.onednn_enabled() == (setting == '1')
    with ops.xla_convolutions():
      assert not ops.onednn_enabled()
    with ops.onednn_convolutions():
      assert ops.onednn_enabled()
  monkeypatch.setenv('CNNJAX_ONEDNN', 'yes')
  with pytest.raises(ValueError, match="CNNJAX_ONEDNN='yes': set it to 0 .* 1 .* or leave it unset"):
    ops.onednn_enabled()


def test_a_library_that_cannot_be_built_warns_and_leaves_xla(monkeypatch, tmp_path):
  monkeypatch.setenv('CNNJAX_CACHE_DIR', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler')
  with pytest.raises(native.BuildError, match='no C.. compiler.*no-such-compiler'):
    native.load(onednn.SOURCE, 'dnnl', 'oneapi/dnnl/dnnl.hpp', onednn.INSTALL_HINT)
  with pytest.raises(native.BuildError, match='pip install onednn'):
    native.load(onednn.SOURCE, 'no_such_library', 'oneapi/dnnl/dnnl.hpp', onednn.INSTALL_HINT)
  monkeypatch.setattr(onednn, 'library', onednn.library.__wrapped__)  # uncached: builds again
  x, w = inputs(2, 8, 3, 4, 3)
  with pytest.warns(RuntimeWarning, match='XLA runs them.*no C.. compiler'):
    assert not on_onednn(loss(ops.conv_general_dilated, (1, 1), 'SAME', (1, 1)), x, w)
  assert not list(tmp_path.iterdir())
