"""The host's malloc for XLA:CPU's temp buffers (cnnjax/host_memory.py): ./run.sh preloads the
installed mimalloc unless the caller set LD_PRELOAD and gives glibc's malloc huge pages without
overriding the caller's tunables, mimalloc reuses a large block without faults where glibc's
defaults fault it in every time, the benchmark's fresh processes get the allocator asked for, and
an experiment says how to get there only where that helps."""

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
REPO = Path(__file__).resolve().parents[1]
MIMALLOC = host_memory.mimalloc_library()
LIB = '/venv/cmeel.prefix/lib/libmimalloc.so'


@pytest.mark.parametrize('tunables, wanted, expected', [
    ('', host_memory.HUGE_PAGES, 'glibc.malloc.hugetlb=1'),
    ('glibc.malloc.tcache_count=5', host_memory.HUGE_PAGES, 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=1'),
    ('glibc.malloc.hugetlb=0', host_memory.HUGE_PAGES, 'glibc.malloc.hugetlb=0'),  # the caller's choice wins
    ('glibc.malloc.tcache_count=5', {}, 'glibc.malloc.tcache_count=5')])
def test_with_tunables_adds_each_missing_one_once(tunables, wanted, expected):
  assert host_memory.with_tunables(tunables, wanted) == expected
  assert host_memory.with_tunables(expected, wanted) == expected


def run_sh_block(first, last, tail, env):
  """What bash prints running run.sh's lines from the one starting with `first` through the next
  one starting with `last`, then `tail`, in `env`."""
  lines = REPO.joinpath('run.sh').read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(first))
  end = next(i for i in range(start, len(lines)) if lines[i].startswith(last))
  shell = '\n'.join(['set -u', *lines[start:end + 1], tail])
  return subprocess.run(['bash', '-c', shell], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize('tunables', ['', 'glibc.malloc.tcache_count=5', 'glibc.malloc.hugetlb=0'])
def test_run_sh_turns_on_the_modules_huge_pages(tunables):
  printed = run_sh_block('[[ ${GLIBC_TUNABLES', '  export GLIBC_TUNABLES', 'printf %s "$GLIBC_TUNABLES"',
                         dict(os.environ, GLIBC_TUNABLES=tunables))
  assert printed == host_memory.with_tunables(tunables)


@pytest.mark.parametrize('preload, installed, expected', [
    (None, True, 'VENV/lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so'),
    (None, False, 'unset'),
    ('/opt/libjemalloc.so', True, '/opt/libjemalloc.so'),  # the caller's choice wins
    ('', True, '')])                                       # ... glibc's malloc on purpose
def test_run_sh_preloads_the_venvs_mimalloc_unless_the_caller_set_ld_preload(tmp_path, preload, installed, expected):
  library = tmp_path / 'lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so'
  if installed:
    library.parent.mkdir(parents=True)
    library.touch()
  env = {key: value for key, value in os.environ.items() if key != 'LD_PRELOAD'}
  if preload is not None:
    env['LD_PRELOAD'] = preload
  printed = run_sh_block('preload_mimalloc() {', '}', f'VENV={tmp_path}; preload_mimalloc; printf %s "${{LD_PRELOAD-unset}}"', env)
  assert printed == expected.replace('VENV', str(tmp_path))


def test_environment_puts_a_fresh_process_on_the_allocator_asked_for():
  environ = {'PATH': '/bin', 'LD_PRELOAD': f'/opt/libfoo.so {LIB}',
             'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=0'}
  defaults = host_memory.environment(environ, 'glibc defaults', LIB)
  huge = host_memory.environment(environ, 'glibc huge pages', LIB)
  mimalloc = host_memory.environment(environ, 'mimalloc', '/lib/libmimalloc.so')
  assert (defaults['LD_PRELOAD'], defaults['GLIBC_TUNABLES']) == ('/opt/libfoo.so', 'glibc.malloc.tcache_count=5')
  assert (huge['LD_PRELOAD'], huge['GLIBC_TUNABLES']) == ('/opt/libfoo.so', 'glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=1')
  assert mimalloc['LD_PRELOAD'] == '/lib/libmimalloc.so /opt/libfoo.so' and mimalloc['PATH'] == '/bin'
  assert host_memory.on_mimalloc(mimalloc) and not host_memory.on_mimalloc(huge)
  with pytest.raises(ValueError, match='unknown allocator .tcmalloc.; known: glibc defaults, glibc huge pages, mimalloc'):
    host_memory.environment(environ, 'tcmalloc')


def test_mimalloc_is_installed_with_the_project():
  assert MIMALLOC is not None and MIMALLOC.is_file() and MIMALLOC.name == 'libmimalloc.so'


# A 200 MB block allocated, written and freed ten times, as XLA:CPU does with a program's temp
# buffer, on a thread other than the main one; the minor page faults of the last nine rounds.
FAULTS = '''
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
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


@pytest.mark.skipif(MIMALLOC is None, reason='needs the cmeel-mimalloc wheel')
def test_mimalloc_reuses_a_large_block_without_faults():
  def faults(allocator):
    env = host_memory.environment(os.environ, allocator)
    return int(subprocess.run([sys.executable, '-c', FAULTS], env=env, capture_output=True, text=True,
                              check=True).stdout)
  # glibc's defaults map the block afresh: a fault per 4 KB (2 MB where the kernel's huge pages are
  # 'always') in every round; mimalloc faults it in once, in the first round.
  assert faults('glibc defaults') >= 9 * 100
  assert faults('mimalloc') < 90


def test_thp_mode_reads_the_kernels_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.thp_mode(path) == 'madvise'
  assert host_memory.thp_mode(tmp_path / 'missing') is None


@pytest.mark.parametrize('libc, known', [(('glibc', '2.36'), True), (('glibc', '2.35'), True),
                                         (('glibc', '2.31'), False), (('', ''), False), (('musl', '1.2'), False)])
def test_the_tunables_need_glibc_2_35(libc, known):
  assert host_memory.glibc_has_tunables(libc) is known


def test_hint_says_to_preload_mimalloc_unless_ld_preload_was_set():
  advice = host_memory.hint({}, library=LIB, mode='madvise', libc=GLIBC)
  assert f'LD_PRELOAD={LIB} ' in advice and 'run.sh' in advice
  assert host_memory.hint({'LD_PRELOAD': LIB}, library=LIB, mode='madvise', libc=GLIBC) == ''
  # an LD_PRELOAD without mimalloc leaves glibc's malloc in charge: huge pages for it
  advice = host_memory.hint({'LD_PRELOAD': ''}, library=LIB, mode='madvise', libc=GLIBC)
  assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1 ' in advice


def test_hint_for_huge_pages_only_where_madvise_mode_leaves_large_allocations_on_small_pages():
  def hint(tunables, mode='madvise', libc=GLIBC):
    return host_memory.hint({'LD_PRELOAD': '', 'GLIBC_TUNABLES': tunables}, mode=mode, libc=libc)
  assert 'GLIBC_TUNABLES=glibc.malloc.tcache_count=5:glibc.malloc.hugetlb=1 ' in hint('glibc.malloc.tcache_count=5')
  assert hint('glibc.malloc.hugetlb=1') == ''
  assert hint('glibc.malloc.hugetlb=0') == ''  # off on purpose
  assert hint('', mode='always') == ''  # every large mapping gets them
  assert hint('', mode='never') == ''
  assert hint('', libc=('glibc', '2.31')) == ''


@pytest.mark.parametrize('preload, printed', [(None, True), (LIB, False)])
def test_setup_says_how_to_preload_mimalloc(monkeypatch, capsys, preload, printed):
  if preload is None:
    monkeypatch.delenv('LD_PRELOAD', raising=False)
  else:
    monkeypatch.setenv('LD_PRELOAD', preload)
  monkeypatch.setattr(host_memory, 'mimalloc_library', lambda: Path(LIB))
  config = cfg.base_config('unit', 'smoke')
  config.compile_cache = ''
  try:
    runner.setup(config, lambda config: None)
  finally:
    gc.unfreeze()
  assert (f'LD_PRELOAD={LIB} ' in capsys.readouterr().err) is printed
