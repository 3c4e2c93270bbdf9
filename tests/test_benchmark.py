"""The benchmark's smoke preset runs as the command line runs it and writes a long-form table of
positive numbers with provenance. No timing assertions: speed targets live in the benchmark."""

import csv
import io
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import host_memory, ops
from cnnjax.errors import ConfigError
from cnnjax.train import sharding
from experiments import benchmark, runner
from experiments.configs.benchmark import get_config

REPO = Path(__file__).resolve().parents[1]
CSV_HEADER = 'experiment,preset,row,column,mean,std,n'


@pytest.mark.slow
def test_smoke_preset_writes_table(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', MPLCONFIGDIR=str(tmp_path / 'mpl'), WANDB_MODE='disabled')
  args = [sys.executable, '-m', 'experiments.benchmark', '--config=experiments/configs/benchmark.py:smoke',
          f'--config.workdir={tmp_path / "work"}', f'--config.results_dir={tmp_path / "results"}',
          f'--config.compile_cache={os.environ["JAX_COMPILATION_CACHE_DIR"]}']  # the session's (conftest.py)
  done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, f'--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}'
  out = tmp_path / 'results' / 'benchmark' / 'smoke'
  for name in ('table.md', 'table.tex', 'table.csv', 'provenance.json'):
    assert (out / name).is_file(), name
  text = (out / 'table.csv').read_text()
  assert text.splitlines()[0] == CSV_HEADER
  rows = list(csv.DictReader(io.StringIO(text)))
  assert rows and {r['experiment'] for r in rows} == {'benchmark'} and {r['preset'] for r in rows} == {'smoke'}
  for r in rows:  # times and ratios are positive; a difference of two times (per-call cost) may not be
    derived = '(from loop and chunk)' in r['row']
    assert (np.isfinite(float(r['mean'])) if derived else float(r['mean']) > 0) and int(r['n']) >= 1, r
  measured = {r['row'] for r in rows}
  for row in ('digit_cnn cnnjax', 'digit_cnn cnnjax, XLA reductions', 'digit_cnn M=2 sequential',
              'digit_cnn M=2 threads / sequential ms/step',
              'digit_cnn lax.scan over 2 steps', 'digit_cnn compile warm / cold s', 'grain mnist_5k loader',
              'grain loader, 2 worker processes / digit_cnn consumption images/s',
              'digit_cnn cost per call (from loop and chunk)'):
    assert row in measured, (row, sorted(measured))
  if benchmark.torch_version() is not None:
    assert {'digit_cnn cnnjax / torch images/s', 'digit_cnn cnnjax, XLA reductions / torch images/s'} <= measured
  else:
    assert 'torch is not installed' in done.stdout
  caption = (out / 'table.md').read_text()  # names the models measured, with their input and batch
  assert 'digit_cnn 28x28x1 at batch 32' in caption and 'resnet20' not in caption
  assert 'of 2 steps in the cnnjax and PyTorch rows' in caption and '1 per member' in caption
  assert 'Partial' not in caption
  record = json.loads((out / 'provenance.json').read_text())
  assert record['experiment'] == 'benchmark' and record['medians'] and record['command'].startswith(
      'python -m experiments.benchmark') and record['complete']


def test_timed_variants_take_turns_and_carry_their_state():
  log = []
  def counter(label):
    def call(state):
      log.append((label, state))
      return state + 1
    return call
  seconds = benchmark.time_repeats({'a': (counter('a'), 0), 'b': (counter('b'), 10)}, repeats=2)
  assert log == [('a', 0), ('b', 10), ('a', 1), ('b', 11), ('a', 2), ('b', 12)]  # warm-ups, then turns
  assert set(seconds) == {'a', 'b'} and all(len(s) == 2 and min(s) >= 0 for s in seconds.values())


def test_each_turn_can_start_with_untimed_calls(monkeypatch):
  calls, clock_reads = [], []
  def call(state):
    calls.append(state)
    return state + 1
  ticks = iter(range(100))
  monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: clock_reads.append(calls[-1]) or next(ticks))
  seconds = benchmark.time_repeats({'a': (call, 0)}, repeats=2, settle=2)
  assert calls == [0, 1, 2, 3, 4, 5, 6]  # a warm-up, then each turn: two untimed calls and a timed one
  assert clock_reads == [2, 3, 5, 6] and seconds == {'a': [1, 1]}  # the clock brackets the third call only


