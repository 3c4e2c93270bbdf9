"""The training spine: pure steps learn, seeds side by side equal seeds alone, 8 devices equal one,
a resumed run equals an uninterrupted one bit for bit, non-finite losses stop the run naming the
step, transfer optimizers freeze what they should, and evaluation masks its padding.

Everything runs a tiny digit CNN (8x8 inputs, width 4) so that compiles stay short.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cnnjax import data, metrics, models, ops, tracking
from cnnjax.methods.classification import cross_entropy
from cnnjax.methods.transfer import finetune_optimizer, l2sp, path_str, with_frozen_norms
from cnnjax.train import loop, sharding, state as train_state, steps
from cnnjax.train.checkpoint import Checkpoints

REPO = Path(__file__).resolve().parents[1]
CLASSES, SIZE, N, BATCH, CHUNK = 5, 8, 32, 8, 5
SIDE_CHUNK = 2  # steps per chunk in the side-by-side comparison (unrolled over members: keep it short)
SEEDS = (0, 1)
TOL = dict(rtol=1e-4, atol=1e-5)


def build(seed):
  return models.build('digit_cnn', num_classes=CLASSES, seed=seed, size=SIZE, width=4)


def split_for(seed, n=N):
  rng = np.random.default_rng(100 + seed)
  return {'image': rng.uniform(size=(n, SIZE, SIZE, 1)).astype(np.float32),
          'label': rng.integers(0, CLASSES, n).astype(np.int32)}


def resident_batch(split, state):
  return data.device_batch(split, state.key('data'), state.step, BATCH)


class Spine:
  """One model family, optimizer and chunk program shared by the tests (compiled once per mode)."""

  def __init__(self):
    self.tx = optax.adam(1e-2)
    self.models = {s: build(s) for s in SEEDS}
    self.graphdef = train_state.split_model(self.models[SEEDS[0]])[0]
    self.step = steps.make_train_step(self.graphdef, self.tx, cross_entropy)
    self.chunk = steps.make_chunk(self.step, resident_batch, CHUNK)
    self.side_chunk = steps.make_chunk(self.step, resident_batch, SIDE_CHUNK)
    self.splits = {s: split_for(s) for s in SEEDS}
    self.sequential = steps.over_members(self.chunk, 'sequential')
    self.mesh = sharding.make_mesh(1)

  def state(self, seed):
    return train_state.create(self.models[seed], self.tx, seed)

  def states(self, seeds=SEEDS):
    """Fresh stacked states (new buffers: the member programs donate their input), placed on the
    mesh as the experiments place them (a restored checkpoint comes back placed alike)."""
    return sharding.replicate(train_state.stack([self.state(s) for s in seeds]), self.mesh)

  def sources(self, seeds=SEEDS):
    return sharding.replicate(train_state.stack([self.splits[s] for s in seeds]), self.mesh)


@pytest.fixture(scope='module')
def spine():
  return Spine()


def assert_trees_close(actual, expected, **tol):
  actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
  expected_leaves = jax.tree.leaves(expected)
  assert len(actual_leaves) == len(expected_leaves)
  for (path, a), e in zip(actual_leaves, expected_leaves):
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape and a.dtype == e.dtype, jax.tree_util.keystr(path)
    if np.issubdtype(a.dtype, np.floating):
      np.testing.assert_allclose(a, e, err_msg=jax.tree_util.keystr(path), **tol)
    else:
      np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


def assert_trees_equal(actual, expected):
  actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
  expected_leaves = jax.tree.leaves(expected)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(actual_leaves, expected_leaves):
    assert np.array_equal(np.asarray(a), np.asarray(e)), f'{jax.tree_util.keystr(path)} differs'


def by_path(state):
  return {path_str(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


# Learning ---------------------------------------------------------------------------------------

def test_train_step_lowers_the_loss_on_a_fixed_batch(spine):
  step = jax.jit(spine.step)
  state = spine.state(0)
  batch = {k: v[:16] for k, v in spine.splits[0].items()}
  losses = []
  for _ in range(20):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
    assert np.isfinite(losses[-1]) and float(m['update_norm']) > 0
  assert int(state.step) == 20
  assert losses[-1] < 0.5 * losses[0], losses
  assert float(m['accuracy']) >= 0.75


def test_step_is_a_pure_function_of_state_and_batch(spine):
  step = jax.jit(spine.step)
  state = spine.state(1)
  batch = {k: v[:BATCH] for k, v in spine.splits[1].items()}
  first, again = step(state, batch), step(state, batch)
  assert_trees_equal(first, again)


def test_chunk_equals_its_steps_one_by_one(spine):
  split = spine.splits[0]
  state, metrics = jax.jit(spine.side_chunk)(spine.state(0), split)
  step = jax.jit(lambda state: spine.step(state, resident_batch(split, state)))
  expected, history = spine.state(0), []
  for _ in range(SIDE_CHUNK):
    expected, m = step(expected)
    history.append(m)
  assert int(state.step) == SIDE_CHUNK
  assert_trees_close(state, expected, **TOL)
  assert_trees_close(metrics, jax.tree.map(lambda *xs: np.stack(xs), *history), **TOL)


def _while_loops(spine, fn):
  return jax.jit(fn).lower(spine.state(0), spine.splits[0]).as_text().count('stablehlo.while')


@pytest.mark.parametrize('k', [1, 3])
def test_chunks_have_no_while_loop(spine, k):
  """A rolled loop around weight-gradient convolutions runs ~20x slower on XLA:CPU (the step's
  own loops, e.g. the random-bits generator's, are fine)."""
  chunk = steps.make_chunk(spine.step, resident_batch, k)
  one_step = lambda state, split: spine.step(state, resident_batch(split, state))
  assert _while_loops(spine, chunk) <= _while_loops(spine, one_step)
  assert jax.eval_shape(chunk, spine.state(0), spine.splits[0])[1]['loss'].shape == (k,)


def test_chunks_roll_on_accelerators_and_equal_unrolled(spine, monkeypatch):
  """On a GPU/TPU the k steps stay one rolled loop (fast there, one step to compile); either way
  the chunk computes the same steps."""
  unrolled = steps.make_chunk(spine.step, resident_batch, 3)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  rolled = steps.make_chunk(spine.step, resident_batch, 3)
  assert _while_loops(spine, rolled) == _while_loops(spine, unrolled) + 1
  monkeypatch.undo()
  (state, metrics), (expected, expected_metrics) = (
      jax.jit(chunk)(spine.state(0), spine.splits[0]) for chunk in (rolled, unrolled))
  assert_trees_close(state, expected, **TOL)
  assert_trees_close(metrics, expected_metrics, **TOL)


# Seeds side by side -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def alone(spine):
  """Each seed trained on its own (no member axis), two chunks."""
  chunk = jax.jit(spine.side_chunk)
  runs = {}
  for seed in SEEDS:
    state, history = spine.state(seed), []
    for _ in range(2):
      state, m = chunk(state, spine.splits[seed])
      history.append(m)
    runs[seed] = (state, jax.tree.map(lambda *xs: np.concatenate(xs), *history))
  return runs


@pytest.mark.parametrize('mode', ['vmap', 'unroll', 'sequential', 'threads'])
def test_seeds_side_by_side_equal_seeds_alone(spine, alone, mode):
  program = steps.over_members(spine.side_chunk, mode)  # threads: the 1st call compiles, the 2nd runs threads
  states, sources, history = spine.states(), spine.sources(), []
  for _ in range(2):
    states, m = program(states, sources)
    history.append(m)
  history = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *history)
  assert int(np.asarray(states.step)[0]) == 2 * SIDE_CHUNK
  for i, seed in enumerate(SEEDS):
    expected_state, expected_metrics = alone[seed]
    assert_trees_close(train_state.member(states, i), expected_state, **TOL)
    assert_trees_close(jax.tree.map(lambda x: x[i], history), expected_metrics, **TOL)
  # The seeds really differ (the comparison is not between copies of one run).
  assert not np.allclose(history['loss'][0], history['loss'][1])


