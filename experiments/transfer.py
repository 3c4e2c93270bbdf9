"""Transfer learning: from scratch, linear probe, last-stage and full fine-tuning, L2-SP.

Pretrains one source model per seed (a grid cell of its own), then transfers each
seed's backbone to the target with k labels per class. Hyper-parameters are fixed
in advance; the target test split is read only for the table.
Presets, command and table: experiments/configs/transfer.py.
"""

import jax
import numpy as np
import optax
from flax import nnx

from cnnjax import config as cfg
from cnnjax import data, metrics, models
from cnnjax.data import transforms
from cnnjax.errors import DataError
from cnnjax.methods.classification import cross_entropy
from cnnjax.methods.transfer import TRANSFER_METHODS, finetune_optimizer, l2sp, with_frozen_norms
from cnnjax.tables import Table, mean_std
from cnnjax.train import loop, sharding, state as train_state, steps
from cnnjax.train.checkpoint import Checkpoints
from experiments import runner



def validate(config):
  """Fail before any compute on a wrong key, name or value."""
  cfg.validate_base(config)
  cfg.check_choice(config, 'model', models.MODELS.names())
  cfg.check_choice(config, 'methods', TRANSFER_METHODS.names())
  known = data.DATASETS.names() + list(data.CATALOG)
  cfg.check_choice(config, 'source', known)
  cfg.check_choice(config, 'targets', known)
  cfg.check_type(config, 'labels_per_class', (list, tuple))
  for k in config.labels_per_class:
    if not cfg.is_count(k):
      raise cfg.ConfigError('labels_per_class', k, 'integers >= 0 (0 = all labels)')
  for phase in ('pretrain', 'finetune'):
    cfg.check_type(config, f'{phase}.steps', int)
    cfg.check_positive(config, f'{phase}.steps')
    cfg.check_divisible(config, f'{phase}.steps', config.chunk_steps, 'steps run in whole chunks')
    cfg.check_positive(config, f'{phase}.learning_rate')
    cfg.check_batch_fits_devices(config, f'{phase}.batch_size')
  cfg.check_positive(config, 'finetune.linear_probe_learning_rate')
  cfg.check_positive(config, 'finetune.backbone_lr_scale')
  cfg.check_positive(config, 'l2sp.alpha', allow_zero=True)
  cfg.check_positive(config, 'l2sp.beta', allow_zero=True)
  cfg.check_batch_fits_devices(config, 'eval_batch_size')
  cfg.check_type(config, 'image_size', int)
  cfg.check_type(config, 'fit_size', int)
  if not 0 < config.fit_size <= config.image_size:
    raise cfg.ConfigError('fit_size', config.fit_size, f'1..image_size ({config.image_size})')


def load_split(config, name, split):
  """A split as uint8 images and int labels. Images of another size than `image_size` are
  resized to `fit_size` and centred on an `image_size` canvas (MNIST centres its digits in a
  20x20 box of a 28x28 image, so 8x8 digits are laid out the same way)."""
  arrays = data.load_arrays(name, split, config.data_dir or None)
  return {'image': transforms.fit_and_centre(arrays['image'], config.image_size, config.fit_size),
          'label': arrays['label']}


def labelled_subset(labels, per_class, seed):
  """Indices of `per_class` examples of every class drawn by `seed` (all when per_class is 0),
  padded to the split's size, and how many there are: subsets of every size share one shape,
  and so one compiled program."""
  if per_class == 0:
    return {'index': np.arange(len(labels), dtype=np.int32), 'count': np.int32(len(labels))}
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels):
    pool = np.flatnonzero(labels == label)
    if len(pool) < per_class:
      raise DataError(f'class {label} has {len(pool)} training examples, fewer than {per_class} labels per class')
    chosen.append(rng.choice(pool, per_class, replace=False))
  index = np.sort(np.concatenate(chosen)).astype(np.int32)
  return {'index': np.pad(index, (0, len(labels) - len(index))), 'count': np.int32(len(index))}


def as_float(batch):
  return dict(batch, image=transforms.to_float(batch['image']))


class Programs:
  """The compiled pieces of one training configuration, for all seeds of a cell.

  The training source is {'split': arrays shared by all seeds, 'index': each seed's example
  indices, 'count': how many of them are used}; images stay uint8 on the device.
  """
  SOURCE_AXES = {'split': None, 'index': 0, 'count': 0}

  def __init__(self, exp, model, tx, loss_fn, batch_size):
    graphdef = train_state.split_model(model)[0]
    mesh, mode = exp.mesh, exp.config.side_by_side

    def batch_fn(source, state):
      index = data.device_batch(source['index'], state.key('data'), state.step, batch_size, source['count'])
      return sharding.shard_batch(as_float(jax.tree.map(lambda x: x[index], source['split'])), mesh)

    step = steps.make_train_step(graphdef, tx, loss_fn)
    self.chunk = steps.over_members(steps.make_chunk(step, batch_fn, exp.config.chunk_steps), mode,
                                    source_axes=self.SOURCE_AXES)
    self.evaluate = loop.make_evaluate(graphdef, lambda model, batch: metrics.classification(model, as_float(batch)),
                                       exp.config.eval_batch_size, mode)

  @staticmethod
  def source(split, subsets, mesh):
    return sharding.replicate({'split': split, **train_state.stack(subsets)}, mesh)


