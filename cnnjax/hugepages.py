"""glibc's transparent huge pages for large host allocations, such as XLA:CPU's temp buffers.

glibc serves an allocation over its mmap threshold (at most 32 MB) with a fresh mapping and unmaps
it on free. An XLA:CPU program allocates its temporaries as one buffer per call, so every call
faults that buffer in again, 4 KB at a time, ~2.7 us a fault on 2 AVX2 cores: a 10-step digit-CNN
chunk at batch 128, ~22,000 faults a call (~7% of its time); a 2-step ResNet-20 chunk, ~75,000
(~15%); a ResNet-50 step at 224x224, batch 32, ~1.1 million (~20%, PyTorch's too). With
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35) glibc asks the kernel for 2 MB transparent
huge pages there (madvise) and those calls fault ~400, ~400 and ~2,400 times. glibc reads the
tunable when a process starts: ./run.sh sets it, and an experiment started otherwise says how
(runner.setup). Measured in experiments/benchmark.py (`huge pages` rows); notes in results/benchmark/NOTES.md.
"""

import platform
import re
from pathlib import Path

TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def with_huge_pages(tunables, value=1):
  """GLIBC_TUNABLES with `glibc.malloc.hugetlb=value` added, unless they set it already (the caller's
  choice wins)."""
  if TUNABLE in tunables:
    return tunables
  return ':'.join(filter(None, (tunables, f'{TUNABLE}={value}')))


def thp_mode(path=THP_MODE_FILE):
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'); None where unknown."""
  try:
    match = re.search(r'\[(\w+)\]', Path(path).read_text())
  except OSError:
    return None
  return match and match.group(1)


def glibc_has_tunable(libc=None):
  """Whether this process runs on a glibc that knows the tunable (2.35 or newer)."""
  name, version = libc or platform.libc_ver()
  numbers = tuple(int(part) for part in re.findall(r'\d+', version)[:2])
  return name == 'glibc' and numbers >= (2, 35)


def hint(tunables, mode=None, libc=None):
  """How to turn huge pages on, or '' where they are on or set off on purpose, would change nothing
  (the kernel gives them to every large mapping or to none) or glibc lacks the tunable."""
  mode = thp_mode() if mode is None else mode
  if TUNABLE in tunables or mode != 'madvise' or not glibc_has_tunable(libc):
    return ''
  return (f'glibc maps every allocation over 32 MB afresh, so XLA:CPU faults its temp buffer in 4 KB '
          f'at a time on every call (~7-20% of a training step here); start Python with '
          f'GLIBC_TUNABLES={with_huge_pages(tunables)} (./run.sh does) for 2 MB pages there.')
