"""Supervised classification losses in the `loss_fn(model, batch, rng)` form of the train steps."""

from cnnjax import metrics


def cross_entropy(model, batch, rng):
  """Mean softmax cross-entropy; reports training accuracy too."""
  del rng
  logits = model(batch['image'])
  return metrics.nll(logits, batch['label']).mean(), {'accuracy': metrics.correct(logits, batch['label']).mean()}
