"""glibc's malloc for XLA:CPU's temp buffers (cnnjax/host_memory.py): the tunables are added without
overriding the caller's, ./run.sh sets the same ones, a program's calls then stop faulting their temp
buffer in (given cnnjax's calls on the calling thread), and an experiment says how to set the
tunables only where they are missing."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnjax import config as cfg
from cnnjax import host_memory
from experiments import runner

GLIBC = ('glibc', '2.36')
KEPT = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776'
OURS = f'glibc.malloc.hugetlb=1:{KEPT}'
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('tunables, expected', [
    ('', OURS),
    ('glibc.malloc.tcache_count=5', f'glibc.malloc.tcache_count=5:{OURS}'),
    ('glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=7',  # the caller's choices win
     'glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=7:glibc.malloc.trim_threshold=1099511627776')])
def test_with_tunables_adds_each_missing_one_once(tunables, expected):
  assert host_memory.with_tunables(tunables) == expected
  assert host_memory.with_tunables(expected) == expected


def test_replace_tunables_keeps_the_callers_others():
  tunables = 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=4'
  assert host_memory.replace_tunables(tunables, {}) == 'glibc.malloc.tcache_count=5'
  assert host_memory.replace_tunables(tunables, host_memory.HUGE_PAGES) == 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('tunables', ['', 'glibc.malloc.hugetlb=0:glibc.malloc.tcache_count=5'])
def test_run_sh_sets_the_modules_tunables(tunables):
  loop = REPO.joinpath('run.sh').read_text().split('\nfor tunable in ', 1)[1].split('\ndone\n', 1)[0]
  shell = f'for tunable in {loop}\ndone\nprintf %s "$GLIBC_TUNABLES"'
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  done = subprocess.run(['bash', '-c', shell], env=env, capture_output=True, text=True, check=True)
  assert done.stdout == host_memory.with_tunables(tunables)


# A jitted program with a 128 MB temporary (a cumulative sum over an outer product), called six
# times on its own output after importing cnnjax: the page faults of the last four calls.
FAULTS = '''
import resource, sys, cnnjax, jax, jax.numpy as jnp
jax.config.update('jax_cpu_enable_async_dispatch', sys.argv[1] == 'async')
program = jax.jit(lambda x: jnp.cumsum(jnp.outer(x, x), axis=0).sum(axis=0) / 1e6, donate_argnums=0)
x = jnp.linspace(0, 1, 4000)
counts = []
for _ in range(6):
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
  x = program(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - counts[2])
'''


def faults(tunables, dispatch='calling thread'):
  env = dict(os.environ, GLIBC_TUNABLES=host_memory.replace_tunables(os.environ.get('GLIBC_TUNABLES', ''), tunables))
  return int(subprocess.run([sys.executable, '-c', FAULTS, dispatch], env=env, capture_output=True, text=True,
                            check=True).stdout)


@pytest.mark.skipif(not host_memory.glibc_has_tunables(), reason='needs glibc >= 2.35')
def test_a_kept_heap_stops_a_programs_calls_from_faulting():
  # glibc's defaults map the temporary afresh: a fault per 4 KB (2 MB where the kernel's huge pages
  # are 'always') in every call; the kept heap faults it in once, in the first calls, but only where
  # the calls run on the calling thread, as cnnjax has them (another thread's arena maps it afresh).
  assert faults({}) >= 4 * 64
  assert faults(host_memory.KEPT_HEAP) < 64
  assert faults(host_memory.KEPT_HEAP, dispatch='async') >= 4 * 64


def test_thp_mode_reads_the_kernels_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.thp_mode(path) == 'madvise'
  assert host_memory.thp_mode(tmp_path / 'missing') is None


@pytest.mark.parametrize('libc, known', [(('glibc', '2.36'), True), (('glibc', '2.35'), True),
                                         (('glibc', '2.31'), False), (('', ''), False), (('musl', '1.2'), False)])
def test_the_tunables_need_glibc_2_35(libc, known):
  assert host_memory.glibc_has_tunables(libc) is known


def test_hint_names_only_the_missing_tunables():
  advice = host_memory.hint('glibc.malloc.tcache_count=5', mode='madvise', libc=GLIBC)
  assert f'GLIBC_TUNABLES=glibc.malloc.tcache_count=5:{OURS} ' in advice and 'run.sh' in advice
  assert host_memory.hint(OURS, mode='madvise', libc=GLIBC) == ''
  assert host_memory.hint(OURS.replace('hugetlb=1', 'hugetlb=0'), mode='madvise', libc=GLIBC) == ''  # off on purpose
  # Where the kernel gives huge pages to every large mapping or to none, only the kept heap is missing.
  for mode in ('always', 'never'):
    assert f'GLIBC_TUNABLES={KEPT} ' in host_memory.hint('', mode=mode, libc=GLIBC)
    assert host_memory.hint(KEPT, mode=mode, libc=GLIBC) == ''
  assert host_memory.hint('', mode='madvise', libc=('glibc', '2.31')) == ''


@pytest.mark.parametrize('tunables, printed', [('', True), (OURS, False)])
def test_setup_says_how_to_set_the_tunables(monkeypatch, capsys, tunables, printed):
  monkeypatch.setenv('GLIBC_TUNABLES', tunables)
  monkeypatch.setattr(host_memory, 'thp_mode', lambda: 'madvise')
  monkeypatch.setattr(host_memory, 'glibc_has_tunables', lambda libc=None: True)
  config = cfg.base_config('unit', 'smoke')
  config.compile_cache = ''
  try:
    runner.setup(config, lambda config: None)
  finally:
    gc.unfreeze()
  assert (f'GLIBC_TUNABLES={OURS} ' in capsys.readouterr().err) is printed
