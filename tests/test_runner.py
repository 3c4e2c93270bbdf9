"""The experiment runner: a grid of cells runs each cell once, records failures and goes on,
reruns unfinished cells, and resumes a cell's training from its last checkpoint."""

import gc
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest

from cnnjax import config as cfg
from cnnjax import data, models, tracking
from cnnjax.methods.classification import cross_entropy
from cnnjax.train import loop, sharding, state as train_state, steps
from experiment_cli import run
from experiments import runner


def make_config(tmp_path, **overrides):
  config = cfg.base_config('unit', 'smoke')
  config.workdir = str(tmp_path / 'work')
  config.results_dir = str(tmp_path / 'results')
  config.compile_cache = ''
  config.progress = False
  config.wandb.mode = 'disabled'
  config.update(overrides)
  return config


@pytest.fixture
def experiment(tmp_path):
  return runner.Experiment('unit', make_config(tmp_path), mesh=None)


def grid():
  return [runner.Cell(row, column, dict(method=row, labels=column, seeds=[0, 1]))
          for row in ('erm', 'dann') for column in ('1', 'all')]


class Counting:
  """A run_cell that counts its calls and can fail chosen cells."""

  def __init__(self, fail=None, error=None):
    self.calls, self.fail, self.error = [], fail, error

  def __call__(self, cell, cell_dir):
    self.calls.append((cell.row, cell.column))
    assert (cell_dir / 'config.json').exists(), 'config.json is written before the cell runs'
    if (cell.row, cell.column) == self.fail:
      raise self.error
    return {'accuracy': [len(self.calls), 0.5], 'cell': f'{cell.row}/{cell.column}'}


def test_cell_directory_names_row_column_and_hash():
  cell = runner.Cell('fine tune/all', '10 labels', dict(lr=0.1, seeds=[0]))
  assert cell.dirname == f'fine_tune_all--10_labels--{cell.hash}'
  assert cell.hash == cfg.config_hash({'lr': 0.1, 'seeds': [0]})
  assert runner.Cell('a', 'b', dict(lr=0.2, seeds=[0])).hash != cell.hash
  # Cells are keys by (row, column); the config does not take part.
  assert runner.Cell('a', 'b', {'x': 1}) == runner.Cell('a', 'b', {'x': 2})


def test_grid_runs_each_cell_once_and_skips_finished_ones(experiment, capsys):
  cells, run_cell = grid(), Counting()
  first = experiment.run_grid(cells, run_cell)
  assert run_cell.calls == [(c.row, c.column) for c in cells]
  assert list(first) == cells
  root = experiment.root
  assert root == Path(experiment.config.workdir) / 'unit' / 'smoke'
  for cell in cells:
    cell_dir = root / cell.dirname
    assert json.loads((cell_dir / 'config.json').read_text()) == cell.config
    assert json.loads((cell_dir / runner.RESULT_FILE).read_text()) == first[cell]
    assert (cell_dir / runner.DONE_FILE).exists()
  capsys.readouterr()

  again = experiment.run_grid(grid(), run_cell)
  assert len(run_cell.calls) == len(cells), 'finished cells must not run again'
  assert {(c.row, c.column): r for c, r in again.items()} == {(c.row, c.column): r for c, r in first.items()}
  assert capsys.readouterr().out.count('done, skipped') == len(cells)


def test_non_finite_cell_is_recorded_as_failed_and_the_grid_goes_on(experiment):
  cells = grid()
  run_cell = Counting(fail=('erm', 'all'), error=loop.NonFiniteError(40, 1, {'loss': float('nan')}))
  results = experiment.run_grid(cells, run_cell)
  assert run_cell.calls == [(c.row, c.column) for c in cells]
  failed = results[cells[1]]
  assert set(failed) == {'failed'} and 'step 40' in failed['failed'] and 'member 1' in failed['failed']
  cell_dir = experiment.root / cells[1].dirname
  assert json.loads((cell_dir / runner.RESULT_FILE).read_text()) == failed
  assert (cell_dir / runner.DONE_FILE).exists()
  assert all('accuracy' in results[c] for c in cells if c is not cells[1])
  # A failure is a result: the rerun does not try again.
  experiment.run_grid(cells, run_cell)
  assert len(run_cell.calls) == len(cells)


def test_other_errors_stop_the_grid_and_the_cell_reruns(experiment):
  cells = grid()
  crashing = Counting(fail=('dann', '1'), error=RuntimeError('killed'))
  with pytest.raises(RuntimeError, match='killed'):
    experiment.run_grid(cells, crashing)
  crashed = experiment.root / cells[2].dirname
  assert (crashed / 'config.json').exists()
  assert not (crashed / runner.DONE_FILE).exists() and not (crashed / runner.RESULT_FILE).exists()

  rerun = Counting()
  results = experiment.run_grid(cells, rerun)
  assert rerun.calls == [('dann', '1'), ('dann', 'all')]
  assert all((experiment.root / c.dirname / runner.DONE_FILE).exists() for c in cells)
  assert len(results) == len(cells)


def test_cell_without_done_marker_is_rerun(experiment):
  cells, run_cell = grid(), Counting()
  experiment.run_grid(cells, run_cell)
  (experiment.root / cells[3].dirname / runner.DONE_FILE).unlink()
  experiment.run_grid(cells, run_cell)
  assert run_cell.calls[len(cells):] == [(cells[3].row, cells[3].column)]


# Training a cell --------------------------------------------------------------------------------

SEEDS, SIZE, BATCH, CHUNK = [0, 1], 8, 8, 5


