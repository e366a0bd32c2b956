"""qcsbm_jax.fid.preprocess: TF1's bilinear resize against TensorFlow itself, scaling, and
the checks of the images users hand in."""

import jax.numpy as jnp
import numpy as np
import pytest

from qcsbm_jax import plotting
from qcsbm_jax.fid import preprocess


@pytest.fixture(scope="module")
def tf():
    tensorflow = pytest.importorskip("tensorflow")
    tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 28, 17, 1), (1, 299, 299, 3),
                                   (1, 512, 400, 3), (1, 1, 1, 3), (1, 300, 7, 2)])
def test_resize_is_tensorflows_legacy_bilinear(tf, shape):
    """Up, down, identity, one pixel, mixed: tf.compat.v1.image.resize_bilinear with
    align_corners=False, half_pixel_centers=False (the ResizeBilinear op of TF's FID graph)."""
    x = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.float32)
    want = tf.raw_ops.ResizeBilinear(images=x, size=(299, 299), align_corners=False,
                                     half_pixel_centers=False).numpy()
    got = np.asarray(preprocess.resize_bilinear_tf1(jnp.asarray(x)))
    assert got.shape == want.shape == (shape[0], 299, 299, shape[3])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # 0..255 values


def test_resize_taps_are_legacy_not_half_pixel():
    lower, upper, lerp = preprocess.legacy_bilinear_taps(32, 299)
    assert lower[0] == 0 and lerp[0] == 0  # half-pixel centres would start at -0.45
    assert upper[-1] == 31 and lower[-1] == 31  # 298 * 32 / 299 = 31.89: clamped
    np.testing.assert_allclose(lower + lerp, np.arange(299) * np.float32(32 / 299), rtol=1e-6)
    lower, upper, lerp = preprocess.legacy_bilinear_taps(598, 299)  # exactly every 2nd pixel
    np.testing.assert_array_equal(lower, 2 * np.arange(299))
    assert not lerp.any()


def test_inception_input_scales_and_repeats_grey():
    grey = np.array([0, 128, 255, 64], np.uint8).reshape(1, 2, 2, 1)
    x = np.asarray(preprocess.inception_input(jnp.asarray(grey)))
    assert x.shape == (1, 299, 299, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    assert x[0, 0, 0, 0] == -1.0 and x.max() <= 127 / 128
    corner = preprocess.inception_input(jnp.full((1, 5, 5, 3), 128, jnp.uint8))
    assert not np.asarray(corner).any()


def test_to_pixels_passes_uint8_and_rounds_floats_as_saved_samples():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    assert preprocess.to_pixels(pixels) is pixels
    np.testing.assert_array_equal(preprocess.to_pixels(pixels / 255.0, (0, 1)), pixels)
    np.testing.assert_array_equal(
        preprocess.to_pixels((pixels / 127.5 - 1).astype(np.float32), (-1, 1)), pixels)
    overshoot = np.float32(pixels / 255.0 * 1.2 - 0.1)  # samplers stray a little
    np.testing.assert_array_equal(preprocess.to_pixels(overshoot, (0, 1)),
                                  plotting.to_pixels(overshoot, (0, 1)))


@pytest.mark.parametrize("images, value_range, message", [
    (np.zeros((8, 8, 3), np.uint8), None, r"\[N, H, W, C\]"),
    (np.zeros((2, 8, 8, 2), np.uint8), None, "C = 1 or 3"),
    (np.zeros((0, 8, 8, 3), np.uint8), None, "N, H, W >= 1"),
    (np.zeros((2, 8, 8, 3), np.int64), None, r"astype\(np.uint8\)"),
    (np.zeros((2, 8, 8, 3), np.float32), None, "need value_range"),
    (np.zeros((2, 8, 8, 3), np.uint8), (0, 1), "leave it out"),
    (np.full((2, 8, 8, 3), 200.0), (0, 1), r"span \[200, 200\], far outside"),
    (np.full((2, 8, 8, 3), -1.0), (0, 1), "far outside"),
    (np.array([0, np.nan])[:, None, None, None] * np.ones((2, 4, 4, 1)), (0, 1),
     "1 of 2 images hold NaN"),
])
def test_bad_images_get_one_clear_error(images, value_range, message):
    with pytest.raises(ValueError, match=message):
        preprocess.to_pixels(images, value_range)
