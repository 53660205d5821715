"""Dataset repos in the published layouts of ylecun/mnist and uoft-cs/cifar10, small, generated at
test time: parquet shards with the same features and the README YAML that names their configs."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np


def _write_shards(dataset: datasets.Dataset, folder: Path, split: str, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(shards):
        dataset.shard(shards, index, contiguous=True).to_parquet(str(folder / f"{split}-{index:05d}-of-{shards:05d}.parquet"))


def _readme(config: str, splits: list[str], features: str) -> str:
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in splits)
    return f"---\ndataset_info:\n  config_name: {config}\n  features:\n{features}configs:\n- config_name: {config}\n  data_files:\n{files}  default: true\n---\n"


def mnist_repo(root: Path, train_rows: int = 96, test_rows: int = 60, train_shards: int = 3, seed: int = 0) -> Path:
    """datasets/ylecun/mnist: mnist/{train,test}-*.parquet, ``image`` (Image, 28x28 L) and ``label`` (ClassLabel 0..9)."""
    folder = root / "datasets" / "ylecun" / "mnist"
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    for split, rows, shards in (("train", train_rows, train_shards), ("test", test_rows, 1)):
        # Digit-like pictures: a bright bar whose position encodes the label, on a dark noisy background.
        labels = rng.integers(0, 10, rows)
        pixels = rng.integers(0, 40, (rows, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            pixels[i, 4:24, 2 + 2 * label : 5 + 2 * label] = 230
        _write_shards(datasets.Dataset.from_dict({"image": list(pixels), "label": labels.tolist()}, features=features), folder / "mnist", split, shards)
    yaml_features = "  - name: image\n    dtype: image\n  - name: label\n    dtype:\n      class_label:\n        names:\n" + "".join(
        f"          '{d}': '{d}'\n" for d in range(10))
    (folder / "README.md").write_text(_readme("mnist", ["train", "test"], yaml_features) + "# MNIST (a small test copy)\n")
    return folder


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_repo(root: Path, train_rows: int = 120, test_rows: int = 40, seed: int = 1) -> Path:
    """datasets/uoft-cs/cifar10: plain_text/{train,test}-*.parquet, ``img`` (Image, 32x32 RGB) and ``label`` (ClassLabel)."""
    folder = root / "datasets" / "uoft-cs" / "cifar10"
    rng = np.random.default_rng(seed)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_CLASSES)})
    for split, rows in (("train", train_rows), ("test", test_rows)):
        pixels = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
        _write_shards(datasets.Dataset.from_dict({"img": list(pixels), "label": rng.integers(0, 10, rows).tolist()}, features=features),
                      folder / "plain_text", split, 1)
    yaml_features = "  - name: img\n    dtype: image\n  - name: label\n    dtype:\n      class_label:\n        names:\n" + "".join(
        f"          '{i}': {name}\n" for i, name in enumerate(CIFAR10_CLASSES))
    (folder / "README.md").write_text(_readme("plain_text", ["train", "test"], yaml_features) + "# CIFAR-10 (a small test copy)\n")
    return folder
