"""PNG outputs: valid files of the documented size and mode; exact pixels for image grids."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qcsbm_jax import plotting


def _open_png(path: str) -> Image.Image:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = Image.open(path)
    image.load()
    return image


def _non_white_fraction(image: Image.Image) -> float:
    return float(np.mean(np.asarray(image.convert("L")) < 250))


def test_scatter_png_single_set(tmp_path):
    points = np.random.default_rng(0).standard_normal((2000, 2))
    path = str(tmp_path / "new" / "dir" / "scatter.png")
    assert plotting.scatter_png(path, points, title="normal", lim=4.0) == path
    image = _open_png(path)
    assert image.format == "PNG" and image.size == (400, 400) and image.mode == "RGBA"
    assert 0.01 < _non_white_fraction(image) < 0.5


def test_scatter_png_dict_side_by_side(tmp_path):
    rng = np.random.default_rng(1)
    sets = {"data": rng.standard_normal((500, 2)), "samples": rng.uniform(-2, 2, (300, 2))}
    path = plotting.scatter_png(str(tmp_path / "pair.png"), sets)
    assert _open_png(path).size == (800, 400)


def test_scatter_png_leaves_out_failed_rows(tmp_path):
    # Failed ODE solves give NaN rows; they must not break the axis limits.
    points = np.random.default_rng(2).standard_normal((300, 2))
    points[::3] = np.nan
    path = plotting.scatter_png(str(tmp_path / "nan.png"), {"data": points, "failed": points[::3]})
    image = _open_png(path)
    assert image.size == (800, 400) and _non_white_fraction(image) > 0.01


@pytest.mark.parametrize("logx,logy", [(False, False), (True, True)])
def test_curves_png(tmp_path, logx, logy):
    x = np.geomspace(1e-3, 1.0, 10)
    curves = {"asym": x**2, "nasym": np.sqrt(x)}
    path = plotting.curves_png(str(tmp_path / "c" / "curves.png"), x, curves, xlabel="t",
                               ylabel="value", logx=logx, logy=logy, title="curves")
    image = _open_png(path)
    assert image.size == (600, 400) and image.mode == "RGBA"
    assert _non_white_fraction(image) > 0.01


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_image_grid_png_pixels(tmp_path, channels, mode):
    n, h, w, pad = 5, 4, 6, 2
    levels = 10 + 50 * np.arange(n)  # 8-bit levels, away from rounding ties
    values = levels / 255
    images = np.ones((n, h, w, channels)) * values[:, None, None, None]
    images[0, 0, 0] = 2.0  # clipped to 255
    images[1, 0, 0] = -1.0  # clipped to 0
    path = plotting.image_grid_png(str(tmp_path / "g" / "grid.png"), images, ncols=3)
    image = _open_png(path)
    assert image.mode == mode
    assert image.size == (3 * (w + pad) + pad, 2 * (h + pad) + pad)
    pixels = np.asarray(image).reshape(image.size[1], image.size[0], channels)
    for i in range(n):
        top, left = pad + (i // 3) * (h + pad), pad + (i % 3) * (w + pad)
        tile = pixels[top:top + h, left:left + w].astype(int)
        expected = np.full((h, w, channels), levels[i])
        expected[0, 0] = {0: 255, 1: 0}.get(i, expected[0, 0, 0])
        np.testing.assert_array_equal(tile, expected)
    border = np.ones(pixels.shape[:2], bool)
    for i in range(6):  # the sixth cell stays empty
        top, left = pad + (i // 3) * (h + pad), pad + (i % 3) * (w + pad)
        border[top:top + h, left:left + w] = i == 5
    assert np.all(pixels[border] == 0)


def test_image_grid_png_default_columns_and_bad_shape(tmp_path):
    path = plotting.image_grid_png(str(tmp_path / "g.png"), np.zeros((10, 8, 8, 3)))
    assert _open_png(path).size == (4 * 10 + 2, 3 * 10 + 2)  # ceil(sqrt(10)) = 4 columns
    with pytest.raises(ValueError, match="C = 1 or 3"):
        plotting.image_grid_png(str(tmp_path / "bad.png"), np.zeros((2, 8, 8, 4)))
    with pytest.raises(ValueError, match="N >= 1"):
        plotting.image_grid_png(str(tmp_path / "none.png"), np.zeros((0, 8, 8, 3)))


def test_to_pixels_and_centered_grid(tmp_path):
    levels = np.array([0, 1, 127, 128, 254, 255])
    centered = 2 * levels / 255 - 1
    np.testing.assert_array_equal(plotting.to_pixels(centered, (-1.0, 1.0)), levels)
    np.testing.assert_array_equal(plotting.to_pixels(levels / 255), levels)
    np.testing.assert_array_equal(plotting.to_pixels([-3.0, 3.0, np.nan], (-1.0, 1.0)),
                                  [0, 255, 0])
    with pytest.raises(ValueError, match="hi > lo"):
        plotting.to_pixels(levels, (1.0, 1.0))
    images = centered.reshape(6, 1, 1, 1) * np.ones((6, 3, 2, 1))
    path = plotting.image_grid_png(str(tmp_path / "c.png"), images, ncols=6, padding=1,
                                   value_range=(-1.0, 1.0))
    pixels = np.asarray(_open_png(path))
    np.testing.assert_array_equal(pixels[1, 1::3], levels)


def test_no_pyplot_state(tmp_path):
    """Plotting never imports pyplot, so users' backends and figures are untouched."""
    code = (
        "import sys, numpy as np\n"
        "from qcsbm_jax import plotting\n"
        f"plotting.scatter_png({str(tmp_path / 'a.png')!r}, np.zeros((3, 2)))\n"
        f"plotting.curves_png({str(tmp_path / 'b.png')!r}, [0, 1], {{'y': [1, 2]}}, 'x', 'y')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(plotting.__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
