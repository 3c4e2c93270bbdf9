"""Orbax checkpoints of the whole TrainState, every N steps, resumed from the latest."""

import warnings
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
    """The latest readable state shaped and sharded like `like`, or None when there is none.

    A damaged checkpoint (truncated or missing files) costs a warning and falls back to the one
    before it; with none readable, the run starts afresh.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as error:  # orbax and tensorstore raise many kinds on damaged files
        warnings.warn(f'checkpoint step {step} in {self.manager.directory} is unreadable ({error}); '
                      'trying the one before', RuntimeWarning)
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
