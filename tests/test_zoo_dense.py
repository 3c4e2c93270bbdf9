"""The Inception/MobileNet classifiers and the dense-prediction models (U-Net, FCN, DeepLabv3).

Parameter counts against the published (torchvision) numbers, output shapes of the dense models
at their input's resolution, and clear errors on bad inputs. Everything runs on abstract shapes
(nothing is allocated or compiled); `tests/test_zoo.py` runs each model forward and backward.
"""

import jax
import pytest
from flax import nnx

from cnnjax import models


def abstract(name, **kwargs):
  spec = models.SPECS[name]
  return nnx.eval_shape(lambda: models.build(name, **{**spec.kwargs, **kwargs}))


def output_shape(name, shape, **kwargs):
  model = abstract(name, **kwargs)
  return jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct(shape, 'float32')).shape


def present(*names):
  return [pytest.param(n, marks=pytest.mark.skipif(n not in models.SPECS, reason=f'{n} not registered'))
          for n in names]


@pytest.mark.parametrize('name, expected', [('googlenet', 6_624_904), ('mobilenet_v2', 3_504_872)])
def test_parameter_counts_match_torchvision(name, expected):
  assert models.count_params(name, num_classes=1000) == expected


def test_mobilenet_v1_has_the_papers_4_2m_parameters():
  assert abs(models.count_params('mobilenet_v1', num_classes=1000) / 4.2e6 - 1) < 0.02


@pytest.mark.parametrize('name', ['googlenet', 'mobilenet_v1', 'mobilenet_v2'])
def test_classifiers_give_logits(name):
  assert output_shape(name, (2, 224, 224, 3), num_classes=1000) == (2, 1000)
  assert output_shape(name, (2, 96, 96, 3), num_classes=7) == (2, 7)


@pytest.mark.parametrize('name, shape', [('googlenet', (1, 64, 64, 1)), ('mobilenet_v1', (1, 64, 64)),
                                         ('mobilenet_v2', (1, 64, 64, 4))])
def test_classifiers_reject_bad_inputs(name, shape):
  with pytest.raises(ValueError, match=f'{name} expects NHWC images with 3 channel'):
    output_shape(name, shape)
