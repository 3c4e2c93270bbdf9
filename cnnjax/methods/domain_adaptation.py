"""Unsupervised domain adaptation terms as pure functions, plus the domain discriminator they train.

- Gradient reversal and the DANN schedules: Ganin & Lempitsky 2015, "Unsupervised Domain
  Adaptation by Backpropagation" (ICML), section 3 and 5.
- Deep CORAL: Sun & Saenko 2016, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation"
  (ECCV workshops), eq. 1.
- Multi-kernel MMD (DAN): Long, Cao, Wang & Jordan 2015, "Learning Transferable Features with
  Deep Adaptation Networks" (ICML), eq. 2-3, with Gaussian kernels at bandwidths spread by powers
  of two around the mean pairwise distance.
- CDAN and CDAN+E: Long, Cao, Wang & Jordan 2018, "Conditional Adversarial Domain Adaptation"
  (NeurIPS), the multilinear map f ⊗ g (eq. 4, without the randomized variant: 128 x 10 features
  are small enough) and entropy conditioning w = 1 + exp(-H(g)) (eq. 8).

Each term takes source and target features (batch, dims) of one step and returns a scalar; the
caller adds it to the source classification loss.
"""


import jax
import jax.numpy as jnp
import optax
from flax import nnx


# Gradient reversal (DANN) ---------------------------------------------------------------------

@jax.custom_vjp
def gradient_reversal(x, scale):
  """Identity forward; backward multiplies the gradient by -scale (the GRL of DANN, section 3).

  `scale` (lambda) may be traced, e.g. the schedule at the current step; it gets no gradient."""
  del scale
  return x


def _reversal_forward(x, scale):
  return x, scale


def _reversal_backward(scale, grad):
  return jax.tree.map(lambda g: -scale * g, grad), jnp.zeros_like(scale)


gradient_reversal.defvjp(_reversal_forward, _reversal_backward)


def dann_lambda(progress, gamma=10.0):
  """The adaptation weight 2 / (1 + exp(-gamma p)) - 1, rising from 0 at p=0 to ~1 at p=1
  (DANN section 5, gamma=10): the noisy discriminator is kept out early in training."""
  return 2.0 / (1.0 + jnp.exp(-gamma * progress)) - 1.0


def dann_learning_rate(mu0=0.01, alpha=10.0, beta=0.75, total_steps=1):
  """The optax schedule mu_p = mu0 / (1 + alpha p)^beta, p = step / total_steps (DANN section 5:
  mu0=0.01, alpha=10, beta=0.75; used with SGD and momentum 0.9)."""
  def schedule(step):
    progress = jnp.minimum(step / total_steps, 1.0)
    return mu0 / (1.0 + alpha * progress) ** beta
  return schedule


# Adversarial losses (DANN, CDAN) ---------------------------------------------------------------

def domain_adversarial_loss(source_logits, target_logits, source_weights=None, target_weights=None):
  """Binary cross-entropy of a domain discriminator: source is domain 1, target domain 0.

  Logits are (batch,) or (batch, 1). Without weights, the mean over both domains' examples
  averaged per domain; with weights (e.g. `entropy_weights`, each domain's summing to 1), the
  weighted sum per domain, averaged over the two domains (CDAN+E's weighting)."""
  source_logits, target_logits = source_logits.reshape(-1), target_logits.reshape(-1)
  source_loss = optax.sigmoid_binary_cross_entropy(source_logits, jnp.ones_like(source_logits))
  target_loss = optax.sigmoid_binary_cross_entropy(target_logits, jnp.zeros_like(target_logits))
  if source_weights is None:
    source_weights = jnp.full(source_loss.shape, 1.0 / source_loss.shape[0])
  if target_weights is None:
    target_weights = jnp.full(target_loss.shape, 1.0 / target_loss.shape[0])
  return 0.5 * ((source_weights * source_loss).sum() + (target_weights * target_loss).sum())


