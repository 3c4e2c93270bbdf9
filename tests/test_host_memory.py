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


@pytest.mark.parametrize('preload, installed, options, expected_preload, expected_options', [
    (None, True, None, 'VENV/lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so', 'cnnjax'),
    (None, True, '7', 'VENV/lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so', 'caller'),
    (None, False, None, 'unset', 'unset'),
    ('/opt/libjemalloc.so', True, None, '/opt/libjemalloc.so', 'unset'),  # the caller's choice wins
    ('', True, None, '', 'unset')])                                     # ... glibc's malloc on purpose
def test_run_sh_preloads_the_venvs_mimalloc_unless_the_caller_set_ld_preload(tmp_path, preload, installed, options,
                                                                              expected_preload, expected_options):
  library = tmp_path / 'lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so'
  if installed:
    library.parent.mkdir(parents=True)
    library.touch()
  names = {'LD_PRELOAD', *host_memory.MIMALLOC_OPTIONS}
  env = {key: value for key, value in os.environ.items() if key not in names}
  if preload is not None:
    env['LD_PRELOAD'] = preload
  if options is not None:
    env.update(dict.fromkeys(host_memory.MIMALLOC_OPTIONS, options))
  values = ' '.join(f'${{{name}-unset}}' for name in ['LD_PRELOAD', *host_memory.MIMALLOC_OPTIONS])
  printed = run_sh_block('preload_mimalloc() {', '}', f'VENV={tmp_path}; preload_mimalloc; printf %s "{values}"', env)
  count = len(host_memory.MIMALLOC_OPTIONS)
  expected = {'cnnjax': list(host_memory.MIMALLOC_OPTIONS.values()), 'caller': [options] * count,
              'unset': ['unset'] * count}[expected_options]
  assert printed == ' '.join([expected_preload.replace('VENV', str(tmp_path)), *expected])


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
  assert mimalloc.items() >= host_memory.MIMALLOC_OPTIONS.items()
  assert not set(host_memory.MIMALLOC_OPTIONS) & (set(defaults) | set(huge))  # mimalloc's options for mimalloc only
  chosen = dict.fromkeys(host_memory.MIMALLOC_OPTIONS, '7')
  assert host_memory.environment({**environ, **chosen}, 'mimalloc', LIB).items() >= chosen.items()  # the caller's win
  with pytest.raises(ValueError, match='unknown allocator .tcmalloc.; known: glibc defaults, glibc huge pages, mimalloc'):
    host_memory.environment(environ, 'tcmalloc')


def test_mimalloc_is_installed_with_the_project():
  assert MIMALLOC is not None and MIMALLOC.is_file() and MIMALLOC.name == 'libmimalloc.so'


# A block of MB megabytes allocated, written and freed ROUNDS times, as XLA:CPU does with a
# program's temp buffer, on a thread other than the main one, PAUSE seconds apart, in which small
# blocks come and go; the minor page faults of all rounds but the first.
FAULTS = '''
import ctypes, resource, sys, threading, time
MB, ROUNDS, PAUSE = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
counts = []
def rounds():
  for _ in range(ROUNDS):
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    block = libc.malloc(MB << 20)
    ctypes.memset(block, 1, MB << 20)
    libc.free(block)
    end = time.perf_counter() + PAUSE
    while time.perf_counter() < end:
      libc.free(libc.malloc(1 << 20))
      time.sleep(0.01)
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(counts[-1] - counts[1])
'''


def faults(allocator, megabytes, rounds, pause=0, **environ):
  env = host_memory.environment({**os.environ, **environ}, allocator)
  return int(subprocess.run([sys.executable, '-c', FAULTS, str(megabytes), str(rounds), str(pause)], env=env,
                            capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(MIMALLOC is None, reason='needs the cmeel-mimalloc wheel')
def test_mimalloc_reuses_a_large_block_without_faults():
  # glibc's defaults map the block afresh: a fault per 4 KB (2 MB where the kernel's huge pages are
  # 'always') in every round; mimalloc faults it in once, in the first round.
  assert faults('glibc defaults', 200, 10) >= 9 * 100
  assert faults('mimalloc', 200, 10) < 90


@pytest.mark.skipif(MIMALLOC is None, reason='needs the cmeel-mimalloc wheel')
def test_mimalloc_options_keep_blocks_over_its_default_2_gib():
  """A 2.5 GB block (ResNet-50's step at batch 32 allocates ~4.3 GB): mimalloc's own limit sends
  it to the kernel afresh every round, cnnjax's options keep it in the arenas."""
  assert faults('mimalloc', 2560, 2, MIMALLOC_ARENA_MAX_OBJECT_SIZE='2GiB') >= 2560 // 4  # 2 MB pages or 4 KB
  assert faults('mimalloc', 2560, 2) < 90


@pytest.mark.skipif(MIMALLOC is None, reason='needs the cmeel-mimalloc wheel')
def test_mimalloc_options_keep_a_block_over_a_pause():
  """Half a second between two uses of a 200 MB block (an evaluation between training chunks):
  mimalloc returns it to the kernel meanwhile with a short purge delay, not with cnnjax's 10 s."""
  assert faults('mimalloc', 200, 2, pause=0.5, MIMALLOC_PURGE_DELAY='10') >= 200 // 4
  assert faults('mimalloc', 200, 2, pause=0.5) < 90


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
