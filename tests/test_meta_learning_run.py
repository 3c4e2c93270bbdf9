"""The meta-learning experiment end to end, as the command line runs it (in a subprocess): the smoke
preset writes its table with every method and a rerun trains nothing; the paper preset's code path
(TFDS omniglot, Vinyals-style class ranges, rotations as new classes, published numbers) runs to a
table on mock data."""

import csv
import io
import json

import pytest

from experiments.configs.meta_learning import get_config
from experiment_cli import flags, on_mock_data, run


def rows_of(out):
  return list(csv.DictReader(io.StringIO((out / 'table.csv').read_text())))


@pytest.mark.slow
def test_smoke_preset_writes_the_table_and_a_rerun_trains_nothing(tmp_path):
  args = ['-m', 'experiments.meta_learning', *flags('meta_learning', tmp_path, 'smoke')]
  first, _ = run(args, tmp_path)
  out = tmp_path / 'results' / 'meta_learning' / 'smoke'
  config = get_config('smoke')
  columns = [f'{w}-way {k}-shot' for w, k in config.settings]
  rows = rows_of(out)
  assert [(r['row'], r['column']) for r in rows] == [
      (m, c) for m in config.methods for c in [*columns, 'meta-train time (s)']]
  for r in rows:
    if r['column'] in columns:  # every test episode of every seed is one value
      assert int(r['n']) == config.test_episodes * config.seeds and 0 <= float(r['mean']) <= 100
  markdown = (out / 'table.md').read_text()
  assert '95% confidence interval' in markdown and 'Expected: every method above nearest neighbour' in markdown
  provenance = json.loads((out / 'provenance.json').read_text())
  assert provenance['preset'] == 'smoke' and provenance['config_hash'] in markdown
  cells = sorted(p.name for p in (tmp_path / 'work' / 'meta_learning' / 'smoke').iterdir())
  assert len(cells) == len(config.methods)  # one way count in smoke: one cell per method
  for cell in (tmp_path / 'work' / 'meta_learning' / 'smoke').iterdir():
    result = json.loads((cell / 'result.json').read_text())
    assert set(result['accuracy']) == set(columns)
  again, _ = run(args, tmp_path)
  assert first.count('done, skipped') == 0 and again.count('done, skipped') == len(config.methods)
  assert rows_of(out) == rows


PAPER_ON_MOCK_DATA = on_mock_data('meta_learning', 'as_data_source_fn=omniglot', prelude='''
    import numpy as np

    def omniglot(self, split=None, **kwargs):
      """Omniglot-shaped records: 105x105 RGB, black strokes on white, 2 drawings of 6 characters in
      each of the paper's meta-train, meta-val and meta-test label ranges."""
      rng = np.random.default_rng(0)
      labels = [lo + c for lo in (0, 1028, 1200) for c in range(6) for _ in range(2)]
      return [{'image': np.where(rng.uniform(size=(105, 105, 3)) < 0.1, 0, 255).astype(np.uint8),
               'label': label, 'alphabet': 0, 'alphabet_char_id': 0} for label in labels]
''')

# The paper's data path, model and settings shrunk: 6 characters x 4 rotations per range, 5-way
# 1-shot only, one query, a step of each method; the paper's width (64) is kept.
PAPER_OVERRIDES = ('--config.methods=("nearest_neighbour","protonet","maml")', '--config.settings=((5,1),)',
                   '--config.test_queries=1', '--config.test_episodes=4', '--config.val_episodes=2',
                   '--config.protonet.ways=5', '--config.protonet.shots=1', '--config.protonet.queries=1',
                   '--config.protonet.steps=1', '--config.maml.train_ways=(5,)', '--config.maml.queries=1',
                   '--config.maml.tasks=1', '--config.maml.steps=1', '--config.maml.test_inner_steps=1',
                   '--config.checkpoint_every=0', '--config.progress=False')


@pytest.mark.slow
def test_paper_preset_runs_to_a_table_on_mock_data(tmp_path):
  run(['-c', PAPER_ON_MOCK_DATA, *flags('meta_learning', tmp_path, 'paper', *PAPER_OVERRIDES)], tmp_path)
  out = tmp_path / 'results' / 'meta_learning' / 'paper'
  config = get_config('paper')
  assert config.dataset == 'omniglot' and config.rotations and config.width == 64
  rows = rows_of(out)
  assert [(r['row'], r['column']) for r in rows if r['column'] == '5-way 1-shot'] == [
      ('nearest_neighbour', '5-way 1-shot'), ('protonet', '5-way 1-shot'), ('maml', '5-way 1-shot')]
  published = {r['row']: float(r['mean']) for r in rows if r['column'] == '5-way 1-shot (published)'}
  assert published == {'protonet': 98.8, 'maml': 98.7}
  markdown = (out / 'table.md').read_text()
  assert '24 meta-train, 24 meta-val, 24 meta-test classes' in markdown  # 6 characters x 4 rotations
  assert 'Finn, Abbeel & Levine 2017' in markdown
