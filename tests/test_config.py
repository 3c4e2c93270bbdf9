"""Experiment configs: presets validate, bad values fail before compute naming key, value and
what is allowed, the command line refuses unknown keys, and the config hash tracks what a run computes."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from cnnjax import config as cfg
from cnnjax import data, models
from cnnjax.errors import ConfigError
from cnnjax.methods.transfer import TRANSFER_METHODS
from experiments import transfer
from experiments.configs.transfer import get_config

REPO = Path(__file__).resolve().parents[1]


def raises_config_error(config, key, value):
  """validate(config) raises a ConfigError that names `key` and `value`; returns the error."""
  with pytest.raises(ConfigError) as info:
    transfer.validate(config)
  error = info.value
  assert error.key == key and error.value == value, str(error)
  message = str(error)
  assert f'config.{key}' in message and repr(value) in message and 'allowed' in message
  return error


def with_value(key, value, preset='smoke'):
  """A preset's config with the dotted `key` replaced by `value`, type checks of ConfigDict bypassed
  (as in a config rebuilt from JSON or a hand-written dict)."""
  values = get_config(preset).to_dict()
  *parents, last = key.split('.')
  holder = values
  for part in parents:
    holder = holder[part]
  holder[last] = value
  return ml_collections.ConfigDict(values)


# Presets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('preset', cfg.PRESETS)
def test_every_preset_validates(preset):
  config = get_config(preset)
  assert config.preset == preset and config.experiment == 'transfer'
  transfer.validate(config)


def test_empty_preset_is_default():
  assert get_config('').preset == 'default'
  assert cfg.config_hash(get_config('')) == cfg.config_hash(get_config('default'))


@pytest.mark.parametrize('preset', cfg.PRESETS)
def test_every_preset_validates_on_eight_devices(preset, monkeypatch):
  """The presets must run unchanged on an 8-accelerator host: every batch splits 8 ways."""
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  transfer.validate(get_config(preset))


def test_unknown_preset_names_preset_and_choices():
  with pytest.raises(ConfigError) as info:
    get_config('huge')
  assert info.value.key == 'preset' and info.value.value == 'huge'
  assert list(info.value.allowed) == list(cfg.PRESETS)
  for name in ('config.preset', "'huge'", 'smoke', 'default', 'paper'):
    assert name in str(info.value)


def test_unknown_preset_on_the_command_line_keeps_its_message(monkeypatch):
  """config_flags re-raises an error of get_config as type(error)(message): a ConfigError survives it."""
  argv = ['transfer', f'--config={REPO / "experiments" / "configs" / "transfer.py"}:huge']
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, lock_config=True)
  with pytest.raises(flags.IllegalFlagValueError, match=r"ConfigError: config.preset = 'huge' is not allowed; "
                                                          r"allowed: \['smoke', 'default', 'paper'\]"):
    values(argv)


# Names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('key, value, known', [
    ('model', 'resnet9000', lambda: models.MODELS.names()),
    ('methods', ['scratch', 'dream'], lambda: TRANSFER_METHODS.names()),
    ('source', 'imagenet_42k', lambda: data.DATASETS.names() + list(data.CATALOG)),
    ('targets', ['sklearn_digits', 'nowhere'], lambda: data.DATASETS.names() + list(data.CATALOG)),
])
def test_unknown_name_lists_the_allowed_names(key, value, known):
  config = get_config('smoke')
  setattr(config, key, value)
  bad = value[-1] if isinstance(value, list) else value
  error = raises_config_error(config, key, bad)
  assert sorted(error.allowed) == sorted(known())
  for name in known():
    assert name in str(error)


# Values -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('key, value', [
    ('pretrain.learning_rate', -1e-3),
    ('finetune.learning_rate', 0.0),
    ('finetune.linear_probe_learning_rate', -0.1),
    ('pretrain.steps', 0),
    ('finetune.steps', -5),
    ('seeds', 0),
    ('chunk_steps', 0),
    ('l2sp.alpha', -0.01),
    ('pretrain.batch_size', 0),
    ('eval_batch_size', -8),  # a multiple of any device count, yet no batch
])
def test_non_positive_values_are_refused(key, value):
  config = get_config('smoke')
  *parents, last = key.split('.')
  holder = config
  for part in parents:
    holder = holder[part]
  holder[last] = value
  error = raises_config_error(config, key, value)
  assert '>' in str(error.allowed)


def test_zero_alpha_is_allowed():
  config = get_config('smoke')
  config.l2sp.alpha = 0.0
  transfer.validate(config)


@pytest.mark.parametrize('key', ['pretrain.steps', 'finetune.steps'])
def test_steps_must_fill_whole_chunks(key):
  config = get_config('smoke')
  assert config.chunk_steps == 2
  holder, last = config[key.split('.')[0]], key.split('.')[1]
  holder[last] = 13
  error = raises_config_error(config, key, 13)
  assert 'multiple of 2' in str(error)


def test_checkpoints_fall_on_chunk_ends():
  config = get_config('smoke')
  config.checkpoint_every = 7
  raises_config_error(config, 'checkpoint_every', 7)


@pytest.mark.parametrize('key, value', [
    ('seeds', '3'),
    ('seeds', 2.0),
    ('seeds', True),
    ('pretrain.steps', 20.0),
    ('pretrain.learning_rate', '1e-3'),
    ('fsdp', 'yes'),
])
def test_wrong_types_are_refused(key, value):
  raises_config_error(with_value(key, value), key, value)


@pytest.mark.parametrize('value', [-1, 1.5, '5'])
def test_labels_per_class_are_non_negative_integers(value):
  config = with_value('labels_per_class', [1, value])
  raises_config_error(config, 'labels_per_class', value)


def test_float16_compute_is_refused_for_lack_of_loss_scaling():
  config = get_config('smoke')
  config.compute_dtype = 'float16'
  error = raises_config_error(config, 'compute_dtype', 'float16')
  assert 'loss scaling' in str(error) and 'bfloat16' in str(error)


def test_unknown_choice_of_side_by_side_and_wandb_mode():
  config = get_config('smoke')
  config.side_by_side = 'pmap'
  raises_config_error(config, 'side_by_side', 'pmap')
  config = get_config('smoke')
  config.wandb.mode = 'loud'
  raises_config_error(config, 'wandb.mode', 'loud')


@pytest.mark.parametrize('key', ['pretrain.batch_size', 'finetune.batch_size', 'eval_batch_size'])
def test_batch_must_split_over_devices(key, monkeypatch):
  if jax.device_count() != 8:
    monkeypatch.setattr(jax, 'device_count', lambda: 8)
  config = get_config('smoke')
  *parents, last = key.split('.')
  holder = config[parents[0]] if parents else config
  holder[last] = 12
  error = raises_config_error(config, key, 12)
  assert 'multiple of 8' in str(error) and '8 devices' in str(error)


@pytest.mark.parametrize('key', ['workdir', 'results_dir', 'compile_cache'])
def test_output_directories_must_be_writable(key, tmp_path):
  """A directory that cannot be made fails validation, before a run that would end unable to
  write; one that can is checked without being made."""
  (tmp_path / 'a_file').write_text('kept')
  config = get_config('smoke')
  config[key] = str(tmp_path / 'a_file' / 'runs')
  error = raises_config_error(config, key, config[key])
  assert 'a file, not a directory' in str(error) and f'--config.{key}=' in str(error)
  config[key] = str(tmp_path / 'new' / 'runs')
  transfer.validate(config)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']
  assert (tmp_path / 'a_file').read_text() == 'kept'


@pytest.mark.parametrize('key, value', [
    ('distributed.coordinator_address', 'localhost'),
    ('distributed.coordinator_address', 'host:port'),
    ('distributed.num_processes', -2),
    ('distributed.process_id', 2),
    ('distributed.process_id', -3),
])
def test_distributed_keys_are_checked(key, value):
  config = with_value(key, value)
  config.distributed.num_processes = config.distributed.num_processes or 2
  raises_config_error(config, key, value)
  good = with_value('distributed.coordinator_address', '10.0.0.1:12345')
  good.distributed.update(num_processes=2, process_id=1)
  transfer.validate(good)


# Command line -----------------------------------------------------------------------------------

def test_command_line_refuses_unknown_keys(tmp_path):
  """config_flags with lock_config=True: a typo in an override fails at parse time, before compute,
  with a ConfigError that names the flag and the key it likely meant."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.transfer', '--config=experiments/configs/transfer.py:smoke',
       '--config.finetune.stpes=10', f'--config.workdir={tmp_path / "work"}',
       f'--config.results_dir={tmp_path / "results"}', '--config.compile_cache=',
       '--config.wandb.mode=disabled'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert ("ConfigError: config.finetune.stpes = '10' is not allowed; allowed: the keys of config.finetune: "
          in result.stderr and 'did you mean --config.finetune.steps?' in result.stderr), result.stderr[-2000:]
  assert not (tmp_path / 'work').exists() and not (tmp_path / 'results').exists()


