"""Images to Inception inputs, the way TF's FID graph prepares them.

Protocol (docs/fid.md): 8-bit pixels [N, H, W, C], any H and W, C = 1 (repeated to 3
channels) or 3, are resized to 299 x 299 by TensorFlow 1's bilinear resize
(`tf.compat.v1.image.resize_bilinear` with align_corners=False and half_pixel_centers=False:
source coordinate i * in / out, no antialiasing) on the values 0..255 in float32, then
scaled to (x - 128) / 128. Float images in a stated value range are first turned into the
8-bit pixels a saved sample would hold (`plotting.to_pixels`: rounded, clipped), so a
model's samples and their saved PNG/npz give the same features.
"""

import jax
import jax.numpy as jnp
import numpy as np

from qcsbm_jax import plotting
from qcsbm_jax.fid.inception import IMAGE_SIZE

RESIZE = "tf1-bilinear-299"  # Recorded in stats files and metrics (docs/fid.md).
# Float images may stray this fraction of the range's width beyond it (sampler overshoot);
# further out they are taken for a wrong value_range.
RANGE_SLACK = 0.5


def legacy_bilinear_taps(in_size: int, out_size: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1's bilinear interpolation along one axis: (lower, upper, lerp) [out_size] each.

    Source coordinate s = float32(i) * float32(in_size / out_size); lower = floor(s),
    upper = min(ceil(s), in_size - 1), lerp = s - floor(s), all in float32 as TF computes.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(source)
    upper = np.minimum(np.ceil(source), in_size - 1)
    return lower.astype(np.int32), upper.astype(np.int32), (source - lower).astype(np.float32)


def resize_bilinear_tf1(x: jax.Array, size: int = IMAGE_SIZE) -> jax.Array:
    """x [B, H, W, C] float32 -> [B, size, size, C], TF1's legacy bilinear resize.

    As TF: interpolate along the width within the two source rows, then between them:
    top + (bottom - top) * lerp_y with top = left + (right - left) * lerp_x.
    """
    (y0, y1, wy), (x0, x1, wx) = (legacy_bilinear_taps(n, size) for n in x.shape[1:3])
    left, right = x[:, :, x0], x[:, :, x1]
    rows = left + (right - left) * wx[:, None]
    top, bottom = rows[:, y0], rows[:, y1]
    return top + (bottom - top) * wy[:, None, None]


def inception_input(pixels: jax.Array) -> jax.Array:
    """uint8 pixels [B, H, W, C], C = 1 or 3 -> float32 [B, 299, 299, 3] in [-1, 1)."""
    x = pixels.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return (resize_bilinear_tf1(x) - 128.0) / 128.0


def to_pixels(images, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Checked 8-bit pixels uint8 [N, H, W, C] (C = 1 or 3) from images on the host.

    uint8 images pass as they are (value_range must be None). Float images need
    value_range = (lo, hi), the range of the data (e.g. (0, 1) or (-1, 1)); they become
    round(255 (x - lo) / (hi - lo)) clipped to 0..255. Raises ValueError, saying what to
    change, for another dtype or shape, non-finite values, or floats more than half the
    range's width outside it (a wrong value_range).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape, default=0) < 1:
        raise ValueError(f"FID needs images [N, H, W, C] with C = 1 or 3 and N, H, W >= 1; got "
                         f"shape {images.shape}. Add a channel axis to grey images "
                         "(images[..., None]).")
    if images.dtype == np.uint8:
        if value_range is not None:
            raise ValueError(f"uint8 images are 8-bit pixels 0..255; value_range={value_range} "
                             "applies to float images only: leave it out.")
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"FID takes uint8 pixels or float images with a value_range; got "
                         f"{images.dtype}. Convert 8-bit pixels with .astype(np.uint8).")
    if value_range is None:
        raise ValueError("Float images need value_range=(lo, hi), the range of the data, "
                         "e.g. (0, 1) or (-1, 1); or pass uint8 pixels.")
    lo, hi = value_range
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    if not finite.all():
        raise ValueError(f"{int((~finite).sum())} of {len(images)} images hold NaN or inf "
                         f"(e.g. image {int(np.argmin(finite))}); FID of diverged samples "
                         "is meaningless. Drop or fix them first.")
    slack = RANGE_SLACK * (hi - lo)
    low, high = float(images.min()), float(images.max())
    if low < lo - slack or high > hi + slack:
        raise ValueError(f"The images span [{low:.4g}, {high:.4g}], far outside value_range="
                         f"{value_range} (more than {RANGE_SLACK} of its width beyond it); "
                         "pass the range the data are in, e.g. (0, 1), (-1, 1) or (0, 255).")
    return plotting.to_pixels(images, (lo, hi))
