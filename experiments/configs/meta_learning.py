"""Meta-learning: few-shot classification on an Omniglot-style benchmark.

  python -m experiments.meta_learning --config=experiments/configs/meta_learning.py[:smoke|default|paper]
  ./run.sh meta_learning --config.seeds=3

Table (results/meta_learning/<preset>/table.md): rows = methods (nearest neighbour on pixels,
Prototypical Networks, Baseline, MAML, first-order MAML, Reptile), columns = accuracy (%) on
meta-test episodes at 5-way 1-shot, 5-way 5-shot, 20-way 1-shot and 20-way 5-shot, mean ± 95%
confidence interval over all test episodes of all seeds (how the papers report), and meta-training
wall time (s, compile included). `default`: `kanji_glyphs` (KanjiVG characters drawn 20 times each
at 28x28, alphabets split into meta-train / meta-val / meta-test), a conv-4 of width 16, training
scaled down to fit 5 minutes on 2 CPU cores. `paper`: TFDS `omniglot` with a Vinyals-style split
(1028 / 172 / 423 characters, each rotated by 0, 90, 180 and 270 degrees as four classes, 28x28),
the papers' conv-4 (64 filters) and settings, published numbers beside ours (prepare it first with
`python -m cnnjax.data.prepare omniglot`).

Hyper-parameters come from the papers (scaled down for `default`); only meta-val episodes may inform
a change (the comments below name the two that did), meta-test episodes are read only for the table.
"""

import ml_collections

from cnnjax.config import base_config


def maml(**overrides):
  """MAML / first-order MAML (Finn et al. 2017, Omniglot): inner SGD with step 0.4, Adam outside.
  One model per number of ways (its head has that many outputs), trained at `shots` shots and tested
  on the settings of its way count. `default` trains 5-way models only: 20-way test episodes adapt
  100 support images per episode, which 2 CPU cores cannot do for three methods in 5 minutes."""
  values = dict(train_ways=(5,), shots=1, queries=5, tasks=4, steps=200, learning_rate=3e-3,
                inner_steps=1, inner_learning_rate=0.4, test_inner_steps=1)
  return ml_collections.ConfigDict({**values, **overrides})


def get_config(preset=''):
  config = base_config('meta_learning', preset)
  config.seeds = 1
  config.dataset = 'kanji_glyphs'
  config.splits = ml_collections.ConfigDict({'train': 'train', 'val': 'validation', 'test': 'test'})
  config.label_ranges = ()              # (lo, hi) labels of meta-train, meta-val, meta-test ('' = whole splits)
  config.rotations = False              # True: each class also rotated by 90, 180, 270 deg as new classes
  config.image_size = 28
  config.model = 'conv4'
  config.width = 16                     # the papers' 64 filters cost too much on 2 CPU cores
  config.methods = ('nearest_neighbour', 'protonet', 'baseline', 'maml', 'fomaml', 'reptile')
  # (ways, shots) of the test columns; queries per class of every test episode.
  config.settings = ((5, 1), (5, 5), (20, 1), (20, 5))
  config.test_queries = 5
  config.test_episodes = 600
  config.val_episodes = 100             # meta-val episodes at the end of training (logged; for choices)
  config.task_mode = 'auto'             # tasks of a meta-batch: vmap | loop (auto: loop where XLA runs CPU convolutions)
  config.eval_batch_size = 500          # images per embedding call
  config.episode_batch = 100            # episodes per vmapped evaluation call (embedding methods)
  config.chunk_steps = 1                # one (meta-)step per compiled call: a step is already big
  config.checkpoint_every = 0           # at the end only
  # Snell et al.: Adam 1e-3, more ways in training than at test (60 on Omniglot), queries 5.
  config.protonet = ml_collections.ConfigDict(dict(ways=20, shots=5, queries=5, steps=200, learning_rate=1e-3))
  # Chen et al.: base classes trained with Adam 1e-3; new head 100 epochs of SGD 0.01 (batches of 4),
  # momentum 0.9, weight decay 1e-3.
  config.baseline = ml_collections.ConfigDict(dict(steps=500, batch_size=64, learning_rate=1e-3, head_steps=100,
                                                   head_learning_rate=0.01, head_weight_decay=1e-3))
  config.maml = maml()
  # First-order MAML with MAML's one inner step learned little here (42% meta-val at 5-way 1-shot);
  # with three, as Nichol et al.'s first-order MAML takes several, 66%: chosen on meta-val.
  config.fomaml = maml(inner_steps=3, test_inner_steps=3)
  # Nichol et al. (Omniglot): several inner steps on the task's examples, outer step 1.0; SGD inside
  # here, with MAML's step 0.4 (inner 0.1 and 1 test step gave 45% meta-val, 0.4 and 3 test steps 75%).
  config.reptile = ml_collections.ConfigDict(dict(train_ways=(5,), shots=1, queries=5, tasks=4, steps=200,
                                                  learning_rate=1.0, inner_steps=3, inner_learning_rate=0.4,
                                                  test_inner_steps=3, test_inner_learning_rate=0.4))

  if config.preset == 'smoke':
    config.dataset = 'kanji_glyphs/small'
    config.width = 8
    config.settings = ((5, 1), (5, 5))
    config.test_queries = 2
    config.test_episodes = 20
    config.val_episodes = 4
    config.protonet.update(ways=5, shots=1, queries=2, steps=2)
    config.baseline.update(steps=2, batch_size=16, head_steps=5)
    config.maml = maml(train_ways=(5,), queries=2, tasks=1, steps=2)
    config.fomaml = maml(train_ways=(5,), queries=2, tasks=1, steps=2)  # one inner step: compiles faster
    config.reptile.update(train_ways=(5,), queries=2, tasks=1, steps=2, inner_steps=1, test_inner_steps=1)
    config.progress = False
  elif config.preset == 'paper':
    config.dataset = 'omniglot'
    # Vinyals et al. 2016 split the 1623 characters 1200 / 423 (Snell et al.'s files: 1028 train, 172 val);
    # here in TFDS label order (background alphabets first), not their character lists.
    config.splits = ml_collections.ConfigDict({'train': 'train+test', 'val': 'train+test', 'test': 'train+test'})
    config.label_ranges = ((0, 1028), (1028, 1200), (1200, 1623))
    config.rotations = True
    config.width = 64
    config.seeds = 1
    config.test_queries = 15
    config.protonet.update(ways=60, shots=5, queries=5, steps=20000)
    config.baseline.update(steps=20000, batch_size=128)
    config.maml = maml(train_ways=(5, 20), tasks=32, steps=60000, test_inner_steps=3)
    config.fomaml = maml(train_ways=(5, 20), tasks=32, steps=60000, test_inner_steps=3)
    config.reptile.update(train_ways=(5, 20), tasks=5, steps=100000, inner_steps=5, test_inner_steps=50)
    config.checkpoint_every = 1000
  return config
