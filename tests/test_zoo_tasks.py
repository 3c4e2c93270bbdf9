"""Task-family CNNs of the model zoo: super-resolution, registration, text, ConvLSTM, SiamFC, fusion.

The generic forward/backward test of every registered model is in test_zoo.py; these check
what is particular to each family: published parameter counts, output shapes and the exact
identities of warps, sub-pixel shuffles and cross-correlation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnjax import models


def small(name, **kwargs):
  spec = models.SPECS[name]
  return models.build(name, **{**spec.kwargs, **spec.small_kwargs, **kwargs})


def run_small(name, *inputs, **kwargs):
  """Build the small model and call it in one compiled program (eager initialisation is slow on CPU)."""
  return jax.jit(lambda *x: small(name, **kwargs)(*x))(*inputs)


def images(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape)


# Super-resolution

def test_srcnn_has_the_papers_8129_parameters():
  assert models.count_params('srcnn') == 9 * 9 * 64 + 64 + 64 * 32 + 32 + 5 * 5 * 32 + 1 == 8129


def test_edsr_parameter_counts_match_the_paper():
  assert round(models.count_params('edsr_baseline', upscale=4) / 1e6, 1) == 1.5
  assert round(models.count_params('edsr', upscale=4) / 1e6) == 43


@pytest.mark.parametrize('name,upscale', [('srcnn', 2), ('srcnn', 3), ('espcn', 2), ('espcn', 4),
                                          ('edsr_baseline', 2), ('edsr_baseline', 3), ('edsr', 4)])
def test_super_resolution_upscales(name, upscale):
  channels = models.SPECS[name].small_inputs[0][-1]
  out = jax.eval_shape(lambda x: small(name, upscale=upscale)(x), jax.ShapeDtypeStruct((2, 6, 5, channels), jnp.float32))
  assert out.shape == (2, 6 * upscale, 5 * upscale, channels)


def test_pixel_shuffle_places_subpixels():
  from cnnjax.models.super_resolution import pixel_shuffle
  r, c = 2, 3
  x = jnp.arange(1 * 2 * 2 * c * r * r).reshape(1, 2, 2, c * r * r)
  y = pixel_shuffle(x, r)
  for h, w, i, j, k in np.ndindex(2, 2, r, r, c):
    assert y[0, h * r + i, w * r + j, k] == x[0, h, w, k * r * r + i * r + j]


def test_super_resolution_rejects_wrong_channels():
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(lambda x: small('edsr_baseline')(x), jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  with pytest.raises(ValueError, match='upscale'):
    jax.eval_shape(lambda: small('edsr', upscale=5))


# Registration

@pytest.mark.parametrize('shape', [(1, 8, 9, 2), (2, 5, 6, 7, 1)])
def test_zero_flow_warps_to_the_identity(shape):
  from cnnjax.models.registration import warp
  image = images(shape)
  flow = jnp.zeros((*shape[:-1], len(shape) - 2))
  np.testing.assert_allclose(warp(image, flow), image, atol=1e-6)


@pytest.mark.parametrize('shape,shift', [((1, 8, 9, 2), (2, -1)), ((2, 5, 6, 7, 1), (1, 0, -2))])
def test_constant_integer_flow_shifts_the_image(shape, shift):
  from cnnjax.models.registration import warp
  image = images(shape)
  flow = jnp.broadcast_to(jnp.array(shift, jnp.float32), (*shape[:-1], len(shift)))
  warped = warp(image, flow)
  # warped[x] = image[x + shift] wherever x + shift lies inside the image
  inside = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape[1:-1]))
  source = tuple(slice(max(0, s), n + min(0, s)) for s, n in zip(shift, shape[1:-1]))
  np.testing.assert_allclose(warped[(slice(None), *inside)], image[(slice(None), *source)], atol=1e-6)


def test_half_pixel_flow_interpolates_linearly():
  from cnnjax.models.registration import warp
  image = jnp.arange(6.0).reshape(1, 1, 6, 1) * jnp.ones((1, 3, 1, 1))
  warped = warp(image, jnp.zeros((1, 3, 6, 2)).at[..., 1].set(0.5))
  np.testing.assert_allclose(warped[0, :, :5, 0], jnp.broadcast_to(jnp.arange(5.0) + 0.5, (3, 5)), atol=1e-6)


@pytest.mark.parametrize('name', ['voxelmorph2d', 'voxelmorph3d'])
def test_voxelmorph_returns_warped_image_and_flow(name):
  shape = (2, *models.SPECS[name].small_inputs[0])
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  warped, flow = jax.eval_shape(lambda m, f: small(name)(m, f), x, x)
  assert warped.shape == shape and flow.shape == (*shape[:-1], len(shape) - 2)


def test_voxelmorph_starts_near_the_identity():
  moving, fixed = images((1, 4, 4, 1), 0), images((1, 4, 4, 1), 1)
  warped, flow = run_small('voxelmorph2d', moving, fixed, enc=(2,), dec=(2, 2, 2, 2))
  assert float(jnp.abs(flow).max()) < 1e-2
  np.testing.assert_allclose(warped, moving, atol=1e-2)


def test_voxelmorph_rejects_bad_inputs():
  two_d = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
  with pytest.raises(ValueError, match='spatial'):
    jax.eval_shape(lambda m, f: small('voxelmorph3d')(m, f), two_d, two_d)
  with pytest.raises(ValueError, match='divisible'):
    odd = jax.ShapeDtypeStruct((1, 6, 8, 1), jnp.float32)
    jax.eval_shape(lambda m, f: small('voxelmorph2d')(m, f), odd, odd)


# Text

def test_text_cnn_parameter_counts():
  convs = 300 * 100 * (3 + 4 + 5) + 3 * 100
  assert models.count_params('kim_cnn', **models.SPECS['kim_cnn'].kwargs) == 18765 * 300 + convs + 300 * 2 + 2
  assert round(models.count_params('char_cnn', **models.SPECS['char_cnn'].kwargs) / 1e6, 1) == 11.3


@pytest.mark.parametrize('name', ['kim_cnn', 'char_cnn'])
def test_text_cnns_classify_int_tokens(name):
  for dtype in (jnp.int32, jnp.uint8, jnp.int64 if jax.config.jax_enable_x64 else jnp.int16):
    tokens = jax.ShapeDtypeStruct((3, *models.SPECS[name].small_inputs[0]), dtype)
    logits = jax.eval_shape(lambda x: small(name)(x), tokens)
    assert logits.shape == (3, models.SPECS[name].kwargs['num_classes']) and logits.dtype == jnp.float32


@pytest.mark.parametrize('name', ['kim_cnn', 'char_cnn'])
def test_text_cnns_reject_bad_inputs(name):
  length = models.SPECS[name].small_inputs[0][0]
  for bad in [jax.ShapeDtypeStruct((2, length, 1), jnp.int32), jax.ShapeDtypeStruct((2, length), jnp.float32)]:
    with pytest.raises(ValueError, match='integer token ids'):
      jax.eval_shape(lambda x: small(name)(x), bad)


def test_char_cnn_rejects_other_lengths():
  with pytest.raises(ValueError, match='built for length'):
    jax.eval_shape(lambda x: small('char_cnn')(x), jax.ShapeDtypeStruct((2, 100), jnp.int32))


# ConvLSTM

def test_convlstm_hidden_states_carry_the_past_and_not_the_future():
  x = images((2, 4, 8, 8, 2))
  first, last = x.at[:, 0].set(0.0), x.at[:, -1].set(0.0)  # only frame 0, or only the last frame, differs
  out, out_first, out_last = jax.jit(lambda *xs: tuple(map(small('convlstm'), xs)))(x, first, last)
  assert out.shape == (2, 4, 8, 8, 8)
  assert float(jnp.abs(out[:, -1] - out_first[:, -1]).max()) > 1e-6  # the state carried frame 0 to the end
  np.testing.assert_allclose(out[:, :-1], out_last[:, :-1], atol=1e-6)  # causal


def test_convlstm_rejects_frames_of_another_shape():
  with pytest.raises(ValueError, match='sequences'):
    jax.eval_shape(lambda x: small('convlstm')(x), jax.ShapeDtypeStruct((2, 8, 8, 2), jnp.float32))


# SiamFC

def test_siamfc_scores_17x17_at_127_and_255():
  spec = models.SPECS['siamfc']
  score = jax.eval_shape(lambda z, x: models.build('siamfc')(z, x), *spec.example(2, small=False))
  assert score.shape == (2, 17, 17, 1)
  assert round(models.count_params('siamfc') / 1e6, 1) == 2.3


def test_cross_correlation_is_per_example_and_matches_a_loop():
  from cnnjax.models.siamese import cross_correlate
  z, x = images((2, 3, 2, 4), 0), images((2, 6, 5, 4), 1)
  out = cross_correlate(z, x)
  assert out.shape == (2, 4, 4, 1)
  z, x, out = np.asarray(z), np.asarray(x), np.asarray(out)
  for b, i, j in np.ndindex(2, 4, 4):
    np.testing.assert_allclose(out[b, i, j, 0], jnp.sum(z[b] * x[b, i:i + 3, j:j + 2]), rtol=1e-5)


def test_siamfc_exemplar_cut_from_the_search_image_scores_its_own_norm_there():
  """With batch norm in inference mode the embedding is translation equivariant with stride 8:
  an exemplar cut at (8a, 8b) embeds to the search embedding at (a, b), so the score there is
  1e-3 |phi(z)|^2 + b (the autocorrelation), and shifting the search image by 8 shifts the map by 1."""
  search = images((1, 71, 71, 3))
  exemplar = search[:, 16:47, 8:39]  # (a, b) = (2, 1)

  @jax.jit
  def run(exemplar, search):
    model = small('siamfc')
    model.eval()
    z = model.embed(exemplar)
    return model(exemplar, search[:, :63, :63]), model(exemplar, search[:, 8:, 8:]), z

  score, shifted, z = run(exemplar, search)
  assert score.shape == (1, 5, 5, 1)
  np.testing.assert_allclose(score[0, 2, 1, 0], 1e-3 * jnp.sum(z * z), rtol=1e-4)
  np.testing.assert_allclose(shifted[:, :4, :4], score[:, 1:, 1:], rtol=1e-4, atol=1e-7)


def test_siamfc_rejects_bad_images():
  spec = models.SPECS['siamfc']
  z, x = spec.example(1)
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(lambda z, x: small('siamfc')(z, x), z, jax.ShapeDtypeStruct((63, 63, 3), jnp.float32))
  with pytest.raises(ValueError, match='larger'):
    jax.eval_shape(lambda z, x: small('siamfc')(z, x), x, z)


# Fusion

FUSIONS = ['fusion_early', 'fusion_late', 'fusion_intermediate', 'fusion_gated']


@pytest.mark.parametrize('name', FUSIONS)
def test_fusion_heads_take_two_modalities(name):
  rgb, depth = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32), jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  assert jax.eval_shape(lambda a, b: small(name)(a, b), rgb, depth).shape == (2, 10)
  with pytest.raises(ValueError, match='channel'):
    jax.eval_shape(lambda a, b: small(name)(a, b), depth, rgb)
  with pytest.raises(ValueError, match='same batch and size'):
    jax.eval_shape(lambda a, b: small(name)(a, b), rgb, jax.ShapeDtypeStruct((2, 4, 4, 1), jnp.float32))


def test_fusion_parameters_grow_from_early_to_gated():
  counts = [models.count_params(name, num_classes=10) for name in FUSIONS]
  assert counts[0] < counts[2] < counts[1] < counts[3]


def test_gated_multimodal_unit_is_a_convex_combination():
  from cnnjax.models.fusion import GatedMultimodalUnit
  gmu = GatedMultimodalUnit(6, 5, rngs=nnx.Rngs(0), dtype=jnp.float32)
  x_a, x_b = images((4, 6), 0), -images((4, 6), 1)
  h = gmu(x_a, x_b)
  h_a, h_b = jnp.tanh(gmu.proj_a(x_a)), jnp.tanh(gmu.proj_b(x_b))
  assert bool(jnp.all((h >= jnp.minimum(h_a, h_b) - 1e-6) & (h <= jnp.maximum(h_a, h_b) + 1e-6)))
