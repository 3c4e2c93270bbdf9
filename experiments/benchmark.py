"""Benchmark: how fast cnnjax trains on this machine, against PyTorch eager and against itself.

Every measurement times `repeats` repeats of `chunk_steps` training steps after a warm-up call
(which compiles), blocking on the results; the variants of one comparison take turns within each
repeat, so that a shared machine's slow drifts hit them alike, and each turn starts with
`settle_calls` untimed calls, as steps of one training run follow each other (on a 2-core Xeon,
ResNet-50's first call after PyTorch's step took 1-5 s longer, faulting in again the memory its
allocator had handed back meanwhile: results/benchmark/NOTES.md). The table shows
mean ± std over the repeats and provenance.json the medians. Speed targets live here and in the
README, never in tests.
Presets, command and table: experiments/configs/benchmark.py.
"""

import collections
import contextlib
import gzip
import itertools
import json
import os

# PyTorch's OpenMP threads busy-wait by default, which on a shared, loaded CPU costs it ~2.5x
# (digit CNN, batch 128: 700 vs 260 ms/step at load 7 on 2 cores); set before torch is imported.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import YNN_FUSION_FLAG, config as cfg
from cnnjax import data, host_memory, models, ops
from cnnjax.methods.classification import cross_entropy
from cnnjax.tables import Table
from cnnjax.train import sharding, state as train_state, steps
from experiments import runner


INPUTS = {'digit_cnn': (28, 1), 'conv4': (28, 1), 'resnet20_cifar': (32, 3), 'resnet50': (224, 3)}  # size, channels
SMALL_MODELS = ('digit_cnn', 'conv4')  # `throughput_chunk_steps` steps per call; chunk comparisons (3)
# cnnjax hands XLA:CPU's reductions to YNNPACK (cnnjax/__init__.py); for one program, this gives
# them back to XLA's own loops (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= for a process).
XLA_REDUCTIONS = {YNN_FUSION_FLAG: ''}
# Rows of the convolutions cnnjax did not pick, by whether it picked oneDNN's (cnnjax/ops/conv.py).
OTHER_CONVOLUTIONS = {True: ('cnnjax, XLA convolutions', ops.xla_convolutions),
                      False: ('cnnjax, oneDNN convolutions', ops.onednn_convolutions)}
NUM_CLASSES = 10
REPO = Path(__file__).resolve().parents[1]


def validate(config):
  """Fail before any compute on a wrong key, name or value."""
  cfg.validate_base(config)
  cfg.check_choice(config, 'models', tuple(INPUTS))
  cfg.check_choice(config, 'host_memory_models', tuple(INPUTS))
  for name in dict.fromkeys(('digit_cnn', *config.models)):  # the digit CNN runs in every section
    cfg.check_batch_fits_devices(config, f'batch_sizes.{name}')
  for key in ('throughput_chunk_steps', 'large_chunk_steps', 'repeats', 'member_chunk_steps', 'split_size',
              'grain_batches', 'compile_repeats'):
    cfg.check_type(config, key, int)
    cfg.check_positive(config, key)
  for key, least in (('members', 1), ('grain_workers', 0)):
    cfg.check_type(config, key, (list, tuple))
    for value in config[key]:
      if not cfg.is_count(value, least):
        raise cfg.ConfigError(key, value, f'integers >= {least}')
  cfg.check_choice(config, 'member_modes', steps.MEMBER_MODES[1:])
  cfg.check_choice(config, 'grain_dataset', data.DATASETS.names() + list(data.CATALOG))
  cfg.check_positive(config, 'learning_rate')
  cfg.check_positive(config, 'peak_flops', allow_zero=True)
  cfg.check_type(config, 'settle_calls', int)
  cfg.check_positive(config, 'settle_calls', allow_zero=True)
  for key in ('torch', 'compile', 'host_memory', 'bf16', 'xla_reductions', 'other_convolutions'):
    cfg.check_type(config, key, bool)
  cfg.check_type(config, 'profile_dir', str)
  if config.profile_dir:
    cfg.check_writable_dir(config, 'profile_dir')
  if config.split_size < max(config.batch_sizes[name] for name in ('digit_cnn', *config.models)):
    raise cfg.ConfigError('split_size', config.split_size, 'at least the largest batch size')


