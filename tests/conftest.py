"""Test-session environment: TFDS data and W&B stay out of the user's home directory; XLA compiles fast.

Set at import time, before any test imports cnnjax, and with `setdefault` so a caller's choice wins.
pytest-xdist workers inherit the controller's environment, so the whole session shares one data dir.
Tests that need their own data dir (tests/test_data.py) pass it explicitly or monkeypatch the variable.
"""

import atexit
import os
import shutil
import tempfile

if 'CNNJAX_DATA_DIR' not in os.environ:
  _DATA_DIR = tempfile.mkdtemp(prefix='cnnjax-tests-tfds-')
  os.environ['CNNJAX_DATA_DIR'] = _DATA_DIR
  atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)

# Tests compile many small programs and run them briefly: without LLVM's optimisation passes XLA:CPU
# compiles them about 2.5x faster (model-zoo tests: 93 -> 36 s of CPU time), and convolutions,
# which call precompiled library kernels, run as fast. Child processes inherit the flags.
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

os.environ.setdefault('WANDB_MODE', 'disabled')
os.environ.setdefault('WANDB_SILENT', 'true')
