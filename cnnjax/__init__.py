"""cnnjax: JAX/Flax (NNX) experiments with convolutional networks.

One XLA:CPU default is set here, on import, before JAX starts its CPU backend: reductions go to
XLA's YNNPACK library fusions, whose kernels sum over the batch and spatial axes (batch-norm
statistics and their gradients, bias gradients, pooling) far faster than XLA's own loops. On 2
CPU cores, batch 128: CIFAR ResNet-20 ~670 -> ~430 ms/step, the digit CNN ~70 -> ~52; at batch
32 they are no slower. YNNPACK's elementwise and dot fusions are left off: they slow small
batches (digit CNN at batch 32: 15 -> 21-29 ms/step). A value already in XLA_FLAGS wins
(`--xla_cpu_experimental_ynn_fusion_type=` turns the fusions off); the flag does nothing on GPUs,
nor once JAX's CPU backend has started, and is not set where an accelerator plugin is installed
(libtpu, or JAX's CUDA plugin: their runtimes parse XLA_FLAGS with their own flag lists, which may
lack it). Measurements: results/benchmark/NOTES.md.
"""

import importlib.util
import os

YNN_FUSION_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
YNN_FUSION_DEFAULT = 'reduce'
CPU_XLA_FLAGS = f'--{YNN_FUSION_FLAG}={YNN_FUSION_DEFAULT}'


def with_xla_flag(xla_flags, flag, value):
  """XLA_FLAGS with `--flag=value` added, unless they already set `flag` (the caller's choice wins)."""
  return xla_flags if flag in xla_flags else f'{xla_flags} --{flag}={value}'.strip()


ACCELERATOR_PLUGINS = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin')


def with_cpu_defaults(xla_flags, accelerator_host):
  """XLA_FLAGS with cnnjax's CPU default added, unless the caller set that flag or this host has an
  accelerator plugin."""
  return xla_flags if accelerator_host else with_xla_flag(xla_flags, YNN_FUSION_FLAG, YNN_FUSION_DEFAULT)


os.environ['XLA_FLAGS'] = with_cpu_defaults(
    os.environ.get('XLA_FLAGS', ''), accelerator_host=any(map(importlib.util.find_spec, ACCELERATOR_PLUGINS)))
