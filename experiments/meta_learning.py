"""Meta-learning: nearest neighbour on pixels, Prototypical Networks, Baseline, MAML, first-order
MAML and Reptile, meta-trained on meta-train classes and tested on episodes of unseen meta-test
classes (disjoint alphabets). Every method trains with the shared fit loop (checkpoints, resume,
metrics.jsonl); test episodes are fixed by one seed and shared by every method and seed.
Presets, command and table: experiments/configs/meta_learning.py.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cnnjax import config as cfg
from cnnjax import data, models
from cnnjax.data import transforms
from cnnjax.data.episodes import EpisodeSampler, check_disjoint, episode_labels
from cnnjax.errors import ConfigError
from cnnjax.methods import meta_learning as ml
from cnnjax.tables import Table
from cnnjax.train import sharding, state as train_state, steps
from experiments import runner

METHODS = ('nearest_neighbour', 'protonet', 'baseline', 'maml', 'fomaml', 'reptile')
ADAPTING = ('maml', 'fomaml', 'reptile')   # adapt all weights by SGD at test: one model per way count
PARTS = ('train', 'val', 'test')
TEST_SEED = 2017                           # the meta-test episodes: the same for every method and seed
PUBLISHED = {  # Omniglot, 28x28, Vinyals split with rotations; 5w1s, 5w5s, 20w1s, 20w5s
    'maml': ((98.7, 99.9, 95.8, 98.9), 'Finn, Abbeel & Levine 2017, Model-Agnostic Meta-Learning, Table 1'),
    'protonet': ((98.8, 99.7, 96.0, 98.9), 'Snell, Swersky & Zemel 2017, Prototypical Networks, Table 1'),
}


def setting_name(ways, shots):
  return f'{ways}-way {shots}-shot'


def validate(config):
  """Fail before any compute on a wrong key, name or value."""
  cfg.validate_base(config)
  cfg.check_choice(config, 'methods', METHODS)
  cfg.check_choice(config, 'model', models.MODELS.names())
  cfg.check_choice(config, 'task_mode', ml.TASK_MODES)
  cfg.check_type(config, 'dataset', str)
  name = config.dataset
  if name.partition('/')[0] not in data.DATASETS and name not in data.CATALOG:
    raise ConfigError('dataset', name, data.DATASETS.names() + list(data.CATALOG))
  for key in ('image_size', 'width', 'test_queries', 'test_episodes', 'val_episodes', 'eval_batch_size',
              'episode_batch'):
    cfg.check_type(config, key, int)
    cfg.check_positive(config, key)
  cfg.check_type(config, 'settings', (list, tuple))
  for setting in config.settings:
    if (not isinstance(setting, (list, tuple)) or len(setting) != 2
        or not all(cfg.is_count(v, 1) for v in setting) or setting[0] < 2):
      raise ConfigError('settings', setting, '(ways >= 2, shots >= 1) pairs')
  ranges = config.label_ranges
  if ranges and (len(ranges) != 3 or not all(isinstance(r, (list, tuple)) and len(r) == 2
                                             and all(map(cfg.is_count, r)) and r[0] < r[1] for r in ranges)):
    raise ConfigError('label_ranges', ranges, '() or three (lo, hi) label ranges, 0 <= lo < hi: train, val, test')
  for method in ('protonet', 'baseline', *ADAPTING):
    for key in ('steps', 'learning_rate'):
      cfg.check_positive(config, f'{method}.{key}')
    cfg.check_type(config, f'{method}.steps', int)
  for method in ADAPTING:
    for key in ('shots', 'queries', 'tasks', 'inner_steps', 'test_inner_steps'):
      cfg.check_type(config, f'{method}.{key}', int)
      cfg.check_positive(config, f'{method}.{key}')
    cfg.check_positive(config, f'{method}.inner_learning_rate')
    ways = config[method].train_ways
    tested = sorted({w for w, _ in config.settings})
    if not isinstance(ways, (list, tuple)) or not set(ways) & set(tested):
      raise ConfigError(f'{method}.train_ways', ways, f'a tuple of one or more of the test way counts {tested}',
                        f'{method} trains one model per way count and tests it on settings of that many ways')


# Data -------------------------------------------------------------------------------------------
def load_parts(config):
  """{'train' | 'val' | 'test': {'image': uint8 (n, s, s, 1), 'label': int}} with disjoint classes."""
  loaded, parts = {}, {}
  for i, part in enumerate(PARTS):
    split = config.splits[part]
    if split not in loaded:
      arrays = data.load_arrays(config.dataset, split, config.data_dir or None)
      loaded[split] = {'image': to_glyphs(arrays['image'], config.image_size), 'label': arrays['label']}
    arrays = loaded[split]
    if config.label_ranges:
      lo, hi = config.label_ranges[i]
      keep = (arrays['label'] >= lo) & (arrays['label'] < hi)
      arrays = {k: v[keep] for k, v in arrays.items()}
    parts[part] = with_rotations(arrays) if config.rotations else arrays
  check_disjoint({f'meta-{p}': np.unique(parts[p]['label']) for p in PARTS})
  return parts


def to_glyphs(images, size):
  """One channel, strokes bright on black, `size` x `size`: Omniglot's 105x105 RGB images (black
  strokes on white) are inverted and resized like the papers' 28x28 version."""
  if images.shape[-1] == 3:
    images = 255 - images[..., :1]
  if images.shape[1:3] != (size, size):
    images = np.concatenate([np.asarray(transforms.resize(images[i:i + 2000], size))
                             for i in range(0, len(images), 2000)])
  return images.astype(np.uint8)