def test_unknown_keys_are_named_with_or_without_the_config_flag():
  """Without --config the default file is parsed when the flag is defined; with it, by app.run."""
  from experiments import runner
  default = str(REPO / 'experiments' / 'configs' / 'transfer.py')

  def parse():
    raise AttributeError('bare')  # what ml_collections raises for an unknown override

  for argv in (['transfer', '--config.wandb.mdoe=y'],
               ['transfer', '--config', f'{default}:smoke', '--config.wandb.mdoe', 'y']):
    with pytest.raises(ConfigError, match=r"config.wandb.mdoe = 'y' .* did you mean --config.wandb.mode\?"):
      runner.refusing_unknown_keys(parse, argv, default)
  with pytest.raises(AttributeError, match='bare'):  # every key known: the parser's own error
    runner.refusing_unknown_keys(parse, ['transfer', '--config.seeds=2'], default)


@pytest.mark.parametrize('key, allowed, guess', [
    ('modle', "the keys of config: ['checkpoint_every',", '--config.model?'),
    ('pretrian.steps', 'the keys of config: ', '--config.pretrain.steps?'),
    ('wandb.mdoe', "the keys of config.wandb: ['mode', 'project']", '--config.wandb.mode?'),
    ('seeds.count', 'no key below config.seeds: it holds a value', None),
    ('zzzz', 'the keys of config: ', None),
])
def test_unknown_keys_name_the_keys_there_and_the_nearest(key, allowed, guess):
  config = get_config('smoke')
  with pytest.raises(ConfigError) as info:
    cfg.check_key(config, key, '1')
  message = str(info.value)
  assert message.startswith(f"config.{key} = '1' is not allowed; allowed: {allowed}"), message
  assert (f'did you mean {guess}' in message) if guess else 'did you mean' not in message
  cfg.check_key(config, 'finetune.steps')  # a known key passes


