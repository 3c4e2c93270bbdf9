"""glibc's transparent huge pages for large allocations (cnnjax/hugepages.py): the tunable is added
without overriding the caller's, and an experiment says how to turn it on only where that helps."""

import gc

import pytest

from cnnjax import config as cfg
from cnnjax import hugepages
from experiments import runner

GLIBC = ('glibc', '2.36')


@pytest.mark.parametrize('tunables, expected', [
    ('', 'glibc.malloc.hugetlb=1'),
    ('glibc.malloc.trim_threshold=5', 'glibc.malloc.trim_threshold=5:glibc.malloc.hugetlb=1'),
    ('glibc.malloc.hugetlb=0', 'glibc.malloc.hugetlb=0')])  # the caller's choice wins
def test_with_huge_pages_adds_the_tunable_once(tunables, expected):
  assert hugepages.with_huge_pages(tunables) == expected


def test_thp_mode_reads_the_kernels_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hugepages.thp_mode(path) == 'madvise'
  assert hugepages.thp_mode(tmp_path / 'missing') is None


@pytest.mark.parametrize('libc, known', [(('glibc', '2.36'), True), (('glibc', '2.35'), True),
                                         (('glibc', '2.31'), False), (('', ''), False), (('musl', '1.2'), False)])
def test_the_tunable_needs_glibc_2_35(libc, known):
  assert hugepages.glibc_has_tunable(libc) is known


def test_hint_only_where_madvise_mode_leaves_large_allocations_on_small_pages():
  advice = hugepages.hint('glibc.malloc.trim_threshold=5', mode='madvise', libc=GLIBC)
  assert 'GLIBC_TUNABLES=glibc.malloc.trim_threshold=5:glibc.malloc.hugetlb=1' in advice and 'run.sh' in advice
  assert hugepages.hint('glibc.malloc.hugetlb=1', mode='madvise', libc=GLIBC) == ''
  assert hugepages.hint('glibc.malloc.hugetlb=0', mode='madvise', libc=GLIBC) == ''  # off on purpose
  assert hugepages.hint('', mode='always', libc=GLIBC) == ''  # every large mapping gets them
  assert hugepages.hint('', mode='never', libc=GLIBC) == ''
  assert hugepages.hint('', mode='madvise', libc=('glibc', '2.31')) == ''


@pytest.mark.parametrize('tunables, printed', [('', True), ('glibc.malloc.hugetlb=1', False)])
def test_setup_says_how_to_turn_huge_pages_on(monkeypatch, capsys, tunables, printed):
  monkeypatch.setenv('GLIBC_TUNABLES', tunables)
  monkeypatch.setattr(hugepages, 'thp_mode', lambda: 'madvise')
  monkeypatch.setattr(hugepages, 'glibc_has_tunable', lambda libc=None: True)
  config = cfg.base_config('unit', 'smoke')
  config.compile_cache = ''
  try:
    runner.setup(config, lambda config: None)
  finally:
    gc.unfreeze()
  assert ('GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in capsys.readouterr().err) is printed
