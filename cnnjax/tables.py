"""Run results -> paper-style tables (.md, .tex, long .csv) with provenance, curves and an index.

Cells show `mean ± std (n=N)` over seeds, std being the sample std (ddof=1; 0 when n=1).
Published numbers sit in a column of their own, `<column> (published)`, right after ours, each
marked `[k]` with its source listed under the table; in the long table.csv a published number is
a line of its own with column `<column> (published)`, empty std and n=0 (no seeds of ours).
Tables are written by code, never by hand.
"""

import csv
import importlib.metadata
import io
import json
import platform
import shlex
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cnnjax.tracking import write_atomic

CSV_COLUMNS = ('experiment', 'preset', 'row', 'column', 'mean', 'std', 'n')
PUBLISHED = ' (published)'
STD_NOTE = 'Cells: mean ± sample std (ddof=1; 0 when n=1) over n seeds.'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets', 'grain',
            'numpy', 'wandb')


def mean_std(values):
  """Mean and sample std (ddof=1; 0 for a single value) of a cell's per-seed values."""
  values = np.asarray(values, dtype=float)
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  return float(values.mean()), float(std)


@dataclass
class Cell:
  """One table cell: our per-seed values, failure reasons and an optional published number."""
  values: list = field(default_factory=list)
  failures: list = field(default_factory=list)
  published: tuple | None = None  # (value, source)


