"""Image data sets: tfds loading (mocked, no files needed), the offline Fashion-MNIST reader,
the clear errors for missing data, and the resumable training batches."""

import gzip
import os
import struct
import time

import jax
import numpy as np
import pytest

from qcsbm_jax import likelihood
from qcsbm_jax.data import images

needs_fashion_mnist = pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(images.FASHION_MNIST_DIR, f))
            for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST files not in {images.FASHION_MNIST_DIR}: "
           "apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def tfds():
    """tensorflow_datasets, imported through the module (GPUs hidden)."""
    return images._tensorflow_datasets()


# ----------------------------------------------------------------------------- names, errors

def test_names_shapes_and_bad_arguments():
    assert images.IMAGE_DATASETS == ("cifar10", "cifar100", "svhn", "imagenet32",
                                     "fashion_mnist")
    assert images.image_shape("cifar10") == (32, 32, 3)
    assert images.image_shape("fashion_mnist") == (32, 32, 1)
    for call in (lambda: images.image_shape("mnist"), lambda: images.load_split("mnist", "train")):
        with pytest.raises(ValueError, match="cifar10.*cifar100.*svhn.*imagenet32.*fashion_mnist"):
            call()
    with pytest.raises(ValueError, match="split 'validation'.*train.*test"):
        images.load_split("cifar10", "validation")
    with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
        images.load_split("fashion_mnist", "test", process_index=2, process_count=2)


def test_missing_tfds_data_raises_quickly_with_instructions(tfds, tmp_path):
    for name, tfds_name in [("cifar10", "cifar10"), ("imagenet32", "imagenet_resized/32x32")]:
        version = str(tfds.builder(tfds_name, data_dir=str(tmp_path)).version)
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError) as error:
            images.load_split(name, "train", data_dir=str(tmp_path))
        assert time.perf_counter() - start < 30
        message = str(error.value)
        assert f"{tmp_path}/{tfds_name}/{version}" in message
        assert f"tfds build {tfds_name} --data_dir=DIR" in message
        assert "download_and_prepare" in message and "TFDS_DATA_DIR" in message
        assert "--config.data.data_dir" in message
    assert "Imagenet32_train_npz.zip" in message and "--manual_dir" in message


