"""Orbax checkpoints of the whole TrainState, every N steps, resumed from the latest."""

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """A `CheckpointManager` over one directory that keeps the last `max_to_keep` steps."""

  def __init__(self, directory, max_to_keep=2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self.manager = ocp.CheckpointManager(Path(directory).resolve(), options=options)  # orbax wants absolute paths

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state):
    self.manager.save(int(step), args=ocp.args.StandardSave(state))

  def restore(self, like):
    """The latest saved state shaped and sharded like `like`, or None when there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