def multilinear_map(features, probabilities):
  """CDAN's conditioning T(f, g) = f ⊗ g, flattened: (batch, dims) x (batch, classes) -> (batch,
  dims * classes). Its outer product lets the discriminator see the joint of features and
  predictions, where concatenation would see only their marginals."""
  return jnp.einsum('bd,bc->bdc', features, probabilities).reshape(features.shape[0], -1)


def entropy(probabilities, eps=1e-8):
  """Shannon entropy (nats) of each row of class probabilities."""
  return -jnp.sum(probabilities * jnp.log(probabilities + eps), axis=-1)


def entropy_weights(probabilities):
  """CDAN+E's example weights w = 1 + exp(-H(g)), normalised to sum to 1 over the batch:
  confident (low-entropy, more transferable) examples weigh more. No gradient flows through them."""
  weights = 1.0 + jnp.exp(-entropy(jax.lax.stop_gradient(probabilities)))
  return weights / weights.sum()


# Statistic alignment (Deep CORAL, DAN) ---------------------------------------------------------

def covariance(x):
  """Unbiased covariance (dims, dims) of the rows of x."""
  centred = x - x.mean(axis=0, keepdims=True)
  return centred.T @ centred / (x.shape[0] - 1)


def coral_loss(source, target):
  """Deep CORAL: ||C_S - C_T||_F^2 / (4 d^2) between the feature covariances (eq. 1)."""
  d = source.shape[-1]
  return jnp.sum((covariance(source) - covariance(target)) ** 2) / (4.0 * d * d)


def mmd_bandwidths(source, target, multiplier=2.0, kernels=5):
  """Squared bandwidths of the kernel family: the mean pairwise squared distance of the pooled
  sample times multiplier^k, k = -(kernels // 2) .. kernels // 2 (DAN's family spread by powers
  of two). Constants: no gradient flows into the bandwidths."""
  pooled = jax.lax.stop_gradient(jnp.concatenate([source, target]))
  n = pooled.shape[0]
  # Floored: features that collapsed to one point (all distances 0) would otherwise give 0 / 0.
  mean_distance = jnp.maximum(squared_distances(pooled, pooled).sum() / (n * n - n), 1e-12)
  powers = jnp.arange(kernels) - kernels // 2
  return mean_distance * multiplier ** powers


def squared_distances(x, y):
  """Pairwise squared Euclidean distances (len(x), len(y)), clipped at 0 against rounding."""
  return jnp.maximum(jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2 * x @ y.T, 0.0)


def mmd_loss(source, target, multiplier=2.0, kernels=5):
  """Squared multi-kernel MMD with the equal-weight sum of Gaussian kernels
  k(x, y) = sum_u exp(-||x - y||^2 / sigma_u^2) (DAN eq. 2-3): mean k(s, s') + mean k(t, t')
  - 2 mean k(s, t) over all pairs, the biased (V-statistic) estimate, zero for identical samples."""
  bandwidths = mmd_bandwidths(source, target, multiplier, kernels)

  def kernel(x, y):
    distances = squared_distances(x, y)
    return jnp.sum(jnp.exp(-distances[None] / bandwidths[:, None, None]), axis=0)

  return kernel(source, source).mean() + kernel(target, target).mean() - 2 * kernel(source, target).mean()


# The domain discriminator ---------------------------------------------------------------------

class DomainDiscriminator(nnx.Module):
  """A two-hidden-layer MLP that scores features as source (logit > 0) or target: the domain
  classifier of DANN (x -> 1024 -> 1024 -> 1 for large nets; `hidden` sets the width) and CDAN."""

  def __init__(self, features, hidden, *, rngs, dtype=jnp.float32):
    self.layers = nnx.List([nnx.Linear(features, hidden, dtype=dtype, rngs=rngs),
                            nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs)])
    self.out = nnx.Linear(hidden, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.out(x).astype(jnp.float32)[:, 0]
