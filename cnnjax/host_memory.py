"""glibc's malloc for XLA:CPU's per-call temp buffers: kept in the heap between calls, on 2 MB pages.

An XLA:CPU program allocates its temporaries as one buffer per call (ResNet-20's 2-step chunk at
batch 128: 306 MB). glibc serves an allocation over its mmap threshold (at most 32 MB) with a fresh
mapping and unmaps it on free, so every call faults that buffer in again, 4 KB at a time, ~2.7 us a
fault on 2 AVX2 cores: a 10-step digit-CNN chunk at batch 128, ~21,000 faults a call (~7% of its
time); a 2-step ResNet-20 chunk, ~75,000 (~15%); a ResNet-50 step at 224x224, batch 32, ~1.1
million (~20%, PyTorch's too). cnnjax's glibc tunables (`TUNABLES`, read from GLIBC_TUNABLES when a
process starts; ./run.sh sets them, an experiment started otherwise says how, in runner.setup):
- `HUGE_PAGES`: `glibc.malloc.hugetlb=1` (glibc >= 2.35), 2 MB transparent huge pages (madvise)
  for glibc's mappings and heap, 50-200x fewer faults;
- `KEPT_HEAP`: `glibc.malloc.mmap_max=0` and `trim_threshold=2**40`: the main heap serves large
  blocks too and keeps what is freed, so the next call reuses the buffer without a fault. Only the
  main heap: a thread's own arena grows in 64 MB heaps and maps larger blocks afresh whatever
  `mmap_max` says, so cnnjax runs XLA:CPU's calls on the calling thread (cnnjax/__init__.py). The
  price: a process keeps its peak heap (its RSS does not fall after a peak). `arena_max=1`, which
  puts every thread on the main heap instead, made XLA's compiler threads share one malloc lock and
  cold compiles ~55% slower.
On a 2-core AVX-512 Xeon (KVM), huge pages alone left ResNet-20's calls bimodal when programs took
turns, 245 or 350 ms/step (fresh huge pages cost up to ~280 ms more of kernel time a call), and
ResNet-50's steps at 8.6 s against 5.2-5.6 s with the buffer kept. Measured in
experiments/benchmark.py (`host memory` rows); notes in results/benchmark/NOTES.md.
"""

import platform
import re
from pathlib import Path

HUGE_PAGES = {'glibc.malloc.hugetlb': '1'}
KEPT_HEAP = {'glibc.malloc.mmap_max': '0', 'glibc.malloc.trim_threshold': str(2**40)}
TUNABLES = {**HUGE_PAGES, **KEPT_HEAP}
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def with_tunables(tunables, wanted=TUNABLES):
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
  """Whether this process runs on a glibc that knows the tunables (2.35 or newer)."""
  name, version = libc or platform.libc_ver()
  numbers = tuple(int(part) for part in re.findall(r'\d+', version)[:2])
  return name == 'glibc' and numbers >= (2, 35)


def hint(tunables, mode=None, libc=None):
  """How to set the tunables that `tunables` lacks, or '' where none is missing (one set to another
  value is the caller's choice), glibc lacks them, or, for huge pages, the kernel gives them to every
  large mapping or to none."""
  mode = thp_mode() if mode is None else mode
  wanted = TUNABLES if mode == 'madvise' else KEPT_HEAP
  if with_tunables(tunables, wanted) == tunables or not glibc_has_tunables(libc):
    return ''
  return (f'glibc maps every allocation over 32 MB afresh, so XLA:CPU faults its temp buffer in 4 KB at '
          f'a time on every call (~7-20% of a training step here); start Python with '
          f'GLIBC_TUNABLES={with_tunables(tunables, wanted)} (./run.sh does) to keep it in the heap '
          f'between calls, on 2 MB pages (cnnjax/host_memory.py).')
