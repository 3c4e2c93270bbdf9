"""Test-session environment: TFDS data, compile cache and W&B stay out of the user's home directory; XLA compiles fast.

Set at import time, before any test starts JAX, and so that a caller's choice wins.
pytest-xdist workers inherit the controller's environment, so the whole session shares one data dir.
Tests that need their own data dir (tests/test_data.py) pass it explicitly or monkeypatch the variable.
"""

import atexit
import os
import shutil
import tempfile

from cnnjax import with_xla_flag  # sets nothing but cnnjax's own CPU default (cnnjax/__init__.py)

if 'CNNJAX_DATA_DIR' not in os.environ:
  _DATA_DIR = tempfile.mkdtemp(prefix='cnnjax-tests-tfds-')
  os.environ['CNNJAX_DATA_DIR'] = _DATA_DIR
  atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)

# Tests compile many small programs and run them briefly: at LLVM optimisation level 1 XLA:CPU
# compiles them about 1.6x faster (model-zoo sample: 77 -> 47 s of CPU time) with the same numbers;
# convolutions call precompiled library kernels either way. (Level 0 compiles faster still but
# miscompiles: NaN gradients through batch norm -> ReLU -> a cropping max pool.) Children inherit it.
# XLA's older (non-MLIR) elementwise emitters compile faster still (model-zoo sample 121 -> 96 s)
# but run slower, so only tests take them (2 AVX2 cores: digit CNN, Conv-4, ResNet-20 train steps
# 4, 6, 15% slower).
os.environ['XLA_FLAGS'] = with_xla_flag(with_xla_flag(os.environ.get('XLA_FLAGS', ''), 'xla_backend_optimization_level', 1),
                                        'xla_cpu_use_fusion_emitters', 'false')

# One persistent compilation cache for the session: both workers and every experiment subprocess
# (tests/experiment_cli.py) reuse what another already compiled, small programs included
# (initialisers, data steps: ~0.1 s each to compile, dozens per process).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix='cnnjax-tests-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The oneDNN convolutions run in every test, on any CPU: by default models use them only where they
# beat XLA's (AVX-512 CPUs; tests/test_ops.py checks that choice), and CI machines vary.
os.environ.setdefault('CNNJAX_ONEDNN', '1')

os.environ.setdefault('WANDB_MODE', 'disabled')
os.environ.setdefault('WANDB_SILENT', 'true')


def pytest_configure(config):
  # Not run first: a slow test often finds its programs already compiled by the fast tests of its
  # topic (ordering them first made the suite's test time 912 -> 1023 s in all, 519 -> 529 s wall).
  config.addinivalue_line('markers', "slow: takes 15 s or more (most run an experiment's command line); "
                                     "-m 'not slow' leaves these out")
