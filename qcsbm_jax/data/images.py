"""Image data sets (docs/method.md, experiment 3): uint8 [N, 32, 32, C] arrays on the host.

  cifar10, cifar100   tfds 'cifar10', 'cifar100' (train / test)
  svhn                tfds 'svhn_cropped' (train / test; 'extra' is not used)
  imagenet32          tfds 'imagenet_resized/32x32' (train / validation, served as 'test')
  fashion_mnist       the IDX files of the Debian package dataset-fashion-mnist, 28x28
                      zero-padded to 32x32, one channel

tfds data are read with downloading disabled (this code runs on offline machines); a data
set that is not there raises one FileNotFoundError that says how to provide it.
TensorFlow is imported only when a tfds data set is loaded, with GPUs hidden from it.

Training batches come from `train_batch`, a pure function of (images, seed, step, process):
epoch-wise shuffling without replacement plus random horizontal flips, so the data-iterator
position is the step itself and resuming reproduces the uninterrupted run exactly.
"""

import functools
import gzip
import os
import zlib

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_FASHION_MNIST_IMAGES = {"train": "train-images-idx3-ubyte.gz",
                         "test": "t10k-images-idx3-ubyte.gz"}

# config name -> (tfds name, {our split: tfds split}).
_TFDS_SOURCES = {
    "cifar10": ("cifar10", {"train": "train", "test": "test"}),
    "cifar100": ("cifar100", {"train": "train", "test": "test"}),
    "svhn": ("svhn_cropped", {"train": "train", "test": "test"}),
    "imagenet32": ("imagenet_resized/32x32", {"train": "train", "test": "validation"}),
}
_CHANNELS = {"cifar10": 3, "cifar100": 3, "svhn": 3, "imagenet32": 3, "fashion_mnist": 1}
IMAGE_DATASETS = tuple(_CHANNELS)
SPLITS = ("train", "test")
IMAGE_SIZE = 32
_IMAGENET32_MANUAL = ("Imagenet32_train_npz.zip", "Imagenet32_val_npz.zip")
_LOAD_CHUNK = 10_000  # examples per tf.data batch when converting to NumPy
# Stream tags that keep the permutation and flip generators of equal numbers apart.
_PERMUTATION_STREAM, _FLIP_STREAM = 0, 1


def _check_name(name: str) -> None:
    if name not in _CHANNELS:
        raise ValueError(f"Unknown image data set {name!r}; valid: {IMAGE_DATASETS}.")


def image_shape(name: str) -> tuple[int, int, int]:
    """(32, 32, C) of data set `name`: C = 1 for fashion_mnist, 3 otherwise."""
    _check_name(name)
    return (IMAGE_SIZE, IMAGE_SIZE, _CHANNELS[name])


def _process_part(num_examples: int, process_index: int, process_count: int) -> slice:
    """Rows of process `process_index`: tfds.even_splits(..., drop_remainder=False) semantics,
    contiguous parts whose sizes differ by at most one, the larger ones first."""
    size, remainder = divmod(num_examples, process_count)
    start = process_index * size + min(process_index, remainder)
    return slice(start, start + size + (process_index < remainder))


def _read_idx_images(path: str) -> np.ndarray:
    """uint8 [N, rows, cols] from a gzipped IDX file (magic 0x00000803, big-endian sizes)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path} is not a complete gzip file ({type(error).__name__}: {error}); replace "
            "it with the file from the Debian package dataset-fashion-mnist, or point "
            "--config.data.fashion_mnist_dir at a directory holding the 4 original files."
            ) from None
    if len(raw) < 16 or raw[:4] != b"\x00\x00\x08\x03":
        raise ValueError(f"{path} is not an IDX file of uint8 images (magic bytes "
                         f"{raw[:4].hex()}, expected 00000803); replace it with the file from "
                         "the Debian package dataset-fashion-mnist.")
    count, rows, cols = (int(d) for d in np.frombuffer(raw, ">u4", count=3, offset=4))
    pixels = np.frombuffer(raw, np.uint8, offset=16)
    if pixels.size != count * rows * cols:
        raise ValueError(f"{path} is truncated or corrupt: the header announces "
                         f"{count}x{rows}x{cols} pixels, the file holds {pixels.size}.")
    return pixels.reshape(count, rows, cols)


def _load_fashion_mnist(split: str, directory: str, process_index: int,
                        process_count: int) -> np.ndarray:
    path = os.path.join(directory, _FASHION_MNIST_IMAGES[split])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {path} does not exist. On Debian/Ubuntu install it with "
            f"`sudo apt-get install dataset-fashion-mnist` (files in {FASHION_MNIST_DIR}), or "
            f"put the 4 files {', '.join(FASHION_MNIST_FILES)} (only the images are read) in "
            "a directory and pass it with --config.data.fashion_mnist_dir=DIR.")
    images = _read_idx_images(path)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{path} holds {images.shape[1:]} images; Fashion-MNIST is 28x28.")
    mine = images[_process_part(len(images), process_index, process_count)]
    pad = (IMAGE_SIZE - 28) // 2
    return np.pad(mine, ((0, 0), (pad, pad), (pad, pad)))[..., None]


def _tensorflow_datasets():
    """tensorflow_datasets, imported with GPUs hidden from TensorFlow (no accelerator memory)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    tf.config.set_visible_devices([], "GPU")  # a no-op when already hidden
    return tfds


