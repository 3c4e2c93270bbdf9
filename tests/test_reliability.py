"""Nothing lost on a kill, a full disk or a bad config: the guarantees of the README's
"What is guaranteed" section, tested as a user meets them."""

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
import pytest

from cnnjax import tracking
from cnnjax.errors import ConfigError
from experiments import transfer
from experiments.configs.transfer import get_config

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


KEYS = ['seeds', 'model', 'methods', 'source', 'targets', 'labels_per_class', 'chunk_steps', 'eval_every',
        'checkpoint_every', 'side_by_side', 'fit_size', 'pretrain.steps', 'pretrain.batch_size',
        'pretrain.learning_rate', 'finetune.steps', 'finetune.learning_rate', 'l2sp.alpha', 'wandb.mode']
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.one_of(st.integers(-3, 30), st.text(max_size=6)), max_size=3))


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(key=st.sampled_from(KEYS), value=VALUES, preset=st.sampled_from(['smoke', 'default', 'paper']))
def test_any_config_value_is_accepted_or_refused_with_a_config_error(key, value, preset):
  """Set one key to anything: validation passes or raises ConfigError (or the ConfigDict's own
  TypeError for a value of the wrong type) — never an error from deep inside."""
  config = get_config(preset)
  *parents, leaf = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  try:
    node[leaf] = value
  except TypeError:
    return  # ml_collections refuses a value of another type, naming the field
  try:
    transfer.validate(config)
  except ConfigError as error:
    assert error.key in str(error)
