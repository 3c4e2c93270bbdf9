"""Run tracking: `metrics.jsonl` per run directory is the source of truth; W&B mirrors it.

Only process 0 writes (jsonl and W&B), so a multi-host run keeps one history. W&B is optional
and must never stop a run: a missing network, missing credentials or a failing `wandb.init`
cost one warning and the run carries on with the jsonl alone.
"""

import collections.abc
import hashlib
import json
import math
import netrc
import os
import tempfile
import urllib.parse
import warnings
from pathlib import Path

import jax
import numpy as np

from cnnjax.errors import ConfigError

METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
WANDB_INIT_TIMEOUT_S = 20.0
_MODES = ('auto', 'online', 'offline', 'disabled')


def write_atomic(path, data):
  """Writes `data` (str or bytes) to `path` via a temp file + os.replace: never a half file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def flatten(config, prefix=''):
  """Nested dict (or ml_collections ConfigDict) -> flat dict with dotted keys, for W&B filters."""
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  flat = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'to_dict') or (isinstance(value, collections.abc.Mapping) and value):
      flat.update(flatten(value, f'{name}.'))
    else:
      flat[name] = value
  return flat


def to_plain(value):
  """numpy/jax scalars and arrays -> Python numbers and lists, so they serialise as JSON."""
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(value).tolist()
  return value


def read_metrics(run_dir):
  """The logged records of a run, in order; a torn last line (a killed write) is skipped."""
  path = Path(run_dir) / METRICS_FILE
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return records


def truncate_metrics(run_dir, step):
  """Drops records with a step above `step` (and a torn last line), so a resumed history
  equals an uninterrupted one."""
  path = Path(run_dir) / METRICS_FILE
  if path.exists():
    kept = [r for r in read_metrics(run_dir) if r['step'] <= step]
    write_atomic(path, ''.join(json.dumps(r) + '\n' for r in kept))


def has_wandb_credentials():
  """True when WANDB_API_KEY is set or a netrc file holds an entry for the W&B host."""
  if os.environ.get('WANDB_API_KEY'):
    return True
  host = urllib.parse.urlparse(os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')).hostname
  try:
    return netrc.netrc(os.environ.get('NETRC')).authenticators(host) is not None
  except (OSError, netrc.NetrcParseError):
    return False


def resolve_mode(mode):
  """'auto' -> $WANDB_MODE if set, else 'online' with credentials and 'offline' without."""
  if mode not in _MODES:
    raise ConfigError('wandb.mode', mode, _MODES)
  if mode != 'auto':
    return mode
  env_mode = os.environ.get('WANDB_MODE')
  if env_mode in _MODES[1:]:
    return env_mode
  return 'online' if has_wandb_credentials() else 'offline'


def wandb_run_id(run_dir):
  """A stable W&B run id from the run directory, so a resumed run continues the same W&B run."""
  return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def _init_wandb(run_dir, options):
  """Starts a W&B run from `options`, or returns None (with one warning) when that fails."""
  options = dict(options.to_dict() if hasattr(options, 'to_dict') else options)
  mode = resolve_mode(options.get('mode') or 'auto')
  if mode == 'disabled':
    return None
  wandb_dir = Path(options.get('dir') or run_dir)
  try:
    import wandb
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=options.get('project', 'cnnjax'), mode=mode, dir=str(wandb_dir),
        group=options.get('group'), job_type=options.get('job_type'), name=options.get('name'),
        config=flatten(options.get('config') or {}), id=wandb_run_id(run_dir), resume='allow',
        reinit='create_new', settings=wandb.Settings(
            init_timeout=WANDB_INIT_TIMEOUT_S,
            # Not the list of installed packages with every run (~0.3 s each, two thirds of W&B's
            # start-up): each table's provenance.json records the versions that matter.
            x_save_requirements=False))
  except Exception as error:  # W&B is a mirror: any failure must leave the run going.
    warnings.warn(f'W&B disabled for {run_dir}: {type(error).__name__}: {error}', RuntimeWarning)
    return None


class Tracker:
  """Appends metrics to `<run_dir>/metrics.jsonl` and mirrors them to W&B (process 0 only).

  wandb: None, or a dict/ConfigDict with project, mode ('auto'|'online'|'offline'|'disabled'),
    group (experiment), job_type (method), name (method-seed), config (nested; logged flattened)
    and dir (where W&B writes; default run_dir).
  resume_step: step of the checkpoint the run resumes from; records with a later step are
    dropped first. -1 restarts the history; None appends to what is there.
  """

  def __init__(self, run_dir, *, wandb=None, resume_step=None):
    self.run_dir = Path(run_dir)
    self.active = jax.process_index() == 0
    self._file = self._run = None
    if not self.active:
      return
    self.run_dir.mkdir(parents=True, exist_ok=True)
    truncate_metrics(self.run_dir, math.inf if resume_step is None else resume_step)
    self._file = open(self.run_dir / METRICS_FILE, 'a')
    if wandb:
      self._run = _init_wandb(self.run_dir, wandb)

  def log(self, step, metrics):
    """Appends {"step": step, **metrics} as one JSON line (flushed) and logs it to W&B."""
    if not self.active:
      return
    plain = {key: to_plain(value) for key, value in metrics.items()}
    self._file.write(json.dumps({'step': int(step), **plain}) + '\n')
    self._file.flush()
    if self._run is not None:
      self._run.log(plain, step=int(step))

  def summary(self, metrics):
    """Merges final metrics into `<run_dir>/summary.json` and the W&B run summary."""
    if not self.active:
      return
    path = self.run_dir / SUMMARY_FILE
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update({key: to_plain(value) for key, value in metrics.items()})
    write_atomic(path, json.dumps(merged, indent=2) + '\n')
    if self._run is not None:
      self._run.summary.update(merged)

  def close(self, exit_code=0):
    """Closes the jsonl and finishes the W&B run (exit_code != 0 marks it failed); idempotent."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._run is not None:
      run, self._run = self._run, None
      try:
        run.finish(exit_code=exit_code)
      except Exception as error:
        warnings.warn(f'W&B finish failed for {self.run_dir}: {error}', RuntimeWarning)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    self.close(exit_code=0 if exc_type is None else 1)
