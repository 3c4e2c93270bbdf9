"""Functional Flax NNX models, registered by name.

Every model maps NHWC images to logits, and splits into `backbone` (a list of
`stages`) and a linear `head`, so transfer methods can freeze or retrain parts
by parameter path.
"""

from cnnjax.models.registry import MODELS, build, trainable_paths
from cnnjax.models import digit_cnn, cifar_resnet  # noqa: F401  (registers the models)

__all__ = ['MODELS', 'build', 'trainable_paths']
