"""Experiments run as their command line runs them, in a subprocess, for the experiment tests
(a helper module, not collected by pytest)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, tmp, timeout=420):
  """`python ARGS` in the repository with the test session's data dir and nothing written to $HOME;
  returns (stdout, seconds)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', MPLCONFIGDIR=str(tmp / 'mpl'), WANDB_MODE='disabled')
  started = time.time()
  done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, f'{args}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}'
  return done.stdout, time.time() - started


def flags(experiment, tmp, preset, *extra):
  """The command-line flags of a run of `experiment` at `preset` that writes only under `tmp` (and
  the session's compile cache, tests/conftest.py)."""
  return [f'--config=experiments/configs/{experiment}.py:{preset}', f'--config.workdir={tmp / "work"}',
          f'--config.results_dir={tmp / "results"}',
          f'--config.compile_cache={os.environ["JAX_COMPILATION_CACHE_DIR"]}',
          '--config.wandb.mode=disabled', *extra]


def on_mock_data(experiment, mock_arguments, prelude=''):
  """A `python -c` script that runs `experiment`'s command line inside `tfds.testing.mock_data(...)`:
  the catalog datasets of a `paper` preset, generated from their TFDS code instead of downloaded.
  `prelude` may define what `mock_arguments` names."""
  return '\n'.join([
      'import sys',
      'import tensorflow_datasets as tfds',
      f'from experiments import runner, {experiment}',
      textwrap.dedent(prelude),
      f"sys.argv = ['experiments.{experiment}', *sys.argv[1:]]",
      f'with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, {mock_arguments}):',
      f"  runner.command_line('{experiment}', {experiment}.main)",
  ])
