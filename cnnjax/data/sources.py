"""Dataset names -> TFDS random-access sources (array_record), with no network at run time.

Two kinds of dataset:
- embedded (`DATASETS`): real data shipped inside a pip package, turned into a TFDS builder under
  `datasets/<name>/`; built into `data_dir` on first use (seconds).
- TFDS catalog (any `tfds.list_builders()` name; `CATALOG` lists the ones the experiments use):
  must be prepared beforehand with `python -m cnnjax.data.prepare NAME`; unprepared ones raise a
  DataError that gives that command.
"""

import contextlib
import fcntl
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants

import cnnjax
from cnnjax.errors import ConfigError, DataError
from cnnjax.registry import Registry

BUILDERS_DIR = Path(cnnjax.__file__).resolve().parents[1] / 'datasets'

DATASETS = Registry('dataset')
"""Embedded dataset name -> its builder folder under `datasets/`."""
DATASETS.register('mnist_5k')('mnist_5k')
DATASETS.register('sklearn_digits')('sklearn_digits')
DATASETS.register('kanji_glyphs')('kanji_glyphs')
DATASETS.register('syn_digits')('syn_digits')
DATASETS.register('mnist_m_5k')('mnist_m_5k')

CATALOG = (
    'mnist', 'fashion_mnist', 'kmnist', 'emnist', 'mnist_corrupted', 'svhn_cropped', 'cifar10',
    'cifar100', 'cifar10_corrupted', 'stl10', 'imagenette', 'oxford_flowers102', 'oxford_iiit_pet',
    'caltech_birds2011', 'omniglot', 'domainnet', 'div2k',
)
"""TFDS catalog datasets the experiments use; any other catalog name works too."""


def default_data_dir():
  """Where datasets live: $CNNJAX_DATA_DIR, else TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return os.environ.get('CNNJAX_DATA_DIR') or constants.get_default_data_dir()


def builder(name, data_dir=None):
  """The TFDS builder for `name`; an embedded dataset is built on first use, a catalog one is not."""
  data_dir = str(data_dir or default_data_dir())
  if name.partition('/')[0] in DATASETS:  # 'kanji_glyphs' or 'kanji_glyphs/small' (a builder config)
    return _prepared_embedded(name, data_dir)
  return _catalog_builder(name, data_dir)


def data_source(name, split, data_dir=None):
  """A random-access source (len, [i], __getitems__) of example dicts for one split of `name`."""
  data_dir = str(data_dir or default_data_dir())
  b = builder(name, data_dir)
  _check_split(b, name, split)
  try:
    source = b.as_data_source(split=split)
  except (NotImplementedError, ValueError, RuntimeError) as e:  # Unprepared, damaged, or no examples selected.
    raise _unreadable(b, name, split, data_dir, e) from e
  if len(source) == 0:
    raise _unreadable(b, name, split, data_dir, 'no examples')
  return source


def load_arrays(name, split, data_dir=None):
  """The whole split as dict(image=uint8 NHWC array, label=int32 array), for on-device loading."""
  source = data_source(name, split, data_dir)
  try:
    records = _read_all(source)
  except RuntimeError as e:  # array_record reports damaged files as RuntimeError
    data_dir = str(data_dir or default_data_dir())
    raise _unreadable(builder(name, data_dir), name, split, data_dir, e) from e
  try:
    images = np.stack([np.asarray(r['image'], np.uint8) for r in records])
  except ValueError as e:
    raise DataError(f'{name}[{split}] has images of different shapes; stream it with '
                    'cnnjax.data.grain_batches and a resizing transform instead') from e
  return {'image': images, 'label': np.asarray([r['label'] for r in records], np.int32)}


def num_classes(name, data_dir=None):
  """Number of label classes, from the builder's metadata."""
  return builder(name, data_dir).info.features['label'].num_classes


def image_shape(name, data_dir=None):
  """(H, W, C) of one image, from the builder's metadata (None for variable sizes)."""
  return tuple(builder(name, data_dir).info.features['image'].shape)


def _prepared_embedded(name, data_dir):
  """The embedded builder, prepared as array_record; a file lock keeps two processes from racing."""
  name, _, config = name.partition('/')
  module = _import_builder(DATASETS.get(name, 'dataset'))
  configs = [c.name for c in module.Builder.BUILDER_CONFIGS]
  if config and config not in configs:
    raise ConfigError('dataset', f'{name}/{config}', [name, *(f'{name}/{c}' for c in configs)],
                      f'{name} has no builder config {config!r}')
  options = {'config': config} if config else {}
  if not module.Builder(data_dir=data_dir, **options).is_prepared():
    with _file_lock(Path(data_dir) / f'.{name}{"-" + config if config else ""}.lock'):
      # Made under the lock: it reads what another process may have built meanwhile, and then builds nothing.
      module.Builder(data_dir=data_dir, **options).download_and_prepare(file_format='array_record')
  # Made once the data is there: a builder made before reads its file format from the code (TFRecord), not
  # from the prepared files, and cannot open them (seen when another process finished in between).
  return module.Builder(data_dir=data_dir, **options)


def _import_builder(folder):
  """`datasets/<folder>/<folder>_dataset_builder.py`, imported the TFDS way (its folder is a package)."""
  if not (BUILDERS_DIR / folder).is_dir():
    raise DataError(f'embedded dataset builder {BUILDERS_DIR / folder} is missing; cnnjax reads '
                    'builders from its repository: install it from there with pip install -e .')
  if str(BUILDERS_DIR) not in sys.path:
    sys.path.insert(0, str(BUILDERS_DIR))
  return importlib.import_module(f'{folder}.{folder}_dataset_builder')


@contextlib.contextmanager
def _file_lock(path):
  """Exclusive lock on `path` across processes, released on exit."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _catalog_builder(name, data_dir):
  """tfds.builder(name), turning an unknown name into a ConfigError that lists the choices."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError('dataset', name, DATASETS.names(),
                      f'Or a TFDS catalog name, e.g. {", ".join(CATALOG)}') from e


def _check_split(b, name, split):
  """DataError naming the known splits when `split` (e.g. 'train', 'train[:90%]+test') names others."""
  known = list(b.info.splits)
  if not known:  # Unprepared catalog set (or tfds.testing.mock_data): as_data_source decides.
    return
  for part in split.split('+'):
    if part.split('[')[0].strip() not in known:
      raise DataError(f'{name} has no split {split!r}; its splits are {sorted(known)}')


def _unreadable(b, name, split, data_dir, reason):
  """DataError for a split that gives no data: how to prepare it, or what TFDS found wrong."""
  command = f'python -m cnnjax.data.prepare {name} --data_dir={data_dir}'
  if not b.is_prepared():
    return DataError(f'TFDS dataset {name!r} is not prepared in {data_dir}. Prepare it once, with '
                     f"TensorFlow and a network: pip install '.[prepare]' && {command}")
  return DataError(f'{name}[{split}] in {b.data_dir} has no readable examples ({reason}); choose '
                   f'another split, or, if its files are damaged, delete that folder and run: {command}')


def _read_all(source):
  """Every record of `source`, in one batched read where the source supports it."""
  indices = list(range(len(source)))
  try:
    return source.__getitems__(indices)
  except (AttributeError, TypeError):
    # Sources without __getitems__, and tfds.testing.mock_data's, whose __getitems__ is unbound.
    return [source[i] for i in indices]
