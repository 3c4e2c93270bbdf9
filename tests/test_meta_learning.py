"""Meta-learning pieces: MAML's second-order meta-gradient against finite differences, tasks side by
side, the episodic sampler (determinism, disjoint classes, clear errors), the few-shot classifiers,
and the kanji_glyphs builder's stroke parser."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import ops
from cnnjax.data import episodes as ep
from cnnjax.errors import ConfigError, DataError
from cnnjax.methods import meta_learning as ml
from cnnjax.data.sources import BUILDERS_DIR


# MAML -------------------------------------------------------------------------------------------

def tiny_task(seed=0, ways=3, shots=2, queries=2, size=16):
  rng = np.random.default_rng(seed)
  support = jnp.asarray(rng.uniform(size=(ways * shots, size, size, 1)), jnp.float32)
  query = jnp.asarray(rng.uniform(size=(ways * queries, size, size, 1)), jnp.float32)
  return support, jnp.asarray(ep.episode_labels(ways, shots)), query, jnp.asarray(ep.episode_labels(ways, queries))


def smooth_model(ways=3, size=16):
  """A tiny smooth CNN (conv 3x3 -> tanh -> dense) as apply(params, rest, x): finite differences
  need a function without the kinks of ReLU and max pooling."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {'conv': 0.5 * jax.random.normal(k1, (3, 3, 1, 2)), 'dense': 0.1 * jax.random.normal(k2, (2 * size * size, ways))}

  def apply(params, rest, x):
    del rest
    h = jnp.tanh(jax.lax.conv_general_dilated(x, params['conv'], (1, 1), 'SAME',
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    return h.reshape(x.shape[0], -1) @ params['dense']
  return apply, params, None


def test_second_order_maml_meta_gradient_matches_finite_differences():
  """The directional derivative of the MAML objective (two unrolled inner steps) by central
  differences equals <meta-gradient, direction>; the first-order gradient does not, so the
  check sees the second-order terms."""
  apply, params, rest = smooth_model()
  support, sy, query, qy = tiny_task()
  kwargs = dict(steps=2, lr=0.05)

  def objective(p, first_order=False):
    return ml.maml_task_loss(apply, p, rest, support, sy, query, qy, first_order=first_order, **kwargs)[0]

  grad = jax.grad(objective)(params)
  grad_first = jax.grad(lambda p: objective(p, True))(params)
  direction = {k: jax.random.normal(jax.random.key(i + 1), v.shape) for i, (k, v) in enumerate(params.items())}
  eps = 1e-3
  shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)
  numeric = (float(objective(shifted(1))) - float(objective(shifted(-1)))) / (2 * eps)
  dot = lambda g: float(sum(jnp.vdot(g[k], direction[k]) for k in g))
  analytic, first_order = dot(grad), dot(grad_first)
  assert abs(analytic - numeric) <= 0.01 * abs(numeric), (analytic, numeric, first_order)
  assert abs(first_order - numeric) > 0.05 * abs(numeric), (analytic, numeric, first_order)


def test_tasks_vmapped_equal_tasks_in_a_loop():
  apply, params, rest = smooth_model()
  tasks = [tiny_task(seed) for seed in range(3)]
  support = jnp.stack([t[0] for t in tasks])
  query = jnp.stack([t[2] for t in tasks])
  sy, qy = tasks[0][1], tasks[0][3]
  outs = {}
  for mode in ('vmap', 'loop'):
    fn = lambda p: ml.maml_meta_loss(apply, p, rest, support, sy, query, qy, steps=1, lr=0.05, mode=mode)
    outs[mode] = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  np.testing.assert_allclose(outs['vmap'][0][0], outs['loop'][0][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(outs['vmap'][1]), jax.tree.leaves(outs['loop'][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_reptile_moves_toward_the_adapted_weights():
  apply, params, rest = smooth_model()
  support, sy, _, _ = tiny_task()
  direction, _ = ml.reptile_direction(apply, params, rest, support[None], sy, steps=1, lr=0.1, mode='loop')
  adapted = ml.adapt(apply, params, rest, support, sy, steps=1, lr=0.1)
  for d, p, a in zip(jax.tree.leaves(direction), jax.tree.leaves(params), jax.tree.leaves(adapted)):
    np.testing.assert_allclose(d, p - a, rtol=1e-5, atol=1e-7)


# Few-shot classifiers ------------------------------------------------------------------------------

def test_prototypes_nearest_neighbour_and_linear_head_classify_separable_episodes():
  centres = np.eye(3, 4) * 5
  rng = np.random.default_rng(0)
  support = jnp.asarray(np.repeat(centres, 2, axis=0) + rng.normal(0, 0.1, (6, 4)), jnp.float32)
  query = jnp.asarray(centres + rng.normal(0, 0.1, (3, 4)), jnp.float32)
  sy, qy = jnp.asarray(ep.episode_labels(3, 2)), jnp.arange(3)
  logits = ml.protonet_logits(support, query, 3)
  expected = -((np.asarray(query)[:, None] - np.asarray(support).reshape(3, 2, 4).mean(1)[None]) ** 2).sum(-1)
  np.testing.assert_allclose(logits, expected, rtol=1e-5)
  assert float(ml.accuracy(logits, qy)) == 1.0
  assert float(ml.accuracy(ml.nearest_neighbour_logits(support, sy, query, 3), qy)) == 1.0
  head = ml.baseline_logits(support, sy, query, 3, steps=100, lr=0.01, weight_decay=1e-3)
  assert float(ml.accuracy(head, qy)) == 1.0


def test_confidence_interval_is_the_papers_normal_interval():
  values = np.array([100.0, 80.0, 60.0, 100.0])
  mean, half = ml.confidence_interval(values)
  assert mean == pytest.approx(85.0)
  assert half == pytest.approx(1.96 * values.std(ddof=1) / 2, rel=1e-5)


# Episodes ---------------------------------------------------------------------------------------

def labels_of(classes, per_class):
  return np.repeat(np.arange(classes), per_class)


def test_same_seed_same_episodes_and_each_episode_is_well_formed():
  labels = np.random.default_rng(0).permutation(labels_of(12, 6))
  sampler = ep.EpisodeSampler(labels, ways=5, shots=2, queries=3)
  first, again, other = sampler.sample(8, seed=3), sampler.sample(8, seed=3), sampler.sample(8, seed=4)
  assert all(np.array_equal(first[k], again[k]) for k in first)
  assert not np.array_equal(first['support'], other['support'])
  assert first['support'].shape == (8, 10) and first['query'].shape == (8, 15)
  for s, q in zip(first['support'], first['query']):
    assert len(set(s) | set(q)) == 25  # no example twice
    s_classes, q_classes = labels[s].reshape(5, 2), labels[q].reshape(5, 3)
    # Class-major: block c of support and of query is one class, the same one, episode_labels' c.
    assert (s_classes == s_classes[:, :1]).all() and (q_classes == s_classes[:, :1]).all()
    assert len(set(s_classes[:, 0])) == 5
  np.testing.assert_array_equal(ep.episode_labels(3, 2), [0, 0, 1, 1, 2, 2])


def test_episodes_never_mix_meta_train_and_meta_test_classes():
  """kanji_glyphs splits by alphabet: the experiment's meta-train and meta-test episodes draw only
  from their own classes, and the builder's splits share no class."""
  from experiments.configs.meta_learning import get_config
  from experiments.meta_learning import load_parts
  config = get_config('smoke')
  parts = load_parts(config)
  train, test = set(parts['train']['label'].tolist()), set(parts['test']['label'].tolist())
  assert train and test and not train & test and not set(parts['val']['label'].tolist()) & (train | test)
  for part, classes in (('train', train), ('test', test)):
    drawn = ep.EpisodeSampler(parts[part]['label'], 5, 1, 2).sample(50, seed=0)
    for k in drawn:
      assert set(parts[part]['label'][drawn[k]].ravel().tolist()) <= classes
  with pytest.raises(DataError, match='share 1 classes'):
    ep.check_disjoint({'meta-train': [0, 1, 2], 'meta-test': [2, 3]})


def test_impossible_episodes_fail_with_a_clear_error():
  labels = labels_of(4, 5)
  with pytest.raises(ConfigError, match=r'config.ways = 5 .*at most 4, the number of classes in meta-test'):
    ep.EpisodeSampler(labels, ways=5, shots=1, queries=1, name='meta-test')
  with pytest.raises(ConfigError, match=r'config.shots = 3 .*shots \+ queries <= 5.*3 shots \+ 3 queries'):
    ep.EpisodeSampler(labels, ways=2, shots=3, queries=3)
  with pytest.raises(ConfigError, match='config.ways = 1'):
    ep.EpisodeSampler(labels, ways=1, shots=1, queries=1)


def test_config_errors_before_compute():
  from experiments.configs.meta_learning import get_config
  from experiments.meta_learning import validate
  config = get_config('smoke')
  config.settings = ((20, 1),)
  with pytest.raises(ConfigError, match='maml.train_ways'):
    validate(config)
  config = get_config('smoke')
  config.methods = ('protonet', 'matching_net')
  with pytest.raises(ConfigError, match='matching_net'):
    validate(config)
  for ranges in (((0, 10), (10, 20), (20, 10)), ((0, 10), (10, 20)), ((0, 10), (10, 20), (20, 30.0))):
    config = get_config('smoke')
    config.label_ranges = ranges
    with pytest.raises(ConfigError, match=r'label_ranges = .* 0 <= lo < hi'):
      validate(config)


@pytest.mark.parametrize('key, value, message', [
    ('maml.shots', 25, r'config.maml.shots = 25 .*maml.shots \+ maml.queries <= 20.*meta-train class'),
    ('protonet.ways', 500, r'config.protonet.ways = 500 .*the number of classes in meta-train'),
    ('settings', ((5, 1), (500, 1)), r'config.settings \(ways\) = 500 .*the number of classes in meta-test'),
    ('test_queries', 20, r'config.test_queries = 20 .*settings \(shots\) \+ test_queries <= 20'),
])
def test_episodes_the_data_cannot_give_fail_before_training_naming_their_key(tmp_path, key, value, message):
  """kanji_glyphs/small: 20 drawings of each character; the counts come from several keys."""
  from experiments import meta_learning, runner
  from experiments.configs.meta_learning import get_config
  from cnnjax.train import sharding
  config = get_config('smoke')
  config.workdir = str(tmp_path)
  *parents, last = key.split('.')
  (config[parents[0]] if parents else config)[last] = value
  with pytest.raises(ConfigError, match=message):
    meta_learning.MetaLearning(runner.Experiment('meta_learning', config, sharding.make_mesh()))
  assert not any(tmp_path.iterdir())


# kanji_glyphs -----------------------------------------------------------------------------------

def test_stroke_paths_parse_absolute_relative_and_smooth_curves():
  sys.path.insert(0, str(BUILDERS_DIR))
  from kanji_glyphs import kanji_glyphs_dataset_builder as kb
  segments = kb.parse_path('M10,20c1,0,2,0,3,0s2,0,3,0L20,20z')
  np.testing.assert_allclose(segments[0], [[10, 20], [11, 20], [12, 20], [13, 20]])
  np.testing.assert_allclose(segments[1], [[13, 20], [14, 20], [15, 20], [16, 20]])  # reflected control
  np.testing.assert_allclose(segments[2][[0, 3]], [[16, 20], [20, 20]])
  np.testing.assert_allclose(segments[3][[0, 3]], [[20, 20], [10, 20]])  # z closes the path
  image = kb.draw([segments], np.random.default_rng(0))
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and image.max() > 100
  again = kb.draw([segments], np.random.default_rng(0))
  np.testing.assert_array_equal(image, again)


def test_auto_task_mode_vmaps_unless_xla_runs_the_cpu_convolutions():
  expected = 'vmap' if jax.default_backend() != 'cpu' or ops.onednn_enabled() and ops.onednn_available() else 'loop'
  assert ml.task_mode('auto') == expected
  with ops.xla_convolutions():
    assert ml.task_mode('auto') == ('loop' if jax.default_backend() == 'cpu' else 'vmap')
  assert ml.task_mode('loop') == 'loop'