def test_one_member_on_threads_runs_on_the_calling_thread(spine, monkeypatch):
  """A thread of its own would only cost the one member time: it runs where it is called."""
  program = steps.over_members(spine.side_chunk, 'threads')
  sources = spine.sources(SEEDS[:1])
  states = program(spine.states(SEEDS[:1]), sources)[0]  # the first call compiles

  def no_threads(*args, **kwargs):
    raise AssertionError('one member started a thread pool')
  monkeypatch.setattr(steps.concurrent.futures, 'ThreadPoolExecutor', no_threads)
  states, metrics = program(states, sources)
  assert int(np.asarray(states.step)[0]) == 2 * SIDE_CHUNK and np.isfinite(metrics['loss']).all()


@pytest.mark.skipif(not ops.onednn_available(), reason='oneDNN convolutions unavailable')
def test_unrolled_members_convolve_on_their_share_of_the_cores(spine, monkeypatch):
  """In one unrolled program each member's convolutions run on its share of the cores, so that
  XLA runs two members' convolutions at once; one member keeps every core (threads = 0)."""
  monkeypatch.setattr(steps, 'cores', lambda: 4)
  assert [steps.core_share(m) for m in (1, 2, 3, 5)] == [0, 2, 1, 1]
  program = steps.over_members(spine.side_chunk, 'unroll')
  text = program.lower(spine.states(), spine.sources()).as_text()
  calls = text.count('cnnjax_conv_')
  assert calls and text.count('threads = 2 : i64') == calls
  one = program.lower(spine.states(SEEDS[:1]), spine.sources(SEEDS[:1])).as_text()
  assert one.count('threads = 0 : i64') == one.count('cnnjax_conv_') > 0


