"""The training state: one pytree holding everything a run needs to continue."""

import zlib

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx


@flax.struct.dataclass
class TrainState:
  """step, parameters, model state (batch statistics), optimizer state and a PRNG key.

  `rng` holds raw key data (uint32) so that checkpoints store it as a plain array.
  Seeds trained side by side stack every field along a leading member axis.
  """
  step: jax.Array
  params: nnx.State
  model_state: nnx.State
  opt_state: object
  rng: jax.Array

  def key(self, name):
    """The run's PRNG key for `name` ('data', 'dropout', ...); fold in the step for per-step keys."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), zlib.crc32(name.encode()) % (1 << 31))


def split_model(model):
  """(graphdef, params, model_state): the static structure and the two kinds of state."""
  return nnx.split(model, nnx.Param, ...)


def create(model, tx, seed):
  """A fresh TrainState for `model` (already initialised) and optimizer `tx`."""
  _, params, model_state = split_model(model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)))


def stack(states):
  """Stack per-seed states along a new leading member axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack(states):
  """The per-member states of a stacked state."""
  members = jax.tree.leaves(states)[0].shape[0]
  return [jax.tree.map(lambda x: x[m], states) for m in range(members)]


def member(states, m):
  return jax.tree.map(lambda x: x[m], states)
