"""Per-example metrics; callers average them (with masks) over a split."""

import jax.numpy as jnp
import optax


def correct(logits, labels):
  """1.0 where the arg-max class is the label."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def nll(logits, labels):
  """Negative log-likelihood of the label under softmax(logits)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def classification(model, batch):
  """Accuracy and NLL of a classifier on a batch of {'image', 'label'}."""
  logits = model(batch['image'])
  return {'accuracy': correct(logits, batch['label']), 'nll': nll(logits, batch['label'])}