# Timing -----------------------------------------------------------------------------------------

def block(tree):
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, 'block_until_ready') else x, tree)


def time_repeats(timers, repeats, warmup=1, settle=0, profile_dir=''):
  """{label: seconds of each of `repeats` timed calls} for `timers` = {label: (call, state)}, each
  call `state = call(state)`, after `warmup` untimed calls each (the first compiles). The labels
  take turns within every repeat, so that a shared machine's slow drifts hit them alike; each turn
  starts with `settle` untimed calls, so that the timed one does not pay for faulting in again
  memory handed back while the previous label's program ran (as steps of one training run do not). With `profile_dir`, one more
  call of each is traced afterwards (`profile`) and its top events printed."""
  states = {}
  for label, (call, state) in timers.items():
    for _ in range(warmup):
      state = block(call(state))
    states[label] = state
  seconds = {label: [] for label in timers}
  for _ in range(repeats):
    for label, (call, _) in timers.items():
      for _ in range(settle):
        states[label] = block(call(states[label]))
      started = time.perf_counter()
      states[label] = block(call(states[label]))
      seconds[label].append(time.perf_counter() - started)
  if profile_dir:
    for label, (call, _) in timers.items():
      top = profile(call, states[label], Path(profile_dir) / re.sub(r'[^\w.=-]+', '_', label))
      events = ', '.join(f'{name} {ms:.2f} ms' for name, ms in top) or "none (jax.profiler sees only JAX's programs)"
      print(f'    profile {label}: {events}', flush=True)
  return seconds


def profile(call, state, directory, top=8):
  """One call traced by `jax.profiler` into `directory` (open its perfetto_trace.json.gz in
  ui.perfetto.dev); returns the `top` trace events by total time as [(name, ms)], host and device
  events alike (the XLA ops, kernels and runtime calls; Python frames left out)."""
  with jax.profiler.trace(str(directory), create_perfetto_trace=True):
    block(call(state))
  newest = max(Path(directory).rglob('perfetto_trace.json.gz'), key=lambda path: path.stat().st_mtime)
  with gzip.open(newest) as f:  # the newest: a rerun into the same directory adds a trace
    trace = json.load(f)
  totals = collections.Counter()
  for event in trace['traceEvents'] if isinstance(trace, dict) else trace:
    if event.get('ph') == 'X' and not event.get('name', '$').startswith('$'):
      totals[event['name']] += event.get('dur', 0) / 1000
  return totals.most_common(top)


# cnnjax programs --------------------------------------------------------------------------------