def device_batch_size(wanted, n):
  """The largest batch <= min(wanted, n) that splits evenly over the devices."""
  devices = jax.device_count()
  return max(devices, min(wanted, n) // devices * devices)


def init_states(models_, tx, seeds, exp):
  states = train_state.stack([train_state.create(m, tx, s) for m, s in zip(models_, seeds)])
  return sharding.place_state(states, exp.mesh, exp.config.fsdp)


class Transfer:
  """The experiment: a pretraining cell, then one cell per (method, target, labels per class)."""

  def __init__(self, exp):
    self.exp, self.config = exp, exp.config
    config = self.config
    self.source = {s: load_split(config, config.source, s) for s in ('train', 'test')}
    self.targets = {t: {s: load_split(config, t, s) for s in ('train', 'test')} for t in config.targets}
    channels = self.source['train']['image'].shape[-1]
    for name, splits in self.targets.items():
      if splits['train']['image'].shape[-1] != channels:
        raise DataError(f'{name} images have {splits["train"]["image"].shape[-1]} channels but the source '
                        f'{config.source} has {channels}: the backbone cannot transfer between them')
      fewest = int(np.unique(splits['train']['label'], return_counts=True)[1].min())
      if (most := max(config.labels_per_class, default=0)) > fewest:  # refused before any cell trains
        raise cfg.ConfigError('labels_per_class', most, f'at most {fewest} (0 = all labels)',
                              f"{name}'s smallest class has {fewest} training examples")
    self.channels = channels
    models.check_classifier(config.model, lambda: self.build(2, 0), self.source['train']['image'].shape[1:])
    self.seeds = list(range(config.seeds))

  def build(self, num_classes, seed):
    return models.build(self.config.model, num_classes=num_classes, seed=seed, channels=self.channels,
                        dtype=self.config.compute_dtype)

  # Pretraining --------------------------------------------------------------------------------
  def pretrain_cell(self):
    c = self.config
    return runner.Cell('pretrain', c.source, dict(
        source=c.source, model=c.model, image_size=c.image_size, seeds=self.seeds, fit_size=c.fit_size,
        dtype=c.compute_dtype, **c.pretrain.to_dict()))

  def pretrain_states(self):
    c = self.config.pretrain
    num_classes = int(self.source['train']['label'].max()) + 1
    source_models = [self.build(num_classes, s) for s in self.seeds]
    tx = optax.adam(c.learning_rate)
    return source_models[0], tx, init_states(source_models, tx, self.seeds, self.exp)

  def run_pretrain(self, cell, cell_dir):
    c = self.config.pretrain
    model, tx, states = self.pretrain_states()
    programs = Programs(self.exp, model, tx, cross_entropy, c.batch_size)
    whole = labelled_subset(self.source['train']['label'], 0, None)
    train = Programs.source(self.source['train'], [whole] * len(self.seeds), self.exp.mesh)
    test = sharding.replicate(self.source['test'], self.exp.mesh)
    _, results = self.exp.train(cell, cell_dir, states, train, chunk_fn=programs.chunk, total_steps=c.steps,
                                evaluate=lambda s: programs.evaluate(s, test))
    return {'accuracy': (100 * results['accuracy']).tolist()}

  def pretrained_backbones(self, pretrain_dir):
    model, _, like = self.pretrain_states()
    with Checkpoints(pretrain_dir / 'checkpoints') as checkpoints:
      states = checkpoints.restore(like)
    graphdef = train_state.split_model(model)[0]
    return [nnx.merge(graphdef, s.params, s.model_state).backbone for s in train_state.unstack(states)]

  # Transfer -----------------------------------------------------------------------------------
  def transfer_cell(self, method, target, per_class, pretrain_cell):
    c = self.config
    column = f'{per_class}/class' if per_class else 'all'
    column = column if len(c.targets) == 1 else f'{target} {column}'
    return runner.Cell(method, column, dict(
        method=method, target=target, labels_per_class=per_class, seeds=self.seeds, model=c.model,
        fit_size=c.fit_size, dtype=c.compute_dtype, pretrain=pretrain_cell.hash, **c.finetune.to_dict(),
        **(c.l2sp.to_dict() if method == 'l2sp' else {})))

  def run_transfer(self, cell, cell_dir, backbones):
    c, cc = self.config.finetune, cell.config
    recipe = TRANSFER_METHODS.get(cc['method'], key='methods')
    splits = self.targets[cc['target']]
    num_classes = int(splits['train']['label'].max()) + 1
    target_models = [self.build(num_classes, 1000 + s) for s in self.seeds]
    if recipe.pretrained:
      for model, backbone in zip(target_models, backbones):
        model.backbone = backbone
    trainable = models.trainable_paths(target_models[0], recipe.trains)
    learning_rate = c.linear_probe_learning_rate if recipe.trains == 'head' else c.learning_rate
    tx = finetune_optimizer(optax.adam, learning_rate, trainable,
                            backbone_scale=c.backbone_lr_scale if recipe.pretrained else 1.0)
    if recipe.l2sp:
      tx = optax.chain(l2sp(self.config.l2sp.alpha, self.config.l2sp.beta), tx)
    subsets = [labelled_subset(splits['train']['label'], cc['labels_per_class'], s) for s in self.seeds]
    batch_size = device_batch_size(c.batch_size, int(subsets[0]['count']))
    programs = Programs(self.exp, target_models[0], tx, with_frozen_norms(cross_entropy, trainable), batch_size)
    train = Programs.source(splits['train'], subsets, self.exp.mesh)
    test = sharding.replicate(splits['test'], self.exp.mesh)
    states = init_states(target_models, tx, self.seeds, self.exp)
    _, results = self.exp.train(cell, cell_dir, states, train, chunk_fn=programs.chunk, total_steps=c.steps,
                                evaluate=lambda s: programs.evaluate(s, test))
    return {'accuracy': (100 * results['accuracy']).tolist()}

  def run(self):
    c, exp = self.config, self.exp
    pretrain = self.pretrain_cell()
    pretrained = exp.run_grid([pretrain], self.run_pretrain)[pretrain]
    if 'failed' in pretrained:
      raise RuntimeError(f'pretraining failed, so there is nothing to transfer: {pretrained["failed"]}')
    pretrain_dir = exp.root / pretrain.dirname
    backbones = None
    cells = [self.transfer_cell(m, t, k, pretrain) for m in c.methods for t in c.targets for k in c.labels_per_class]

    def run_cell(cell, cell_dir):
      nonlocal backbones
      backbones = backbones or self.pretrained_backbones(pretrain_dir)
      return self.run_transfer(cell, cell_dir, backbones)

    results = exp.run_grid(cells, run_cell)
    self.write_table(cells, results, pretrained)

  @staticmethod
  def expectation(cells, results):
    """The bar this preset is expected to clear: full fine-tuning beats from-scratch by >= 5 points
    of target accuracy at 10 labels per class (mean over seeds); says whether this run does."""
    mean = {cell.row: np.mean(results[cell]['accuracy']) for cell in cells
            if cell.config['labels_per_class'] == 10 and 'accuracy' in results[cell]}
    if not {'finetune', 'scratch'} <= set(mean):
      return ''
    gap = mean['finetune'] - mean['scratch']
    return (f' Expected: finetune beats scratch by >= 5 points at 10 labels per class; this run: '
            f'{gap:+.1f} points ({"met" if gap >= 5 else "not met"}).')

  def write_table(self, cells, results, pretrained):
    c = self.config
    source = '{:.1f} ± {:.1f}'.format(*mean_std(pretrained['accuracy']))
    table = Table('transfer', c.preset, f'Transfer {c.source} -> {", ".join(c.targets)}: target test accuracy (%)',
                  caption=(f'{c.model} pretrained on {c.source} ({c.pretrain.steps} steps; source test accuracy '
                           f'{source} %), then trained {c.finetune.steps} steps on k labels per class of the target. '
                           'Hyper-parameters were fixed in advance: no choice used target labels, and the target '
                           'test split was read only for this table.'))
    table.caption += self.expectation(cells, results)
    for cell in cells:
      result = results[cell]
      if 'failed' in result:
        table.mark_failed(cell.row, cell.column, result['failed'])
      else:
        for value in result['accuracy']:
          table.add(cell.row, cell.column, value)
    curve_column = next((cell.column for cell in cells if cell.config['labels_per_class'] == 10), cells[0].column)
    curve_cells = {cell.row: self.exp.root / cell.dirname for cell in cells if cell.column == curve_column}
    curves = {'runs': runner.curves_from(curve_cells, self.seeds, 'train/loss'), 'ylabel': 'training loss',
              'title': f'Fine-tuning at {curve_column}'}
    self.exp.write_table(table, curves, side_by_side=steps.member_mode(c.side_by_side))


def main(config):
  mesh = runner.setup(config, validate)
  Transfer(runner.Experiment('transfer', config, mesh)).run()


if __name__ == '__main__':
  runner.command_line('transfer', main)