@pytest.fixture(scope='module')
def program():
  """A tiny two-seed training set-up as the experiments build it (compiled once for the module)."""
  tx = optax.adam(1e-2)
  cnns = [models.build('digit_cnn', num_classes=4, seed=s, size=SIZE, width=4) for s in SEEDS]
  graphdef = train_state.split_model(cnns[0])[0]
  mesh = sharding.make_mesh(1)
  batch_fn = lambda split, state: sharding.shard_batch(
      data.device_batch(split, state.key('data'), state.step, BATCH), mesh)
  chunk = steps.over_members(steps.make_chunk(steps.make_train_step(graphdef, tx, cross_entropy), batch_fn,
                                              CHUNK), 'sequential')
  rng = np.random.default_rng(0)
  splits = [{'image': rng.uniform(size=(24, SIZE, SIZE, 1)).astype(np.float32),
             'label': rng.integers(0, 4, 24).astype(np.int32)} for _ in SEEDS]
  source = sharding.replicate(train_state.stack(splits), mesh)
  fresh = lambda: sharding.replicate(
      train_state.stack([train_state.create(m, tx, s) for m, s in zip(cnns, SEEDS)]), mesh)
  return chunk, source, fresh


def test_train_resumes_a_cell_from_its_last_checkpoint(tmp_path, program):
  chunk, source, fresh = program
  experiment = runner.Experiment('unit', make_config(tmp_path, checkpoint_every=5, chunk_steps=CHUNK), None)
  straight = runner.Cell('erm', 'all', dict(seeds=SEEDS, run='straight'))
  resumed = runner.Cell('erm', 'all', dict(seeds=SEEDS, run='resumed'))
  dirs = {cell: experiment.root / cell.dirname for cell in (straight, resumed)}

  expected, _ = experiment.train(straight, dirs[straight], fresh(), source, chunk_fn=chunk, total_steps=15)
  experiment.train(resumed, dirs[resumed], fresh(), source, chunk_fn=chunk, total_steps=10)
  # The second call starts from fresh states but picks up the cell's checkpoint at step 10.
  states, _ = experiment.train(resumed, dirs[resumed], fresh(), source, chunk_fn=chunk, total_steps=15)

  assert int(np.asarray(states.step)[0]) == 15
  for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(expected)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  for s in SEEDS:
    want = tracking.read_metrics(dirs[straight] / f'seed_{s}')
    assert [r['step'] for r in want] == [5, 10, 15]
    assert tracking.read_metrics(dirs[resumed] / f'seed_{s}') == want

  curves = runner.curves_from({'erm': dirs[straight]}, SEEDS, 'train/loss')
  assert [[step for step, _ in run] for run in curves['erm']] == [[5, 10, 15]] * len(SEEDS)
  assert curves['erm'][0][0][1] == tracking.read_metrics(dirs[straight] / 'seed_0')[0]['train/loss']


def test_train_writes_each_seeds_final_eval_to_its_summary(tmp_path, program):
  chunk, source, fresh = program
  experiment = runner.Experiment('unit', make_config(tmp_path, checkpoint_every=5, chunk_steps=CHUNK), None)
  cell = runner.Cell('erm', 'all', dict(seeds=SEEDS))
  evaluate = lambda states: {'accuracy': np.asarray(states.step, np.float32) / 10 + np.arange(len(SEEDS))}
  experiment.train(cell, experiment.root / cell.dirname, fresh(), source, chunk_fn=chunk, total_steps=5,
                   evaluate=evaluate)
  for m, s in enumerate(SEEDS):
    summary = json.loads((experiment.root / cell.dirname / f'seed_{s}' / 'summary.json').read_text())
    assert summary == {'eval/accuracy': pytest.approx(0.5 + m)}


def test_two_runs_into_one_workdir_share_the_cells(tmp_path):
  """Two sweeps at once (threads here; flock works the same across processes): every cell is
  computed once, and both end with every cell's result."""
  import threading
  import time
  cells = [runner.Cell('erm', f'setting {i}', dict(seeds=[0], i=i)) for i in range(6)]
  computed = []

  def run_cell(cell, cell_dir):
    computed.append(cell.config['i'])
    time.sleep(0.05)
    return {'accuracy': [float(cell.config['i'])]}

  outputs = [None, None]

  def sweep(k):
    outputs[k] = runner.Experiment('unit', make_config(tmp_path), None).run_grid(cells, run_cell)

  threads = [threading.Thread(target=sweep, args=(k,)) for k in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert sorted(computed) == list(range(6))
  assert outputs[0] == outputs[1] == {cell: {'accuracy': [float(cell.config['i'])]} for cell in cells}


def test_setup_hides_what_is_alive_from_the_garbage_collector():
  """Objects alive at set-up (modules, JAX, Flax) are frozen: full collections skip them."""
  config = cfg.base_config('unit', 'smoke')
  config.compile_cache = ''
  alive = [1.0]
  try:
    runner.setup(config, lambda config: None)
    assert gc.get_freeze_count() > 0
    assert not any(o is alive for o in gc.get_objects())
  finally:
    gc.unfreeze()
  assert any(o is alive for o in gc.get_objects())


def test_setup_keeps_small_programs_in_the_compile_cache(tmp_path):
  """A second run compiles nothing: the runner's persistent cache keeps programs that compile in
  milliseconds (initialisers, data steps), not only slow ones. The script drops the threshold the
  test session sets (tests/conftest.py), so that the runner's own applies."""
  script = '\n'.join([
      'import os, sys',
      "del os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']",
      'import jax',
      'from cnnjax import config as cfg',
      'from experiments import runner',
      "config = cfg.base_config('unit', 'smoke')",
      'config.compile_cache = sys.argv[1]',
      'runner.setup(config, lambda config: None)',
      'jax.jit(lambda x: x + 1)(1.0).block_until_ready()'])
  run(['-c', script, str(tmp_path / 'cache')], tmp_path)
  assert any((tmp_path / 'cache').iterdir())
