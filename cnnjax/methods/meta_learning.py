"""Few-shot learning methods as pure functions of parameters and episodes.

- Prototypical Networks (Snell, Swersky & Zemel 2017): class prototypes are the mean support
  embeddings; a query's logits are minus its squared Euclidean distances to them.
- MAML (Finn, Abbeel & Levine 2017): a few SGD steps on the support set from the meta-learned
  parameters, then the query loss of the adapted parameters; its meta-gradient differentiates
  through the inner gradients (second order: `jax.grad` of a function that itself calls
  `jax.grad`). First-order MAML drops those second derivatives (`stop_gradient` on the inner
  gradients).
- Reptile (Nichol, Achiam & Schulman 2018): adapt to each task for k SGD steps and move the
  meta-parameters toward the adapted ones; `reptile_direction` is (theta - mean adapted theta),
  a "gradient" any optax optimizer can follow.
- Baseline (Chen et al. 2019, "A Closer Look at Few-shot Classification"): a classifier trained on
  all base classes; for each episode a new linear head is fitted on the frozen support embeddings.
- Nearest neighbour on pixels: the query takes the label of its closest support image (L2).

Inner loops are unrolled Python loops of a few steps: a rolled `fori_loop` around convolution weight
gradients runs ~10x slower on XLA:CPU. Models arrive as a functional `apply(params, rest, x)`
(`functional`) whose batch norm always normalises with the statistics of the batch it is given
(transductive, as in MAML's and Reptile's reference code), so adapted parameters need no running
statistics. Tasks of a meta-batch run side by side with `jax.vmap` ('vmap') or as an unrolled
loop in one program ('loop', faster where XLA runs the convolutions on CPU: vmapped per-task
convolution weights become slow grouped convolutions there, not on oneDNN); both give the same
numbers up to float rounding (`over_tasks`).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cnnjax import ops

TASK_MODES = ('auto', 'vmap', 'loop')


def task_mode(mode):
  """'auto' -> 'vmap', except where XLA runs the convolutions on CPU (several devices, CPUs without
  AVX-512, oneDNN off or not built: cnnjax/ops): vmapped per-task weights become grouped
  convolutions there, slower than a loop. On oneDNN the vmapped tasks' convolutions are one call
  each: on 2 AVX-512 cores the default preset's MAML meta-trains in 13.8 instead of 20.3 s, and
  `./run.sh meta_learning` takes 2 min 1 s instead of 2 min 58 s."""
  if mode != 'auto':
    return mode
  on_xla_cpu = jax.default_backend() == 'cpu' and not (ops.onednn_enabled() and ops.onednn_available())
  return 'loop' if on_xla_cpu else 'vmap'


def over_tasks(fn, tasks, mode):
  """`fn(*task)` for every task (leading axis of each array in `tasks`), outputs stacked."""
  mode = task_mode(mode)
  if mode == 'vmap':
    return jax.vmap(fn)(*tasks)
  if mode != 'loop':
    raise ValueError(f'unknown task mode {mode!r}; allowed: {TASK_MODES}')
  count = tasks[0].shape[0]
  outs = [fn(*(t[i] for t in tasks)) for i in range(count)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def functional(graphdef, features=False):
  """`apply(params, rest, x)`: the model's logits (or backbone features) with batch statistics.

  The module is merged inside the caller's trace with fresh copies of `rest` (its batch-norm
  state), so nested `jax.grad`s never mutate a variable of an outer trace.
  """
  def apply(params, rest, x):
    model = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
    model.train()
    return model.features(x) if features else model(x)
  return apply


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def accuracy(logits, labels):
  return (logits.argmax(-1) == labels).mean()


# Prototypical Networks --------------------------------------------------------------------------
def prototypes(support, ways):
  """Mean embedding of each class of a class-major support set (ways*shots, d) -> (ways, d)."""
  return support.reshape(ways, -1, support.shape[-1]).mean(axis=1)


def protonet_logits(support, query, ways):
  """Minus squared Euclidean distances of query embeddings (q, d) to the prototypes: (q, ways)."""
  centres = prototypes(support, ways)
  return -((query[:, None, :] - centres[None]) ** 2).sum(-1)


# MAML ---------------------------------------------------------------------------------------------
def adapt(apply, params, rest, x, y, *, steps, lr, first_order=False):
  """`steps` SGD steps of the cross-entropy on (x, y) from `params`, unrolled.

  Second order by default: the result stays differentiable through the inner gradients.
  """
  loss = lambda p: cross_entropy(apply(p, rest, x), y)
  for _ in range(steps):
    grads = jax.grad(loss)(params)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  return params


def maml_task_loss(apply, params, rest, support, support_y, query, query_y, *, steps, lr, first_order=False):
  """(query loss, query accuracy) after adapting to the support set: MAML's per-task objective."""
  fast = adapt(apply, params, rest, support, support_y, steps=steps, lr=lr, first_order=first_order)
  logits = apply(fast, rest, query)
  return cross_entropy(logits, query_y), accuracy(logits, query_y)


