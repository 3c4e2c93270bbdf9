"""Transfer-learning optimizers: partial fine-tuning by parameter path, and L2-SP.

Freezing goes through an optax partition (`optax.multi_transform` with zero
updates for frozen parameters), so a frozen backbone keeps its pretrained values
bit for bit. L2-SP (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for
Transfer Learning with Convolutional Networks") pulls the backbone toward its
starting point w0: Omega(w) = alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_head||^2.
"""

from typing import NamedTuple

import jax
import optax
from flax import nnx

from cnnjax.registry import Registry


def path_str(path):
  """'backbone/stages/0/conv/kernel' for a pytree key path of an nnx.State."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def startswith_any(path, prefixes):
  return any(path == p or path.startswith(p + '/') or p == '' for p in prefixes)


def partition(transforms, label_of):
  """One optax transform per group of parameters: `label_of(path)` names the group of a
  parameter path ('backbone/stages/0/conv/kernel'); a group's `transforms[label]` updates it."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: label_of(path_str(path)), params)
  return optax.multi_transform(transforms, labels)


def finetune_optimizer(make_tx, learning_rate, trainable_prefixes, backbone_scale=1.0, head_prefix='head'):
  """`make_tx(lr)` on the trainable parameters, with the learning rate scaled by `backbone_scale`
  outside the new head; every other parameter frozen (zero updates, so it keeps its value bit for bit)."""
  def label_of(path):
    if not startswith_any(path, trainable_prefixes):
      return 'frozen'
    return 'head' if startswith_any(path, (head_prefix,)) else 'backbone'
  return partition({'head': make_tx(learning_rate), 'backbone': make_tx(learning_rate * backbone_scale),
                    'frozen': optax.set_to_zero()}, label_of)


class L2SPState(NamedTuple):
  anchor: optax.Params  # w0: the parameters at the start of fine-tuning


def l2sp(alpha, beta, head_prefix='head'):
  """Adds the gradient of the L2-SP penalty; chain it before the optimizer.

  Parameters under `head_prefix` are new (no pretrained value): plain weight decay beta.
  """

  def init(params):
    return L2SPState(anchor=params)

  def update(grads, state, params):
    def pull(path, g, w, w0):
      return g + (beta * w if startswith_any(path_str(path), (head_prefix,)) else alpha * (w - w0))
    return jax.tree_util.tree_map_with_path(pull, grads, params, state.anchor), state

  return optax.GradientTransformation(init, update)


class Recipe(NamedTuple):
  """How a transfer method starts and what it trains."""
  pretrained: bool   # start from the source model's backbone (else a fresh initialisation)
  trains: str        # 'all' | 'last_stage' | 'head' (see cnnjax.models.trainable_paths)
  l2sp: bool = False


TRANSFER_METHODS = Registry('transfer method')
TRANSFER_METHODS.register('scratch')(Recipe(pretrained=False, trains='all'))
TRANSFER_METHODS.register('linear_probe')(Recipe(pretrained=True, trains='head'))
TRANSFER_METHODS.register('finetune_last')(Recipe(pretrained=True, trains='last_stage'))
TRANSFER_METHODS.register('finetune')(Recipe(pretrained=True, trains='all'))
TRANSFER_METHODS.register('l2sp')(Recipe(pretrained=True, trains='all', l2sp=True))


def with_frozen_norms(loss_fn, trainable_prefixes):
  """`loss_fn` with the batch norms of frozen parts in inference mode, so a frozen backbone
  keeps its source statistics too (as a linear probe of a fixed feature extractor should)."""
  def frozen_loss(model, batch, rng):
    for path, module in nnx.iter_modules(model):
      if isinstance(module, nnx.BatchNorm) and not startswith_any('/'.join(map(str, path)), trainable_prefixes):
        module.use_running_average = True
    return loss_fn(model, batch, rng)
  return frozen_loss