def with_rotations(arrays):
  """Each class also rotated by 90, 180 and 270 degrees as three new classes (Santoro et al. 2016)."""
  offset = int(arrays['label'].max()) + 1
  images = [np.rot90(arrays['image'], k, axes=(1, 2)) for k in range(4)]
  labels = [arrays['label'] + k * offset for k in range(4)]
  return {'image': np.concatenate(images), 'label': np.concatenate(labels)}


def dense_labels(labels):
  return np.unique(labels, return_inverse=True)[1].astype(np.int32)


def as_float(images):
  return transforms.to_float(images)


# Evaluation ---------------------------------------------------------------------------------------
class Evaluator:
  """Accuracy (%) per episode; compiled programs are shared by every method and seed."""

  def __init__(self, config):
    self.config = config
    self._jitted = {}

  def jitted(self, key, make):
    if key not in self._jitted:
      self._jitted[key] = make()
    return self._jitted[key]

  def embed(self, graphdef, params, rest, images):
    """Features of every image, batch norm with its running statistics (per image, no episode)."""
    def make():
      def fn(params, rest, x):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return model.features(as_float(x))
      return jax.jit(fn)
    fn = self.jitted(('embed', graphdef), make)
    size = self.config.eval_batch_size
    n = len(images)
    padded = np.concatenate([images, np.zeros((-n % size, *images.shape[1:]), images.dtype)])
    return jnp.concatenate([fn(params, rest, padded[i:i + size]) for i in range(0, len(padded), size)])[:n]

  def on_embeddings(self, kind, features, episodes, ways, **options):
    """Per-episode accuracy of a classifier of embeddings (or pixels) over vmapped episode batches."""
    def make():
      def one(features, support, query):
        s, q = features[support], features[query]
        sy, qy = episode_labels(ways, len(support) // ways), episode_labels(ways, len(query) // ways)
        if kind == 'protonet':
          logits = ml.protonet_logits(s, q, ways)
        elif kind == 'baseline':
          logits = ml.baseline_logits(s, sy, q, ways, **options)
        else:
          logits = ml.nearest_neighbour_logits(s, sy, q, ways)
        return ml.accuracy(logits, qy)
      return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
    fn = self.jitted((kind, ways, tuple(sorted(options.items()))), make)
    return batched(lambda s, q: fn(features, s, q), episodes, self.config.episode_batch)

  def adapting(self, graphdef, params, rest, images, episodes, ways, *, steps, lr):
    """Per-episode accuracy after `steps` SGD steps on each episode's support set (MAML, Reptile)."""
    mode = ml.task_mode(self.config.task_mode)

    def make():
      apply = ml.functional(graphdef)

      def one(params, rest, images, support, query):
        sy, qy = episode_labels(ways, len(support) // ways), episode_labels(ways, len(query) // ways)
        fast = ml.adapt(apply, params, rest, as_float(images[support]), sy, steps=steps, lr=lr)
        return ml.accuracy(apply(fast, rest, as_float(images[query])), qy)
      if mode == 'vmap':
        return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)))
      single = jax.jit(one)  # one episode per call: vmapped per-episode weights are slow on CPU
      return lambda p, r, x, s, q: jnp.stack([single(p, r, x, s[i], q[i]) for i in range(len(s))])
    images = jnp.asarray(images)
    fn = self.jitted(('adapt', graphdef, ways, steps, lr, mode), make)
    return batched(lambda s, q: fn(params, rest, images, s, q), episodes, self.config.episode_batch)


