"""The meta-learning experiment end to end, as the command line runs it (in a subprocess): the smoke
preset writes its table with every method and a rerun trains nothing; the paper preset's code path
(TFDS omniglot, Vinyals-style class ranges, rotations as new classes, published numbers) runs to a
table on mock data."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from experiments.configs.meta_learning import get_config

REPO = Path(__file__).resolve().parents[1]


def run(args, tmp, timeout=420):
  """The command in a subprocess."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', MPLCONFIGDIR=str(tmp / 'mpl'), WANDB_MODE='disabled')
  done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, f'{args}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}'
  return done.stdout


def flags(tmp, preset, *extra):
  return [f'--config=experiments/configs/meta_learning.py:{preset}', f'--config.workdir={tmp / "work"}',
          f'--config.results_dir={tmp / "results"}', f'--config.compile_cache={tmp.parent / "jax-cache"}',
          '--config.wandb.mode=disabled', *extra]


def rows_of(out):
  return list(csv.DictReader(io.StringIO((out / 'table.csv').read_text())))


def test_smoke_preset_writes_the_table_and_a_rerun_trains_nothing(tmp_path):
  args = ['-m', 'experiments.meta_learning', *flags(tmp_path, 'smoke')]
  first = run(args, tmp_path)
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
  again = run(args, tmp_path)
  assert first.count('done, skipped') == 0 and again.count('done, skipped') == len(config.methods)
  assert rows_of(out) == rows


PAPER_ON_MOCK_DATA = textwrap.dedent('''
    import sys
    import numpy as np
    import tensorflow_datasets as tfds
    from absl import app
    from ml_collections import config_flags
    from experiments import meta_learning

    def omniglot(self, split=None, **kwargs):
      """Omniglot-shaped records: 105x105 RGB, black strokes on white, 2 drawings of 6 characters in
      each of the paper's meta-train, meta-val and meta-test label ranges."""
      rng = np.random.default_rng(0)
      labels = [lo + c for lo in (0, 1028, 1200) for c in range(6) for _ in range(2)]
      return [{'image': np.where(rng.uniform(size=(105, 105, 3)) < 0.1, 0, 255).astype(np.uint8),
               'label': label, 'alphabet': 0, 'alphabet_char_id': 0} for label in labels]

    sys.argv = ['experiments.meta_learning', *sys.argv[1:]]
    CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=omniglot):
      app.run(lambda argv: meta_learning.main(CONFIG.value))
''')

# The paper's data path, model and settings shrunk: 6 characters x 4 rotations per range, 5-way
# 1-shot only, one query, a step of each method; the paper's width (64) is kept.
PAPER_OVERRIDES = ('--config.methods=("nearest_neighbour","protonet","maml")', '--config.settings=((5,1),)',
                   '--config.test_queries=1', '--config.test_episodes=4', '--config.val_episodes=2',
                   '--config.protonet.ways=5', '--config.protonet.shots=1', '--config.protonet.queries=1',
                   '--config.protonet.steps=1', '--config.maml.train_ways=(5,)', '--config.maml.queries=1',
                   '--config.maml.tasks=1', '--config.maml.steps=1', '--config.maml.test_inner_steps=1',
                   '--config.checkpoint_every=0', '--config.progress=False')


def test_paper_preset_runs_to_a_table_on_mock_data(tmp_path):
  run(['-c', PAPER_ON_MOCK_DATA, *flags(tmp_path, 'paper', *PAPER_OVERRIDES)], tmp_path)
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