def _tfds_missing_message(name: str, tfds_name: str, prepared_dir: str, version: str) -> str:
    root = prepared_dir.removesuffix(f"/{tfds_name}/{version}")
    build, prepare_args, manual = f"tfds build {tfds_name} --data_dir=DIR", "", ""
    if name == "imagenet32":
        build += " --manual_dir=MANUAL_DIR"
        prepare_args = "download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR)"
        manual = (f" ImageNet 32x32 needs the files {' and '.join(_IMAGENET32_MANUAL)} "
                  "(https://image-net.org/download-images, account required; tfds fetches "
                  "them itself only where image-net.org serves them) in MANUAL_DIR.")
    return (
        f"Data set {name!r} (tfds {tfds_name!r}, version {version}) is not prepared in "
        f"{root}: {prepared_dir} does not exist, and this code never downloads. "
        f"On a machine with internet access run `{build}` (or, in Python, "
        f"tfds.builder({tfds_name!r}, data_dir=DIR).download_and_prepare({prepare_args})), "
        f"then copy the prepared directory DIR/{tfds_name}/{version} to {prepared_dir} on "
        "this machine, or copy it under another directory and point TFDS_DATA_DIR or "
        f"--config.data.data_dir at that directory.{manual}")


def _load_tfds(name: str, split: str, data_dir: str | None, process_index: int,
               process_count: int) -> np.ndarray:
    tfds = _tensorflow_datasets()
    tfds_name, splits = _TFDS_SOURCES[name]
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    part = tfds.even_splits(splits[split], process_count)[process_index]
    # Files read one after the other (no interleaving): the stored order, so the process
    # parts concatenate to the whole split.
    in_order = tfds.ReadConfig(interleave_cycle_length=1)
    try:
        examples = builder.as_dataset(split=part, shuffle_files=False, read_config=in_order)
    except AssertionError as e:  # tfds: "could not find data in <data_dir>"
        if builder.is_prepared():
            raise
        raise FileNotFoundError(_tfds_missing_message(
            name, tfds_name, os.fspath(builder.data_dir), str(builder.version))) from e
    images = examples.map(lambda example: example["image"])
    out = np.empty((int(images.cardinality()), *image_shape(name)), np.uint8)
    filled = 0
    for chunk in tfds.as_numpy(images.batch(_LOAD_CHUNK)):
        out[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    if filled != len(out):
        raise RuntimeError(f"{builder.data_dir} announces {len(out)} examples of {name!r} "
                           f"{split} but holds {filled}; prepare it again with tfds build.")
    return out


def load_split(name: str, split: str, *, data_dir: str | None = None,
               fashion_mnist_dir: str = FASHION_MNIST_DIR, process_index: int = 0,
               process_count: int = 1) -> np.ndarray:
    """This process's part of split 'train' | 'test' of data set `name`: uint8 [N_p, 32, 32, C].

    The parts of processes 0..process_count-1 are disjoint, contiguous and concatenate to the
    whole split in its stored order (tfds.even_splits semantics); process_count=1 gives the
    whole split. data_dir: the tfds data directory (None: TFDS_DATA_DIR or
    ~/tensorflow_datasets); fashion_mnist_dir: where the Fashion-MNIST IDX files are.
    Raises FileNotFoundError, saying how to provide the data, when they are missing.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid: {SPLITS}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if name == "fashion_mnist":
        return _load_fashion_mnist(split, fashion_mnist_dir, process_index, process_count)
    return _load_tfds(name, split, data_dir, process_index, process_count)


def to_float(images: np.ndarray, centered: bool = False) -> np.ndarray:
    """uint8 k -> float32 k / 255 in [0, 1] (correctly rounded), or 2 k / 255 - 1 in [-1, 1]."""
    x = np.asarray(images, np.float32) / np.float32(255)
    return x * np.float32(2) - np.float32(1) if centered else x


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, process_index: int, epoch: int, num_examples: int):
    """The read-only order of epoch `epoch`; cached because a batch reuses it ~N/b times."""
    rng = np.random.default_rng([seed, process_index, _PERMUTATION_STREAM, epoch])
    order = rng.permutation(num_examples)
    order.flags.writeable = False
    return order


def train_batch(images: np.ndarray, seed: int, step: int, local_batch_size: int, *,
                process_index: int = 0, random_flip: bool = True,
                centered: bool = False) -> np.ndarray:
    """Training batch number `step` of this process: float32 [b, H, W, C], b = local_batch_size.

    images: this process's uint8 [N, H, W, C] (load_split with its index and count). Epoch e
    is a permutation of the N rows from a generator seeded by (seed, process_index, 0, e);
    the batch holds positions [step b, (step + 1) b) of the epochs laid end to end, so each
    epoch visits every row once. A generator seeded by (seed, process_index, 1, step) picks
    the rows mirrored left-right (probability 1/2). Values as in `to_float`. A pure function
    of its arguments: batch `step` is the same whatever was drawn before.
    """
    num_examples = len(images)
    if num_examples == 0 or local_batch_size < 1 or min(seed, step, process_index) < 0:
        raise ValueError(
            f"train_batch needs a non-empty image array (got {num_examples} rows), "
            f"local_batch_size >= 1 (got {local_batch_size}) and non-negative seed, step "
            f"and process_index (got {seed}, {step}, {process_index}).")
    start = step * local_batch_size
    stop = start + local_batch_size
    indices = np.concatenate([
        _epoch_permutation(seed, process_index, epoch, num_examples)[
            max(start - epoch * num_examples, 0):stop - epoch * num_examples]
        for epoch in range(start // num_examples, (stop - 1) // num_examples + 1)])
    batch = images[indices]
    if random_flip:
        rng = np.random.default_rng([seed, process_index, _FLIP_STREAM, step])
        flip = rng.random(local_batch_size) < 0.5
        batch[flip] = batch[flip, :, ::-1]
    return to_float(batch, centered)