def test_auto_member_mode_avoids_vmap_on_cpu():
  """vmapped convolutions become slow grouped convolutions on CPU: one CPU device runs members
  on threads, several CPU devices one after another; accelerators vmap."""
  auto = steps.member_mode('auto')
  if jax.default_backend() == 'cpu':
    assert auto == ('threads' if jax.device_count() == 1 else 'sequential')
  else:
    assert auto == 'vmap'
  assert all(steps.member_mode(m) == m for m in steps.MEMBER_MODES[1:])
  with pytest.raises(ValueError, match='pmap'):
    steps.over_members(lambda s, b: (s, {}), 'pmap')


# Eight devices equal one ------------------------------------------------------------------------

EIGHT_DEVICES = textwrap.dedent('''
    import json
    import jax, numpy as np, optax
    from cnnjax import data, models
    from cnnjax.methods.classification import cross_entropy
    from cnnjax.train import sharding, state as train_state, steps

    assert jax.device_count() == 8, jax.devices()
    BATCH, CHUNK, CHUNKS, SIZE = 16, 1, 3, 8
    rng = np.random.default_rng(0)
    split = {'image': rng.uniform(size=(64, SIZE, SIZE, 1)).astype(np.float32),
             'label': rng.integers(0, 5, 64).astype(np.int32)}
    model = models.build('digit_cnn', num_classes=5, seed=0, size=SIZE, width=4)
    tx = optax.adam(1e-2)
    step = steps.make_train_step(train_state.split_model(model)[0], tx, cross_entropy)

    def train(devices, fsdp=False):
      """The transfer experiment's path: replicated (or FSDP) state, replicated data,
      device_batch + shard_batch."""
      mesh = sharding.make_mesh(devices)
      seen = []
      def batch_fn(source, state):
        batch = sharding.shard_batch(data.device_batch(source, state.key('data'), state.step, BATCH), mesh)
        jax.debug.inspect_array_sharding(batch['image'], callback=seen.append)
        return batch
      chunk = steps.over_members(steps.make_chunk(step, batch_fn, CHUNK), 'unroll')
      states = sharding.place_state(train_state.stack([train_state.create(model, tx, 0)]), mesh, fsdp, min_size=64)
      source = sharding.replicate(train_state.stack([split]), mesh)
      losses = []
      for _ in range(CHUNKS):
        states, metrics = chunk(states, source)
        losses += np.asarray(metrics['loss'])[0].tolist()
      params = jax.tree.leaves(states.params)
      return dict(losses=losses, params=[np.asarray(p).tolist() for p in params],
                  steps=int(np.asarray(states.step)[0]),
                  batch_devices=len(seen[0].device_set),
                  batch_shard_shape=list(seen[0].shard_shape((BATCH, SIZE, SIZE, 1))),
                  params_replicated=all(p.sharding.is_fully_replicated for p in params),
                  params_devices=len(params[0].sharding.device_set),
                  sharded_params=sum(p.size for p in params if not p.sharding.is_fully_replicated),
                  sharded_moments=sum(x.size for x in jax.tree.leaves(states.opt_state)
                                      if not x.sharding.is_fully_replicated),
                  all_params=sum(p.size for p in params))

    print('RESULT ' + json.dumps({'eight': train(8), 'fsdp': train(8, fsdp=True), 'one': train(1)}))
''')


