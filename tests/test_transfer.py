"""The transfer experiment end to end: the smoke preset writes its table, figure and provenance and
a rerun trains nothing; the paper preset's code path (ResNet-20, CIFAR-100 -> CIFAR-10 / SVHN) runs
to a table on TFDS mock data. Both run as the command line runs them, in a subprocess."""

import csv
import io
import json

import jax
import numpy as np
import pytest

from cnnjax import tracking
from cnnjax.errors import ConfigError, DataError
from cnnjax.train import sharding
from experiments import runner, transfer
from experiments.configs.transfer import get_config
from experiment_cli import flags, on_mock_data, run

CSV_HEADER = 'experiment,preset,row,column,mean,std,n'
OUTPUTS = ('table.md', 'table.tex', 'table.csv', 'provenance.json', 'learning_curves.png')


def snapshot(root):
  """Every file under `root` with its size and modification time."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob('*')) if p.is_file()}


def read_csv(path):
  return list(csv.DictReader(io.StringIO(path.read_text())))


# Smoke preset -----------------------------------------------------------------------------------
# One test per subprocess run: under pytest-xdist a module fixture would run once per worker.

@pytest.mark.slow
def test_smoke_preset_end_to_end_and_rerun_skips(tmp_path):
  args = ['-m', 'experiments.transfer', *flags('transfer', tmp_path, 'smoke')]
  first, first_s = run(args, tmp_path)
  out, work = tmp_path / 'results' / 'transfer' / 'smoke', tmp_path / 'work' / 'transfer' / 'smoke'
  check_smoke_outputs(tmp_path, out)
  check_smoke_table(out)
  check_smoke_cells(out, work)
  cells_before = snapshot(tmp_path / 'work')
  table_before = (out / 'table.csv').read_text()

  again, again_s = run(args, tmp_path)
  config = get_config('smoke')
  cells = 1 + len(config.methods) * len(config.labels_per_class)
  assert first.count('done, skipped') == 0
  assert again.count('done, skipped') == cells, again
  # No cell directory changed: no checkpoint, metric or result was written again.
  assert snapshot(tmp_path / 'work') == cells_before
  assert (out / 'table.csv').read_text() == table_before
  assert again_s < first_s


def check_smoke_outputs(tmp, out):
  for name in OUTPUTS:
    path = out / name
    assert path.is_file() and path.stat().st_size > 0, name
  assert (out / 'learning_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'transfer/smoke/table.md' in (tmp / 'results' / 'README.md').read_text()

  provenance = json.loads((out / 'provenance.json').read_text())
  assert provenance['experiment'] == 'transfer' and provenance['preset'] == 'smoke'
  assert 'experiments/configs/transfer.py:smoke' in provenance['command']
  assert len(provenance['config_hash']) == 12
  assert provenance['versions']['jax'] and provenance['device']['count'] >= 1

  markdown = (out / 'table.md').read_text()
  assert provenance['config_hash'] in markdown
  for method in get_config('smoke').methods:
    assert f'| {method} |' in markdown
  assert r'\pm' in (out / 'table.tex').read_text()


def check_smoke_table(out):
  """table.csv: the fixed header, then one line per (method, labels per class) cell, in order."""
  config = get_config('smoke')
  text = (out / 'table.csv').read_text()
  assert text.splitlines()[0] == CSV_HEADER
  rows = read_csv(out / 'table.csv')
  columns = [f'{k}/class' if k else 'all' for k in config.labels_per_class]
  assert [(r['row'], r['column']) for r in rows] == [(m, c) for m in config.methods for c in columns]
  for r in rows:
    assert (r['experiment'], r['preset'], r['n']) == ('transfer', 'smoke', str(config.seeds))
    assert 0 <= float(r['mean']) <= 100 and float(r['std']) >= 0


def check_smoke_cells(out, work):
  """Each cell holds config, result, DONE, its checkpoints and one metrics.jsonl per seed, and the
  table's means are the means of the cells' results."""
  config = get_config('smoke')
  cells = sorted(p for p in work.iterdir() if p.is_dir())
  assert len(cells) == 1 + len(config.methods) * len(config.labels_per_class)
  rows = read_csv(out / 'table.csv')
  for cell in cells:
    for name in ('config.json', 'result.json', 'DONE'):
      assert (cell / name).is_file(), cell / name
    result = json.loads((cell / 'result.json').read_text())
    assert len(result['accuracy']) == config.seeds
    steps = config.pretrain.steps if cell.name.startswith('pretrain--') else config.finetune.steps
    assert sorted(int(p.name) for p in (cell / 'checkpoints').iterdir() if p.name.isdigit())[-1] == steps
    for seed in range(config.seeds):
      records = tracking.read_metrics(cell / f'seed_{seed}')
      assert records[-1]['step'] == steps and 'eval/accuracy' in records[-1]
      assert abs(100 * records[-1]['eval/accuracy'] - result['accuracy'][seed]) < 1e-3
    if not cell.name.startswith('pretrain--'):
      cell_config = json.loads((cell / 'config.json').read_text())
      column = f'{cell_config["labels_per_class"]}/class' if cell_config['labels_per_class'] else 'all'
      line = next(r for r in rows if (r['row'], r['column']) == (cell_config['method'], column))
      assert abs(float(line['mean']) - np.mean(result['accuracy'])) < 1e-6


# Pieces -----------------------------------------------------------------------------------------

def test_labelled_subset_draws_k_per_class_by_seed():
  labels = np.repeat(np.arange(4), 5)
  subset = transfer.labelled_subset(labels, 2, seed=0)
  count, index = int(subset['count']), np.asarray(subset['index'])
  assert count == 8
  # Every subset has the split's shape (one compiled program for every label budget).
  assert index.shape == labels.shape
  chosen = index[:count]
  assert len(set(chosen.tolist())) == count
  assert np.array_equal(np.bincount(labels[chosen]), [2, 2, 2, 2])
  again = transfer.labelled_subset(labels, 2, seed=0)
  assert np.array_equal(np.asarray(again['index']), index)
  others = [np.asarray(transfer.labelled_subset(labels, 2, seed=s)['index']) for s in range(1, 6)]
  assert any(not np.array_equal(o, index) for o in others)
  everything = transfer.labelled_subset(labels, 0, seed=0)
  assert int(everything['count']) == 20 and sorted(np.asarray(everything['index']).tolist()) == list(range(20))
  with pytest.raises(DataError, match='fewer than 6 labels per class'):
    transfer.labelled_subset(labels, 6, seed=0)


def test_more_labels_per_class_than_the_target_has_fail_before_training(tmp_path):
  config = get_config('smoke')
  config.labels_per_class, config.workdir = (5, 1000), str(tmp_path)
  with pytest.raises(ConfigError, match=r"labels_per_class = 1000 .* at most 1\d\d .* sklearn_digits's smallest class"):
    transfer.Transfer(runner.Experiment('transfer', config, sharding.make_mesh()))
  assert not any(tmp_path.iterdir())


def test_a_model_that_is_no_classifier_fails_before_training(tmp_path):
  config = get_config('smoke')
  config.model, config.workdir = 'unet', str(tmp_path)
  with pytest.raises(ConfigError, match="config.model = 'unet' is not allowed; allowed: a classifier"):
    transfer.Transfer(runner.Experiment('transfer', config, sharding.make_mesh()))
  assert not any(tmp_path.iterdir())


def test_device_batch_size_fits_small_subsets():
  devices = jax.device_count()
  for wanted, n in ((32, 10), (32, 100), (8 * devices, 3 * devices + 1)):
    size = transfer.device_batch_size(wanted, n)
    assert size % devices == 0 and devices <= size <= max(devices, min(wanted, n))
  if devices == 1:
    assert transfer.device_batch_size(32, 10) == 10 and transfer.device_batch_size(32, 100) == 32


# Paper preset on mock data ----------------------------------------------------------------------

PAPER_ON_MOCK_DATA = on_mock_data('transfer', 'num_examples=24')

# The paper's model, data, targets and methods; only sizes shrink: one seed, one step per phase in
# chunks of one step (the paper's chunk of ten unrolled ResNet-20 steps would make compiling the
# test's main cost), batches of 8, 1 label per class, 24 mock examples per split.
PAPER_OVERRIDES = ('--config.seeds=1', '--config.chunk_steps=1', '--config.pretrain.steps=1',
                   '--config.finetune.steps=1', '--config.pretrain.batch_size=8', '--config.finetune.batch_size=8',
                   '--config.eval_batch_size=8', '--config.labels_per_class=(1,)', '--config.progress=False',
                   # Two methods: each compiles its own ResNet-20 programs (the smoke preset runs three).
                   "--config.methods=('scratch','l2sp')")


@pytest.mark.slow
def test_paper_preset_runs_to_a_table_on_mock_data(tmp_path):
  run(['-c', PAPER_ON_MOCK_DATA, *flags('transfer', tmp_path, 'paper', *PAPER_OVERRIDES)], tmp_path)
  out = tmp_path / 'results' / 'transfer' / 'paper'
  config = get_config('paper')
  assert config.model == 'resnet20_cifar' and config.source == 'cifar100'
  for name in OUTPUTS:
    assert (out / name).is_file(), name
  rows = read_csv(out / 'table.csv')
  columns = [f'{target} 1/class' for target in config.targets]
  assert [(r['row'], r['column']) for r in rows] == [(m, c) for m in ('scratch', 'l2sp') for c in columns]
  assert all(r['n'] == '1' and r['preset'] == 'paper' and 0 <= float(r['mean']) <= 100 for r in rows)
  markdown = (out / 'table.md').read_text()
  assert 'cifar100 -> cifar10, svhn_cropped' in markdown and 'resnet20_cifar' in markdown
  provenance = json.loads((out / 'provenance.json').read_text())
  assert provenance['preset'] == 'paper'
