"""Episodic sampling for few-shot learning: N-way K-shot tasks with Q queries per class.

An episode (Vinyals et al. 2016) draws `ways` classes from a pool, then `shots` support and
`queries` query examples of each, all distinct. Within an episode the classes are relabelled
0..ways-1 in the order drawn; support and query indices are class-major (class c holds positions
c*shots .. c*shots+shots-1), so the labels of every episode are the same array (`episode_labels`).
The same seed gives the same episodes on every machine (numpy's PCG64). Class pools of meta-train,
meta-val and meta-test must not share a class (`check_disjoint`).
"""

import numpy as np

from cnnjax.config import is_count
from cnnjax.errors import ConfigError, DataError


def episode_labels(ways, per_class):
  """Labels 0..ways-1 of a class-major episode part: [0]*per_class + [1]*per_class + ..."""
  return np.repeat(np.arange(ways, dtype=np.int32), per_class)


class EpisodeSampler:
  """Episodes over the examples of one split: `labels[i]` is example i's class.

  `sample(count, seed)` -> {'support': (count, ways*shots), 'query': (count, ways*queries)} int32
  indices into the split. Fails at construction when the split cannot give such episodes; the error
  names the counts by `keys` (the config keys they came from).
  """

  def __init__(self, labels, ways, shots, queries, name='split', keys=('ways', 'shots', 'queries')):
    labels = np.asarray(labels)
    for key, value, least in zip(keys, (ways, shots, queries), (2, 1, 1)):
      if not is_count(value, least):
        raise ConfigError(key, value, f'an integer >= {least}')
    self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
    self.classes, counts = np.unique(labels, return_counts=True)
    if self.ways > len(self.classes):
      raise ConfigError(keys[0], ways, f'at most {len(self.classes)}, the number of classes in {name}')
    need = self.shots + self.queries
    if need > counts.min():
      poorest = self.classes[np.argmin(counts)]
      key, value = (keys[2], queries) if self.queries >= counts.min() else (keys[1], shots)  # the likelier culprit
      raise ConfigError(key, value, f'{keys[1]} + {keys[2]} <= {counts.min()}',
                        f'{name} class {poorest} has {counts.min()} examples, fewer than {shots} shots + '
                        f'{queries} queries')
    order = np.argsort(labels, kind='stable')
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    self._members = [order[s:s + n] for s, n in zip(starts, counts)]  # example indices of each class

  def sample(self, count, seed):
    """`count` episodes drawn by `seed`."""
    rng = np.random.default_rng(seed)
    support = np.empty((count, self.ways, self.shots), np.int32)
    query = np.empty((count, self.ways, self.queries), np.int32)
    for e in range(count):
      for c, k in enumerate(rng.choice(len(self.classes), self.ways, replace=False)):
        chosen = rng.choice(self._members[k], self.shots + self.queries, replace=False)
        support[e, c], query[e, c] = chosen[:self.shots], chosen[self.shots:]
    return {'support': support.reshape(count, -1), 'query': query.reshape(count, -1)}


def check_disjoint(class_sets):
  """DataError when two named class pools ({'meta-train': classes, ...}) share a class."""
  names = list(class_sets)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      shared = set(np.asarray(class_sets[a]).tolist()) & set(np.asarray(class_sets[b]).tolist())
      if shared:
        raise DataError(f'{a} and {b} share {len(shared)} classes (e.g. {sorted(shared)[:5]}); '
                        'few-shot splits must hold disjoint classes')
