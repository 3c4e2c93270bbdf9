"""glibc's malloc for XLA:CPU's per-call temp buffers: 2 MB pages, and optionally a heap kept between calls.

An XLA:CPU program allocates its temporaries as one buffer per call (ResNet-20's 2-step chunk at
batch 128: 306 MB), on whichever of XLA's threads runs it. glibc serves an allocation over its mmap
threshold (at most 32 MB) with a fresh mapping and unmaps it on free, so every call faults that
buffer in again, 4 KB at a time, ~2.7 us a fault on 2 AVX2 cores: a 10-step digit-CNN chunk at batch
128, ~22,000 faults a call (~7% of its time); a 2-step ResNet-20 chunk, ~75,000 (~15%); a ResNet-50
step at 224x224, batch 32, ~1.1 million (~20%, PyTorch's too). glibc reads its tunables from
GLIBC_TUNABLES when a process starts:
- `HUGE_PAGES`, cnnjax's default (./run.sh sets it; an experiment started otherwise says how, in
  runner.setup): `glibc.malloc.hugetlb=1` (glibc >= 2.35), 2 MB transparent huge pages (madvise)
  for glibc's mappings, 50-200x fewer faults.
- `KEPT_HEAP`, not set by cnnjax: `glibc.malloc.arena_max=1`, `mmap_max=0`, `trim_threshold=2**40`.
  Every thread allocates from the one main heap, large blocks included (a thread's own arena would
  map them afresh), and freed memory stays there, so the next call reuses the buffer without a fault:
  on a 2-core AVX-512 Xeon, ResNet-20 steps ~4% and a Python loop of one-step calls 13-18% faster than
  with huge pages alone. But XLA's compiler threads then share one malloc lock: cold compiles took
  ~55% longer there, and the transfer experiment's default preset from a cold cache 16% longer. For
  long runs that compile little, set both (run.sh keeps them): GLIBC_TUNABLES=glibc.malloc.hugetlb=1:
  glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776 ./run.sh ...
Measured in experiments/benchmark.py (`host memory` rows); notes in results/benchmark/NOTES.md.
"""

import platform
import re
from pathlib import Path

HUGE_PAGES = {'glibc.malloc.hugetlb': '1'}
KEPT_HEAP = {'glibc.malloc.arena_max': '1', 'glibc.malloc.mmap_max': '0', 'glibc.malloc.trim_threshold': str(2**40)}
TUNABLES = {**HUGE_PAGES, **KEPT_HEAP}  # every tunable this module speaks of
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def with_tunables(tunables, wanted=HUGE_PAGES):
  """GLIBC_TUNABLES with each of `wanted` ({name: value}) added that it does not set already (the
  caller's choice wins)."""
  have = {item.split('=')[0] for item in tunables.split(':') if item}
  return ':'.join(filter(None, [tunables, *(f'{name}={value}' for name, value in wanted.items() if name not in have)]))


def replace_tunables(tunables, wanted):
  """GLIBC_TUNABLES with every one of `TUNABLES` dropped, then `wanted` added (the caller's others kept)."""
  others = ':'.join(item for item in tunables.split(':') if item and item.split('=')[0] not in TUNABLES)
  return with_tunables(others, wanted)


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


def hint(tunables, mode=None, libc=None):
  """How to turn huge pages on, or '' where they are on or set off on purpose, would change nothing
  (the kernel gives them to every large mapping or to none) or glibc lacks the tunable."""
  mode = thp_mode() if mode is None else mode
  if with_tunables(tunables) == tunables or mode != 'madvise' or not glibc_has_tunables(libc):
    return ''
  return (f'glibc maps every allocation over 32 MB afresh, so XLA:CPU faults its temp buffer in 4 KB '
          f'at a time on every call (~7-20% of a training step here); start Python with '
          f'GLIBC_TUNABLES={with_tunables(tunables)} (./run.sh does) for 2 MB pages there (cnnjax/host_memory.py).')
