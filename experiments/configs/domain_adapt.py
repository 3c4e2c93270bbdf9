"""Unsupervised domain adaptation: DANN, Deep CORAL, DAN (MMD), CDAN and CDAN+E against source-only.

  python -m experiments.domain_adapt --config=experiments/configs/domain_adapt.py[:smoke|default|paper]
  ./run.sh domain_adapt --config.seeds=5

Table (results/domain_adapt/<preset>/table.md): rows = methods (source only, the five adaptation
methods, a target oracle trained on labelled target data), columns = target test accuracy (%) of
each shift and the source test accuracy, mean ± std over seeds; the model of each seed is the
evaluation point with the best source-validation accuracy (no target label is read for any choice).
Figure: PCA of source and target features, before (source only) and after adaptation.
`default` (embedded data; 4 min 50 s measured cold on 2 idle CPU cores):
syn_digits -> mnist_5k, mnist_5k -> mnist_m_5k, mnist_5k -> sklearn_digits. `paper`: svhn_cropped -> mnist (DANN's Table 2) and RotatedMNIST
(mnist, rotations 0-60 -> 75; DomainBed) with the published numbers beside ours (TFDS catalog;
prepare them first with `python -m cnnjax.data.prepare NAME`).
"""

import ml_collections

from cnnjax.config import base_config


def get_config(preset=''):
  config = base_config('domain_adapt', preset)
  config.model = 'digit_cnn'
  config.model_kwargs = ml_collections.ConfigDict({'width': 16})   # builder arguments (digit_cnn: conv widths)
  config.image_size = 28      # every domain is brought to image_size x image_size x channels (0: keep)
  config.fit_size = 20        # other-size images: resized to this box, centred (MNIST's layout)
  config.channels = 3         # grey digits are repeated to RGB, as DANN feeds MNIST to an RGB network
  # Tuples: config_flags overrides tuple fields (--config.shifts="('mnist_5k->mnist_m_5k',)").
  config.shifts = ('syn_digits->mnist_5k', 'mnist_5k->mnist_m_5k', 'mnist_5k->sklearn_digits')
  config.methods = ('source_only', 'dann', 'coral', 'mmd', 'cdan', 'cdan_e', 'target_oracle')
  # One optimizer for every method, the DANN paper's: SGD, momentum 0.9, mu0 / (1 + alpha p)^beta.
  config.train = ml_collections.ConfigDict(dict(
      steps=200, batch_size=32, learning_rate=0.01, momentum=0.9, lr_alpha=10.0, lr_beta=0.75))
  # The papers' settings, fixed in advance: DANN's gamma=10 schedule (also CDAN's), unit weights for
  # the CORAL and MMD terms (DomainBed's defaults), DAN's 5 Gaussian kernels spread by powers of 2.
  config.adaptation = ml_collections.ConfigDict(dict(
      gamma=10.0, coral_weight=1.0, mmd_weight=1.0, mmd_kernels=5, mmd_multiplier=2.0, discriminator_width=256))
  config.validation_fraction = 0.1   # of the training domain's labelled split: model selection only
  config.eval_every = 50             # steps between evaluations; model selection picks one of them
  config.eval_batch_size = 512
  config.figure_method = 'dann'      # the "after adaptation" panels of the feature figure
  config.checkpoint_every = 0
  # Two steps per compiled call: each method's program compiles in seconds (five unrolled steps took
  # 3x longer to compile for a step time within noise on 2 loaded cores).
  config.chunk_steps = 2

  if config.preset == 'smoke':
    config.seeds = 2
    config.shifts = ['mnist_5k->mnist_m_5k', 'mnist_5k->sklearn_digits']
    config.methods = ['source_only', 'cdan_e']
    config.figure_method = 'cdan_e'
    config.train.steps = 8
    config.train.batch_size = 16
    config.eval_every = 4
    config.chunk_steps = 1
    config.progress = False
  elif config.preset == 'paper':
    config.image_size = 32
    config.model_kwargs = ml_collections.ConfigDict({'width': 64, 'size': 32})
    config.fit_size = 32
    config.shifts = ['svhn_cropped->mnist', 'mnist@0,15,30,45,60->mnist@75']
    config.train.steps = 20000
    config.train.batch_size = 128
    config.adaptation.discriminator_width = 1024
    config.eval_every = 2000
    config.checkpoint_every = 1000
    config.chunk_steps = 10
  return config
