"""The Inception/MobileNet classifiers and the dense-prediction models (U-Net, FCN, DeepLabv3).

Parameter counts against the published (torchvision) numbers, output shapes of the dense models
at their input's resolution, and clear errors on bad inputs. Everything runs on abstract shapes
(nothing is allocated or compiled); `tests/test_zoo.py` runs each model forward and backward.
"""

import re

import jax
import pytest
from flax import nnx

from cnnjax import models



def abstract(name, **kwargs):
  spec = models.SPECS[name]
  return nnx.eval_shape(lambda: models.build(name, **{**spec.kwargs, **kwargs}))


def small(name):
  """The fast-test build arguments (narrow and shallow), without its number of classes."""
  return {k: v for k, v in models.SPECS[name].small_kwargs.items() if k != 'num_classes'}


def output_shape(name, shape, **kwargs):
  model = abstract(name, **kwargs)
  return jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct(shape, 'float32')).shape


@pytest.mark.parametrize('name, expected', [('googlenet', 6_624_904), ('mobilenet_v2', 3_504_872)])
def test_parameter_counts_match_torchvision(name, expected):
  assert models.count_params(name, num_classes=1000) == expected


def test_mobilenet_v2_repeats_set_the_blocks_of_each_row():
  model = abstract('mobilenet_v2', num_classes=10, repeats=(1, 2, 1, 1, 1, 1, 1))
  blocks = [stage.blocks for stage in model.backbone.stages[:-1]]
  assert [len(b) for b in blocks] == [1, 2, 1, 1, 1, 1, 1]
  assert [block.residual for b in blocks for block in b] == [False, False, True, False, False, False, False, False]
  for wrong in ((3, 4), ()):
    with pytest.raises(ValueError, match=rf'7 repeats of at least 1.*{re.escape(str(wrong))}'):
      abstract('mobilenet_v2', num_classes=10, repeats=wrong)


def test_mobilenet_v1_has_the_papers_4_2m_parameters():
  assert abs(models.count_params('mobilenet_v1', num_classes=1000) / 4.2e6 - 1) < 0.02


@pytest.mark.parametrize('name, shape', [('googlenet', (1, 64, 64, 1)), ('mobilenet_v1', (1, 64, 64)),
                                         ('mobilenet_v2', (1, 64, 64, 4))])
def test_classifiers_reject_bad_inputs(name, shape):
  with pytest.raises(ValueError, match=f'{name} expects NHWC images with 3 channel'):
    output_shape(name, shape)


# Dense prediction ---------------------------------------------------------------------------------

@pytest.mark.parametrize('name, expected', [('fcn_resnet50', 32_957_013), ('deeplabv3', 39_638_869)])
def test_segmentation_counts_match_torchvision_without_auxiliary_heads(name, expected):
  assert models.count_params(name, num_classes=21) == expected


def test_unet_counts():
  assert models.count_params('unet', num_classes=2) == 31_030_658
  assert abs(models.count_params('unet3d', num_classes=3) / 19_069_955 - 1) < 0.001  # Cicek et al.


@pytest.mark.parametrize('name, shape', [('unet', (2, 48, 64, 1)), ('fcn_resnet50', (2, 72, 40, 3)),
                                         ('deeplabv3', (2, 72, 40, 3))])
def test_dense_models_predict_at_input_resolution(name, shape):
  assert output_shape(name, shape, num_classes=5, **small(name)) == (*shape[:3], 5)


def test_deeplabv3_at_output_stride_8():
  assert output_shape('deeplabv3', (1, 64, 64, 3), output_stride=8, **small('deeplabv3')) == (1, 64, 64, 21)
  with pytest.raises(ValueError, match='output_stride must be 8 or 16'):
    abstract('deeplabv3', output_stride=32)


def test_unet3d_segments_volumes():
  assert output_shape('unet3d', (2, 16, 24, 32, 1), num_classes=4, width=4) == (2, 16, 24, 32, 4)
  assert output_shape('unet3d', (1, 8, 8, 8, 2), channels=2, width=4) == (1, 8, 8, 8, 3)


@pytest.mark.parametrize('name, shape, message', [
    ('unet', (1, 32, 32, 3), 'unet expects NHWC images with 1 channel'),
    ('unet', (1, 32, 32), 'unet expects NHWC images with 1 channel'),
    ('unet', (1, 40, 32, 1), 'unet needs spatial sizes divisible by 16'),
    ('unet3d', (1, 16, 16, 1), 'unet3d expects NDHWC volumes with 1 channel'),
    ('unet3d', (1, 12, 16, 16, 1), 'unet3d needs spatial sizes divisible by 8'),
    ('fcn_resnet50', (1, 32, 32, 1), 'fcn_resnet50 expects NHWC images with 3 channel'),
    ('deeplabv3', (1, 32, 32, 3, 1), 'deeplabv3 expects NHWC images with 3 channel'),
])
def test_dense_models_reject_bad_inputs(name, shape, message):
  with pytest.raises(ValueError, match=message):
    output_shape(name, shape, **small(name))