def test_chunk_comparisons_cover_the_small_models(monkeypatch):
  config = get_config('smoke')
  config.models = ('resnet20_cifar', 'conv4')
  compared = []
  monkeypatch.setattr(benchmark.Benchmark, 'chunks_of', lambda self, name: compared.append(name))
  benchmark.Benchmark(types.SimpleNamespace(config=config)).chunks()
  assert compared == ['digit_cnn', 'conv4']  # the digit CNN always, ResNet-20 never


def test_a_run_stopped_early_keeps_its_table_marked_partial(tmp_path, monkeypatch):
  config = get_config('smoke')
  config.results_dir = str(tmp_path)
  bench = benchmark.Benchmark(runner.Experiment('benchmark', config, sharding.make_mesh()))
  monkeypatch.setattr(bench, 'throughput', lambda: bench.add('digit_cnn cnnjax', 'ms/step', [2.0, 4.0]))
  monkeypatch.setattr(bench, 'members', lambda: None)
  def chunks():
    raise KeyboardInterrupt  # as a time limit would stop it
  monkeypatch.setattr(bench, 'chunks', chunks)
  with pytest.raises(KeyboardInterrupt):
    bench.run()
  out = tmp_path / 'benchmark' / 'smoke'
  assert 'digit_cnn cnnjax,ms/step,3.0' in (out / 'table.csv').read_text()
  assert 'Partial: the run had yet to measure chunks, compile, grain.' in (out / 'table.md').read_text()
  assert json.loads((out / 'provenance.json').read_text())['complete'] is False


def test_flops_count_every_convolution():
  """MFU's numerator: a digit-CNN train step costs about 3x its forward flops (forward, input and
  weight gradients; the first layer needs no input gradient), counted by hand below. With XLA's
  convolutions: oneDNN's are custom calls, which cost analysis does not count (and run on CPU only,
  where the benchmark reports no MFU)."""
  config = get_config('smoke')
  config.batch_sizes.digit_cnn = 8
  bench = benchmark.Bench(config, sharding.make_mesh(), 'digit_cnn', convolutions=ops.xla_convolutions)
  forward = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 9 * 32 + 7 * 7 * 64 * 128 + 128 * 10)  # per image
  per_image = bench.flops(bench.chunk(1), bench.states()) / 8
  assert 2.8 * forward < per_image < 3.3 * forward, per_image / forward


def test_profile_dir_traces_each_program_once_and_prints_its_ops(tmp_path, capsys):
  matmul = jax.jit(lambda x: jnp.tanh(x @ x))
  seconds = benchmark.time_repeats({'matmul x': (matmul, jnp.ones((64, 64)))}, repeats=2, profile_dir=str(tmp_path))
  assert len(seconds['matmul x']) == 2  # the traced call is not timed
  assert len(list((tmp_path / 'matmul_x').rglob('perfetto_trace.json.gz'))) == 1
  printed = capsys.readouterr().out
  assert 'profile matmul x: ' in printed and 'dot_general' in printed  # the XLA op, by its name in the program
  time.sleep(1.1)  # jax.profiler names each trace's directory by the second it started
  benchmark.time_repeats({'matmul x': (matmul, jnp.ones((64, 64)))}, repeats=1, profile_dir=str(tmp_path))
  assert len(list((tmp_path / 'matmul_x').rglob('perfetto_trace.json.gz'))) == 2  # a rerun keeps the first trace
  assert 'dot_general' in capsys.readouterr().out
  benchmark.time_repeats({'numpy': (lambda x: x + 1, np.zeros(3))}, repeats=1, profile_dir=str(tmp_path))
  assert "profile numpy: none (jax.profiler sees only JAX's programs)" in capsys.readouterr().out


