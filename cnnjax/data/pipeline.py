"""Batches for training: a grain loader for any source, and a device-resident loader for small sets.

Both are indexed by step rather than replayed, so a run resumed at step s sees exactly the batches
an uninterrupted run sees from step s on.
"""

import cloudpickle
import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec


def grain_batches(source, *, global_batch_size, seed, shuffle=True, num_epochs=None, transform=None,
                  start_step=0, process_index=None, process_count=None, workers=0):
  """Iterator of this process's numpy batch dicts, from step `start_step` on.

  The example stream is `source` shuffled anew each epoch (deterministic per seed), repeated
  `num_epochs` times (None: forever) and cut into global batches of `global_batch_size`; a batch may
  span two epochs. Process p gets the p-th contiguous block of global_batch_size // process_count
  examples of every global batch, so the processes' batches at a step, concatenated in process
  order, are the global batch a one-process run sees at that step. `transform` maps one example
  dict (numpy) before batching; it runs in reader threads, so it must be deterministic and
  thread-safe. Process index/count default to jax.process_index() / jax.process_count().

  Reading and decoding hold Python's GIL, so one process reads at most ~6-10k MNIST-sized images/s.
  `workers` > 0 reads in that many worker processes instead (grain's `mp_prefetch`: worker w reads
  every `workers`-th batch; the batches and their order stay the same); they start in ~2-3 s, and
  `source` and `transform` must be picklable.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batch_size = _per_process_batch_size(global_batch_size, process_count)
  ds = grain.MapDataset.range(len(source))  # batches of indices, read a batch at a time
  if shuffle:
    ds = ds.shuffle(_grain_seed(seed))
  ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
  global_steps = len(ds) // process_count
  ds = ds[process_index:global_steps * process_count:process_count]
  ds = ds[start_step:].map(lambda indices: _read_batch(source, indices, transform))
  ds = ds.to_iter_dataset(_read_options())
  if workers:
    _check_picklable(source, transform, workers)
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside `app.run`, their defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return iter(ds)


def _read_batch(source, indices, transform):
  """The examples at `indices`, through `transform`, stacked: one `__getitems__` call where the
  source has it (TFDS's ArrayRecord sources read and decode a batch ~3x faster than one by one)."""
  indices = [int(i) for i in indices]
  examples = source.__getitems__(indices) if hasattr(source, '__getitems__') else [source[i] for i in indices]
  if transform is not None:
    examples = [transform(example) for example in examples]
  return jax.tree.map(lambda *leaves: np.stack(leaves), *examples)


def _check_picklable(source, transform, workers):
  """Fail at the call, naming the fix, where grain would fail at the first batch."""
  try:
    cloudpickle.dumps((source, transform))  # as grain sends them to its workers
  except Exception as error:
    raise ValueError(f'grain_batches(workers={workers}) sends `source` and `transform` to worker processes, '
                     f'but they cannot be pickled ({type(error).__name__}: {error}); make them picklable '
                     'or read in this process (workers=0)') from error


def _per_process_batch_size(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                     f'process_count={process_count}')
  return global_batch_size // process_count


def _grain_seed(seed):
  """A well-mixed 32-bit shuffle seed: grain shuffles epoch e with seed + e, so nearby seeds would
  otherwise share permutations shifted by an epoch (seed 1 epoch 0 == seed 0 epoch 1)."""
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _read_options():
  """One reader thread, prefetching two batches: decoding holds Python's GIL, so more threads were
  slower (mnist_5k, batch 128, 2 cores: 8.8-10.6k images/s with one, 7.0k with two, 6.1-6.8k with
  eight; 2.9k on a 16-core GPU host with eight threads and one-by-one reads)."""
  return grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def device_batch(arrays, key, step, batch_size, count=None):
  """Batch number `step` of a split held on device: a pure, jittable function of (key, step).

  Epoch e = step // (n // batch_size) visits the examples in the order
  jax.random.permutation(fold_in(key, e), n), dropping the last n % batch_size; `step` may be traced.
  `arrays` is a pytree of arrays sharing the leading axis; returns the same pytree of batches.
  With `count` (may be traced) only the first `count` examples are used: splits of different
  sizes padded to one shape then share one compiled program.
  """
  size = jax.tree.leaves(arrays)[0].shape[0]
  n = size if count is None else count
  if isinstance(n, int) and n < batch_size:
    raise ValueError(f'batch_size={batch_size} is larger than the {n} examples')
  epoch, index = jnp.divmod(step, n // batch_size)
  epoch_key = jax.random.fold_in(key, epoch)
  if count is None:
    order = jax.random.permutation(epoch_key, size)
  else:  # a random order of the valid examples first, padding last
    order = jnp.argsort(jnp.where(jnp.arange(size) < count, jax.random.uniform(epoch_key, (size,)), 2.0))
  chosen = lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
  return jax.tree.map(lambda a: jnp.take(a, chosen, axis=0), arrays)


def put_on_device(arrays, sharding=None):
  """Numpy arrays -> device arrays; with a sharding, replicated over its devices (any device can
  then gather any example, which device_batch needs)."""
  if sharding is not None and not sharding.is_fully_replicated:
    sharding = NamedSharding(sharding.mesh, PartitionSpec())
  return jax.device_put(arrays, sharding)
