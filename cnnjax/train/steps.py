"""Pure train and eval steps built from a loss function, chunked and run over members.

A loss function has the signature `loss_fn(model, batch, rng) -> (loss, metrics)`;
the model arrives merged and in training mode. Steps are pure functions of
`(state, batch)`; `chunk` runs k of them in one program: unrolled on CPU, which XLA:CPU
runs 1.3-1.6x faster than a Python loop of jitted steps (digit CNN, k = 10: it pays the
cost of a call once) and 20-40x faster than a rolled `lax.scan` around XLA's weight-gradient
convolutions; rolled on accelerators. `over_members` runs several
seeds (or ensemble members) of one table cell in one program.
"""

import concurrent.futures
import os
import threading

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cnnjax import ops

MEMBER_MODES = ('auto', 'vmap', 'unroll', 'sequential', 'threads')


def make_train_step(graphdef, tx, loss_fn):
  """`step(state, batch) -> (state, metrics)`: one optimizer update."""

  def step(state, batch):
    model = nnx.merge(graphdef, state.params, state.model_state)
    model.train()
    rng = jax.random.fold_in(state.key('dropout'), state.step)
    objective = lambda model: loss_fn(model, batch, rng)
    (loss, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    # The norm of the updates, not of all gradients: gradients of frozen parameters stay dead code.
    metrics = dict(metrics, loss=loss, update_norm=optax.tree.norm(updates))
    return state.replace(step=state.step + 1, params=params, model_state=model_state,
                         opt_state=opt_state), metrics

  return step


def make_chunk(step, batch_fn, k, unroll=None):
  """`chunk(state, source) -> (state, metrics)`: k steps in one program.

  `batch_fn(source, state)` gives the batch of the state's step (for example a
  device-resident sample); metrics come back stacked along a leading axis of k.
  `unroll` (default: on CPU only) lowers the `lax.scan` to k straight-line copies of the step:
  on XLA:CPU a rolled loop around XLA's weight-gradient convolutions runs ~20-37x slower (around
  oneDNN's, cnnjax/ops, ResNet-20 still 5-13% slower), and the unrolled scan is the same optimized
  program as a Python loop of k steps, traced ~4x faster (digit CNN, k = 10: 0.2 s instead of
  0.85 s). On a GPU the rolled loop runs as fast (NVIDIA
  H200, digit CNN: 0.93x the unrolled chunk's time) and compiles one step instead of k (the
  unrolled 10-step chunk took 19 s cold). For k = 1 the step is called directly.
  """
  unroll = jax.default_backend() == 'cpu' if unroll is None else unroll

  def chunk(state, source):
    if k == 1:
      state, metrics = step(state, batch_fn(source, state))
      return state, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(lambda state, _: step(state, batch_fn(source, state)), state, None, length=k,
                        unroll=unroll)

  return chunk


def member_mode(mode):
  """The side-by-side path for 'auto': vmap on GPU/TPU, where one small model leaves the chip
  idle; on one CPU device, one compiled member program called from a thread per member, each
  member's oneDNN convolutions (cnnjax/ops) on its share of the cores, so that the members' steps,
  XLA's single-threaded ops included, fill the cores (2 AVX-512 EPYC cores, digit CNN at batch
  128: 5 members on threads take 0.82-0.91 of the sequential time, vmapped 0.79-0.91, unrolled
  0.89-0.99, and unrolling costs about M times the compile; 2 AVX-512 Xeon cores, medians:
  threads 1.01, unrolled 0.81, vmapped 0.87, yet the transfer preset's cells, short runs of small
  models, ran faster on threads than unrolled, 58-60 against 68-69 s in all; 2 AVX2 cores,
  with XLA's convolutions: threads 0.88, unrolled 0.90, vmapped 1.71, and there with huge pages,
  medians of two runs, threads 0.89-0.99, unrolled 0.94-0.98, vmapped 1.5-2.4); on several CPU
  devices, sequential calls (each program already spans every device)."""
  if mode != 'auto':
    return mode
  if jax.default_backend() != 'cpu':
    return 'vmap'
  return 'threads' if jax.device_count() == 1 else 'sequential'


def cores():
  """The CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def core_share(members):
  """OpenMP threads for each member's oneDNN convolutions (`ops.threads_per_call`) when `members`
  run at once: the cores shared out among them (at least 1), or 0 (every core) for one member."""
  return max(1, cores() // members) if members > 1 else 0


def _signature(tree):
  """What decides whether a jitted call compiles: structure, shapes, dtypes, placements."""
  leaves, structure = jax.tree.flatten(tree)
  return structure, tuple((jnp.shape(x), jnp.result_type(x), getattr(x, 'sharding', None)) for x in leaves)


def over_members(fn, mode, donate=True, source_axes=0):
  """Run `fn(state, source)` for every member of a stacked state.

  `source_axes` says, like `jax.vmap`'s in_axes, which parts of `source` are stacked per
  member (0) and which all members share (None): e.g. {'split': None, 'index': 0} shares a
  dataset and gives each seed its own subset. 'vmap' and 'unroll' compile all members into
  one program; 'sequential' calls one compiled member program per member, and 'threads' makes
  those calls from one thread per member, so that members run at the same time on the CPU
  cores. In 'unroll' and 'threads' each convolution runs on its member's share of the cores
  (`ops.threads_per_call`), beside the other members'. All four give the same numbers up to
  float rounding.
  """
  mode = member_mode(mode)
  if mode not in MEMBER_MODES[1:]:
    raise ValueError(f'unknown member mode {mode!r}; allowed: {MEMBER_MODES}')
  donate_argnums = (0,) if donate else ()
  if mode == 'vmap':
    return jax.jit(jax.vmap(fn, in_axes=(0, source_axes)), donate_argnums=donate_argnums)

  def member(tree, m, axes=0):
    """Member m (may be traced) of a stacked tree; parts whose axis is None are shared."""
    take = lambda part: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, m, keepdims=False), part)
    return jax.tree.map(lambda axis, part: part if axis is None else take(part), axes, tree,
                        is_leaf=lambda axis: axis is None)

  stack = lambda outs: jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  if mode == 'unroll':
    def unrolled(states, source):
      members = jax.tree.leaves(states)[0].shape[0]
      with ops.threads_per_call(core_share(members)):  # XLA runs the members' convolutions side by side
        return stack([fn(member(states, m), member(source, m, source_axes)) for m in range(members)])
    return jax.jit(unrolled, donate_argnums=donate_argnums)
  # Sequential and threads: one compiled program for every member, which picks its member inside
  # (the index is traced), and one that stacks their outputs; slicing and stacking with eager ops
  # around them cost more than the training itself for small models (a per-leaf dispatch each).
  def member_program(threads=0):
    """The member program with oneDNN convolutions on `threads` threads each (0: all cores)."""
    def program(states, source, m):
      with ops.threads_per_call(threads):
        return fn(member(states, m), member(source, m, source_axes))
    return jax.jit(program)

  one = member_program()
  stack_outputs = jax.jit(stack)

  def sequential(states, source):
    members = jax.tree.leaves(states)[0].shape[0]
    return stack_outputs([one(states, source, m) for m in range(members)])

  if mode == 'sequential':
    return sequential
  programs, compiled, lock = {}, set(), threading.Lock()

  def threads(states, source):
    members = jax.tree.leaves(states)[0].shape[0]
    share = core_share(members)  # each convolution runs on its member's share of the cores
    signature = (share, _signature((states, source)))
    with lock:
      if share not in programs:
        programs[share] = member_program(share) if share else one
      program, warm = programs[share], signature in compiled
    if warm and members > 1:
      run = lambda m: jax.block_until_ready(program(states, source, m))
      with concurrent.futures.ThreadPoolExecutor(members, thread_name_prefix='member') as pool:
        return stack_outputs(list(pool.map(run, range(members))))
    # In turn on this thread, dispatched without waiting: one member (a thread of its own only
    # added to its step time), or the first call of a signature (it compiles once).
    outputs = stack_outputs([program(states, source, m) for m in range(members)])
    with lock:
      compiled.add(signature)
    return outputs

  return threads
