"""The host's malloc for XLA:CPU's per-call temp buffers: mimalloc, or glibc's with 2 MB pages.

An XLA:CPU program allocates its temporaries as one buffer per call (ResNet-20's 2-step chunk at
batch 128: 306 MB), on whichever of XLA's threads runs it. glibc's malloc serves an allocation over
its mmap threshold (at most 32 MB) with a fresh mapping and unmaps it on free, so every call faults
the buffer in again, 4 KB at a time, ~2.7 us a fault on 2 AVX2 cores: a 10-step digit-CNN chunk at
batch 128, ~22,000 faults a call (~7% of its time); a 2-step ResNet-20 chunk, ~75,000 (~15%).
- `./run.sh` preloads mimalloc (Leijen, Zorn and de Moura, "Mimalloc: Free List Sharding in
  Action", APLAS 2019; the cmeel-mimalloc wheel, a dependency). It serves blocks from its arenas,
  whatever the thread, and keeps freed memory there for a while, so the next call reuses the
  buffer: 13 faults a ResNet-20 call. On a 2-core Xeon against glibc with huge pages: a Python loop
  of one-step calls 1.25-1.29x and ResNet-20's chunk 1.02-1.16x faster, and the transfer
  experiment, which compiles a lot, ~3% faster. `MIMALLOC_OPTIONS`, set by ./run.sh too: its
  arenas take blocks up to 16 GiB, not 2 (ResNet-50's step at 224x224, batch 32, a ~4.3 GB buffer,
  faulted 2,156 huge pages in every call without, 0.6 s of kernel time; none with, 3-5% faster),
  and it returns memory to the kernel once unused for 10 s, not a fraction of a second (the
  transfer experiment's default preset: 3.4x fewer page faults, half the kernel time, ~6% faster).
- glibc's malloc where mimalloc is not preloaded (an LD_PRELOAD the caller set wins: `LD_PRELOAD=
  ./run.sh ...`): `HUGE_PAGES`, set by ./run.sh too, 2 MB transparent huge pages for its mappings
  (glibc >= 2.35, the kernel in `madvise` mode): 50-200x fewer faults.
An experiment started without ./run.sh says how (runner.setup). Measured in experiments/benchmark.py
(`host memory` rows); notes in results/benchmark/NOTES.md.
"""

import importlib.metadata
import platform
import re
from pathlib import Path

HUGE_PAGES = {'glibc.malloc.hugetlb': '1'}
MIMALLOC = 'libmimalloc.so'
MIMALLOC_OPTIONS = {'MIMALLOC_ARENA_MAX_OBJECT_SIZE': '16GiB',  # environment variables; the caller's values win
                    'MIMALLOC_PURGE_DELAY': '10000'}
ALLOCATORS = ('glibc defaults', 'glibc huge pages', 'mimalloc')  # the benchmark's settings; the last is cnnjax's
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def with_tunables(tunables, wanted=HUGE_PAGES):
  """GLIBC_TUNABLES with each of `wanted` ({name: value}) added that it does not set already (the
  caller's choice wins)."""
  have = {item.split('=')[0] for item in tunables.split(':') if item}
  return ':'.join(filter(None, [tunables, *(f'{name}={value}' for name, value in wanted.items() if name not in have)]))


def mimalloc_library():
  """The path of the installed cmeel-mimalloc wheel's libmimalloc.so; None where it is not installed."""
  try:
    files = importlib.metadata.files('cmeel-mimalloc') or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  return next((Path(file.locate()) for file in files if file.name == MIMALLOC), None)


def preloads(environ):
  """The libraries `environ`'s LD_PRELOAD names (separated by spaces or colons)."""
  return [path for path in re.split(r'[\s:]+', environ.get('LD_PRELOAD', '')) if path]


def is_mimalloc(path):
  """Whether the library at `path` is mimalloc."""
  return Path(path).name.startswith(MIMALLOC)


def on_mimalloc(environ):
  """Whether `environ`'s LD_PRELOAD puts a process on mimalloc."""
  return any(map(is_mimalloc, preloads(environ)))


def environment(environ, allocator, library=None):
  """`environ` for a fresh process on `allocator`, one of `ALLOCATORS`: mimalloc (at `library`,
  default the installed one) preloaded with `MIMALLOC_OPTIONS` or not, glibc's huge pages on or
  off; the rest kept."""
  if allocator not in ALLOCATORS:
    raise ValueError(f'unknown allocator {allocator!r}; known: {", ".join(ALLOCATORS)}')
  others = [path for path in preloads(environ) if not is_mimalloc(path)]
  if allocator == 'mimalloc':
    library = library or mimalloc_library()
    if library is None:
      raise FileNotFoundError('mimalloc is not installed: pip install cmeel-mimalloc (./run.sh installs it)')
    others.insert(0, str(library))
  kept = [item for item in environ.get('GLIBC_TUNABLES', '').split(':') if item and item.split('=')[0] not in HUGE_PAGES]
  tunables = with_tunables(':'.join(kept), {} if allocator == 'glibc defaults' else HUGE_PAGES)
  options = MIMALLOC_OPTIONS if allocator == 'mimalloc' else {}
  return {**options, **environ, 'GLIBC_TUNABLES': tunables, 'LD_PRELOAD': ' '.join(others)}


def thp_mode(path=THP_MODE_FILE):
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'); None where unknown."""
  try:
    match = re.search(r'\[(\w+)\]', Path(path).read_text())
  except OSError:
    return None
  return match and match.group(1)


def glibc_has_tunables(libc=None):
  """Whether this process runs on a glibc that knows `glibc.malloc.hugetlb` (2.35 or newer)."""
  name, version = libc or platform.libc_ver()
  numbers = tuple(int(part) for part in re.findall(r'\d+', version)[:2])
  return name == 'glibc' and numbers >= (2, 35)


def hint(environ, library=None, mode=None, libc=None):
  """How to keep XLA:CPU's temp buffers between calls (preload mimalloc, where no LD_PRELOAD says
  otherwise and `library` or the installed one is there), else how to give glibc's malloc huge
  pages; '' where neither applies: chosen already, off on purpose, or no help here."""
  if 'LD_PRELOAD' not in environ and (library := library or mimalloc_library()):
    return (f'glibc\'s malloc maps XLA:CPU\'s temp buffer afresh on every call and faults it in again '
            f'(~7-20% of a training step here); start Python with LD_PRELOAD={library} '
            f'{" ".join(f"{name}={value}" for name, value in MIMALLOC_OPTIONS.items())} (./run.sh does) '
            f'to keep it in mimalloc\'s arenas between calls (cnnjax/host_memory.py).')
  tunables = environ.get('GLIBC_TUNABLES', '')
  mode = thp_mode() if mode is None else mode
  if on_mimalloc(environ) or with_tunables(tunables) == tunables or mode != 'madvise' or not glibc_has_tunables(libc):
    return ''
  return (f'glibc maps every allocation over 32 MB afresh, so XLA:CPU faults its temp buffer in 4 KB '
          f'at a time on every call (~7-20% of a training step here); start Python with '
          f'GLIBC_TUNABLES={with_tunables(tunables)} (./run.sh does) for 2 MB pages there (cnnjax/host_memory.py).')