def test_validation_names_the_key():
  config = get_config('smoke')
  config.models = ('alexnet_nope',)
  with pytest.raises(ConfigError, match='models'):
    benchmark.validate(config)
  config = get_config('smoke')
  config.members = (0,)
  with pytest.raises(ConfigError, match='members'):
    benchmark.validate(config)
  config = get_config('smoke')
  config.grain_workers = (0, -2)
  with pytest.raises(ConfigError, match='grain_workers'):
    benchmark.validate(config)
  config = get_config('smoke')
  config.profile_dir = None
  with pytest.raises(ConfigError, match='profile_dir'):
    benchmark.validate(config)
  config = get_config('smoke')
  config.grain_dataset = 'mnist_55k'
  with pytest.raises(ConfigError, match='grain_dataset'):
    benchmark.validate(config)
  config = get_config('smoke')
  config.models = ('conv4',)
  config.batch_sizes.digit_cnn = 0  # the digit CNN runs the members, chunks and grain sections anyway
  with pytest.raises(ConfigError, match='batch_sizes.digit_cnn = 0'):
    benchmark.validate(config)
  config = get_config('smoke')
  config.profile_dir = 'README.md/traces'  # under a file: refused before any compute
  with pytest.raises(ConfigError, match='profile_dir.*a file, not a directory'):
    benchmark.validate(config)


def test_torch_twins_match_parameter_counts():
  torch = pytest.importorskip('torch')
  from cnnjax import models
  for name in ('digit_cnn', 'conv4', 'resnet20_cifar', 'resnet50'):
    size, channels = benchmark.INPUTS[name]
    ours = models.count_params(name, num_classes=benchmark.NUM_CLASSES, channels=channels)
    twin = benchmark.torch_model(name)
    theirs = sum(p.numel() for p in twin.parameters())
    assert theirs == ours, (name, theirs, ours)
  assert twin(torch.zeros(1, 3, 64, 64)).shape == (1, benchmark.NUM_CLASSES)


def test_host_memory_rows_come_from_fresh_processes_in_abccba_order(tmp_path, monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=0')
  monkeypatch.setattr(host_memory, 'mimalloc_library', lambda: Path('/lib/libmimalloc.so'))
  launched = []

  def in_fresh_process(script, config, name, env):
    launched.append((name, env['LD_PRELOAD'].split()[:1], env['GLIBC_TUNABLES']))
    kept = host_memory.on_mimalloc(env)
    return {'seconds': {'chunk of 2 unrolled': [0.02 if kept else 0.03] * 2, 'Python loop of 2 jitted steps': [0.04] * 2},
            'faults': 0 if kept else 500}

  monkeypatch.setattr(benchmark, 'in_fresh_process', in_fresh_process)
  config = get_config('smoke')
  config.results_dir = str(tmp_path)
  config.host_memory_models = ('digit_cnn',)
  bench = benchmark.Benchmark(runner.Experiment('benchmark', config, sharding.make_mesh()))
  bench.host_memory()
  defaults, huge = 'glibc.malloc.tcache_count=5', 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=1'  # the caller's other tunables kept
  glibc, mimalloc = ('digit_cnn', [], defaults), ('digit_cnn', ['/lib/libmimalloc.so'], huge)
  assert launched == [glibc, ('digit_cnn', [], huge), mimalloc, mimalloc, ('digit_cnn', [], huge), glibc]
  medians = bench.medians
  assert medians['digit_cnn chunk of 2 unrolled, glibc huge pages / mimalloc ms/step | ratio'] == pytest.approx(3 / 2)
  assert medians['digit_cnn Python loop of 2 jitted steps, glibc defaults / mimalloc ms/step | ratio'] == 1
  assert medians['digit_cnn Python loop of 2 jitted steps, mimalloc | ms/step'] == pytest.approx(20.0)
  assert medians['digit_cnn page faults per chunk call, mimalloc | faults'] == 0
  assert medians['digit_cnn page faults per chunk call, glibc huge pages | faults'] == 500


def test_chunk_and_loop_times_both_and_counts_faults():
  config = get_config('smoke')
  result = benchmark.chunk_and_loop(benchmark.Bench(config, sharding.make_mesh(), 'digit_cnn'))
  assert set(result['seconds']) == {'chunk of 2 unrolled', 'Python loop of 2 jitted steps'}
  assert all(len(s) == config.repeats and min(s) > 0 for s in result['seconds'].values())
  assert isinstance(result['faults'], int) and result['faults'] >= 0
