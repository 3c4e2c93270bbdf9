"""The adaptation terms of cnnjax.methods.domain_adaptation and the domain helpers of cnnjax.data.domains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnjax.data import domains
from cnnjax.errors import ConfigError, DataError
from cnnjax.methods import domain_adaptation as da


def sample(seed, n=64, d=8, shift=0.0, scale=1.0):
  return jax.random.normal(jax.random.key(seed), (n, d)) * scale + shift


# Gradient reversal and schedules --------------------------------------------------------------

def test_gradient_reversal_is_identity_forward_and_negates_scaled_gradients():
  x = sample(0, 4, 3)
  assert np.array_equal(da.gradient_reversal(x, 0.7), x)
  f = lambda x: jnp.sum(jnp.sin(x))
  plain = jax.grad(f)(x)
  reversed_ = jax.grad(lambda x: f(da.gradient_reversal(x, 0.7)))(x)
  np.testing.assert_allclose(reversed_, -0.7 * plain, rtol=1e-6)
  # A traced scale (the schedule inside a jitted step) works and gets a zero gradient.
  scale_grad = jax.jit(jax.grad(lambda s: f(da.gradient_reversal(x, s))))(0.5)
  assert float(scale_grad) == 0.0


def test_dann_schedules_endpoints():
  assert float(da.dann_lambda(0.0)) == 0.0
  assert abs(float(da.dann_lambda(1.0)) - (2 / (1 + np.exp(-10)) - 1)) < 1e-6
  assert 0.99 < float(da.dann_lambda(1.0)) < 1.0
  values = [float(da.dann_lambda(p)) for p in np.linspace(0, 1, 11)]
  assert values == sorted(values)
  schedule = da.dann_learning_rate(0.01, 10, 0.75, total_steps=100)
  assert abs(float(schedule(0)) - 0.01) < 1e-9
  assert abs(float(schedule(100)) - 0.01 / 11 ** 0.75) < 1e-9
  assert float(schedule(500)) == float(schedule(100))   # past the end: stays at the last value


# CORAL and MMD --------------------------------------------------------------------------------

def test_coral_is_zero_for_equal_covariances_and_grows_with_scale():
  x = sample(0)
  assert float(da.coral_loss(x, x)) == 0.0
  assert abs(float(da.coral_loss(x, x + 3.0))) < 1e-6       # a mean shift leaves covariances equal
  losses = [float(da.coral_loss(x, sample(1, scale=s))) for s in (1.0, 2.0, 4.0)]
  assert losses == sorted(losses) and losses[-1] > 10 * losses[0]
  np.testing.assert_allclose(da.covariance(x), np.cov(np.asarray(x), rowvar=False), rtol=1e-4, atol=1e-5)


def test_mmd_is_zero_for_identical_samples_and_grows_with_mean_shift():
  x = sample(0)
  assert abs(float(da.mmd_loss(x, x))) < 1e-5
  losses = [float(da.mmd_loss(x, sample(1, shift=s))) for s in (0.0, 0.5, 1.0, 2.0)]
  assert losses == sorted(losses)
  assert losses[0] < 0.1 * losses[-1]
  assert all(np.isfinite(jax.grad(lambda y: da.mmd_loss(x, y))(sample(1, shift=1.0))).ravel())
  # Collapsed features (every distance 0, as dead ReLUs give) stay finite, value and gradient.
  zeros = jnp.zeros((8, 4))
  assert float(da.mmd_loss(zeros, zeros)) == 0.0
  assert np.isfinite(jax.grad(lambda y: da.mmd_loss(zeros, y))(zeros)).all()


# CDAN -----------------------------------------------------------------------------------------

def test_multilinear_map_is_the_flattened_outer_product():
  f, g = sample(0, 5, 4), jax.nn.softmax(sample(1, 5, 3))
  out = da.multilinear_map(f, g)
  assert out.shape == (5, 12)
  np.testing.assert_allclose(out[2].reshape(4, 3), np.outer(f[2], g[2]), rtol=1e-6)


def test_entropy_weights_favour_confident_predictions_and_sum_to_one():
  confident, uniform = jnp.array([0.97, 0.01, 0.01, 0.01]), jnp.full(4, 0.25)
  assert abs(float(da.entropy(uniform)) - np.log(4)) < 1e-5
  weights = da.entropy_weights(jnp.stack([confident, uniform]))
  assert abs(float(weights.sum()) - 1.0) < 1e-6 and weights[0] > weights[1]
  raw = 1 + np.exp(-np.array([float(da.entropy(confident)), np.log(4)]))
  np.testing.assert_allclose(weights, raw / raw.sum(), rtol=1e-5)
  # Equal weights give the plain mean binary cross-entropy.
  s, t = sample(0, 6, 1)[:, 0], sample(1, 6, 1)[:, 0]
  equal = jnp.full(6, 1 / 6)
  np.testing.assert_allclose(da.domain_adversarial_loss(s, t), da.domain_adversarial_loss(s, t, equal, equal),
                             rtol=1e-6)


def test_domain_adversarial_loss_is_low_for_a_perfect_discriminator():
  good = float(da.domain_adversarial_loss(jnp.full(4, 10.0), jnp.full(4, -10.0)))
  chance = float(da.domain_adversarial_loss(jnp.zeros(4), jnp.zeros(4)))
  assert good < 1e-3 and abs(chance - np.log(2)) < 1e-6
  discriminator = da.DomainDiscriminator(8, 16, rngs=nnx.Rngs(0))
  assert discriminator(sample(0, 5, 8)).shape == (5,)


# Domains --------------------------------------------------------------------------------------

def test_domain_names_shapes_and_checks():
  assert domains.parse_domain('mnist@0,15') == ('mnist', (0.0, 15.0))
  assert domains.parse_shift('a -> b') == ('a', 'b')
  with pytest.raises(ConfigError, match='SOURCE->TARGET'):
    domains.parse_shift('mnist_5k')
  with pytest.raises(ConfigError, match=r"config.shifts = 'mnist@x' is not allowed; allowed: NAME or NAME@ANGLE"):
    domains.parse_domain('mnist@x')
  grey = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  assert domains.to_shape(grey, 28, 20, 3).shape == (3, 28, 28, 3)
  assert domains.to_shape(grey, 0, 20, 0).shape == (3, 8, 8, 1)
  colour = np.repeat(grey, 3, axis=-1)
  assert np.array_equal(domains.to_shape(colour, 0, 1, 1), grey)   # luma of a grey image is itself
  rotated = domains.rotate(grey, (0.0, 90.0))
  assert np.array_equal(rotated[0], grey[0]) and np.array_equal(rotated[1], np.rot90(grey[1]))
  names = [str(i) for i in range(10)]
  domains.check_pair('a', names, (28, 28, 3), 'b', names, (28, 28, 3))
  with pytest.raises(DataError, match='different label sets'):
    domains.check_pair('a', names, (28, 28, 3), 'b', names[:5], (28, 28, 3))
  with pytest.raises(DataError, match=r'\(28, 28, 3\) and \(28, 28, 1\)'):
    domains.check_pair('a', names, (28, 28, 3), 'b', names, (28, 28, 1))


def test_pair_batches_draw_each_domain_independently_from_its_count():
  source, count = domains.pad_to({'x': np.arange(10)}, 16)
  target, target_count = domains.pad_to({'x': 100 + np.arange(6)}, 16)
  assert count == 10 and target_count == 6 and source['x'].shape == (16,)
  pair = ({'split': source, 'count': count}, {'split': target, 'count': target_count})
  seen = set()
  for step in range(3):   # one epoch of the target (6 // 2 batches)
    batch = domains.pair_batch(*pair, jax.random.key(0), step, 2)
    assert all(0 <= v < 10 for v in batch['source']['x'].tolist())
    seen.update(batch['target']['x'].tolist())
  assert seen == set(range(100, 106))
  again = domains.pair_batch(*pair, jax.random.key(0), 1, 2)
  assert np.array_equal(again['source']['x'], domains.pair_batch(*pair, jax.random.key(0), 1, 2)['source']['x'])