def test_eight_devices_equal_one(tmp_path):
  """XLA_FLAGS must be set before JAX starts, so this runs in a fresh process."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip())
  done = subprocess.run([sys.executable, '-c', EIGHT_DEVICES], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  line = next(l for l in done.stdout.splitlines() if l.startswith('RESULT '))
  runs = json.loads(line[len('RESULT '):])
  eight, fsdp, one = runs['eight'], runs['fsdp'], runs['one']
  # The 8-device run split every batch 8 ways and kept the state replicated on all 8.
  assert eight['batch_devices'] == 8 and eight['batch_shard_shape'] == [2, SIZE, SIZE, 1]
  assert eight['params_replicated'] and eight['params_devices'] == 8
  assert one['batch_devices'] == 1 and one['batch_shard_shape'] == [16, SIZE, SIZE, 1]
  assert eight['steps'] == one['steps'] == 3
  np.testing.assert_allclose(eight['losses'], one['losses'], **TOL)
  assert len(eight['params']) == len(one['params']) > 0
  for a, b in zip(eight['params'], one['params']):
    np.testing.assert_allclose(np.array(a), np.array(b), **TOL)
  # FSDP: most parameters and Adam moments stay split over the 8 devices through training, and
  # the run equals the replicated one.
  assert fsdp['sharded_params'] > 0.9 * fsdp['all_params'] and fsdp['sharded_moments'] > 0
  np.testing.assert_allclose(fsdp['losses'], one['losses'], **TOL)
  for a, b in zip(fsdp['params'], one['params']):
    np.testing.assert_allclose(np.array(a), np.array(b), **TOL)


# Resume -----------------------------------------------------------------------------------------

def test_resumed_run_equals_uninterrupted_run(spine, tmp_path):
  test_split = split_for(7, n=20)
  evaluate_members = loop.make_evaluate(spine.graphdef, metrics.classification, 8, 'sequential')
  evaluate = lambda states: evaluate_members(states, test_split)
  sources = spine.sources()

  def fit(states, run, total_steps):
    trackers = [tracking.Tracker(tmp_path / run / f'seed_{s}', resume_step=int(np.asarray(states.step)[0]))
                for s in SEEDS]
    with Checkpoints(tmp_path / run / 'checkpoints') as checkpoints:
      try:
        return loop.fit(states, sources, chunk_fn=spine.sequential, total_steps=total_steps,
                        chunk_steps=CHUNK, evaluate=evaluate, eval_every=10, checkpoints=checkpoints,
                        checkpoint_every=5, trackers=trackers, progress=False)
      finally:
        for tracker in trackers:
          tracker.close()

  straight, straight_eval = fit(spine.states(), 'straight', 20)

  fit(spine.states(), 'resumed', 10)
  # A crash after logging past the last checkpoint leaves records the resumed run must drop.
  with open(tmp_path / 'resumed' / 'seed_0' / tracking.METRICS_FILE, 'a') as f:
    f.write(json.dumps({'step': 15, 'train/loss': 123.0}) + '\n{"step": 1')
  with Checkpoints(tmp_path / 'resumed' / 'checkpoints') as checkpoints:
    assert checkpoints.latest_step() == 10
    restored = checkpoints.restore(spine.states())
  assert int(np.asarray(restored.step)[0]) == 10
  resumed, resumed_eval = fit(restored, 'resumed', 20)

  assert_trees_equal(resumed, straight)
  for key in straight_eval:
    assert np.array_equal(resumed_eval[key], straight_eval[key])
  for seed in SEEDS:
    expected = tracking.read_metrics(tmp_path / 'straight' / f'seed_{seed}')
    assert [r['step'] for r in expected] == [5, 10, 10, 15, 20, 20]
    assert tracking.read_metrics(tmp_path / 'resumed' / f'seed_{seed}') == expected
  with Checkpoints(tmp_path / 'straight' / 'checkpoints') as checkpoints:
    assert checkpoints.latest_step() == 20


# Non-finite guard -------------------------------------------------------------------------------

def test_exploding_learning_rate_stops_the_run(spine):
  tx = optax.sgd(1e30)
  step = steps.make_train_step(spine.graphdef, tx, cross_entropy)
  program = steps.over_members(steps.make_chunk(step, resident_batch, 2), 'sequential')
  states = train_state.stack([train_state.create(spine.models[0], tx, 0)])
  with pytest.raises(loop.NonFiniteError) as info:
    loop.fit(states, train_state.stack([spine.splits[0]]), chunk_fn=program, total_steps=10, chunk_steps=2,
             progress=False)
  error = info.value
  assert 1 <= error.step <= 10 and error.member == 0
  assert f'step {error.step}' in str(error) and 'learning rate' in str(error)


def test_nan_loss_names_the_step_and_member(spine):
  """Member 1's loss turns NaN at its 5th step (state.step 4): the error names step 5, member 1."""
  def poisoned_loss(model, batch, rng):
    loss, aux = cross_entropy(model, batch, rng)
    return loss + jnp.where(batch['poison'], jnp.nan, 0.0), aux

  def scripted_batch(source, state):
    return jax.tree.map(lambda x: x[state.step], source)

  step = steps.make_train_step(spine.graphdef, spine.tx, poisoned_loss)
  program = steps.over_members(steps.make_chunk(step, scripted_batch, 2), 'sequential')
  total = 6
  sources = []
  for seed in SEEDS:
    split = spine.splits[seed]
    poison = np.zeros(total, bool)
    poison[4] = seed == SEEDS[1]
    sources.append({'image': np.stack([split['image'][:BATCH]] * total),
                    'label': np.stack([split['label'][:BATCH]] * total), 'poison': poison})
  with pytest.raises(loop.NonFiniteError) as info:
    loop.fit(spine.states(), train_state.stack(sources), chunk_fn=program, total_steps=total, chunk_steps=2,
             progress=False)
  assert (info.value.step, info.value.member) == (5, 1)
  assert 'step 5 (member 1)' in str(info.value)


