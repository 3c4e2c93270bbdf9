"""One process of tests/test_distributed.py: trains a few steps on a global batch over every
device of every process, once from a replicated device-resident split and once from grain batches
that each process reads for itself and that become global arrays, saves and restores a checkpoint
in CHECKPOINT_DIR, runs a 3-cell grid of the experiment runner in CHECKPOINT_DIR-grid, and prints
the losses and which cell each process was in as JSON (run as a script, not collected by pytest).

usage: distributed_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS CHECKPOINT_DIR
(PORT '': JAX finds the coordinator, process count and id in the environment, e.g. SLURM's)
"""

import json
import os
import sys

process_id, num_processes, port, devices, checkpoint_dir = sys.argv[1:6]
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from cnnjax import data, models  # noqa: E402
from cnnjax.methods.classification import cross_entropy  # noqa: E402
from cnnjax.train import sharding, state as train_state, steps  # noqa: E402
from cnnjax.train.checkpoint import Checkpoints  # noqa: E402
from experiments import runner  # noqa: E402

if not port:
  sharding.initialize_distributed()
elif int(num_processes) > 1:
  sharding.initialize_distributed(f'127.0.0.1:{port}', int(num_processes), int(process_id))
mesh = sharding.make_mesh()
rng = np.random.default_rng(0)
split = {'image': rng.uniform(size=(64, 8, 8, 1)).astype(np.float32),
         'label': rng.integers(0, 4, 64).astype(np.int32)}
model = models.build('digit_cnn', num_classes=4, seed=0, size=8, width=4)
tx = optax.adam(1e-2)
states = sharding.replicate(train_state.stack([train_state.create(model, tx, 0)]), mesh)
source = sharding.replicate(train_state.stack([split]), mesh)
batch_fn = lambda split, state: sharding.shard_batch(data.device_batch(split, state.key('data'), state.step, 16), mesh)
step = steps.make_train_step(train_state.split_model(model)[0], tx, cross_entropy)
chunk = steps.over_members(steps.make_chunk(step, batch_fn, 2), 'unroll')
losses = []
for _ in range(3):
  states, metrics = chunk(states, source)
  losses += np.asarray(metrics['loss'].addressable_data(0)).ravel().tolist()
# Streaming input: each process reads its block of every global batch with grain.
examples = [{'image': image, 'label': label} for image, label in zip(split['image'], split['label'])]
batches = data.grain_batches(examples, global_batch_size=16, seed=0)
stream_step = jax.jit(step, donate_argnums=0)
state = sharding.replicate(train_state.create(model, tx, 0), mesh)
stream_losses = []
for _ in range(4):
  state, metrics = stream_step(state, sharding.global_batch(next(batches), mesh))
  stream_losses.append(float(metrics['loss'].addressable_data(0)))
with Checkpoints(checkpoint_dir) as checkpoints:
  checkpoints.save(6, states)
with Checkpoints(checkpoint_dir) as checkpoints:
  restored = checkpoints.restore(states)
same = all(np.array_equal(a.addressable_data(0), b.addressable_data(0))
           for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states)))
# A grid through the experiment runner, its workdir shared: every process must be in the same cell.
experiment = runner.Experiment('grid', ml_collections.ConfigDict(
    {'workdir': f'{checkpoint_dir}-grid', 'results_dir': f'{checkpoint_dir}-results', 'preset': 'smoke'}), mesh)
cells = [runner.Cell('row', str(i), {'i': i}) for i in range(3)]
in_cell = lambda cell, _: {'cells': multihost_utils.process_allgather(np.int32(cell.config['i'])).tolist()}
results = experiment.run_grid(cells, in_cell)
grid = [results[cell]['cells'] for cell in cells]
print('RESULT', json.dumps({'devices': jax.device_count(), 'losses': losses, 'restored': same,
                            'stream_losses': stream_losses, 'grid': grid}), flush=True)
