"""Nothing lost on a kill, a full disk or a bad config: the guarantees of the README's
"What is guaranteed" section, tested as a user meets them."""

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import ml_collections
import pytest

from cnnjax import tracking
from cnnjax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def command(tmp):
  """A small transfer sweep: 1 seed, pretraining then 2 fine-tuning cells, a checkpoint per chunk."""
  return [sys.executable, '-m', 'experiments.transfer', '--config=experiments/configs/transfer.py:smoke',
          '--config.seeds=1', '--config.methods=("scratch","finetune")', '--config.labels_per_class=(5,)',
          '--config.pretrain.steps=20', '--config.finetune.steps=20', '--config.checkpoint_every=2',
          f'--config.workdir={tmp / "work"}', f'--config.results_dir={tmp / "results"}',
          f'--config.compile_cache={tmp.parent / "jax-cache"}', '--config.wandb.mode=disabled']


def environment(tmp):
  return dict(os.environ, JAX_PLATFORMS='cpu', MPLCONFIGDIR=str(tmp / 'mpl'), WANDB_MODE='disabled')


def finished(tmp):
  """Every cell's result and every seed's metric history (the numbers a table is made of)."""
  cells = sorted((tmp / 'work' / 'transfer' / 'smoke').iterdir())
  return {cell.name: (json.loads((cell / 'result.json').read_text()),
                      tracking.read_metrics(cell / 'seed_0')) for cell in cells}


@pytest.mark.slow
def test_killed_and_rerun_sweep_ends_bit_identical(tmp_path):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  started = time.time()
  subprocess.run(command(straight), cwd=REPO, env=environment(straight), check=True, capture_output=True)
  duration = time.time() - started
  rng, interrupted = random.Random(0), 0
  for _ in range(2):  # SIGKILL at random moments: in a step, a checkpoint, a table write ...
    process = subprocess.Popen(command(killed), cwd=REPO, env=environment(killed),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.05, 0.3) * duration)  # the first run filled the compile cache: reruns take ~45%
    interrupted += process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert interrupted >= 1  # reruns start faster (compile cache), so a late kill may find them done
  subprocess.run(command(killed), cwd=REPO, env=environment(killed), check=True, capture_output=True)
  assert finished(killed) == finished(straight)
  assert ((killed / 'results' / 'transfer' / 'smoke' / 'table.csv').read_text()
          == (straight / 'results' / 'transfer' / 'smoke' / 'table.csv').read_text())


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
  path = tmp_path / 'table.csv'
  tracking.write_atomic(path, 'old\n')

  def disk_full(fd):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', disk_full)
  with pytest.raises(OSError, match='No space'):
    tracking.write_atomic(path, 'new\n')
  assert path.read_text() == 'old\n'
  assert [p.name for p in tmp_path.iterdir()] == ['table.csv']  # no temp file left behind


EXPERIMENTS = ('transfer', 'domain_adapt', 'meta_learning', 'benchmark')
# Paths stay out: validation tries writing into them (tests/test_config.py checks that).
DIRECTORIES = ('workdir', 'results_dir', 'data_dir', 'compile_cache', 'profile_dir')
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.one_of(st.integers(-3, 30), st.text(max_size=6)), max_size=3))


def leaf_keys(config, prefix=''):
  """The dotted keys of every value in `config`."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaf_keys(value, f'{prefix}{key}.')
    elif key not in DIRECTORIES:
      yield prefix + key


def accepted_or_refused(validate, config, key, value):
  """Set `key` to `value`: validation passes or raises ConfigError naming the key (or the
  ConfigDict's own TypeError for a value of the wrong type) — never an error from deep inside."""
  *parents, leaf = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  try:
    node[leaf] = value
  except TypeError:
    return  # ml_collections refuses a value of another type, naming the field
  try:
    validate(config)
  except ConfigError as error:
    assert error.key in str(error)


@pytest.mark.parametrize('experiment', EXPERIMENTS)
def test_any_config_value_is_accepted_or_refused_with_a_config_error(experiment):
  """Every key of every experiment set to each of a few edge values, then any key to anything."""
  module, configs = (importlib.import_module(f'{package}.{experiment}')
                     for package in ('experiments', 'experiments.configs'))
  keys = sorted(leaf_keys(configs.get_config('smoke')))
  for key in keys:
    for value in (None, '', 0, -1, True, ()):
      accepted_or_refused(module.validate, configs.get_config('smoke'), key, value)

  @hypothesis.settings(max_examples=300, deadline=None, derandomize=True, database=None)
  @hypothesis.given(key=st.sampled_from(keys), value=VALUES, preset=st.sampled_from(['smoke', 'default', 'paper']))
  def set_one_key(key, value, preset):
    accepted_or_refused(module.validate, configs.get_config(preset), key, value)

  set_one_key()
