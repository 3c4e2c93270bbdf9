"""Unsupervised domain adaptation: source only, DANN, Deep CORAL, DAN (MMD), CDAN, CDAN+E, target oracle.

Every method trains the same network with the same optimizer (DANN's annealed SGD) on labelled
source batches; the adaptation methods add a term on the features of an equal-sized batch of the
unlabelled target training split. Model selection is training-domain validation (DomainBed): each
run is evaluated every `eval_every` steps and the point with the best accuracy on held-out source
examples is reported; the labelled target test split is read only for the table (and the oracle,
an upper bound, trains on labelled target examples). Presets, command, table: the config's docstring.
"""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cnnjax import config as cfg
from cnnjax import data, metrics, models, tracking
from cnnjax.data import domains
from cnnjax.errors import DataError
from cnnjax.methods import domain_adaptation as da
from cnnjax.tables import Table
from cnnjax.train import loop, sharding, state as train_state, steps
from experiments import runner

METHODS = ('source_only', 'dann', 'coral', 'mmd', 'cdan', 'cdan_e', 'target_oracle')
ADVERSARIAL = ('dann', 'cdan', 'cdan_e')
PARTS = ('val', 'source', 'target')   # the evaluation splits: source validation, source test, target test

GANIN = 'Ganin & Lempitsky 2015, Unsupervised Domain Adaptation by Backpropagation, Table 2 (SVHN -> MNIST)'
DOMAINBED = ('Gulrajani & Lopez-Paz 2021, In Search of Lost Domain Generalization, RotatedMNIST, training-domain '
             'validation: the average over six held-out rotations, each with the other five as sources')
PUBLISHED = {
    ('svhn_cropped->mnist', 'source_only'): (54.90, GANIN),
    ('svhn_cropped->mnist', 'dann'): (73.85, GANIN),
    ('mnist@0,15,30,45,60->mnist@75', 'source_only'): (98.0, DOMAINBED),
    ('mnist@0,15,30,45,60->mnist@75', 'coral'): (98.0, DOMAINBED),
    ('mnist@0,15,30,45,60->mnist@75', 'dann'): (97.8, DOMAINBED),
}


def validate(config):
  """Fail before any compute on a wrong key, name or value."""
  cfg.validate_base(config)
  cfg.check_choice(config, 'model', models.MODELS.names())
  cfg.check_type(config, 'model_kwargs', ml_collections.ConfigDict)
  cfg.check_choice(config, 'methods', METHODS)
  cfg.check_type(config, 'shifts', (list, tuple))
  known = data.DATASETS.names() + list(data.CATALOG)
  if not config.shifts:
    raise cfg.ConfigError('shifts', config.shifts, 'one or more SOURCE->TARGET pairs')
  for shift in config.shifts:
    if not isinstance(shift, str):
      raise cfg.ConfigError('shifts', shift, 'SOURCE->TARGET strings')
    for domain in domains.parse_shift(shift):
      name, _ = domains.parse_domain(domain)
      if name not in known:
        raise cfg.ConfigError('shifts', shift, sorted(known), f'unknown dataset {name!r}')
  cfg.check_choice(config, 'figure_method', METHODS)
  cfg.check_type(config, 'train.steps', int)
  cfg.check_positive(config, 'train.steps')
  cfg.check_divisible(config, 'train.steps', config.chunk_steps, 'steps run in whole chunks')
  for key in ('train.learning_rate', 'train.lr_alpha', 'adaptation.gamma', 'adaptation.mmd_multiplier'):
    cfg.check_positive(config, key)
  for key in ('train.momentum', 'train.lr_beta', 'adaptation.coral_weight', 'adaptation.mmd_weight'):
    cfg.check_positive(config, key, allow_zero=True)
  for key in ('adaptation.mmd_kernels', 'adaptation.discriminator_width', 'image_size', 'fit_size', 'channels'):
    cfg.check_type(config, key, int)
  cfg.check_positive(config, 'adaptation.mmd_kernels')
  cfg.check_positive(config, 'adaptation.discriminator_width')
  cfg.check_choice(config, 'channels', (0, 1, 3))
  cfg.check_positive(config, 'image_size', allow_zero=True)
  if not 0 < config.fit_size <= (config.image_size or config.fit_size):
    raise cfg.ConfigError('fit_size', config.fit_size, f'1..image_size ({config.image_size})')
  cfg.check_batch_fits_devices(config, 'train.batch_size')
  cfg.check_batch_fits_devices(config, 'eval_batch_size')
  cfg.check_type(config, 'validation_fraction', float)
  if not 0 < config.validation_fraction < 1:
    raise cfg.ConfigError('validation_fraction', config.validation_fraction, 'a fraction in (0, 1)')


