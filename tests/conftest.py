"""Test-session environment: TFDS data and W&B stay out of the user's home directory.

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

os.environ.setdefault('WANDB_MODE', 'disabled')
os.environ.setdefault('WANDB_SILENT', 'true')
