"""Tables: mean ± std with n, long csv, failed and published cells, provenance, index, figures."""

import csv
import json
import subprocess

import numpy as np
import pytest

from cnnjax import ops, tables
from cnnjax.tables import Table, plot_curves, provenance, provenance_markdown, write_index

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def make_table():
  table = Table('domain_adapt', 'smoke', 'Target accuracy (%)', caption='MNIST -> USPS.')
  for value in (90.0, 92.0, 94.0):
    table.add('ERM', 'acc', value)
  table.add('ERM', 'ece', 0.05)
  table.add('DANN', 'acc', 95.0)
  table.mark_failed('DANN', 'ece', 'NaN loss at step 40')
  table.add_published('DANN', 'acc', 96.5, 'Ganin et al. 2016, Table 2')
  return table


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.reader(f))


def test_cells_render_mean_sample_std_and_n():
  table = make_table()
  assert table.render('ERM', 'acc') == '92.000 ± 2.000 (n=3)'  # sample std of 90, 92, 94
  assert table.render('ERM', 'ece') == '0.050 ± 0.000 (n=1)'
  assert table.render('DANN', 'ece') == 'failed: NaN loss at step 40'
  assert table.render('DANN', 'acc (published)') == '96.500 [1]'
  assert table.render('ERM', 'acc (published)') == '—'
  assert table.header() == ['acc', 'acc (published)', 'ece']


def test_partly_failed_cell_keeps_values_and_counts_failures():
  table = Table('e', 'p', 't')
  table.add('A', 'acc', 1.0)
  table.add('A', 'acc', 3.0)
  table.mark_failed('A', 'acc', 'diverged')
  assert table.render('A', 'acc') == f'2.000 ± {np.sqrt(2):.3f} (n=2), 1 failed'


def test_write_markdown_latex_csv_provenance(tmp_path):
  info = provenance('./run.sh domain_adapt --config.seeds=3', 'abc123', seeds=3)
  out = make_table().write(tmp_path / 'domain_adapt' / 'smoke', info)
  markdown = (out / 'table.md').read_text()
  assert markdown.startswith('# Target accuracy (%)\n')
  assert 'MNIST -> USPS. Cells: mean ± sample std (ddof=1; 0 when n=1)' in markdown
  assert '| ERM | 92.000 ± 2.000 (n=3) | — | 0.050 ± 0.000 (n=1) |' in markdown
  assert '| DANN | 95.000 ± 0.000 (n=1) | 96.500 [1] | failed: NaN loss at step 40 |' in markdown
  assert '[1] Ganin et al. 2016, Table 2' in markdown
  assert '`./run.sh domain_adapt --config.seeds=3`' in markdown and info['date'] in markdown
  latex = (out / 'table.tex').read_text()
  assert latex.startswith(r'\begin{tabular}{lccc}') and r'\toprule' in latex and r'\bottomrule' in latex
  assert r'92.000 $\pm$ 2.000 (n=3)' in latex and r'Target' not in latex
  rows = read_csv(out / 'table.csv')
  assert rows[0] == ['experiment', 'preset', 'row', 'column', 'mean', 'std', 'n']
  by_cell = {(r[2], r[3]): r[4:] for r in rows[1:]}
  assert len(by_cell) == len(rows) - 1 == 5
  assert by_cell['ERM', 'acc'] == ['92.0', '2.0', '3']
  assert by_cell['ERM', 'ece'] == ['0.05', '0.0', '1']
  assert by_cell['DANN', 'ece'] == ['', '', '0']
  assert by_cell['DANN', 'acc (published)'] == ['96.5', '', '0']
  assert all(r[:2] == ['domain_adapt', 'smoke'] for r in rows[1:])
  saved = json.loads((out / 'provenance.json').read_text())
  assert saved['title'] == 'Target accuracy (%)' and saved['config_hash'] == 'abc123'
  assert not list(out.glob('.*tmp'))


