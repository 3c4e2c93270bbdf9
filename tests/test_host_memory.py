"""glibc's malloc for XLA:CPU's temp buffers (cnnjax/host_memory.py): the tunables are added without
overriding the caller's, ./run.sh sets the same huge pages, a kept heap stops a block's reuse from
faulting, and an experiment says how to turn huge pages on only where that helps."""

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
KEPT = 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776'
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('tunables, wanted, expected', [
    ('', host_memory.HUGE_PAGES, 'glibc.malloc.hugetlb=1'),
    ('glibc.malloc.tcache_count=5', host_memory.HUGE_PAGES, 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=1'),
    ('glibc.malloc.hugetlb=0', host_memory.HUGE_PAGES, 'glibc.malloc.hugetlb=0'),  # the caller's choice wins
    ('', host_memory.TUNABLES, f'glibc.malloc.hugetlb=1:{KEPT}'),
    ('glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=7', host_memory.KEPT_HEAP,
     'glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=7:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=1099511627776')])
def test_with_tunables_adds_each_missing_one_once(tunables, wanted, expected):
  assert host_memory.with_tunables(tunables, wanted) == expected
  assert host_memory.with_tunables(expected, wanted) == expected


def test_replace_tunables_keeps_the_callers_others():
  tunables = 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=0:glibc.malloc.arena_max=4'
  assert host_memory.replace_tunables(tunables, {}) == 'glibc.malloc.tcache_count=5'
  assert host_memory.replace_tunables(tunables, host_memory.HUGE_PAGES) == 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('tunables', ['', 'glibc.malloc.tcache_count=5', 'glibc.malloc.hugetlb=0'])
def test_run_sh_turns_on_the_modules_huge_pages(tunables):
  lines = REPO.joinpath('run.sh').read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('[[ ${GLIBC_TUNABLES'))
  shell = '\n'.join([*lines[start:start + 2], 'printf %s "$GLIBC_TUNABLES"'])
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  done = subprocess.run(['bash', '-c', shell], env=env, capture_output=True, text=True, check=True)
  assert done.stdout == host_memory.with_tunables(tunables)


# A 200 MB block allocated, written and freed ten times, as XLA:CPU does with a program's temp
# buffer, on a thread other than the main one; the minor page faults of the last nine rounds.
FAULTS = '''
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
counts = []
def rounds():
  for _ in range(10):
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    block = libc.malloc(200 << 20)
    ctypes.memset(block, 1, 200 << 20)
    libc.free(block)
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(counts[-1] - counts[1])
'''


@pytest.mark.skipif(not host_memory.glibc_has_tunables(), reason='needs glibc >= 2.35')
def test_a_kept_heap_reuses_a_large_block_without_faults():
  def faults(tunables):
    env = dict(os.environ, GLIBC_TUNABLES=host_memory.replace_tunables('', tunables))
    return int(subprocess.run([sys.executable, '-c', FAULTS], env=env, capture_output=True, text=True,
                              check=True).stdout)
  # glibc's defaults map the block afresh: a fault per 4 KB (2 MB where the kernel's huge pages are
  # 'always') in every round; the kept heap faults it in once, in the first round.
  assert faults({}) >= 9 * 100
  assert faults(host_memory.KEPT_HEAP) < 90


def test_thp_mode_reads_the_kernels_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.thp_mode(path) == 'madvise'
  assert host_memory.thp_mode(tmp_path / 'missing') is None


@pytest.mark.parametrize('libc, known', [(('glibc', '2.36'), True), (('glibc', '2.35'), True),
                                         (('glibc', '2.31'), False), (('', ''), False), (('musl', '1.2'), False)])
def test_the_tunables_need_glibc_2_35(libc, known):
  assert host_memory.glibc_has_tunables(libc) is known


def test_hint_only_where_madvise_mode_leaves_large_allocations_on_small_pages():
  advice = host_memory.hint('glibc.malloc.tcache_count=5', mode='madvise', libc=GLIBC)
  assert 'GLIBC_TUNABLES=glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=1 ' in advice and 'run.sh' in advice
  assert host_memory.hint('glibc.malloc.hugetlb=1', mode='madvise', libc=GLIBC) == ''
  assert host_memory.hint('glibc.malloc.hugetlb=0', mode='madvise', libc=GLIBC) == ''  # off on purpose
  assert host_memory.hint('', mode='always', libc=GLIBC) == ''  # every large mapping gets them
  assert host_memory.hint('', mode='never', libc=GLIBC) == ''
  assert host_memory.hint('', mode='madvise', libc=('glibc', '2.31')) == ''


@pytest.mark.parametrize('tunables, printed', [('', True), ('glibc.malloc.hugetlb=1', False)])
def test_setup_says_how_to_turn_huge_pages_on(monkeypatch, capsys, tunables, printed):
  monkeypatch.setenv('GLIBC_TUNABLES', tunables)
  monkeypatch.setattr(host_memory, 'thp_mode', lambda: 'madvise')
  monkeypatch.setattr(host_memory, 'glibc_has_tunables', lambda libc=None: True)
  config = cfg.base_config('unit', 'smoke')
  config.compile_cache = ''
  try:
    runner.setup(config, lambda config: None)
  finally:
    gc.unfreeze()
  assert ('GLIBC_TUNABLES=glibc.malloc.hugetlb=1 ' in capsys.readouterr().err) is printed
