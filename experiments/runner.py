"""The experiment runner: a grid of cells, each run once and resumed when unfinished, then a table.

A cell is one table cell (a row such as a method, a column such as a setting) with all
its seeds. Its directory `<workdir>/<experiment>/<preset>/<row>--<column>--<hash>` holds
config.json, one run directory per seed (metrics.jsonl, W&B), checkpoints/, result.json
and, once finished, DONE. Rerunning skips cells with DONE and resumes the others from
their last checkpoint (DomainBed-style sweeps).
"""

import contextlib
import dataclasses
import fcntl
import gc
import json
import os
import re
import runpy
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging

from cnnjax import config as cfg
from cnnjax import host_memory, tables, tracking
from cnnjax.train import loop
from cnnjax.train.checkpoint import Checkpoints

RESULT_FILE, DONE_FILE = 'result.json', 'DONE'


@dataclasses.dataclass(frozen=True)
class Cell:
  """One table cell: `config` (JSON-able, seeds included) defines what it computes."""
  row: str
  column: str
  config: dict = dataclasses.field(hash=False, compare=False)

  @property
  def hash(self):
    return cfg.config_hash(self.config)

  @property
  def dirname(self):
    slug = lambda text: re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_')
    return f'{slug(self.row)}--{slug(self.column)}--{self.hash}'


class Experiment:
  """Everything a topic module needs to run its grid: config, mesh, directories, trackers."""

  def __init__(self, name, config, mesh):
    self.name, self.config, self.mesh = name, config, mesh
    self.preset = config.preset
    self.root = Path(config.workdir) / name / config.preset
    self.results_dir = Path(config.results_dir) / name / config.preset
    self.started = time.time()

  def run_grid(self, cells, run_cell):
    """{cell: result} for every cell; `run_cell(cell, cell_dir) -> result (JSON-able dict)`.

    Another process of the same sweep may hold a cell (an flock on `<cell_dir>/.lock`, which the
    kernel drops when its holder dies): such a cell is left for later, then waited for, so two
    runs into one workdir share the work and each ends with every cell's result. The processes
    of one multi-host run are not such a sweep: they take every cell together, in order.
    """
    results, busy = {}, []
    for i, cell in enumerate(cells):
      label = f'[{i + 1}/{len(cells)}] {self.name}: {cell.row} | {cell.column}'
      with cell_lock(self.root / cell.dirname, wait=False) as held:
        if held:
          results[cell] = self._run_cell(cell, run_cell, label)
        else:
          busy.append((cell, label))
    for cell, label in busy:
      print(f'{label}: waiting for another process', flush=True)
      with cell_lock(self.root / cell.dirname, wait=True):
        results[cell] = self._run_cell(cell, run_cell, label)
    return {cell: results[cell] for cell in cells}

  def _run_cell(self, cell, run_cell, label):
    """The cell's result: read when it is DONE, else computed (under the cell's lock)."""
    cell_dir = self.root / cell.dirname
    if (cell_dir / DONE_FILE).exists():
      print(f'{label}: done, skipped', flush=True)
      return json.loads((cell_dir / RESULT_FILE).read_text())
    print(label, flush=True)
    tracking.write_atomic(cell_dir / 'config.json', json.dumps(cell.config, indent=2, default=str))
    try:
      result = run_cell(cell, cell_dir)
    except loop.NonFiniteError as error:
      result = {'failed': str(error)}
      print(f'  failed: {error}', flush=True)
    tracking.write_atomic(cell_dir / RESULT_FILE, json.dumps(result, indent=2, default=tracking.to_plain))
    tracking.write_atomic(cell_dir / DONE_FILE, '')
    return result

  def trackers(self, cell, cell_dir, seeds, resume_step):
    """One Tracker per seed under `<cell_dir>/seed_<s>`, W&B run named method-seed."""
    wandb = self.config.wandb
    options = None if wandb.mode == 'disabled' else dict(
        project=wandb.project, mode=wandb.mode, group=self.name, job_type=cell.row,
        config=dict(cell.config, preset=self.preset, column=cell.column))
    return [tracking.Tracker(cell_dir / f'seed_{s}', resume_step=resume_step,
                             wandb=options and dict(options, name=f'{cell.row}-{s}'))
            for s in seeds]

  def train(self, cell, cell_dir, states, source, *, chunk_fn, total_steps, evaluate=None,
            desc=None):
    """Train a cell's stacked seed states, resuming from its last checkpoint; returns
    (states, final eval metrics per seed)."""
    config = self.config
    with Checkpoints(cell_dir / 'checkpoints') as checkpoints:
      restored = checkpoints.restore(states)
      states = states if restored is None else restored
      step = int(np.asarray(states.step).reshape(-1)[0])
      trackers = self.trackers(cell, cell_dir, cell.config['seeds'], resume_step=step)
      try:
        states, results = loop.fit(states, source, chunk_fn=chunk_fn, total_steps=total_steps,
                                   chunk_steps=config.chunk_steps, evaluate=evaluate, eval_every=config.eval_every,
                                   checkpoints=checkpoints, checkpoint_every=config.checkpoint_every,
                                   trackers=trackers, progress=config.progress,
                                   desc=desc or f'{cell.row} | {cell.column}')
        for m, tracker in enumerate(trackers):
          tracker.summary({f'eval/{k}': v[m] for k, v in results.items()})
        return states, results
      finally:
        for tracker in trackers:
          tracker.close()

  def write_table(self, table, curves=None, **extra):
    """The table, its provenance and (optionally) a learning-curve figure under results/."""
    if jax.process_index() != 0:
      return
    command = 'python -m experiments.' + self.name + ' ' + shlex.join(sys.argv[1:])
    record = tables.provenance(command, cfg.config_hash(self.config),
                               wall_time_s=round(time.time() - self.started, 1), **extra)
    table.write(self.results_dir, record)
    if curves:
      tables.plot_curves(curves['runs'], self.results_dir / 'learning_curves.png',
                         ylabel=curves['ylabel'], title=curves['title'])
    tables.write_index(self.results_dir.parent.parent)
    print(f'wrote {self.results_dir}/table.md')