def test_missing_fashion_mnist_raises_with_instructions(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        images.load_split("fashion_mnist", "train", fashion_mnist_dir=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    for file_name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                      "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert file_name in message


# ----------------------------------------------------------------------------- tfds (mocked)

SPLIT_SIZES = {"train": 11, "test": 7, "validation": 5}


def _indexed_image(index: int) -> np.ndarray:
    """A distinct uint8 [32, 32, 3] image per example index."""
    return ((np.arange(32 * 32 * 3) + 7 * index) % 256).astype(np.uint8).reshape(32, 32, 3)


def _indexed_split(tfds):
    """A mock _as_dataset that serves example i of each split as _indexed_image(i), honouring
    sub-splits (the process parts) through tfds's own split arithmetic."""
    import tensorflow as tf

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        del self, decoders, read_config, kwargs
        split_dict = tfds.core.SplitDict([
            tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
            for name, n in SPLIT_SIZES.items()])
        (part,) = tfds.core.splits.AbstractSplit.from_spec(split).to_absolute(split_dict)
        stop = SPLIT_SIZES[part.splitname] if part.to is None else part.to
        index = np.arange(part.from_ or 0, stop)
        return tf.data.Dataset.from_tensor_slices({
            "image": np.stack([_indexed_image(i) for i in index]).reshape(-1, 32, 32, 3),
            "label": index})
    return as_dataset


@pytest.mark.parametrize("name, test_split", [("cifar10", "test"), ("svhn", "test"),
                                              ("imagenet32", "validation")])
def test_tfds_process_parts_are_disjoint_and_cover_the_split(tfds, name, test_split):
    with tfds.testing.mock_data(as_dataset_fn=_indexed_split(tfds)):
        for split, tfds_split in [("train", "train"), ("test", test_split)]:
            n = SPLIT_SIZES[tfds_split]
            whole = images.load_split(name, split)
            assert whole.dtype == np.uint8 and whole.shape == (n, 32, 32, 3)
            np.testing.assert_array_equal(whole, np.stack([_indexed_image(i) for i in range(n)]))
            parts = [images.load_split(name, split, process_index=p, process_count=3)
                     for p in range(3)]
            assert [len(p) for p in parts] == [n // 3 + (p < n % 3) for p in range(3)]
            np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_tfds_prepared_files_round_trip(tfds, tmp_path):
    """The unmocked read path: a small cifar10 written by tfds in 2 files of 30 examples, read
    back whole and in process parts, which must concatenate to the stored order (reading the
    files interleaved, in blocks of 16, would break that)."""
    from tensorflow_datasets.image_classification.cifar import Cifar10

    class SmallCifar10(Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            return {"train": self._examples(range(60)), "test": self._examples(range(60, 67))}

        def _examples(self, indices):
            for i in indices:
                yield str(i), {"id": str(i), "image": _indexed_image(i), "label": i % 10}

    SmallCifar10(data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=2))
    assert len(list(tmp_path.glob("cifar10/*/cifar10-train.tfrecord-*"))) == 2
    for split, indices in [("train", range(60)), ("test", range(60, 67))]:
        whole = images.load_split("cifar10", split, data_dir=str(tmp_path))
        assert whole.dtype == np.uint8 and whole.shape == (len(indices), 32, 32, 3)
        stored = sorted(whole.tolist())  # tfds stores examples in a key-hashed order
        assert stored == sorted(_indexed_image(i).tolist() for i in indices)
        parts = [images.load_split("cifar10", split, data_dir=str(tmp_path), process_index=p,
                                   process_count=3) for p in range(3)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_tfds_default_mock_data(tfds, name):
    with tfds.testing.mock_data(num_examples=5):
        x = images.load_split(name, "test")
    assert x.dtype == np.uint8 and x.shape == (5, 32, 32, 3)


# ----------------------------------------------------------------------------- Fashion-MNIST

def _write_idx(path, array: np.ndarray, magic: bytes = b"\x00\x00\x08\x03") -> None:
    header = magic + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_synthetic_idx(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", raw)
    whole = images.load_split("fashion_mnist", "test", fashion_mnist_dir=str(tmp_path))
    expected = np.zeros((7, 32, 32, 1), np.uint8)
    expected[:, 2:30, 2:30, 0] = raw
    np.testing.assert_array_equal(whole, expected)
    parts = [images.load_split("fashion_mnist", "test", fashion_mnist_dir=str(tmp_path),
                               process_index=p, process_count=3) for p in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_fashion_mnist_reader_rejects_bad_files(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(path, np.zeros((2, 28, 28)), magic=b"\x00\x00\x08\x01")
    with pytest.raises(ValueError, match="not an IDX file of uint8 images"):
        images.load_split("fashion_mnist", "train", fashion_mnist_dir=str(tmp_path))
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 3, 28, 28) + bytes(28 * 28))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        images.load_split("fashion_mnist", "train", fashion_mnist_dir=str(tmp_path))


@needs_fashion_mnist
@pytest.mark.parametrize("split, file_name, count", [
    ("train", "train-images-idx3-ubyte.gz", 60000), ("test", "t10k-images-idx3-ubyte.gz", 10000)])
def test_real_fashion_mnist(split, file_name, count):
    x = images.load_split("fashion_mnist", split)
    assert x.dtype == np.uint8 and x.shape == (count, 32, 32, 1)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not x[:, border].any()
    with gzip.open(os.path.join(images.FASHION_MNIST_DIR, file_name), "rb") as f:
        raw = f.read()
    assert struct.unpack(">4I", raw[:16]) == (0x803, count, 28, 28)
    inner = x[:, 2:30, 2:30, 0].reshape(-1)
    np.testing.assert_array_equal(inner, np.frombuffer(raw[16:], np.uint8))
    assert x.max() == 255 and 0.2 < images.to_float(x).mean() < 0.4  # mean ~0.22


# ----------------------------------------------------------------------------- to_float

def test_to_float_is_k_over_255_and_fits_uniform_dequantize():
    k = np.arange(256, dtype=np.uint8)
    x = images.to_float(k)
    assert x.dtype == np.float32
    exact = np.arange(256) / 255.0  # float64
    np.testing.assert_array_equal(x, exact.astype(np.float32))
    np.testing.assert_allclose(images.to_float(k, centered=True), 2 * exact - 1, atol=1e-7)
    np.testing.assert_array_equal(np.round(x * 255), k)
    y = np.asarray(likelihood.uniform_dequantize(jax.random.key(0), x))
    assert np.all(y >= exact * 255 / 256) and np.all(y < (exact * 255 + 1) / 256)


# ----------------------------------------------------------------------------- train_batch

def _random_images(n: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, channels), dtype=np.uint8)


def _constant_images(n: int) -> np.ndarray:
    """Image i is all i (n <= 256): the batch reveals which rows it took, flips or not."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1))


def _rows_taken(batch: np.ndarray) -> np.ndarray:
    return np.round(batch[:, 0, 0, 0] * 255).astype(int)


def test_train_batch_is_deterministic_and_resumes_exactly():
    x = _random_images(100)
    in_order = [images.train_batch(x, 3, step, 32) for step in range(10)]
    images._epoch_permutation.cache_clear()
    for step in reversed(range(10)):
        np.testing.assert_array_equal(images.train_batch(x, 3, step, 32), in_order[step])
    images._epoch_permutation.cache_clear()
    np.testing.assert_array_equal(images.train_batch(x, 3, 7, 32), in_order[7])
    assert in_order[0].dtype == np.float32 and in_order[0].shape == (32, 32, 32, 3)
    assert not np.array_equal(images.train_batch(x, 4, 7, 32), in_order[7])
    assert not np.array_equal(images.train_batch(x, 3, 7, 32, process_index=1), in_order[7])


@pytest.mark.parametrize("n, batch_size", [(96, 32), (100, 32), (10, 32)])
def test_train_batch_epochs_are_permutations(n, batch_size):
    x = _constant_images(n)
    num_epochs = 3
    steps = -(-num_epochs * n // batch_size)
    taken = np.concatenate([_rows_taken(images.train_batch(x, 5, s, batch_size))
                            for s in range(steps)])
    epochs = taken[:num_epochs * n].reshape(num_epochs, n)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    # Naive reference: the epoch permutations laid end to end, cut into batches.
    order = np.concatenate([np.random.default_rng([5, 0, 0, e]).permutation(n)
                            for e in range(num_epochs + 1)])
    np.testing.assert_array_equal(taken, order[:len(taken)])


def test_train_batch_flips_are_exact_mirrors_half_the_time():
    x = _random_images(64)
    lookup = {x[i].tobytes(): (i, False) for i in range(64)}
    lookup.update({x[i, :, ::-1].tobytes(): (i, True) for i in range(64)})
    assert len(lookup) == 128  # no image is its own mirror
    flips = []
    for step in range(40):
        batch = images.train_batch(x, 0, step, 64)
        for row in np.round(batch * 255).astype(np.uint8):
            flips.append(lookup[row.tobytes()][1])  # KeyError: not an exact (mirrored) image
    assert abs(np.mean(flips) - 0.5) < 5 * np.sqrt(0.25 / len(flips))
    unflipped = np.round(images.train_batch(x, 0, 0, 64, random_flip=False) * 255)
    assert all(not lookup[row.astype(np.uint8).tobytes()][1] for row in unflipped)


def test_train_batch_value_ranges():
    x = _random_images(256, channels=1)
    plain = images.train_batch(x, 1, 0, 256)
    centered = images.train_batch(x, 1, 0, 256, centered=True)
    assert plain.min() == 0 and plain.max() == 1
    assert centered.min() == -1 and centered.max() == 1
    np.testing.assert_array_equal(centered, 2 * plain - 1)


def test_train_batch_draws_each_epoch_order_once():
    x = _constant_images(200)
    images._epoch_permutation.cache_clear()
    for step in range(20):  # 20 x 8 < 200: one epoch
        images.train_batch(x, 0, step, 8)
    assert images._epoch_permutation.cache_info().misses == 1


def test_train_batch_bad_arguments():
    x = _random_images(4)
    for kwargs in [dict(local_batch_size=0), dict(step=-1)]:
        args = dict(images=x, seed=0, step=0, local_batch_size=2) | kwargs
        with pytest.raises(ValueError, match="local_batch_size >= 1.*non-negative"):
            images.train_batch(**args)
    with pytest.raises(ValueError, match="non-empty"):
        images.train_batch(x[:0], 0, 0, 2)