class Bench:
  """Synthetic device-resident data and the train step of one model, as the experiments build it."""

  def __init__(self, config, mesh, name, dtype='float32', convolutions=contextlib.nullcontext):
    self.config, self.mesh, self.name = config, mesh, name
    size, channels = INPUTS[name]
    self.batch_size = config.batch_sizes[name]
    rng = np.random.default_rng(0)
    split = {'image': rng.integers(0, 256, (config.split_size, size, size, channels), dtype=np.uint8),
             'label': rng.integers(0, NUM_CLASSES, config.split_size).astype(np.int32)}
    self.source = sharding.replicate({'split': split}, mesh)

    def build(seed):  # the model's convolutions are chosen when it is built (cnnjax/ops/conv.py):
      # inside `convolutions()` (ops.xla_convolutions, ops.onednn_convolutions; default: cnnjax's choice)
      with convolutions():
        return models.build(name, num_classes=NUM_CLASSES, seed=seed, channels=channels, dtype=dtype)
    self.build = build
    model = self.build(0)
    self.tx = optax.adam(config.learning_rate)
    self.graphdef = train_state.split_model(model)[0]
    self.step = steps.make_train_step(self.graphdef, self.tx, cross_entropy)

  def batch_fn(self, source, state):
    batch = data.device_batch(source['split'], state.key('data'), state.step, self.batch_size)
    return sharding.shard_batch(dict(batch, image=data.transforms.to_float(batch['image'])), self.mesh)

  def states(self, members=None):
    """One state, or `members` stacked states (seeds 0..M-1), replicated over the mesh."""
    if members is None:
      return sharding.replicate(train_state.create(self.build(0), self.tx, 0), self.mesh)
    return sharding.replicate(train_state.stack([train_state.create(self.build(s), self.tx, s)
                                                 for s in range(members)]), self.mesh)

  def chunk(self, k, compiler_options=None, unroll=None):
    """k steps in one jitted program (one member): unrolled or a rolled lax.scan (default: as
    the experiments run them, unrolled on CPU only)."""
    return jax.jit(steps.make_chunk(self.step, self.batch_fn, k, unroll), donate_argnums=0,
                   compiler_options=compiler_options)

  def chunk_timers(self, k, scan=True):
    """{label: (call, state)} for `time_repeats`: k unrolled steps in one program, a Python loop of
    k jitted steps and (with `scan`) a rolled lax.scan over k steps."""
    single = self.chunk(1)

    def loop(state, source):
      for _ in range(k):
        state, metrics = single(state, source)
      return state, metrics

    programs = {f'chunk of {k} unrolled': self.chunk(k, unroll=True), f'Python loop of {k} jitted steps': loop}
    if scan:
      programs[f'lax.scan over {k} steps'] = self.chunk(k, unroll=False)
    return {label: self.timer(fn, self.states()) for label, fn in programs.items()}

  def members(self, k, mode):
    return steps.over_members(steps.make_chunk(self.step, self.batch_fn, k), mode, source_axes={'split': None})

  def timer(self, fn, state):
    """`state = fn(state, source)[0]` as a (call, state) pair for `time_repeats`."""
    return lambda s: fn(s, self.source)[0], state

  def flops(self, fn, state):
    """Flops of one call of the jitted `fn` from XLA's cost analysis of the program before
    optimization (0 when it has none): the compiled program's analysis misses the convolutions
    that XLA:GPU hands to cuDNN (on an H200 it counted ~1/57 of ResNet-50's). Custom calls count
    nothing: on CPU, count a Bench built with `ops.xla_convolutions` (oneDNN's are custom calls)."""
    try:
      analysis = fn.lower(state, self.source).cost_analysis()
      analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
      return float(analysis.get('flops', 0.0))
    except Exception:  # cost analysis is best effort: no MFU row without it
      return 0.0


# PyTorch reference models (eager, NCHW) --------------------------------------------------------