def maml_meta_loss(apply, params, rest, support, support_y, query, query_y, *, steps, lr, first_order=False,
                   mode='auto'):
  """Mean MAML objective over a meta-batch: support (T, n, ...), query (T, m, ...); labels shared.
  `jax.grad` of it is the (first- or second-order) meta-gradient."""
  task = lambda s, q: maml_task_loss(apply, params, rest, s, support_y, q, query_y, steps=steps, lr=lr,
                                     first_order=first_order)
  losses, accuracies = over_tasks(task, (support, query), mode)
  return losses.mean(), accuracies.mean()


def reptile_direction(apply, params, rest, x, y, *, steps, lr, mode='auto'):
  """(theta - mean over tasks of the adapted theta, mean first-step loss): Reptile's update direction
  for a meta-batch of tasks x (T, n, ...) with shared labels y; follow it like a gradient."""
  def task(xs):
    adapted = adapt(apply, params, rest, xs, y, steps=steps, lr=lr, first_order=True)
    return adapted, cross_entropy(apply(params, rest, xs), y)
  adapted, losses = over_tasks(task, (x,), mode)
  direction = jax.tree.map(lambda p, a: p - a.mean(axis=0), params, adapted)
  return jax.lax.stop_gradient(direction), losses.mean()


# Baseline (Chen et al. 2019) ---------------------------------------------------------------------
def fit_linear_head(support, support_y, ways, *, steps, lr, weight_decay, momentum=0.9, batch_size=4):
  """A new linear head (d, ways) + bias fitted on frozen support embeddings for `steps` epochs.

  Chen et al. train theirs for 100 epochs of SGD (momentum 0.9, weight decay 1e-3) on mini-batches
  of 4 support examples; here each epoch is one full-batch step whose learning rate is their
  summed over the epoch's mini-batches (lr * n / batch_size), so support sets of every size get
  the same training. No convolution in here, so a rolled loop costs nothing."""
  d = support.shape[-1]
  params = {'w': jnp.zeros((d, ways)), 'b': jnp.zeros(ways)}
  epoch_lr = lr * support.shape[0] / batch_size
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(epoch_lr, momentum=momentum))
  loss = lambda p: cross_entropy(support @ p['w'] + p['b'], support_y)

  def one(_, carry):
    p, opt = carry
    updates, opt = tx.update(jax.grad(loss)(p), opt, p)
    return optax.apply_updates(p, updates), opt

  params, _ = jax.lax.fori_loop(0, steps, one, (params, tx.init(params)))
  return params


def baseline_logits(support, support_y, query, ways, **fit):
  head = fit_linear_head(support, support_y, ways, **fit)
  return query @ head['w'] + head['b']


# Nearest neighbour on pixels ---------------------------------------------------------------------
def nearest_neighbour_logits(support, support_y, query, ways):
  """Logits that pick the label of the closest support example (squared L2 on flattened inputs)."""
  s, q = support.reshape(support.shape[0], -1), query.reshape(query.shape[0], -1)
  distances = (q ** 2).sum(-1)[:, None] - 2 * q @ s.T + (s ** 2).sum(-1)[None]
  return jax.nn.one_hot(jnp.asarray(support_y)[distances.argmin(-1)], ways)


def confidence_interval(accuracies):
  """(mean, half-width of the 95% normal interval 1.96 * std / sqrt(n)) over episodes, as the
  few-shot papers report."""
  a = jnp.asarray(accuracies, jnp.float32)
  return float(a.mean()), float(1.96 * a.std(ddof=1) / jnp.sqrt(a.size)) if a.size > 1 else 0.0
