"""Transfer learning: pretrain a CNN on a source task, transfer with few target labels.

  python -m experiments.transfer --config=experiments/configs/transfer.py[:smoke|default|paper]
  ./run.sh transfer --config.seeds=5

Table (results/transfer/<preset>/table.md): rows = methods (from scratch, linear
probe, fine-tune the last stage, full fine-tune, L2-SP), columns = target test
accuracy (%) at 1, 5, 10 and all labels per class, mean ± std over seeds.
`default` pretrains the digit CNN on mnist_5k (real MNIST) and transfers to
sklearn_digits (other writers, 8x8 upsampled to 28x28). `paper` pretrains a CIFAR
ResNet-20 on cifar100 and transfers to cifar10 and svhn_cropped (TFDS catalog;
prepare them first with `python -m cnnjax.data.prepare NAME`).
"""

import ml_collections

from cnnjax.config import base_config


def get_config(preset=''):
  config = base_config('transfer', preset)
  config.model = 'digit_cnn'
  config.image_size = 28
  config.fit_size = 20          # other-size images: resized to this box, centred (MNIST's layout)
  config.source = 'mnist_5k'
  # Tuples, not lists: config_flags can override tuple fields (--config.methods="('scratch',)") but
  # not list fields; a preset's list assigned below is stored as a tuple.
  config.targets = ('sklearn_digits',)
  config.methods = ('scratch', 'linear_probe', 'finetune_last', 'finetune', 'l2sp')
  config.labels_per_class = (1, 5, 10, 0)   # 0 = every training label
  config.pretrain = ml_collections.ConfigDict(dict(steps=200, batch_size=64, learning_rate=1e-3))
  # One learning rate for every trained weight (backbone_lr_scale scales the pretrained ones);
  # linear probes take the usual larger rate. Fixed in advance, never chosen on target labels.
  config.finetune = ml_collections.ConfigDict(dict(steps=100, batch_size=32, learning_rate=1e-3,
                                                   linear_probe_learning_rate=1e-2, backbone_lr_scale=1.0))
  config.l2sp = ml_collections.ConfigDict(dict(alpha=0.01, beta=0.01))
  config.eval_batch_size = 512          # a multiple of 8, 16, ... devices: every preset runs on 8-accelerator hosts

  if config.preset == 'smoke':
    config.seeds = 2
    config.labels_per_class = [1, 10]
    config.methods = ['scratch', 'linear_probe', 'finetune']
    config.pretrain.steps = 20
    config.finetune.steps = 10
    config.checkpoint_every = 10
    config.chunk_steps = 2      # compile grows with the unrolled steps: a cold run 50 -> 29 s (tests' flags)
    config.progress = False
  elif config.preset == 'paper':
    config.model = 'resnet20_cifar'
    config.image_size = 32
    config.fit_size = 32
    config.source = 'cifar100'
    config.targets = ['cifar10', 'svhn_cropped']
    config.labels_per_class = [10, 100, 0]
    config.pretrain = ml_collections.ConfigDict(dict(steps=30000, batch_size=128, learning_rate=1e-3))
    config.finetune = ml_collections.ConfigDict(dict(steps=3000, batch_size=128, learning_rate=1e-3,
                                                     linear_probe_learning_rate=1e-2, backbone_lr_scale=1.0))
    config.checkpoint_every = 1000
    config.chunk_steps = 10
  return config
