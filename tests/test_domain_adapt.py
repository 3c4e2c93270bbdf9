"""The domain adaptation experiment: the smoke preset runs end to end to a table, figure and provenance;
the paper preset's code path (svhn_cropped -> mnist, RotatedMNIST) runs on TFDS mock data; mismatched
domains and bad configs fail before training; the new embedded datasets build."""

import csv
import io
import json

import numpy as np
import pytest

from cnnjax import data
from cnnjax.errors import ConfigError, DataError
from experiments import domain_adapt
from experiments.configs.domain_adapt import get_config
from experiment_cli import flags, on_mock_data, run



def read_csv(path):
  return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
  run(['-m', 'experiments.domain_adapt', *flags('domain_adapt', tmp_path, 'smoke')], tmp_path)
  config = get_config('smoke')
  out = tmp_path / 'results' / 'domain_adapt' / 'smoke'
  for name in ('table.md', 'table.tex', 'table.csv', 'provenance.json', 'learning_curves.png', 'features_pca.png'):
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name
  assert (out / 'features_pca.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  labels = [domain_adapt.shift_label(s) for s in config.shifts]
  columns = [c for label in labels for c in (label, f'{label} source')]
  rows = read_csv(out / 'table.csv')
  assert [(r['row'], r['column']) for r in rows] == [(m, c) for m in config.methods for c in columns]
  assert all(r['n'] == str(config.seeds) and 0 <= float(r['mean']) <= 100 for r in rows)
  markdown = (out / 'table.md').read_text()
  assert 'Model selection by source validation only' in markdown and 'Expected:' in markdown
  assert json.loads((out / 'provenance.json').read_text())['preset'] == 'smoke'
  # The reported numbers are those of the evaluation with the best source-validation accuracy.
  work = tmp_path / 'work' / 'domain_adapt' / 'smoke'
  cell = next(p for p in work.iterdir() if p.name.startswith('cdan_e--'))
  result = json.loads((cell / 'result.json').read_text())
  for seed, step in enumerate(result['step']):
    records = [json.loads(line) for line in (cell / f'seed_{seed}' / 'metrics.jsonl').read_text().splitlines()]
    evals = [r for r in records if 'eval/val' in r]
    assert len(evals) == config.train.steps // config.eval_every
    best = max(r['eval/val'] for r in evals)
    chosen = next(r for r in evals if r['step'] == step)
    assert chosen['eval/val'] == best and abs(100 * chosen['eval/target'] - result['target'][seed]) < 1e-9


def test_validate_rejects_bad_values():
  for key, value in (('shifts', ('mnist_5k',)), ('shifts', ('mnist_5k->nope',)), ('methods', ('nope',)),
                     ('validation_fraction', 0.0), ('channels', 2), ('train.steps', 0), ('eval_every', -4), ('fit_size', 30)):
    config = get_config('smoke')
    parent, _, leaf = key.rpartition('.')
    (config[parent] if parent else config)[leaf] = value
    with pytest.raises(ConfigError):
      domain_adapt.validate(config)
  domain_adapt.validate(get_config('default'))


def test_mismatched_image_shapes_fail_before_training(tmp_path):
  config = get_config('smoke')
  config.shifts, config.channels = ['syn_digits->mnist_5k'], 0    # RGB source, grey target, no conversion
  config.workdir = str(tmp_path)
  with pytest.raises(DataError, match=r'\(28, 28, 3\) and \(28, 28, 1\) after preprocessing'):
    domain_adapt.DomainAdapt(experiment(config))
  assert not any(tmp_path.iterdir())


def experiment(config):
  from cnnjax.train import sharding
  from experiments import runner
  return runner.Experiment('domain_adapt', config, sharding.make_mesh())


def test_embedded_domains_build_with_their_shapes():
  syn, mnist_m = data.load_arrays('syn_digits', 'test'), data.load_arrays('mnist_m_5k', 'test')
  mnist = data.load_arrays('mnist_5k', 'test')
  assert syn['image'].shape == (1000, 28, 28, 3) and np.bincount(syn['label']).tolist() == [100] * 10
  assert mnist_m['image'].shape == (1000, 28, 28, 3)
  assert np.array_equal(mnist_m['label'], mnist['label'])      # the same digits, over photos
  assert syn['image'].std() > 20 and mnist_m['image'].std() > 20


# Paper preset on mock data ----------------------------------------------------------------------

MOCK = on_mock_data('domain_adapt', 'num_examples=40')

PAPER_OVERRIDES = ('--config.seeds=1', '--config.chunk_steps=1', '--config.train.steps=2', '--config.eval_every=1',
                   '--config.train.batch_size=8', '--config.eval_batch_size=8', '--config.progress=False',
                   '--config.adaptation.discriminator_width=8', "--config.methods=('source_only','dann')",
                   '--config.model_kwargs.width=4')


@pytest.mark.slow
def test_paper_preset_runs_to_a_table_on_mock_data(tmp_path):
  run(['-c', MOCK, *flags('domain_adapt', tmp_path, 'paper', *PAPER_OVERRIDES)], tmp_path)
  out = tmp_path / 'results' / 'domain_adapt' / 'paper'
  config = get_config('paper')
  rows = read_csv(out / 'table.csv')
  labels = [domain_adapt.shift_label(s) for s in config.shifts]
  published = {(r['row'], r['column']): float(r['mean']) for r in rows if r['column'].endswith('(published)')}
  assert published[('source_only', f'{labels[0]} (published)')] == 54.90
  assert published[('dann', f'{labels[0]} (published)')] == 73.85
  assert published[('source_only', f'{labels[1]} (published)')] == 98.0
  assert {r['column'] for r in rows} >= {labels[0], f'{labels[1]} source'}
  assert 'Ganin & Lempitsky 2015' in (out / 'table.md').read_text()


def test_mismatched_label_sets_fail_before_training(tmp_path):
  import tensorflow_datasets as tfds
  config = get_config('paper')
  config.shifts, config.workdir = ['cifar100->mnist'], str(tmp_path)
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=4):
    with pytest.raises(DataError, match='different label sets'):
      domain_adapt.DomainAdapt(experiment(config))
  assert not any(tmp_path.iterdir())