@contextlib.contextmanager
def cell_lock(cell_dir, wait):
  """An exclusive flock on `<cell_dir>/.lock`; yields whether it is held (always, when `wait`).

  The processes of one multi-host run train every cell together (their steps are collectives), so
  in such a run no process locks a cell: one holding it would send the others on to the next cell.
  """
  cell_dir.mkdir(parents=True, exist_ok=True)
  if jax.process_count() > 1:
    yield True
    return
  with open(cell_dir / '.lock', 'a') as lock:  # 'a': creating it once, never touching it again
    try:
      fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def curves_from(cell_dirs, seeds, metric):
  """Learning curves of `metric` from the metrics.jsonl of every seed of each labelled cell."""
  runs = {}
  for label, cell_dir in cell_dirs.items():
    runs[label] = [[(r['step'], r[metric]) for r in tracking.read_metrics(Path(cell_dir) / f'seed_{s}')
                    if metric in r] for s in seeds]
  return runs


def setup(config, validate):
  """Process-wide set-up: quiet logs, join a multi-host run, validate the config (before any
  compute), the persistent compile cache; returns the data mesh over every device of every host."""
  from cnnjax.train import sharding
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS narrate every step at INFO
  os.environ.setdefault('WANDB_SILENT', 'true')
  cfg.validate_distributed(config)
  if config.distributed.enabled:  # before validation, which counts the devices of all hosts
    join_cluster(config.distributed)
  validate(config)
  if config.compile_cache:
    jax.config.update('jax_compilation_cache_dir', str(Path(config.compile_cache).expanduser()))
    # Every program, the many small ones (initialisers, data steps: ~0.1-0.4 s each) included, so
    # that a second run compiles nothing.
    for option, value in (('jax_persistent_cache_min_compile_time_secs', 0),
                          ('jax_persistent_cache_min_entry_size_bytes', 0)):
      if option.upper() not in os.environ:  # JAX's own environment variables win
        jax.config.update(option, value)
  if jax.default_backend() == 'cpu' and jax.process_index() == 0 and (
      advice := host_memory.hint(os.environ)):
    print(f'cnnjax: {advice}', file=sys.stderr, flush=True)
  # What is alive now (modules, JAX, Flax, TFDS) lives as long as the process: the cyclic garbage
  # collector skips it from here on instead of walking it on every full collection, which halves
  # lowering (digit CNN, 10-step chunk: 0.24-0.28 -> 0.11-0.13 s).
  gc.collect()
  gc.freeze()
  return sharding.make_mesh()


def join_cluster(distributed):
  """jax.distributed.initialize from the config's keys, or from the cluster's environment."""
  from cnnjax.train import sharding
  try:
    sharding.initialize_distributed(distributed.coordinator_address, distributed.num_processes,
                                    distributed.process_id)
  except ValueError as error:
    if distributed.coordinator_address:
      raise
    raise cfg.ConfigError(
        'distributed.coordinator_address', '', 'HOST:PORT of process 0 where no cluster is detected',
        'JAX found no SLURM, Open MPI, Kubernetes or TPU-pod environment; give '
        '--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N '
        '--config.distributed.process_id=I') from error


def command_line(experiment, main):
  """Run `main(config)` as `python -m experiments.<experiment> --config=experiments/configs/<experiment>.py[:preset]`
  (plus --config.KEY=VALUE overrides). The --config flag is defined here, when a module runs as a
  command, so importing several experiments defines no flags."""
  from absl import app
  from ml_collections import config_flags
  default = f'experiments/configs/{experiment}.py'
  # Without --config the default file is read here, with the overrides; with it, when app.run parses.
  config = refusing_unknown_keys(lambda: config_flags.DEFINE_config_file('config', default, lock_config=True),
                                 sys.argv, default)
  app.run(lambda argv: main(config.value),
          flags_parser=lambda argv: refusing_unknown_keys(lambda: app.parse_flags_with_usage(argv), argv, default))


def refusing_unknown_keys(parse, argv, default_config):
  """`parse()`, but an override of a key the config lacks (a typo) is a ConfigError that names the
  flag and the keys it could be (ml_collections raises a bare AttributeError or KeyError)."""
  try:
    return parse()
  except (AttributeError, KeyError) as error:
    refused = error
  given = [(flag, value if equals else following)  # --FLAG=VALUE or --FLAG VALUE
           for arg, following in zip(argv[1:], [*argv[2:], None]) if arg.startswith('--config')
           for flag, equals, value in [arg.partition('=')]]
  path, _, preset = next((value for flag, value in given if flag == '--config'), default_config).partition(':')
  config = runpy.run_path(path)['get_config'](preset)  # as the file gives it, before the overrides
  for flag, value in given:
    if flag.startswith('--config.'):
      cfg.check_key(config, flag.removeprefix('--config.'), value)
  raise refused