def torch_model(name):
  """The PyTorch twin of a cnnjax model: same layers, shapes, batch-norm momentum and head."""
  import torch
  from torch import nn

  def conv_bn(cin, cout, kernel=3, stride=1):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout, momentum=0.1)]

  class CifarBlock(nn.Module):  # option A: identity shortcut, subsampled and zero-padded
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout))
      self.stride, self.pad = stride, cout - cin

    def forward(self, x):
      shortcut = x[:, :, ::self.stride, ::self.stride]
      if self.pad:
        shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
      return torch.relu(self.body(x) + shortcut)

  class Bottleneck(nn.Module):  # torchvision v1.5: stride on the 3x3, projection where shapes change
    def __init__(self, cin, width, stride):
      super().__init__()
      self.body = nn.Sequential(*conv_bn(cin, width, 1), nn.ReLU(), *conv_bn(width, width, 3, stride), nn.ReLU(),
                                *conv_bn(width, 4 * width, 1))
      self.shortcut = (nn.Sequential(*conv_bn(cin, 4 * width, 1, stride))
                       if stride != 1 or cin != 4 * width else nn.Identity())

    def forward(self, x):
      return torch.relu(self.body(x) + self.shortcut(x))

  if name == 'digit_cnn':
    return nn.Sequential(*conv_bn(1, 32), nn.ReLU(), nn.MaxPool2d(2), *conv_bn(32, 64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))
  if name == 'conv4':  # conv with bias, batch norm, ReLU, 2x2 max pool; 28 -> 14 -> 7 -> 3 -> 1
    blocks = [[nn.Conv2d(cin, 64, 3, padding=1), nn.BatchNorm2d(64, momentum=0.1), nn.ReLU(), nn.MaxPool2d(2)]
              for cin in (1, 64, 64, 64)]
    return nn.Sequential(*sum(blocks, []), nn.Flatten(), nn.Linear(64, NUM_CLASSES))
  if name == 'resnet20_cifar':
    layers, cin = [*conv_bn(3, 16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
      for i in range(3):
        layers.append(CifarBlock(cin, cout, stride if i == 0 else 1))
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, NUM_CLASSES))
  if name == 'resnet50':
    layers, cin = [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
      for b in range(blocks):
        layers.append(Bottleneck(cin, width, 2 if i and not b else 1))
        cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, NUM_CLASSES))
  raise ValueError(name)


def torch_timer(config, name):
  """A (call, state) pair for `time_repeats`: the call runs the cnnjax chunk's number of PyTorch
  eager Adam steps of the twin model, on the GPU when JAX runs on one and torch sees it, else on the CPU."""
  import torch
  torch.manual_seed(0)
  device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  size, channels = INPUTS[name]
  batch = config.batch_sizes[name]
  model = torch_model(name).to(device).train()
  optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
  generator = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (config.split_size, channels, size, size), dtype=torch.uint8,
                         generator=generator).to(device)
  labels = torch.randint(0, NUM_CLASSES, (config.split_size,), generator=generator).to(device)

  def train_steps(k):
    for _ in range(k):
      index = torch.randint(0, config.split_size, (batch,), generator=generator).to(device)
      x, y = images[index].float() / 255.0, labels[index]
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      optimizer.step()
    return loss.item()

  k = chunk_steps_for(config, name)
  return lambda _: train_steps(k), None


def chunk_steps_for(config, name):
  return config.throughput_chunk_steps if name in SMALL_MODELS else config.large_chunk_steps


def torch_version():
  """PyTorch's version, or None when it is not installed."""
  try:
    import torch
    return torch.__version__
  except ImportError:
    return None


# Fresh processes -------------------------------------------------------------------------------

# Run by `in_fresh_process`: a Bench (the model named by the second argument) in a process set up
# as an experiment's (`runner.setup`), the config given as JSON; the script prints its result as
# JSON after RESULT.
SCRIPT_HEAD = '''
import json, sys, time
import ml_collections
from experiments import benchmark, runner
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
bench = benchmark.Bench(config, runner.setup(config, validate=lambda config: None), sys.argv[2])
'''
COMPILE_SCRIPT = SCRIPT_HEAD + '''
state = bench.states()
started = time.perf_counter()
bench.chunk(config.chunk_steps).lower(state, bench.source).compile()
print('RESULT', json.dumps(time.perf_counter() - started))
'''
CHUNKS_SCRIPT = SCRIPT_HEAD + '''
print('RESULT', json.dumps(benchmark.chunk_and_loop(bench)))
'''