def shift_label(shift):
  source, target = domains.parse_shift(shift)
  return f'{source}→{target}'


# The network and the losses -------------------------------------------------------------------

class Adapter(nnx.Module):
  """The classifier (backbone + head) and, for the adversarial methods, a domain discriminator on
  its features (DANN) or on their multilinear map with the predictions (CDAN)."""

  def __init__(self, classifier, discriminator=None):
    self.classifier = classifier
    self.discriminator = discriminator

  def __call__(self, x):
    return self.classifier(x)


def make_loss(method, adaptation):
  """`loss_fn(model, batch, rng)` of a method: source cross-entropy plus its adaptation term.

  batch = {'source': {'image', 'label'}, 'target': {'image'}, 'progress': step / steps}. The
  adaptation methods pass source and target through the network as one batch (one set of batch
  norm statistics for both domains, as the papers' implementations do); source only and the
  oracle see their training domain alone."""
  a = adaptation

  def loss_fn(model, batch, rng):
    del rng
    source, target = batch['source'], batch['target']
    if method in ('source_only', 'target_oracle'):
      logits = model(source['image'])
      ce = metrics.nll(logits, source['label']).mean()
      return ce, {'accuracy': metrics.correct(logits, source['label']).mean(), 'classification': ce}
    n = source['image'].shape[0]
    features = model.classifier.features(jnp.concatenate([source['image'], target['image']]))
    logits = model.classifier.head(features).astype(jnp.float32)
    features = features.astype(jnp.float32)
    ce = metrics.nll(logits[:n], source['label']).mean()
    if method == 'coral':
      term = a.coral_weight * da.coral_loss(features[:n], features[n:])
    elif method == 'mmd':
      term = a.mmd_weight * da.mmd_loss(features[:n], features[n:], a.mmd_multiplier, a.mmd_kernels)
    else:
      scale = da.dann_lambda(batch['progress'], a.gamma)
      probabilities = jax.nn.softmax(jax.lax.stop_gradient(logits))
      inputs = features if method == 'dann' else da.multilinear_map(features, probabilities)
      domain_logits = model.discriminator(da.gradient_reversal(inputs, scale))
      weights = ((da.entropy_weights(probabilities[:n]), da.entropy_weights(probabilities[n:]))
                 if method == 'cdan_e' else (None, None))
      term = da.domain_adversarial_loss(domain_logits[:n], domain_logits[n:], *weights)
    return ce + term, {'accuracy': metrics.correct(logits[:n], source['label']).mean(),
                       'classification': ce, 'adaptation': term}

  return loss_fn


def part_accuracies(model, batch):
  """Per-example correctness split by evaluation part (padding has part -1)."""
  correct = metrics.correct(model(domains.to_float(batch['image'])), batch['label'])
  return {name: correct * (batch['part'] == i) for i, name in enumerate(PARTS)}


# The experiment -------------------------------------------------------------------------------

