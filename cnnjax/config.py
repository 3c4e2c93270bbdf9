"""Presets, validation and hashing of experiment configs.

Every experiment config is an `ml_collections.ConfigDict` made by
`experiments/configs/<topic>.py:get_config(preset)`. Validation runs before any
compute and raises `ConfigError` naming the key, the value and what is allowed.
"""

import collections.abc
import difflib
import hashlib
import json
import math
import numbers
import re
import tempfile
from pathlib import Path

import jax
import ml_collections

from cnnjax.errors import ConfigError

PRESETS = ('smoke', 'default', 'paper')

# Keys that change where or how a run is logged, not what it computes: left out of the hash.
UNHASHED_KEYS = ('workdir', 'results_dir', 'data_dir', 'compile_cache', 'wandb', 'progress', 'side_by_side',
                 'distributed', 'fsdp')


def preset_name(preset):
  """The preset named by `--config=FILE:preset` ('' means default)."""
  preset = preset or 'default'
  if preset not in PRESETS:
    raise ConfigError('preset', preset, list(PRESETS), 'select one as --config=FILE:PRESET')
  return preset


def lookup(config, key):
  """The value at a dotted key."""
  value = config
  for part in key.split('.'):
    value = value[part]
  return value


def check_key(config, key, value=None):
  """`key` (dotted) names a value of `config`: else a ConfigError for `--config.KEY=VALUE` that lists
  the keys where the path goes wrong and the nearest of them (a typo on the command line)."""
  node, parts = config, key.split('.')
  for depth, part in enumerate(parts):
    where = '.'.join(['config', *parts[:depth]])
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(key, value, f'no key below {where}: it holds a value')
    if part not in node:
      known = sorted(node.keys())
      close = difflib.get_close_matches(part, known, n=1)
      guess = '.'.join([*parts[:depth], *close, *parts[depth + 1:]])
      raise ConfigError(key, value, f'the keys of {where}: {known}', f'did you mean --config.{guess}?' if close else '')
    node = node[part]


def check_choice(config, key, choices, hint=''):
  """The value (or each value of a list) is one of `choices` (`hint`: why others are not)."""
  value = lookup(config, key)
  values = value if isinstance(value, (list, tuple)) else [value]
  if not values:
    raise ConfigError(key, value, f'one or more of {sorted(choices)}')
  for v in values:
    if not isinstance(v, collections.abc.Hashable) or v not in choices:
      raise ConfigError(key, v, sorted(choices), hint)


def is_count(value, least=0):
  """A whole number (an int or a numpy integer, not a bool) of at least `least`."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def check_positive(config, key, allow_zero=False):
  """A finite number > 0 (or >= 0)."""
  value = lookup(config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(key, value, 'a finite number')
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(key, value, 'a number >= 0' if allow_zero else 'a number > 0')


def check_type(config, key, kind):
  """A value of type `kind` (a type or a tuple of types); bool does not pass for int."""
  value = lookup(config, key)
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
    raise ConfigError(key, value, 'a value of type ' + ' or '.join(k.__name__ for k in kinds))


def check_divisible(config, key, divisor, why):
  """A whole number that `divisor` divides."""
  check_type(config, key, int)
  value = lookup(config, key)
  if value % divisor:
    raise ConfigError(key, value, f'a multiple of {divisor} ({why})')


def check_batch_fits_devices(config, key='batch_size'):
  """A global batch: a positive whole number that splits evenly over every device of the data mesh."""
  check_type(config, key, int)
  check_positive(config, key)
  check_divisible(config, key, jax.device_count(), f'{jax.device_count()} devices share each batch')


def check_writable_dir(config, key):
  """A directory this process can create (or already has) and write into, tried with a temporary
  directory in it or in its nearest existing parent, so a run cannot end in a write that fails."""
  check_type(config, key, str)
  value = lookup(config, key)
  path = Path(value).expanduser().absolute()
  existing = next(p for p in (path, *path.parents) if p.exists())
  try:
    if not existing.is_dir():
      raise NotADirectoryError('a file, not a directory')
    tempfile.TemporaryDirectory(dir=existing).cleanup()
  except OSError as error:
    raise ConfigError(key, value, 'a directory this process can create and write into',
                      f'cannot write in {existing} ({error.strerror or error}); choose another, e.g. '
                      f'--config.{key}=/tmp/{path.name}') from None


def validate_distributed(config):
  """The multi-host keys: all unset (JAX finds the cluster in the environment) or a coordinator
  host:port, with the process count and this process's id where the environment has none."""
  check_type(config, 'distributed.enabled', bool)
  check_type(config, 'distributed.coordinator_address', str)
  check_type(config, 'distributed.num_processes', int)
  check_type(config, 'distributed.process_id', int)
  address, count, index = (config.distributed[k] for k in ('coordinator_address', 'num_processes', 'process_id'))
  if address and not re.fullmatch(r'[^\s:]+:\d+|\[[0-9a-fA-F:.]+\]:\d+', address):
    raise ConfigError('distributed.coordinator_address', address, "'' (detected) or HOST:PORT of process 0",
                      'e.g. --config.distributed.coordinator_address=10.0.0.1:12345')
  check_positive(config, 'distributed.num_processes', allow_zero=True)
  if index < -1 or (count and index >= count):
    raise ConfigError('distributed.process_id', index,
                      f'-1 (detected) or 0 to {count - 1}' if count else '-1 (detected) or an id >= 0')