def in_fresh_process(script, config, name='digit_cnn', env=None):
  """What `script` (SCRIPT_HEAD + ...) prints after RESULT, run with `config` for model `name` in a
  fresh Python process (environment `env`; default, this one's)."""
  done = subprocess.run([sys.executable, '-c', script, json.dumps(config.to_dict()), name], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  if done.returncode:
    raise RuntimeError(f'benchmark subprocess failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.split('RESULT')[-1])


def compile_seconds(config, cache_dir):
  """Seconds to compile the digit-CNN chunk in a fresh process with the persistent cache at `cache_dir`."""
  config = config.copy_and_resolve_references()
  config.compile_cache = str(cache_dir)
  return in_fresh_process(COMPILE_SCRIPT, config)


def chunk_and_loop(bench):
  """{'seconds': {label: seconds of each repeat}, 'faults': page faults of one more chunk call} for
  `bench`'s chunk of `chunk_steps_for` unrolled steps and, for the small models, a Python loop of as
  many jitted steps."""
  k = chunk_steps_for(bench.config, bench.name)
  timers = (bench.chunk_timers(k, scan=False) if bench.name in SMALL_MODELS else
            {f'chunk of {k} unrolled': bench.timer(bench.chunk(k, unroll=True), bench.states())})
  seconds = time_repeats(timers, bench.config.repeats, settle=bench.config.settle_calls)
  call = timers[f'chunk of {k} unrolled'][0]
  state = block(call(bench.states()))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block(call(state))
  return {'seconds': seconds, 'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}


def host_memory_times(config, name, allocator):
  """`chunk_and_loop` for model `name` in a fresh process on `allocator`, one of
  host_memory.ALLOCATORS (the caller's other settings kept)."""
  return in_fresh_process(CHUNKS_SCRIPT, config, name, host_memory.environment(os.environ, allocator))


# grain ------------------------------------------------------------------------------------------

def grain_seconds(config, source, batch_size, workers):
  """Seconds per repeat of `grain_batches` batches from the grain loader over `source`, read in
  this process (`workers` 0) or in `workers` worker processes, after a warm-up repeat (which starts them)."""
  batches = data.grain_batches(source, global_batch_size=batch_size, seed=0, workers=workers)

  def read(_):
    for _ in range(config.grain_batches):
      batch = next(batches)
    return batch['image'].shape[0]

  return time_repeats({'grain': (read, None)}, config.repeats)['grain']


# The benchmark ----------------------------------------------------------------------------------

class Benchmark:

  def __init__(self, exp):
    self.exp, self.config = exp, exp.config
    c = self.config
    self.table = Table('benchmark', c.preset, f'Training speed on {jax.devices()[0].device_kind} '
                       f'({jax.device_count()} {jax.default_backend()} device(s))', digits=2)
    self.medians, self.notes = {}, []
    self.consumed = None  # digit-CNN images/s, for the grain comparison
    # Opened before any timing, so that a missing or unprepared dataset stops the run at once.
    self.grain_source = data.data_source(c.grain_dataset, 'train', c.data_dir or None)

  def add(self, row, column, values):
    for value in values:
      self.table.add(row, column, value)
    self.medians[f'{row} | {column}'] = float(np.median(values))
    print(f'  {row} | {column}: median {np.median(values):.2f}', flush=True)

  def profile_dir(self, section):
    """Where `time_repeats` traces one section's programs ('' when `profile_dir` is not set)."""
    return self.config.profile_dir and str(Path(self.config.profile_dir) / section)

  def add_step_times(self, row, seconds, steps_per_repeat, batch):
    ms = [1000 * s / steps_per_repeat for s in seconds]
    self.add(row, 'ms/step', ms)
    self.add(row, 'images/s', [1000 * batch / m for m in ms])
    return ms

  def throughput(self):
    """(1) cnnjax vs PyTorch eager images/s, same model, batch and Adam."""
    c = self.config
    have_torch = c.torch and torch_version() is not None
    if c.torch and not have_torch:
      self.notes.append('PyTorch rows skipped: torch is not installed (pip install torch==2.13.0, the bench extra).')
      print('  torch is not installed: skipping the PyTorch rows (pip install torch==2.13.0)', flush=True)
    if have_torch:
      import torch
      self.notes.append(f'PyTorch {torch.__version__} eager, {torch.get_num_threads()} threads, '
                        f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY")}.')
    if jax.default_backend() == 'cpu':
      malloc = 'mimalloc' if host_memory.on_mimalloc(os.environ) else 'glibc'
      self.notes.append(f"malloc: {malloc}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset)'}, the "
                        f"kernel's transparent huge pages: {host_memory.thp_mode()} (cnnjax/host_memory.py).")
      self.notes.append(f"The cnnjax rows run {'oneDNN' if ops.onednn_enabled() else 'XLA'}'s convolutions (oneDNN has "
                        f"{'' if ops.onednn_faster() else 'no '}direct NHWC kernels on this CPU: cnnjax/ops/conv.py).")
    for name in c.models:
      print(f'[throughput] {name}', flush=True)
      bench, k, cpu = Bench(c, self.exp.mesh, name), chunk_steps_for(c, name), jax.default_backend() == 'cpu'
      programs = {'cnnjax': (bench, bench.chunk(k))}  # label: (bench, jitted chunk)
      if c.xla_reductions and cpu:
        programs['cnnjax, XLA reductions'] = bench, bench.chunk(k, XLA_REDUCTIONS)
      if c.other_convolutions and cpu:  # the convolutions cnnjax did not pick here
        label, choice = OTHER_CONVOLUTIONS[ops.onednn_enabled()]
        other = Bench(c, self.exp.mesh, name, convolutions=choice)
        programs[label] = other, other.chunk(k)
      if c.bf16 and not cpu:
        low = Bench(c, self.exp.mesh, name, dtype='bfloat16')
        programs['cnnjax bf16'] = low, low.chunk(k)
      timers = {label: b.timer(fn, b.states()) for label, (b, fn) in programs.items()}
      if have_torch:
        timers['torch'] = torch_timer(c, name)
      ms = {label: self.add_step_times(f'{name} {label}', seconds, k, bench.batch_size)
            for label, seconds in time_repeats(timers, c.repeats, settle=c.settle_calls,
                                               profile_dir=self.profile_dir(name)).items()}
      ours = ms['cnnjax']
      variants = [label for label in ms if label.startswith('cnnjax, ')]
      if name == 'digit_cnn':
        self.consumed = [1000 * bench.batch_size / m for m in ours]
      if c.peak_flops and not cpu:  # of the bf16 program when there is one: peak_flops is a bf16 peak
        label = 'cnnjax bf16' if 'cnnjax bf16' in ms else 'cnnjax'
        b, fn = programs[label]
        flops = b.flops(fn, b.states()) / k
        if flops:
          self.add(f'{name} {label}', 'MFU %', [100 * flops / (m / 1000 * c.peak_flops) for m in ms[label]])
      for label in variants:
        self.add(f'{name} cnnjax / {label} images/s', 'ratio', [x / o for o, x in zip(ours, ms[label])])
      if have_torch:
        theirs = ms['torch']
        for label in ['cnnjax', *variants]:
          self.add(f'{name} {label} / torch images/s', 'ratio', [t / o for o, t in zip(ms[label], theirs)])

  def members(self):
    """(2) M members in one program (vmap, unroll) or on one thread each vs M sequential calls."""
    c = self.config
    bench, k = Bench(c, self.exp.mesh, 'digit_cnn'), c.member_chunk_steps
    for m in sorted(c.members):
      print(f'[members] M={m}', flush=True)
      timers = {mode: bench.timer(bench.members(k, mode), bench.states(m)) for mode in c.member_modes}
      seconds = time_repeats(timers, c.repeats, settle=c.settle_calls, profile_dir=self.profile_dir(f'members_M={m}'))
      ms = {mode: [1000 * s / k for s in times] for mode, times in seconds.items()}
      for mode in ms:
        self.add(f'digit_cnn M={m} {mode}', 'ms/step', ms[mode])
      if 'sequential' in ms:
        for mode in [mode for mode in ms if mode != 'sequential']:
          self.add(f'digit_cnn M={m} {mode} / sequential ms/step', 'ratio',
                   [a / b for a, b in zip(ms[mode], ms['sequential'])])
      if m == 1:
        one = ms
      elif 1 in c.members:  # what M members cost against one (members runs M=1 first: sorted)
        for mode in ms:
          self.add(f'digit_cnn M={m} / M=1 {mode} ms/step', 'ratio', [a / b for a, b in zip(ms[mode], one[mode])])

  def chunks(self):
    """(3) k unrolled steps in one program vs a Python loop of jitted steps vs a rolled scan, for the
    small models (the digit CNN always)."""
    for name in dict.fromkeys(('digit_cnn', *(m for m in self.config.models if m in SMALL_MODELS))):
      self.chunks_of(name)

  def chunks_of(self, name):
    c, k = self.config, self.config.chunk_steps
    print(f'[chunks] {name} k={k}', flush=True)
    seconds = time_repeats(Bench(c, self.exp.mesh, name).chunk_timers(k), c.repeats, settle=c.settle_calls,
                           profile_dir=self.profile_dir(f'chunks_{name}'))
    ms = {label: [1000 * s / k for s in times] for label, times in seconds.items()}
    for label in ms:
      self.add(f'{name} {label}', 'ms/step', ms[label])
    chunk, loop_label, scan_label = ms
    self.add(f'{name} Python loop / chunk ms/step', 'ratio', [a / b for a, b in zip(ms[loop_label], ms[chunk])])
    # time per step = compute + per-call cost / steps per call: the loop pays the cost every step.
    per_call = [(a - b) * k / (k - 1) for a, b in zip(ms[loop_label], ms[chunk])] if k > 1 else []
    if per_call:
      self.add(f'{name} cost per call (from loop and chunk)', 'ms', per_call)
      self.add(f'{name} compute per step (from loop and chunk)', 'ms/step',
               [b - p / k for b, p in zip(ms[chunk], per_call)])
    self.add(f'{name} lax.scan / chunk ms/step', 'ratio', [a / b for a, b in zip(ms[scan_label], ms[chunk])])

  def compile(self):
    """(4) Cold compile vs warm start from the persistent compilation cache, in fresh processes."""
    c = self.config
    print(f'[compile] cold, then warm, {c.compile_repeats} time(s)', flush=True)
    cold, warm = [], []
    for _ in range(c.compile_repeats):  # each pair with an empty cache of its own
      with tempfile.TemporaryDirectory(prefix='cnnjax-bench-cache-') as cache:
        cold.append(compile_seconds(c, cache))
        warm.append(compile_seconds(c, cache))
    self.add(f'digit_cnn chunk of {c.chunk_steps} compile, cold', 's', cold)
    self.add(f'digit_cnn chunk of {c.chunk_steps} compile, warm cache', 's', warm)
    self.add('digit_cnn compile warm / cold s', 'ratio', [w / cold_s for w, cold_s in zip(warm, cold)])

  def host_memory(self):
    """(7) On CPU, each of `host_memory_models`' chunk (and the small models' Python loop) in fresh
    processes on glibc's malloc with its defaults and with huge pages, and on mimalloc (cnnjax's
    default, where installed; cnnjax/host_memory.py), in the order A B C C B A: paired fresh
    processes drift with their order. The ratios divide by the last of them."""
    c = self.config
    settings = [s for s in host_memory.ALLOCATORS if s != 'mimalloc' or host_memory.mimalloc_library()]
    order = settings + settings[::-1]
    print(f'[host memory] {" -> ".join(order)} (the kernel\'s huge pages: {host_memory.thp_mode()})', flush=True)
    for name in c.host_memory_models:
      ms, faults = collections.defaultdict(list), collections.defaultdict(list)
      for setting in order:
        result = host_memory_times(c, name, setting)
        for label, seconds in result['seconds'].items():
          ms[label, setting] += [1000 * s / chunk_steps_for(c, name) for s in seconds]
        faults[setting].append(result['faults'])
      labels = list(dict.fromkeys(label for label, _ in ms))
      for setting in settings:
        for label in labels:
          self.add(f'{name} {label}, {setting}', 'ms/step', ms[label, setting])
        self.add(f'{name} page faults per chunk call, {setting}', 'faults', faults[setting])
      ours = settings[-1]
      for label, setting in itertools.product(labels, [s for s in settings if s != ours]):
        self.add(f'{name} {label}, {setting} / {ours} ms/step', 'ratio',
                 [a / b for a, b in zip(ms[label, setting], ms[label, ours])])

  def grain(self):
    """(5) grain loader images/s, in this process and in worker processes, vs the digit CNN's consumption."""
    c = self.config
    batch = c.batch_sizes.digit_cnn
    for workers in c.grain_workers:
      print(f'[grain] {workers} worker processes', flush=True)
      seconds = grain_seconds(c, self.grain_source, batch, workers)
      rate = [c.grain_batches * batch / s for s in seconds]
      suffix = f', {workers} worker processes' if workers else ''
      self.add(f'grain {c.grain_dataset} loader{suffix}', 'images/s', rate)
      if self.consumed:
        self.add(f'grain loader{suffix} / digit_cnn consumption images/s', 'ratio',
                 [r / used for r, used in zip(rate, self.consumed)])

  def run(self):
    """Every section, the table rewritten after each: a run stopped early (a time limit, an
    error) keeps what it measured, marked as partial."""
    c, cpu = self.config, jax.default_backend() == 'cpu'
    sections = [self.throughput, self.members, self.chunks, *([self.compile] if c.compile else []),
                *([self.host_memory] if c.host_memory and cpu else []), self.grain]
    for i, section in enumerate(sections):
      section()
      left = [s.__name__ for s in sections[i + 1:]]
      self.write(partial=f'Partial: the run had yet to measure {", ".join(left)}.' if left else '')

  def write(self, partial=''):
    c = self.config
    # The digit CNN also runs the members, chunks and grain sections.
    shapes = ', '.join(f'{name} {INPUTS[name][0]}x{INPUTS[name][0]}x{INPUTS[name][1]} at batch {c.batch_sizes[name]}'
                       for name in dict.fromkeys(('digit_cnn', *c.models)))
    self.table.caption = ' '.join([
        f'Training steps with Adam on synthetic device-resident batches ({shapes}); each value is one '
        f'timed call after a warm-up call ({c.settle_calls} more untimed at the start of each turn): '
        f'of {c.throughput_chunk_steps} steps in the cnnjax and PyTorch rows '
        f'({c.large_chunk_steps} for the larger models), {c.member_chunk_steps} per member in the M= rows, '
        f'{c.chunk_steps} in the chunk rows. '
        'A ratio row divides the two named quantities (images/s ratio > 1: the first is faster; ms/step or s '
        'ratio < 1: the first is faster; grain > 1: the loader outpaces training). The cost per call (ms) and '
        'compute per step split the chunk and loop times as compute + cost per call / steps per call. '
        'Faults: the page faults of one more chunk call in a host memory process. '
        'Here n counts timed repeats, not seeds.',
        *self.notes, partial]).strip()
    self.exp.write_table(self.table, medians=self.medians, complete=not partial, cpu_count=os.cpu_count(),
                         load_average=[round(x, 2) for x in os.getloadavg()], torch=torch_version())


def main(config):
  mesh = runner.setup(config, validate)
  Benchmark(runner.Experiment('benchmark', config, mesh)).run()


if __name__ == '__main__':
  runner.command_line('benchmark', main)