class DomainAdapt:
  """One cell per (method, shift), all seeds inside; programs compiled once per method and reused
  across shifts and seeds (every split is padded to one capacity, so shapes never change)."""

  def __init__(self, exp):
    self.exp, self.config = exp, exp.config
    c = self.config
    self.seeds = list(range(c.seeds))
    self.shape = dict(image_size=c.image_size, fit_size=c.fit_size, channels=c.channels,
                      data_dir=c.data_dir or None)
    self.splits = {}
    for shift in c.shifts:
      source, target = domains.parse_shift(shift)
      for domain in (source, target):
        for split in ('train', 'test'):
          if (domain, split) not in self.splits:
            self.splits[domain, split] = domains.load_domain(domain, split, **self.shape)
      domains.check_pair(source, domains.label_names(source, self.shape['data_dir']),
                         self.splits[source, 'train']['image'].shape[1:],
                         target, domains.label_names(target, self.shape['data_dir']),
                         self.splits[target, 'train']['image'].shape[1:])
    shapes = {arrays['image'].shape[1:] for arrays in self.splits.values()}
    if len(shapes) > 1:  # e.g. the test split of a domain differs from its train split
      raise DataError(f'the domains have images of several shapes after preprocessing: {sorted(shapes)}')
    self.image_shape = shapes.pop()
    self.num_classes = len(domains.label_names(domains.parse_shift(c.shifts[0])[0], self.shape['data_dir']))
    models.check_classifier(c.model, lambda: self.build('source_only', 0).classifier, self.image_shape)
    self.train_capacity = max(len(a['label']) for (_, split), a in self.splits.items() if split == 'train')
    eval_sizes = [self._eval_size(shift, oracle) for shift in c.shifts for oracle in (False, True)]
    self.eval_capacity = -(-max(eval_sizes) // c.eval_batch_size) * c.eval_batch_size
    self.programs = {}

  # Data ---------------------------------------------------------------------------------------
  def training_domain(self, shift, oracle):
    """(labelled train, validation) of the domain a method learns labels from: the source, or the
    target for the oracle; the validation part is held out with a fixed seed."""
    source, target = domains.parse_shift(shift)
    return domains.split_off(self.splits[target if oracle else source, 'train'],
                             self.config.validation_fraction, seed=0)

  def _eval_size(self, shift, oracle):
    source, target = domains.parse_shift(shift)
    return (len(self.training_domain(shift, oracle)[1]['label']) + len(self.splits[source, 'test']['label'])
            + len(self.splits[target, 'test']['label']))

  def device_data(self, shift, oracle):
    """The training pair (padded to one capacity; target without labels) and the evaluation
    arrays (validation, source test, target test, tagged by part and padded), on device."""
    source, target = domains.parse_shift(shift)
    labelled, validation = self.training_domain(shift, oracle)
    train_source, source_count = domains.pad_to(labelled, self.train_capacity)
    train_target, target_count = domains.pad_to({'image': self.splits[target, 'train']['image']},
                                                 self.train_capacity)
    pair = {'source': {'split': train_source, 'count': source_count},
            'target': {'split': train_target, 'count': target_count}}
    parts = [validation, self.splits[source, 'test'], self.splits[target, 'test']]
    evaluation = {k: np.concatenate([p[k] for p in parts]) for k in ('image', 'label')}
    evaluation['part'] = np.concatenate([np.full(len(p['label']), i, np.int32) for i, p in enumerate(parts)])
    sizes = np.array([len(p['label']) for p in parts])
    evaluation, _ = domains.pad_to(evaluation, self.eval_capacity)
    evaluation['part'][int(sizes.sum()):] = -1
    mesh = self.exp.mesh
    return sharding.replicate(pair, mesh), sharding.replicate(evaluation, mesh), sizes

  # Programs -----------------------------------------------------------------------------------
  def build(self, method, seed):
    c = self.config
    classifier = models.build(c.model, num_classes=self.num_classes, seed=seed, channels=self.image_shape[-1],
                              dtype=c.compute_dtype, **c.model_kwargs.to_dict())
    discriminator = None
    if method in ADVERSARIAL:
      features = classifier.head.in_features * (self.num_classes if method != 'dann' else 1)
      discriminator = da.DomainDiscriminator(features, c.adaptation.discriminator_width,
                                             rngs=nnx.Rngs(10_000 + seed), dtype=jnp.dtype(c.compute_dtype))
    return Adapter(classifier, discriminator)

  def optimizer(self):
    t = self.config.train
    schedule = da.dann_learning_rate(t.learning_rate, t.lr_alpha, t.lr_beta, t.steps)
    return optax.sgd(schedule, momentum=t.momentum or None)

  def program(self, method):
    """(chunk, evaluate, features) of a method, compiled on first use and reused after."""
    key = 'source_only' if method == 'target_oracle' else method  # the same program on other data
    if key in self.programs:
      return self.programs[key]
    c, mesh = self.config, self.exp.mesh
    model = self.build(method, 0)
    graphdef = train_state.split_model(model)[0]
    classifier_graphdef = train_state.split_model(model.classifier)[0]

    def batch_fn(pair, state):
      batch = domains.pair_batch(pair['source'], pair['target'], state.key('data'), state.step, c.train.batch_size)
      batch = sharding.shard_batch(domains.to_float(batch), mesh)
      return dict(batch, progress=state.step / c.train.steps)

    step = steps.make_train_step(graphdef, self.optimizer(), make_loss(method, c.adaptation))
    chunk = steps.over_members(steps.make_chunk(step, batch_fn, c.chunk_steps), c.side_by_side, source_axes=None)
    if 'evaluate' not in self.programs:  # the classifier alone: one program for every method

      @jax.jit
      def features(params, model_state, images):
        classifier = nnx.merge(classifier_graphdef, params, model_state)
        classifier.eval()
        return classifier.features(domains.to_float(images)).astype(jnp.float32)

      self.programs['evaluate'] = loop.make_evaluate(classifier_graphdef, part_accuracies, c.eval_batch_size,
                                                     c.side_by_side)
      self.programs['features'] = features
    self.programs[key] = (chunk, self.programs['evaluate'], self.programs['features'])
    return self.programs[key]

  # Cells --------------------------------------------------------------------------------------
  def cell(self, method, shift):
    c = self.config
    return runner.Cell(method, shift_label(shift), dict(
        method=method, shift=shift, seeds=self.seeds, model=c.model, model_kwargs=c.model_kwargs.to_dict(), image_size=c.image_size,
        fit_size=c.fit_size, channels=c.channels, dtype=c.compute_dtype, chunk_steps=c.chunk_steps,
        eval_every=c.eval_every, validation_fraction=c.validation_fraction, train=c.train.to_dict(),
        adaptation=c.adaptation.to_dict() if method not in ('source_only', 'target_oracle') else {}))

  def run_cell(self, cell, cell_dir):
    c, cc = self.config, cell.config
    method, oracle = cc['method'], cc['method'] == 'target_oracle'
    chunk, evaluate, features = self.program(method)
    pair, evaluation, sizes = self.device_data(cc['shift'], oracle)
    tx = self.optimizer()
    states = sharding.place_state(train_state.stack(
        [train_state.create(self.build(method, s), tx, s) for s in self.seeds]), self.exp.mesh, c.fsdp)

    def evaluate_parts(states):
      classifier = states.replace(params=states.params['classifier'], model_state=states.model_state['classifier'],
                                  opt_state=None)
      sums = evaluate(classifier, evaluation)
      return {name: sums[name] * (self.eval_capacity / sizes[i]) for i, name in enumerate(PARTS)}

    states, _ = self.exp.train(cell, cell_dir, states, pair, chunk_fn=chunk, total_steps=c.train.steps,
                               evaluate=evaluate_parts)
    if method in ('source_only', c.figure_method):
      self.save_features(cell, cell_dir, states, features)
    return select_by_validation(cell_dir, self.seeds)

  def save_features(self, cell, cell_dir, states, features):
    """Seed 0's final features of (up to) 300 source and 300 target test images, for the figure."""
    source, target = domains.parse_shift(cell.config['shift'])
    first = train_state.member(states, 0)
    params, model_state = first.params['classifier'], first.model_state['classifier']
    out = {}
    for name, domain in (('source', source), ('target', target)):
      images = self.splits[domain, 'test']['image'][:300]
      out[name] = np.asarray(features(params, model_state, images))
    path = cell_dir / 'features.npz'
    with open(path.with_suffix('.tmp'), 'wb') as f:
      np.savez(f, **out)
    path.with_suffix('.tmp').replace(path)

  def run(self):
    c = self.config
    cells = [self.cell(m, s) for m in c.methods for s in c.shifts]
    results = self.exp.run_grid(cells, self.run_cell)
    self.write_table(cells, results)

  # Table and figure ---------------------------------------------------------------------------
  @staticmethod
  def expectation(cells, results, shifts):
    """The bar of the default preset: on >= 2 of 3 shifts the best adaptation method beats source
    only by >= 5 points of target accuracy (mean over seeds); says whether this run does."""
    gaps = []
    for shift in shifts:
      mean = {cell.row: np.mean(results[cell]['target']) for cell in cells
              if cell.config['shift'] == shift and 'target' in results[cell]}
      adapted = [v for k, v in mean.items() if k not in ('source_only', 'target_oracle')]
      if 'source_only' in mean and adapted:
        gaps.append((shift_label(shift), max(adapted) - mean['source_only']))
    if not gaps:
      return ''
    wins = sum(gap >= 5 for _, gap in gaps)
    needed = min(2, len(gaps))
    listed = ', '.join(f'{label} {gap:+.1f}' for label, gap in gaps)
    return (f' Expected: the best adaptation method beats source only by >= 5 points on at least {needed} of '
            f'{len(gaps)} shifts; this run: {listed} points ({"met" if wins >= needed else "not met"}).')

  def write_table(self, cells, results):
    c = self.config
    table = Table('domain_adapt', c.preset, 'Unsupervised domain adaptation: target test accuracy (%)', caption=(
        f'{c.model} ({", ".join(f"{k}={v}" for k, v in c.model_kwargs.items())}), {c.train.steps} SGD steps (momentum {c.train.momentum}, DANN\'s annealed learning rate from '
        f'{c.train.learning_rate}) of {c.train.batch_size} labelled source and {c.train.batch_size} unlabelled '
        'target images. Columns: accuracy on the target test split of each shift (source → target), and on '
        'the source test split. Model selection by source validation only: of the evaluations every '
        f'{c.eval_every} steps, each seed reports the one with the best accuracy on {c.validation_fraction:.0%} '
        'of the source training split held out (the oracle: of its target training split). Hyper-parameters are '
        'the papers\' and were fixed in advance; no choice used target labels, and the target test split was read '
        'only for this table. target_oracle trains on labelled target images: an upper bound (its source column '
        'is the reverse shift). A run whose loss turns NaN stops and its cell shows as failed.'), digits=1)
    table.caption += self.expectation(cells, results, c.shifts)
    for cell in cells:
      result = results[cell]
      for part, column in (('target', cell.column), ('source', f'{cell.column} source')):
        if 'failed' in result:
          table.mark_failed(cell.row, column, result['failed'])
        else:
          for value in result[part]:
            table.add(cell.row, column, value)
        if part == 'target' and (cell.config['shift'], cell.row) in PUBLISHED:
          table.add_published(cell.row, column, *PUBLISHED[cell.config['shift'], cell.row])
    first = c.shifts[0]
    curve_cells = {cell.row: self.exp.root / cell.dirname for cell in cells if cell.config['shift'] == first}
    curves = {'runs': runner.curves_from(curve_cells, self.seeds, 'train/loss'), 'ylabel': 'training loss',
              'title': f'Training loss, {shift_label(first)}'}
    self.exp.write_table(table, curves, side_by_side=steps.member_mode(c.side_by_side))
    if jax.process_index() == 0:
      plot_features({shift_label(s): {m: self.exp.root / self.cell(m, s).dirname / 'features.npz'
                                      for m in ('source_only', c.figure_method)} for s in c.shifts},
                    self.exp.results_dir / 'features_pca.png', c.figure_method)


def select_by_validation(cell_dir, seeds):
  """Per seed, the evaluation with the best source-validation accuracy (the earliest on ties):
    {'target', 'source', 'val': accuracies in %, 'step': where}. Reads the metrics.jsonl files, so
  a resumed run selects among the same evaluations as an uninterrupted one."""
  result = {'target': [], 'source': [], 'val': [], 'step': []}
  for seed in seeds:
    records = [r for r in tracking.read_metrics(cell_dir / f'seed_{seed}') if 'eval/val' in r]
    best = max(records, key=lambda r: (r['eval/val'], -r['step']))
    for part in PARTS:
      result[part].append(100 * best[f'eval/{part}'])
    result['step'].append(best['step'])
  return result


def pca(points, k=2):
  """Projections of the rows of `points` on their first k principal axes."""
  centred = points - points.mean(axis=0)
  _, _, axes = np.linalg.svd(centred, full_matrices=False)
  return centred @ axes[:k].T


def plot_features(panels, path, method):
  """A grid of PCA scatter plots: one column per shift, rows 'source only' and `method`; source test
  features in one colour, target test features in another (seed 0, the final step)."""
  from matplotlib.figure import Figure  # no pyplot: no global backend state
  rows = ('source_only', method)
  figure = Figure(figsize=(3.2 * len(panels), 6.0), layout='constrained')
  axes = figure.subplots(len(rows), len(panels), squeeze=False)
  for j, (label, files) in enumerate(panels.items()):
    for i, row in enumerate(rows):
      ax = axes[i, j]
      ax.set_xticks([]), ax.set_yticks([])
      if not files[row].exists():
        ax.set_title(f'{label}\n{row}: no features', fontsize=8)
        continue
      with np.load(files[row]) as f:
        source, target = f['source'], f['target']
      projected = pca(np.concatenate([source, target]))
      ax.scatter(*projected[:len(source)].T, s=3, alpha=0.5, label='source')
      ax.scatter(*projected[len(source):].T, s=3, alpha=0.5, label='target')
      ax.set_title(f'{label}\n{row}', fontsize=8)
  axes[0, 0].legend(fontsize=7, markerscale=3)
  figure.suptitle('PCA of source and target test features (seed 0, final step)', fontsize=9)
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=110)
  tracking.write_atomic(path, buffer.getvalue())


def main(config):
  mesh = runner.setup(config, validate)
  DomainAdapt(runner.Experiment('domain_adapt', config, mesh)).run()


if __name__ == '__main__':
  runner.command_line('domain_adapt', main)
