"""The fit loop: chunks of unrolled steps, evaluation, checkpoints, NaN guard, progress.

Seeds of one table cell train side by side: every state here carries a leading
member axis (use `state.stack([s])` for a single run).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cnnjax.train.steps import over_members


class NonFiniteError(FloatingPointError):
  """A loss or gradient became NaN or inf: the run stops at that step."""

  def __init__(self, step, member, metrics):
    self.step, self.member = step, member
    super().__init__(f'non-finite loss or update at step {step} (member {member}): {metrics}; '
                     'lower the learning rate or check the inputs')


def make_evaluate(graphdef, metrics_fn, batch_size, mode):
  """`evaluate(states, arrays) -> {name: [members]}`: means over a whole split in eval mode.

  `metrics_fn(model, batch) -> {name: per-example values}`. The split is padded to
  whole batches and the padding masked out; batches run in a rolled `lax.map`
  (forward-only, so rolled loops cost nothing on CPU).
  """

  def evaluate(state, arrays):
    n = jax.tree.leaves(arrays)[0].shape[0]
    batches = -(-n // batch_size)
    pad = lambda x: jnp.pad(x, [(0, batches * batch_size - n)] + [(0, 0)] * (x.ndim - 1))
    split = lambda x: pad(x).reshape(batches, batch_size, *x.shape[1:])
    mask = split(jnp.ones(n))

    def one(batch_and_mask):
      batch, weight = batch_and_mask
      model = nnx.merge(graphdef, state.params, state.model_state)
      model.eval()
      return {k: (v * weight).sum() for k, v in metrics_fn(model, batch).items()}

    sums = jax.lax.map(one, (jax.tree.map(split, arrays), mask))
    return {k: v.sum() / n for k, v in sums.items()}

  return over_members(evaluate, mode, donate=False, source_axes=None)


def check_finite(metrics, step):
  losses = np.asarray(metrics['loss'])
  norms = np.asarray(metrics.get('update_norm', losses))
  bad = ~(np.isfinite(losses) & np.isfinite(norms))
  if bad.any():
    member, offset = map(int, np.argwhere(bad)[0])
    raise NonFiniteError(step - losses.shape[1] + offset + 1, member,
                         {'loss': float(losses[member, offset])})


def fit(states, source, *, chunk_fn, total_steps, chunk_steps, evaluate=None, eval_every=0,
        checkpoints=None, checkpoint_every=0, trackers=(), progress=True, desc='train'):
  """Train stacked `states` from their current step to `total_steps`.

  `chunk_fn(states, source)` runs `chunk_steps` steps of every member. Logs the mean
  training metrics of each chunk and `eval/*` metrics every `eval_every` steps and at
  the end to the per-member `trackers`; saves a checkpoint every `checkpoint_every`
  steps and at the end. Returns (states, last eval metrics per member).
  """
  step = int(np.asarray(states.step).reshape(-1)[0])
  bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not progress or jax.process_index() != 0,
             unit='step', dynamic_ncols=True, leave=False,
             mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
  results = {}
  while step < total_steps:
    states, metrics = chunk_fn(states, source)
    step += chunk_steps
    metrics = jax.device_get(metrics)
    check_finite(metrics, step)
    for m, tracker in enumerate(trackers):
      tracker.log(step, {f'train/{k}': float(np.mean(v[m])) for k, v in metrics.items()})
    bar.update(chunk_steps)
    bar.set_postfix(loss=f"{np.mean(metrics['loss'][:, -1]):.4f}")
    if evaluate and (step == total_steps or (eval_every and step % eval_every == 0)):
      results = jax.device_get(evaluate(states))
      for m, tracker in enumerate(trackers):
        tracker.log(step, {f'eval/{k}': float(v[m]) for k, v in results.items()})
    if checkpoints and (step == total_steps or (checkpoint_every and step % checkpoint_every == 0)):
      checkpoints.save(step, states)
  bar.close()
  if evaluate and not results:
    results = jax.device_get(evaluate(states))
  return states, {k: np.asarray(v) for k, v in results.items()}