def test_provenance_has_commit_versions_command_and_no_environment(monkeypatch):
  monkeypatch.setenv('WANDB_API_KEY', 'very-secret-key')
  info = provenance(['python', '-m', 'experiments.x', '--config.lr=0.1 '], 'h1', preset='smoke')
  assert info['command'] == "python -m experiments.x '--config.lr=0.1 '"
  assert info['config_hash'] == 'h1' and info['preset'] == 'smoke'
  assert {'git_commit', 'git_dirty', 'date', 'python', 'device'} <= set(info)
  assert info['versions']['jax'] and info['versions']['numpy'] and 'orbax-checkpoint' in info['versions']
  assert info['device']['count'] >= 1 and info['device']['platform'] == 'cpu'
  # What decides a CPU run's sums: the tests take oneDNN's convolutions (tests/conftest.py) where they build.
  assert info['device']['convolutions'] == ('oneDNN' if ops.onednn_available() else 'XLA') and info['device']['cpu']
  assert f"{info['device']['cpu']} with {info['device']['convolutions']} convolutions." in provenance_markdown(info)
  assert info['date'].endswith('+00:00')
  text = json.dumps(info)
  assert 'very-secret-key' not in text and 'PATH' not in text


def test_dirty_means_code_changed_not_results(tmp_path):
  git = lambda *args: subprocess.run(['git', *args], cwd=tmp_path, check=True, capture_output=True)
  git('init', '-q')
  (tmp_path / 'results').mkdir()
  (tmp_path / 'results' / 'table.md').write_text('old')
  (tmp_path / 'train.py').write_text('lr = 0.1')
  git('add', '.')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'start')
  (tmp_path / 'results' / 'table.md').write_text('new')  # a run writes its table
  assert tables.code_changed(tmp_path / 'results') is False
  (tmp_path / 'train.py').write_text('lr = 0.2')
  assert tables.code_changed(tmp_path / 'results') is True


def test_provenance_without_git(monkeypatch):
  run = tables.subprocess.run

  def no_git(args, *rest, **kwargs):
    if args[0] == 'git':
      raise FileNotFoundError('git')
    return run(args, *rest, **kwargs)  # e.g. the C++ compiler that builds the oneDNN convolutions
  monkeypatch.setattr(tables.subprocess, 'run', no_git)
  info = provenance('cmd', 'h')
  assert info['git_commit'] is None and info['git_dirty'] is None


def test_index_lists_every_table(tmp_path):
  for experiment, title in (('robustness', 'PGD accuracy'), ('domain_adapt', 'Target accuracy')):
    table = Table(experiment, 'default', title)
    table.add('ERM', 'acc', 1.0)
    table.write(tmp_path / experiment / 'default', provenance(f'./run.sh {experiment}', 'h'))
  index = write_index(tmp_path).read_text()
  lines = [line for line in index.splitlines() if line.startswith('| ') and 'default' in line]
  assert len(lines) == 2 and 'domain_adapt' in lines[0] and 'robustness' in lines[1]
  assert '[Target accuracy](domain_adapt/default/table.md)' in lines[0]
  assert '`./run.sh robustness`' in lines[1]
  assert 'Notes' not in index
  (tmp_path / 'robustness' / 'NOTES.md').write_text('# What the runs showed\n')
  assert write_index(tmp_path).read_text().splitlines()[-1] == 'Notes: [robustness](robustness/NOTES.md)'


def test_plot_curves_writes_png(tmp_path):
  runs = [[(step, 1.0 / (step + 1) + seed * 0.01) for step in range(5)] for seed in range(3)]
  single = [(step, 0.5) for step in range(0, 5, 2)]
  path = tmp_path / 'figs' / 'loss.png'
  plot_curves({'ERM': runs, 'DANN': single}, path, ylabel='loss', title='Training loss')
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


@pytest.mark.parametrize('values, expected', [([2.0], (2.0, 0.0)), ([1.0, 3.0], (2.0, np.sqrt(2)))])
def test_mean_std_uses_sample_std(values, expected):
  assert tables.mean_std(values) == pytest.approx(expected)
