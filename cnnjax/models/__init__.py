"""Functional Flax NNX models, registered by name.

Classifiers map NHWC images to logits and split into `backbone` (a list of `stages`) and a
linear `head`, so transfer methods can freeze or retrain parts by parameter path. Every
module in this package registers its models on import; `SPECS[name]` says how to call each.
`python -m cnnjax.models` writes the table of parameters and FLOPs to results/models.md.
"""

import importlib
import pkgutil

from cnnjax.models.registry import MODELS, SPECS, Spec, build, check_classifier, count_params, trainable_paths

for _module in pkgutil.iter_modules(__path__):
  if _module.name not in ('registry', '__main__'):
    importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['MODELS', 'SPECS', 'Spec', 'build', 'check_classifier', 'count_params', 'trainable_paths']
