"""cnnjax: JAX/Flax (NNX) experiments with convolutional networks.

One XLA:CPU default is set here, on import, before JAX starts its CPU backend: reductions go to
XLA's YNNPACK library fusions, whose kernels sum over the batch and spatial axes (batch-norm
statistics and their gradients, bias gradients, pooling) far faster than XLA's own loops. On 2
CPU cores, batch 128: CIFAR ResNet-20 ~670 -> ~430 ms/step, the digit CNN ~70 -> ~52; at batch
32 they are no slower. YNNPACK's elementwise and dot fusions are left off: they slow small
batches (digit CNN at batch 32: 15 -> 21-29 ms/step). A value already in XLA_FLAGS wins
(`--xla_cpu_experimental_ynn_fusion_type=` turns the fusions off); the flag does nothing on
accelerators, nor once JAX's CPU backend has started. README: Benchmark.
"""

import os

YNN_FUSION_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
CPU_XLA_FLAGS = f'--{YNN_FUSION_FLAG}=reduce'

if YNN_FUSION_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()