def batched(fn, episodes, size):
  """100 * fn(support, query) over episode batches of `size` (the last one padded), as a numpy array."""
  n = len(episodes['support'])
  out = []
  for i in range(0, n, size):
    s, q = episodes['support'][i:i + size], episodes['query'][i:i + size]
    pad = size - len(s)
    if pad and n > size:
      s, q = np.concatenate([s, s[:1].repeat(pad, 0)]), np.concatenate([q, q[:1].repeat(pad, 0)])
    out.append(np.asarray(fn(jnp.asarray(s), jnp.asarray(q)))[:size - pad])
  return 100 * np.concatenate(out)


# The experiment -----------------------------------------------------------------------------------
class MetaLearning:
  """One cell per method (per training way count for MAML and Reptile); each cell trains its seeds,
  then tests them on the shared meta-test episodes of its settings."""

  def __init__(self, exp):
    self.exp, self.config = exp, exp.config
    c = self.config
    self.parts = load_parts(c)
    self.train_labels = dense_labels(self.parts['train']['label'])
    self.seeds = list(range(c.seeds))
    self.val_setting = tuple(min(map(tuple, c.settings)))  # the embedding methods' meta-val episodes
    self.samplers = self.episode_samplers()
    self.test_episodes = {(w, k): self.samplers['test', w, k, c.test_queries].sample(c.test_episodes, [TEST_SEED, w, k])
                          for w, k in c.settings}
    self.evaluator = Evaluator(c)
    models.check_classifier(c.model, lambda: self.build(2, 0), self.parts['train']['image'].shape[1:])

  def build(self, num_classes, seed):
    return models.build(self.config.model, num_classes=num_classes, seed=seed, width=self.config.width,
                        size=self.config.image_size, dtype=self.config.compute_dtype)

  def episode_samplers(self):
    """{(part, ways, shots, queries): EpisodeSampler} for every episode the cells draw, built before
    any training so that counts a part cannot give fail at once, naming the keys they came from."""
    c, wanted = self.config, {}
    setting_keys = ('settings (ways)', 'settings (shots)', 'test_queries')
    for w, k in c.settings:
      wanted['test', w, k, c.test_queries] = setting_keys
    for cell in self.cells():
      method = cell.config['method']
      if method in ('protonet', 'baseline'):
        wanted[('val', *self.val_setting, c.test_queries)] = setting_keys
      if method == 'protonet':
        p = c.protonet
        wanted['train', p.ways, p.shots, p.queries] = ('protonet.ways', 'protonet.shots', 'protonet.queries')
      elif method in ADAPTING:
        m, ways = c[method], cell.config['ways']
        wanted['train', ways, m.shots, m.queries] = (f'{method}.train_ways', f'{method}.shots', f'{method}.queries')
        wanted['val', ways, m.shots, c.test_queries] = (f'{method}.train_ways', f'{method}.shots', 'test_queries')
    return {key: EpisodeSampler(self.parts[key[0]]['label'], *key[1:], f'meta-{key[0]}', keys)
            for key, keys in wanted.items()}

  def cells(self):
    c, cells = self.config, []
    base = dict(dataset=c.dataset, splits=c.splits.to_dict(), label_ranges=c.label_ranges, rotations=c.rotations,
                model=c.model, width=c.width, seeds=self.seeds, test_queries=c.test_queries,
                test_episodes=c.test_episodes, dtype=c.compute_dtype)
    for method in c.methods:
      if method in ADAPTING:
        for ways in c[method].train_ways:
          settings = [s for s in c.settings if s[0] == ways]
          if settings:
            cells.append(runner.Cell(method, f'{ways}-way', dict(base, method=method, ways=ways, settings=settings,
                                                                 **c[method].to_dict())))
      else:
        extra = c[method].to_dict() if method in c else {}
        cells.append(runner.Cell(method, 'all', dict(base, method=method, settings=list(c.settings), **extra)))
    return cells

  # Training ---------------------------------------------------------------------------------------
  def states(self, models_, tx):
    states = train_state.stack([train_state.create(m, tx, s) for m, s in zip(models_, self.seeds)])
    return sharding.place_state(states, self.exp.mesh, self.config.fsdp)

  def episode_source(self, ways, shots, queries, count, tasks=None):
    """Training episodes of every seed, drawn in advance: indices (seeds, count[, tasks], n) into
    the meta-train images, support first, then queries, both class-major."""
    per_seed = []
    for seed in self.seeds:
      drawn = self.samplers['train', ways, shots, queries].sample(count * (tasks or 1), [seed, ways, shots, queries])
      both = np.concatenate([drawn['support'], drawn['query']], axis=1)
      per_seed.append(both.reshape(count, tasks, -1) if tasks else both)
    return {'images': self.parts['train']['image'], 'episodes': np.stack(per_seed)}

  def train(self, cell, cell_dir, states, step, source, total_steps, evaluate, batch_fn=None):
    """Trains through the shared fit loop; returns (states, val metrics, wall seconds without val).
    `source['episodes'][seed]` holds each step's example indices; the rest is shared by the seeds."""
    batch_fn = batch_fn or (lambda src, st: as_float(src['images'][src['episodes'][st.step]]))
    chunk = steps.over_members(steps.make_chunk(step, batch_fn, self.config.chunk_steps), self.config.side_by_side,
                               source_axes={k: 0 if k == 'episodes' else None for k in source})
    source = sharding.replicate(source, self.exp.mesh)
    val_time = [0.0]

    def timed_evaluate(states):
      started = time.time()
      out = evaluate(states)
      val_time[0] += time.time() - started
      return out

    started = time.time()
    states, results = self.exp.train(cell, cell_dir, states, source, chunk_fn=chunk, total_steps=total_steps,
                                     evaluate=timed_evaluate)
    return states, results, time.time() - started - val_time[0]

  def run_embedding_method(self, cell, cell_dir):
    """ProtoNets or Baseline: train, embed the meta-test images once, test every setting."""
    c, method = self.config, cell.config['method']
    if method == 'protonet':
      p = c.protonet
      tx = optax.adam(p.learning_rate)
      source = self.episode_source(p.ways, p.shots, p.queries, p.steps)
      ways, shots = p.ways, p.shots
      query_labels = episode_labels(p.ways, p.queries)

      def loss_fn(model, batch, rng):
        del rng
        features = model.features(batch)
        logits = ml.protonet_logits(features[:ways * shots], features[ways * shots:], ways)
        return ml.cross_entropy(logits, query_labels), {'accuracy': ml.accuracy(logits, query_labels)}
      models_ = [self.build(1, s) for s in self.seeds]   # the head is unused
      options, kind, batch_fn = {}, 'protonet', None
    else:
      b = c.baseline
      num_classes = int(self.train_labels.max()) + 1
      models_ = [self.build(num_classes, s) for s in self.seeds]
      tx = optax.adam(b.learning_rate)
      rng = [np.random.default_rng([s, 1]) for s in self.seeds]
      source = {'images': self.parts['train']['image'],
                'episodes': np.stack([r.integers(0, len(self.train_labels), (b.steps, b.batch_size)) for r in rng])}
      source['labels'] = self.train_labels

      def loss_fn(model, batch, rng):
        del rng
        logits = model(batch['image'])
        return ml.cross_entropy(logits, batch['label']), {'accuracy': ml.accuracy(logits, batch['label'])}
      options = dict(steps=b.head_steps, lr=b.head_learning_rate, weight_decay=b.head_weight_decay)
      kind = 'baseline'

      def batch_fn(src, state):
        index = src['episodes'][state.step]
        return {'image': as_float(src['images'][index]), 'label': src['labels'][index]}
    val_setting = self.val_setting
    graphdef = train_state.split_model(models_[0])[0]
    step = steps.make_train_step(graphdef, tx, loss_fn)
    val = self.samplers[('val', *val_setting, c.test_queries)].sample(c.val_episodes, [TEST_SEED, 1])

    def accuracies(member, part, episodes_by_setting):
      features = self.evaluator.embed(graphdef, member.params, member.model_state, self.parts[part]['image'])
      return {s: self.evaluator.on_embeddings(kind, features, e, s[0], **options)
              for s, e in episodes_by_setting.items()}

    def evaluate(states):
      return {'val_accuracy': np.array([accuracies(m, 'val', {val_setting: val})[val_setting].mean()
                                        for m in train_state.unstack(states)])}

    states, results, seconds = self.train(cell, cell_dir, self.states(models_, tx), step, source,
                                          c[method].steps, evaluate, batch_fn)
    tested = [accuracies(m, 'test', self.test_episodes) for m in train_state.unstack(states)]
    return self.result(cell, tested, seconds, results)

  def run_adapting_method(self, cell, cell_dir):
    """MAML, first-order MAML or Reptile with an N-way head: meta-train on N-way tasks, then adapt
    to each test episode by SGD from the meta-learned weights."""
    c, method, ways = self.config, cell.config['method'], cell.config['ways']
    m = c[method]
    models_ = [self.build(ways, s) for s in self.seeds]
    graphdef = train_state.split_model(models_[0])[0]
    apply = ml.functional(graphdef)
    mode = c.task_mode
    support_y, query_y = episode_labels(ways, m.shots), episode_labels(ways, m.queries)
    n_support = ways * m.shots
    if method == 'reptile':
      tx = optax.sgd(m.learning_rate)
      labels = np.concatenate([support_y, query_y])

      def step(state, images):
        direction, loss = ml.reptile_direction(apply, state.params, state.model_state, images, labels,
                                               steps=m.inner_steps, lr=m.inner_learning_rate, mode=mode)
        updates, opt_state = tx.update(direction, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), {'loss': loss, 'update_norm': optax.tree.norm(updates)}
      test_lr = m.test_inner_learning_rate
    else:
      tx = optax.adam(m.learning_rate)
      first_order = method == 'fomaml'

      def step(state, images):
        def objective(params):
          return ml.maml_meta_loss(apply, params, state.model_state, images[:, :n_support], support_y,
                                   images[:, n_support:], query_y, steps=m.inner_steps, lr=m.inner_learning_rate,
                                   first_order=first_order, mode=mode)
        (loss, accuracy), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), {'loss': loss, 'accuracy': accuracy,
                                                    'update_norm': optax.tree.norm(updates)}
      test_lr = m.inner_learning_rate
    source = self.episode_source(ways, m.shots, m.queries, m.steps, tasks=m.tasks)
    val = self.samplers['val', ways, m.shots, c.test_queries].sample(c.val_episodes, [TEST_SEED, 1])
    adapt = dict(steps=m.test_inner_steps, lr=test_lr)

    def evaluate(states):
      return {'val_accuracy': np.array([
          self.evaluator.adapting(graphdef, s.params, s.model_state, self.parts['val']['image'], val, ways,
                                  **adapt).mean() for s in train_state.unstack(states)])}

    states, results, seconds = self.train(cell, cell_dir, self.states(models_, tx), step, source, m.steps, evaluate)
    tested = [{s: self.evaluator.adapting(graphdef, member.params, member.model_state, self.parts['test']['image'],
                                          self.test_episodes[s], ways, **adapt)
               for s in map(tuple, cell.config['settings'])} for member in train_state.unstack(states)]
    return self.result(cell, tested, seconds, results)

  def run_nearest_neighbour(self, cell, cell_dir):
    del cell_dir
    started = time.time()
    pixels = as_float(self.parts['test']['image']).reshape(len(self.parts['test']['image']), -1)
    tested = [{s: self.evaluator.on_embeddings('nearest_neighbour', pixels, e, s[0])
               for s, e in self.test_episodes.items()}] * len(self.seeds)
    return self.result(cell, tested, 0.0, {}, test_seconds=time.time() - started)

  def result(self, cell, tested, train_seconds, results, test_seconds=None):
    """{'accuracy': {setting: per-episode accuracies of every seed}, 'train_seconds': [per seed], ...}"""
    out = {'accuracy': {setting_name(*s): np.concatenate([t[s] for t in tested]).tolist() for s in tested[0]},
           'train_seconds': [train_seconds / len(self.seeds)] * len(self.seeds)}
    if 'val_accuracy' in results:
      out['val_accuracy'] = np.asarray(results['val_accuracy']).tolist()
    for s in tested[0]:
      mean, half = ml.confidence_interval(out['accuracy'][setting_name(*s)])
      print(f'  {cell.row} {setting_name(*s)}: {mean:.1f} ± {half:.1f} %', flush=True)
    return out

  def run_cell(self, cell, cell_dir):
    method = cell.config['method']
    if method == 'nearest_neighbour':
      return self.run_nearest_neighbour(cell, cell_dir)
    if method in ADAPTING:
      return self.run_adapting_method(cell, cell_dir)
    return self.run_embedding_method(cell, cell_dir)

  def run(self):
    cells = self.cells()
    results = self.exp.run_grid(cells, self.run_cell)
    self.write_table(cells, results)

  # Table ----------------------------------------------------------------------------------------
  def write_table(self, cells, results):
    c = self.config
    table = EpisodeTable('meta_learning', c.preset, f'Few-shot classification on {c.dataset}: meta-test accuracy (%)',
                         caption=self.caption(), digits=1)
    table.ci_columns = {setting_name(*s) for s in c.settings}
    times = {}
    for cell in cells:
      result = results[cell]
      if 'failed' in result:
        for s in cell.config['settings']:
          table.mark_failed(cell.row, setting_name(*s), result['failed'])
        continue
      for column, values in result['accuracy'].items():
        for value in values:
          table.add(cell.row, column, value)
      times.setdefault(cell.row, np.zeros(len(result['train_seconds'])))
      times[cell.row] = times[cell.row] + np.asarray(result['train_seconds'])
    for row, seconds in times.items():
      for value in seconds:
        table.add(row, TIME_COLUMN, value)
    if c.preset == 'paper':
      for row, (numbers, source) in PUBLISHED.items():
        for s, value in zip(((5, 1), (5, 5), (20, 1), (20, 5)), numbers):
          if row in table.rows and tuple(s) in map(tuple, c.settings):
            table.add_published(row, setting_name(*s), value, source)
    table.caption += self.expectation(table)
    self.exp.write_table(table, task_mode=ml.task_mode(c.task_mode))

  def caption(self):
    c = self.config
    return (f'{len(self.test_episodes[tuple(c.settings[0])]["support"])} meta-test episodes per column '
            f'({c.test_queries} queries per class) of classes never seen in meta-training '
            f'({len(np.unique(self.parts["train"]["label"]))} meta-train, {len(np.unique(self.parts["val"]["label"]))} '
            f'meta-val, {len(np.unique(self.parts["test"]["label"]))} meta-test classes), the same episodes for every '
            f'method; {c.model} of width {c.width}. MAML, first-order MAML and Reptile train one model per way '
            f'count (an N-way head; here {self.adapting_ways()}), at 1 shot, and adapt all weights by SGD at test '
            '(— : a way count they did not train for); ProtoNets and Baseline embed '
            'with batch-norm running statistics, MAML and Reptile normalise with each batch (transductive, as '
            'their reference code). Hyper-parameters come from the papers (scaled down); the config notes the '
            'few chosen on meta-val episodes (first-order MAML\'s inner steps, Reptile\'s step sizes); '
            'meta-test episodes were read only for this table. Time: meta-training wall seconds, compile '
            'included, test excluded.')

  def adapting_ways(self):
    c = self.config
    ways = {m: tuple(c[m].train_ways) for m in c.methods if m in ADAPTING}
    return ', '.join(f'{m} {"/".join(map(str, w))}-way' for m, w in ways.items()) or 'none run'

  def expectation(self, table):
    """The bar: every learned method above nearest neighbour on pixels in every column, ProtoNets
    >= 80% at 5-way 1-shot; says whether this run meets it."""
    means = {(r, col): np.mean(table.cells[r, col].values) for (r, col) in table.cells
             if col in table.ci_columns and table.cells[r, col].values}
    parts = []
    if ('nearest_neighbour', '5-way 1-shot') in means and ('protonet', '5-way 1-shot') in means:
      gaps = [means[r, col] - means['nearest_neighbour', col] for (r, col) in means if r != 'nearest_neighbour']
      proto = means['protonet', '5-way 1-shot']
      parts.append(f' Expected: every method above nearest neighbour on pixels (this run: smallest margin '
                   f'{min(gaps):+.1f} points, {"met" if min(gaps) > 0 else "not met"}); ProtoNets >= 80% at '
                   f'5-way 1-shot (this run: {proto:.1f}%, {"met" if proto >= 80 else "not met"}).')
    return ''.join(parts)


TIME_COLUMN = 'meta-train time (s)'


class EpisodeTable(Table):
  """Accuracy columns show mean ± 95% confidence interval over episodes (1.96 std / sqrt(n)),
  n = episodes x seeds, as the few-shot papers report; the time column mean ± std over seeds."""
  ci_columns = frozenset()

  def render(self, row, display_column):
    cell = self.cells.get((row, display_column))
    if display_column not in self.ci_columns or cell is None or not cell.values:
      return super().render(row, display_column)
    mean, half = ml.confidence_interval(cell.values)
    return f'{mean:.{self.digits}f} ± {half:.{self.digits}f} (n={len(cell.values)})'

  def full_caption(self):
    return (f'{self.caption} Accuracy cells: mean ± 95% confidence interval over n test episodes (all seeds '
            'pooled); time cells: mean ± sample std over seeds.')


def main(config):
  mesh = runner.setup(config, validate)
  MetaLearning(runner.Experiment('meta_learning', config, mesh)).run()


if __name__ == '__main__':
  runner.command_line('meta_learning', main)