def test_multi_host_without_a_cluster_says_which_keys_to_give(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'KUBERNETES_', 'TPU_'))}
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.transfer', '--config=experiments/configs/transfer.py:smoke',
       '--config.distributed.enabled=True', f'--config.workdir={tmp_path / "work"}',
       f'--config.results_dir={tmp_path / "results"}', '--config.compile_cache=', '--config.wandb.mode=disabled'],
      cwd=REPO, env=dict(env, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "ConfigError: config.distributed.coordinator_address = ''" in result.stderr
  assert '--config.distributed.num_processes=N' in result.stderr
  assert not (tmp_path / 'work').exists() and not (tmp_path / 'results').exists()


def test_command_line_overrides_sequence_keys(monkeypatch):
  """Methods, targets and label budgets are tuples, so config_flags can override them."""
  config_file = REPO / 'experiments' / 'configs' / 'transfer.py'
  argv = ['transfer', f'--config={config_file}:smoke',
          '--config.labels_per_class=(1,)', "--config.methods=('scratch', 'l2sp')",
          "--config.targets=('sklearn_digits',)", '--config.seeds=5', '--config.pretrain.learning_rate=0.01']
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', f'{config_file}:smoke', flag_values=values, lock_config=True)
  values(argv)
  config = values.config
  assert tuple(config.labels_per_class) == (1,) and tuple(config.methods) == ('scratch', 'l2sp')
  assert tuple(config.targets) == ('sklearn_digits',)
  assert config.seeds == 5 and config.pretrain.learning_rate == 0.01
  transfer.validate(config)


# Hash -------------------------------------------------------------------------------------------

def test_config_hash_is_stable():
  config = get_config('smoke')
  first = cfg.config_hash(config)
  assert cfg.config_hash(config) == first == cfg.config_hash(get_config('smoke'))
  assert cfg.config_hash(config.to_dict()) == first
  assert len(first) == 12 and int(first, 16) >= 0


@pytest.mark.parametrize('key, value', [
    ('pretrain.steps', 40), ('finetune.learning_rate', 3e-4), ('model', 'resnet20_cifar'),
    ('seeds', 3), ('labels_per_class', [1]), ('l2sp.alpha', 0.1),
])
def test_config_hash_changes_with_what_is_computed(key, value):
  config = get_config('smoke')
  before = cfg.config_hash(config)
  *parents, last = key.split('.')
  holder = config[parents[0]] if parents else config
  holder[last] = value
  assert cfg.config_hash(config) != before


@pytest.mark.parametrize('key, value', [
    ('workdir', '/elsewhere'), ('wandb.mode', 'disabled'), ('wandb.project', 'other'),
    ('progress', True), ('side_by_side', 'sequential'), ('fsdp', True),
])
def test_config_hash_ignores_logging_and_placement(key, value):
  config = get_config('smoke')
  before = cfg.config_hash(config)
  *parents, last = key.split('.')
  holder = config[parents[0]] if parents else config
  holder[last] = value
  assert cfg.config_hash(config) == before


def test_presets_hash_differently():
  hashes = {cfg.config_hash(get_config(p)) for p in cfg.PRESETS}
  assert len(hashes) == len(cfg.PRESETS)