# Transfer optimizers ----------------------------------------------------------------------------

def test_finetune_optimizer_freezes_and_frozen_norms_keep_statistics(spine):
  """Train stage 1 and the head: stages 0 and 2 keep their values bit for bit and the frozen
  batch norm (stage 0) its statistics; the trainable ones all move."""
  trainable = ('backbone/stages/1', 'head')
  tx = finetune_optimizer(optax.adam, 1e-2, trainable)
  step = jax.jit(steps.make_train_step(spine.graphdef, tx, with_frozen_norms(cross_entropy, trainable)))
  start = train_state.create(spine.models[0], tx, 0)
  state = start
  for i in range(3):
    state, _ = step(state, {k: v[i * BATCH:(i + 1) * BATCH] for k, v in spine.splits[0].items()})

  before, after = by_path(start.params), by_path(state.params)
  frozen = [p for p in before if p.startswith(('backbone/stages/0/', 'backbone/stages/2/'))]
  trained = [p for p in before if p.startswith(('backbone/stages/1/', 'head/'))]
  assert frozen and trained and len(frozen) + len(trained) == len(before)
  for p in frozen:
    assert np.array_equal(before[p], after[p]), p
  for p in trained:
    assert not np.array_equal(before[p], after[p]), p

  stats_before, stats_after = by_path(start.model_state), by_path(state.model_state)
  for p in stats_before:
    if p.startswith('backbone/stages/0/norm/'):
      assert np.array_equal(stats_before[p], stats_after[p]), p
    elif p.startswith('backbone/stages/1/norm/'):
      assert not np.array_equal(stats_before[p], stats_after[p]), p
  assert any(p.startswith('backbone/stages/0/norm/') for p in stats_before)