def config_hash(config):
  """A short stable hash of everything that changes what a run computes."""
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  for key in UNHASHED_KEYS:
    values.pop(key, None)
  text = json.dumps(values, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_config(experiment, preset):
  """Keys every experiment shares: where runs and tables go, seeds, the step loop, logging."""
  config = ml_collections.ConfigDict()
  config.experiment = experiment
  config.preset = preset_name(preset)
  config.seeds = 3
  config.workdir = 'workdir'              # per-cell runs, checkpoints, DONE markers
  config.results_dir = 'results'          # tables, provenance and figures
  config.data_dir = ''                    # TFDS data dir ('' = $CNNJAX_DATA_DIR or TFDS's default)
  config.chunk_steps = 5                  # unrolled steps per compiled call (rolled loops are slow on CPU)
  config.eval_every = 0                   # steps between evaluations (0 = at the end only)
  config.checkpoint_every = 100           # steps between checkpoints (and at the end)
  config.compute_dtype = 'float32'        # bfloat16 on accelerators: bf16 compute, f32 params and optimizer
  config.side_by_side = 'auto'            # how seeds train side by side: auto | vmap | unroll | sequential | threads
  config.fsdp = False                     # shard parameters and optimizer state over the devices (large models)
  config.compile_cache = '~/.cache/cnnjax/jax'  # persistent XLA compile cache ('' = off)
  config.progress = True
  config.wandb = ml_collections.ConfigDict({'project': 'cnnjax', 'mode': 'auto'})
  # Multi-host: enabled=True joins jax.distributed (auto-detected on SLURM / TPU pods, else give
  # the coordinator host:port, the process count and this process's id).
  config.distributed = ml_collections.ConfigDict(
      {'enabled': False, 'coordinator_address': '', 'num_processes': 0, 'process_id': -1})
  return config


def validate_base(config):
  """Checks of the shared keys; experiments add their own."""
  from cnnjax.train.steps import MEMBER_MODES
  check_type(config, 'seeds', int)
  check_positive(config, 'seeds')
  check_choice(config, 'preset', PRESETS)
  check_positive(config, 'chunk_steps')
  check_type(config, 'chunk_steps', int)
  for key in ('eval_every', 'checkpoint_every'):
    check_positive(config, key, allow_zero=True)
    check_divisible(config, key, config.chunk_steps, 'evaluations and checkpoints fall on chunk ends')
  check_choice(config, 'side_by_side', MEMBER_MODES)
  check_choice(config, 'compute_dtype', ('float32', 'bfloat16'),
               'not float16: its gradients underflow without loss scaling, which cnnjax does not do')
  check_choice(config, 'wandb.mode', ('auto', 'online', 'offline', 'disabled'))
  validate_distributed(config)
  check_type(config, 'fsdp', bool)
  for key in ('workdir', 'results_dir'):
    check_writable_dir(config, key)
  if config.compile_cache:
    check_writable_dir(config, 'compile_cache')