class Table:
  """Per-seed values by (row, column), rendered as md/tex/csv; rows and columns keep insertion order."""

  def __init__(self, experiment, preset, title, caption='', digits=3):
    self.experiment, self.preset, self.title, self.caption = experiment, preset, title, caption
    self.digits = digits
    self.rows, self.columns, self.cells = [], [], {}

  def _cell(self, row, column):
    if row not in self.rows:
      self.rows.append(row)
    if column not in self.columns:
      self.columns.append(column)
    return self.cells.setdefault((row, column), Cell())

  def add(self, row, column, value):
    """Adds one seed's value to a cell."""
    self._cell(row, column).values.append(float(value))

  def add_published(self, row, column, value, source):
    """Sets the published number for a cell, shown in the `<column> (published)` column."""
    self._cell(row, column).published = (float(value), source)

  def mark_failed(self, row, column, reason):
    """Records a failed seed of a cell; a cell with no value left renders as `failed: reason`."""
    self._cell(row, column).failures.append(reason)

  def sources(self):
    """Published sources in first-use order; their 1-based index is the `[k]` mark."""
    found = [c.published[1] for c in self._cells_in_order() if c.published]
    return list(dict.fromkeys(found))

  def _cells_in_order(self):
    return [self.cells[r, c] for r in self.rows for c in self.columns if (r, c) in self.cells]

  def header(self):
    """Display columns: each of ours, followed by its published column when it has one."""
    out = []
    for column in self.columns:
      cells = [self.cells.get((row, column)) for row in self.rows]
      if any(c and (c.values or c.failures) for c in cells):
        out.append(column)
      if any(c and c.published for c in cells):
        out.append(column + PUBLISHED)
    return out

  def render(self, row, display_column):
    """Text of one displayed cell: `mean ± std (n=N)`, `failed: reason`, a published value or `—`."""
    column = display_column.removesuffix(PUBLISHED)
    cell = self.cells.get((row, column))
    if cell is None:
      return '—'
    if display_column.endswith(PUBLISHED):
      if not cell.published:
        return '—'
      value, source = cell.published
      return f'{value:.{self.digits}f} [{self.sources().index(source) + 1}]'
    if not cell.values:
      return f'failed: {"; ".join(cell.failures)}' if cell.failures else '—'
    mean, std = mean_std(cell.values)
    text = f'{mean:.{self.digits}f} ± {std:.{self.digits}f} (n={len(cell.values)})'
    return text + (f', {len(cell.failures)} failed' if cell.failures else '')

  def full_caption(self):
    return ' '.join(part for part in (self.caption, STD_NOTE) if part)

  def to_markdown(self):
    """Title, caption, the table and the published sources, as markdown."""
    columns = self.header()
    lines = [f'# {self.title}', '', self.full_caption(), '',
             '| | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
    lines += [f'| {row} | ' + ' | '.join(self.render(row, c) for c in columns) + ' |'
              for row in self.rows]
    lines += [''] + [f'[{k}] {source}  ' for k, source in enumerate(self.sources(), 1)]
    return '\n'.join(lines).rstrip() + '\n'

  def to_latex(self):
    """A booktabs tabular; published sources in a final full-width row."""
    columns = self.header()
    lines = [r'\begin{tabular}{l' + 'c' * len(columns) + '}', r'\toprule',
             ' & '.join([''] + [_latex_escape(c) for c in columns]) + r' \\', r'\midrule']
    for row in self.rows:
      cells = [_latex_escape(row)] + [_latex_cell(self.render(row, c)) for c in columns]
      lines.append(' & '.join(cells) + r' \\')
    lines.append(r'\bottomrule')
    for k, source in enumerate(self.sources(), 1):
      note = rf'\footnotesize [{k}] {_latex_escape(source)}'
      lines.append(rf'\multicolumn{{{len(columns) + 1}}}{{l}}{{{note}}} \\')
    lines.append(r'\end{tabular}')
    return '\n'.join(lines) + '\n'

  def csv_rows(self):
    """Long form, one line per cell. Ours: mean, std, n = successful seeds (a fully failed cell:
    empty mean and std, n=0). Published: column `<column> (published)`, mean = the number,
    empty std, n=0 (no seeds of ours)."""
    out = []
    for row in self.rows:
      for column in self.columns:
        cell = self.cells.get((row, column))
        if cell is None:
          continue
        if cell.values or cell.failures:
          mean, std = mean_std(cell.values) if cell.values else ('', '')
          out.append((row, column, mean, std, len(cell.values)))
        if cell.published:
          out.append((row, column + PUBLISHED, cell.published[0], '', 0))
    return [(self.experiment, self.preset, *r) for r in out]

  def to_csv(self):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(CSV_COLUMNS)
    writer.writerows(self.csv_rows())
    return buffer.getvalue()

  def write(self, out_dir, provenance):
    """Writes table.md (+ provenance lines), table.tex, table.csv and provenance.json, atomically."""
    out_dir = Path(out_dir)
    record = {**provenance, 'experiment': self.experiment, 'preset': self.preset, 'title': self.title}
    write_atomic(out_dir / 'table.md', self.to_markdown() + '\n' + provenance_markdown(record))
    write_atomic(out_dir / 'table.tex', self.to_latex())
    write_atomic(out_dir / 'table.csv', self.to_csv())
    write_atomic(out_dir / 'provenance.json', json.dumps(record, indent=2) + '\n')
    return out_dir


def _latex_escape(text):
  for char in '&%_#':
    text = text.replace(char, '\\' + char)
  return text


def _latex_cell(text):
  return _latex_escape(text).replace('±', r'$\pm$').replace('—', '--')


def provenance_markdown(record):
  """The lines beneath a table that say how to make it again."""
  commit = record.get('git_commit') or 'unknown'
  dirty = ' (dirty)' if record.get('git_dirty') else ''
  device = record.get('device', {})
  cpu = f', {device["cpu"]} with {device["convolutions"]} convolutions' if device.get('convolutions') else ''
  return (f'Made by `{record["command"]}` on {record["date"]}, commit {commit}{dirty}, '
          f'config hash {record.get("config_hash")}{cpu}.\n')


def _git(*args, cwd=Path(__file__).resolve().parent):
  """Output of a git command in the repository holding `cwd` (cnnjax's), or None without git or repo."""
  try:
    result = subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.strip()


def code_changed(cwd=Path(__file__).resolve().parent):
  """Whether tracked files differ from the commit, outside results/ (what runs write); None without git."""
  status = _git('status', '--porcelain', '--untracked-files=no', '--', ':/', ':(top,exclude)results', cwd=cwd)
  return None if status is None else bool(status)


def _version(package):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_model():
  """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows, else None."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.partition(':')[2].strip()
  except OSError:
    pass
  return platform.processor() or None


def device_record():
  """The devices a run used. On CPU also the CPU model and whose convolutions models built now run
  (oneDNN's or XLA's, cnnjax.ops): they sum in different orders, so numbers agree bit for bit only
  between runs with the same ones."""
  import jax
  from cnnjax import ops
  devices = jax.devices()
  record = {'platform': devices[0].platform, 'kind': devices[0].device_kind, 'count': len(devices),
            'process_count': jax.process_count()}
  if devices[0].platform == 'cpu':
    record['cpu'] = cpu_model()
    record['convolutions'] = 'oneDNN' if ops.onednn_enabled() and ops.onednn_available() else 'XLA'
  return record


def provenance(command, config_hash, **extra):
  """How a table was made: git commit + dirty flag (tracked files outside results/), package
  versions, devices (`device_record`), python, UTC date, the command and config hash, plus `extra`.
  No hostname, environment variables or credentials."""
  return {
      'command': command if isinstance(command, str) else shlex.join(command),
      'config_hash': config_hash,
      'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
      'git_commit': _git('rev-parse', 'HEAD'),
      'git_dirty': code_changed(),
      'versions': {package: _version(package) for package in PACKAGES},
      'python': platform.python_version(),
      'device': device_record(),
      **extra,
  }


def _aligned(runs):
  """Steps common to all runs and a (runs, steps) value array over them."""
  steps = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
  values = np.array([[dict(run)[s] for s in steps] for run in runs], dtype=float)
  return np.array(steps), values


def plot_curves(curves, path, *, ylabel, title, xlabel='step'):
  """Learning curves to a PNG. curves: label -> list of runs, each a list of (step, value);
  a label with several runs is drawn as mean ± sample std over the steps all its runs share.
  A label may also map to a single run (a list of (step, value))."""
  from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg renders the PNG
  figure = Figure(figsize=(5, 3.5), layout='constrained')
  axes = figure.subplots()
  for label, runs in curves.items():
    runs = [runs] if np.ndim(runs[0]) == 1 else runs
    steps, values = _aligned(runs)
    mean = values.mean(axis=0)
    line, = axes.plot(steps, mean, label=f'{label} (n={len(runs)})')
    if len(runs) > 1:
      std = values.std(axis=0, ddof=1)
      axes.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
  axes.legend()
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=120)
  write_atomic(path, buffer.getvalue())


def write_index(results_dir):
  """Writes `<results_dir>/README.md`: one line per `<experiment>/<preset>/table.md`, then a link to
  each experiment's hand-written `<experiment>/NOTES.md` (what the runs showed, beyond the tables)."""
  results_dir = Path(results_dir)
  lines = ['# Results', '', 'Written by `cnnjax.tables.write_index`; each table lists its provenance.',
           '', '| experiment | preset | table | command | date |', '|---|---|---|---|---|']
  for table in sorted(results_dir.glob('*/*/table.md')):
    info_path = table.parent / 'provenance.json'
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    experiment, preset = table.parent.parent.name, table.parent.name
    link = table.relative_to(results_dir).as_posix()
    lines.append(f'| {experiment} | {preset} | [{info.get("title", link)}]({link}) | '
                 f'`{info.get("command", "?")}` | {info.get("date", "?")} |')
  notes = sorted(results_dir.glob('*/NOTES.md'))
  if notes:
    lines += ['', 'Notes: ' + ', '.join(f'[{n.parent.name}]({n.relative_to(results_dir).as_posix()})' for n in notes)]
  write_atomic(results_dir / 'README.md', '\n'.join(lines) + '\n')
  return results_dir / 'README.md'