def test_without_frozen_norms_frozen_statistics_move(spine):
  """The control of the test above: a plain loss updates every batch norm's statistics."""
  tx = finetune_optimizer(optax.adam, 1e-2, ('head',))
  step = jax.jit(steps.make_train_step(spine.graphdef, tx, cross_entropy))
  start = train_state.create(spine.models[0], tx, 0)
  state, _ = step(start, {k: v[:BATCH] for k, v in spine.splits[0].items()})
  before, after = by_path(start.model_state), by_path(state.model_state)
  assert not np.array_equal(before['backbone/stages/0/norm/mean'], after['backbone/stages/0/norm/mean'])
  assert np.array_equal(by_path(start.params)['backbone/stages/0/conv/kernel'],
                        by_path(state.params)['backbone/stages/0/conv/kernel'])


def l2sp_penalty(params, anchor, alpha, beta):
  """alpha/2 ||w_S - w0_S||^2 over the backbone + beta/2 ||w_head||^2 (Li et al. 2018, eq. 4)."""
  backbone = sum(jnp.sum((w - w0) ** 2) for w, w0 in
                 zip(jax.tree.leaves(params['backbone']), jax.tree.leaves(anchor['backbone'])))
  head = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(params['head']))
  return alpha / 2 * backbone + beta / 2 * head


def perturbed(tree, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + np.float32(scale) * rng.standard_normal(x.shape, np.float32), tree)


def test_l2sp_adds_the_gradient_of_its_penalty(spine):
  alpha, beta = 0.3, 0.05
  anchor = train_state.split_model(spine.models[0])[1]
  params = perturbed(anchor, 1, 0.1)
  grads = perturbed(jax.tree.map(jnp.zeros_like, anchor), 2, 1.0)
  penalty_grad = jax.jit(jax.grad(l2sp_penalty), static_argnums=(2, 3))
  expected = jax.tree.map(jnp.add, grads, penalty_grad(params, anchor, alpha, beta))

  def update(tx):
    return jax.jit(lambda g, w0, w: tx.update(g, tx.init(w0), w)[0])(grads, anchor, params)

  assert_trees_close(update(l2sp(alpha, beta)), expected, rtol=1e-6, atol=1e-7)

  # As the transfer experiment chains it: L2-SP, then plain SGD (lr 1) on the trainable parameters;
  # frozen ones get no update, trainable ones minus the regularised gradient.
  trainable = ('backbone/stages/2', 'head')
  tx = optax.chain(l2sp(alpha, beta), finetune_optimizer(optax.sgd, 1.0, trainable))
  got, want = by_path(update(tx)), by_path(expected)
  for p in want:
    if p.startswith(('backbone/stages/2/', 'head/')):
      np.testing.assert_allclose(got[p], -want[p], rtol=1e-6, atol=1e-7, err_msg=p)
    else:
      assert not got[p].any(), p


def test_finetune_optimizer_scales_the_backbone_rate(spine):
  """Pretrained weights learn at backbone_scale x the head's rate; frozen ones not at all."""
  params = train_state.split_model(spine.models[0])[1]
  grads = perturbed(jax.tree.map(jnp.zeros_like, params), 3, 1.0)
  tx = finetune_optimizer(optax.sgd, 0.5, ('backbone/stages/1', 'backbone/stages/2', 'head'), backbone_scale=0.1)
  updates = jax.jit(lambda g, w: tx.update(g, tx.init(w), w)[0])(grads, params)
  got, g = by_path(updates), by_path(grads)
  for p in g:
    scale = 0.0 if p.startswith('backbone/stages/0/') else 0.1 if p.startswith('backbone/') else 1.0
    np.testing.assert_allclose(got[p], -0.5 * scale * g[p], rtol=1e-6, err_msg=p)


# Evaluation -------------------------------------------------------------------------------------

@pytest.mark.parametrize('n, mode', [(32, 'unroll'), (37, 'unroll'), (37, 'vmap'), (5, 'sequential')])
def test_evaluate_equals_numpy_over_a_split(spine, n, mode):
  states = spine.states()
  split = split_for(9, n=n)
  logits = []
  for i in range(len(SEEDS)):
    model = nnx.merge(spine.graphdef, train_state.member(states, i).params,
                      train_state.member(states, i).model_state)
    model.eval()
    logits.append(np.asarray(model(split['image']), np.float64))
  # Half the labels agree with member 0's predictions, so accuracies differ from chance and by member.
  split['label'][: n // 2] = logits[0][: n // 2].argmax(-1)

  evaluate = loop.make_evaluate(spine.graphdef, metrics.classification, 8, mode)
  results = jax.device_get(evaluate(states, split))
  assert set(results) == {'accuracy', 'nll'}
  for i, z in enumerate(logits):
    accuracy = np.mean(z.argmax(-1) == split['label'])
    log_probs = z - z.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.mean(log_probs[np.arange(n), split['label']])
    np.testing.assert_allclose(results['accuracy'][i], accuracy, rtol=1e-6)
    np.testing.assert_allclose(results['nll'][i], nll, rtol=1e-5)
  assert results['accuracy'][0] >= (n // 2) / n


def test_checkpoints_accept_a_relative_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tree = {'w': jnp.arange(3.0)}
  with Checkpoints('workdir/cell/checkpoints') as checkpoints:
    checkpoints.save(5, tree)
  with Checkpoints('workdir/cell/checkpoints') as checkpoints:
    assert checkpoints.latest_step() == 5
    np.testing.assert_array_equal(checkpoints.restore(tree)['w'], tree['w'])


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path):
  tree = {'w': jnp.arange(3.0)}
  with Checkpoints(tmp_path / 'ckpt', max_to_keep=3) as checkpoints:
    checkpoints.save(5, tree)
    checkpoints.save(10, {'w': tree['w'] + 1})
  for path in (tmp_path / 'ckpt' / '10').rglob('*'):  # truncate every file of the newer checkpoint
    if path.is_file():
      path.write_bytes(path.read_bytes()[:3])
  with Checkpoints(tmp_path / 'ckpt') as checkpoints, pytest.warns(RuntimeWarning, match='step 10'):
    restored = checkpoints.restore(tree)
  np.testing.assert_array_equal(restored['w'], tree['w'])


def test_no_readable_checkpoint_means_a_fresh_start(tmp_path):
  tree = {'w': jnp.arange(3.0)}
  with Checkpoints(tmp_path / 'ckpt') as checkpoints:
    checkpoints.save(5, tree)
  for path in (tmp_path / 'ckpt' / '5').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')
  with Checkpoints(tmp_path / 'ckpt') as checkpoints, pytest.warns(RuntimeWarning):
    assert checkpoints.restore(tree) is None


def test_bfloat16_compute_keeps_float32_parameters_and_trains():
  model = models.build('digit_cnn', num_classes=4, seed=0, size=8, width=4, dtype='bfloat16')
  graphdef, params, _ = train_state.split_model(model)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  tx = optax.adam(1e-2)
  step = jax.jit(steps.make_train_step(graphdef, tx, cross_entropy))
  state = train_state.create(model, tx, 0)
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(size=(16, 8, 8, 1)).astype(np.float32), 'label': rng.integers(0, 4, 16).astype(np.int32)}
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[0]
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}


def test_cpu_reductions_go_to_ynnpack_and_match_numpy():
  """cnnjax's CPU default (cnnjax/__init__.py), unless the caller's XLA_FLAGS chose otherwise."""
  import cnnjax
  if jax.default_backend() != 'cpu' or cnnjax.CPU_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
    pytest.skip('not the CPU default')
  x = np.random.default_rng(0).normal(size=(16, 8, 8, 32)).astype(np.float32)
  stats = jax.jit(lambda x: (x.mean(axis=(0, 1, 2)), (x * x).mean(axis=(0, 1, 2))))
  assert '__ynn_fusion' in stats.lower(x).compile().as_text()
  mean, square = stats(x)
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(square, (x * x).mean(axis=(0, 1, 2)), rtol=1e-5)


def test_cpu_default_flag_yields_to_the_caller_and_to_accelerator_hosts():
  from cnnjax import CPU_XLA_FLAGS, with_cpu_defaults
  assert with_cpu_defaults('', accelerator_host=False) == CPU_XLA_FLAGS
  assert with_cpu_defaults('--xla_force_host_platform_device_count=8', accelerator_host=False) == (
      f'--xla_force_host_platform_device_count=8 {CPU_XLA_FLAGS}')
  assert with_cpu_defaults('--xla_cpu_experimental_ynn_fusion_type=', accelerator_host=False) == (
      '--xla_cpu_experimental_ynn_fusion_type=')
  assert with_cpu_defaults('--xla_dump_to=/tmp/x', accelerator_host=True) == '--xla_dump_to=/tmp/x'
