"""The training loop's image sources, and the held-out images: ``load_data`` is the entry point.

Two sources feed the training loop through the same two calls, ``next_batch(step, micro)``
and ``state_dict()``:

- `InMemoryImages`: datasets that fit in memory (MNIST, CIFAR-10, the offline digits) are
  decoded once into a uint8 tensor on the training device. Batches are gathered by index, so
  Python image decoding never limits the loop. The example at each position of the run is a
  pure function of (seed, position), so a resumed run draws exactly the batches it would have.
- `StreamingImages`: an `IterableDataset` with a shuffle buffer, decoded in DataLoader workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import datasets
import numpy as np
import torch

from .config import TrainingConfig
from .data import (ImageFormat, class_names_of, decode_in_memory, find_columns, first_examples, image_format_for, labels_and_classes,
                   load_source_dataset, to_uint8_array)
from .errors import DataStreamError, UserError, cause_line
from .seeds import Stream
from .seeds import generator as seeded_generator

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
            generator = seeded_generator(Stream.DATA_ORDER, self.seed, epoch)
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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, num_classes: int | None, seed: int, micro_batch: int, rank: int, world_size: int,
                 class_names: list[str] | None = None):
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.class_names = class_names  # a ClassLabel column's names, else None
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
        """``count`` training images spread evenly over the set (for diagnostics: a dataset sorted by
        class shows several classes), without moving the data position."""
        return self.images[torch.linspace(0, len(self.images) - 1, count).round().long()]

    # The position is a function of the step alone: nothing to save.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
        self.class_names = class_names_of(dataset.features, label_column)
        self.num_classes = len(self.class_names) if self.class_names is not None else None
        self.epoch = 0
        self.consumed = 0
        self._step_start = (0, 0)
        self._iterator = None

    channels = property(lambda self: self.fmt.channels)
    resolution = property(lambda self: self.fmt.resolution)

    def _start_epoch(self):
        from datasets.distributed import split_dataset_by_node

        stream = self.dataset.shuffle(seed=self.config.seed, buffer_size=self.config.shuffle_buffer_size)
        stream.set_epoch(self.epoch)
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        workers = min(self.config.dataloader_num_workers, stream.num_shards)
        # Resuming mid-epoch: with one reader the stream itself can skip what was consumed. With
        # several workers it cannot: each worker batches its own shards and the loader takes their
        # batches in turn, so the loader's order is not the stream's. The loader is replayed instead
        # (deterministic, so exact; it re-reads the consumed part of the epoch).
        replay = self.consumed // self.config.train_batch_size if workers > 1 else 0
        if self.consumed and workers <= 1:
            stream = stream.skip(self.consumed)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=self.config.train_batch_size,
            num_workers=workers,
            drop_last=True,  # constant shapes; the remainder is seen in later epochs' shuffles
            collate_fn=partial(_collate_stream, image_column=self.image_column, label_column=self.label_column, fmt=self.fmt),
        )
        self._iterator = iter(loader)
        for _ in range(replay):
            next(self._iterator)

    def next_batch(self, step: int, micro: int, accumulation: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if micro == 0:
            self._step_start = (self.epoch, self.consumed)
        try:
            batch = self._read_batch()
        except UserError:
            raise
        except Exception as e:  # the connection, the server, a worker: the stream broke mid-run
            # Back to where this step began, so that a checkpoint of the last complete step resumes exactly.
            (self.epoch, self.consumed), self._iterator = self._step_start, None
            raise DataStreamError(cause_line(e)) from None
        self.consumed += len(batch["pixels"])
        labels = batch["labels"].to(self.device, non_blocking=True) if batch["labels"] is not None else None
        return batch["pixels"].to(self.device, non_blocking=True), labels

    def _read_batch(self) -> dict:
        if self._iterator is None:
            self._start_epoch()
        try:
            return next(self._iterator)
        except StopIteration:
            if self.consumed == 0:
                raise UserError(f"the stream has fewer than --train_batch_size ({self.config.train_batch_size}) examples per process") from None
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start_epoch()
            return next(self._iterator)

    def preview(self, count: int) -> torch.Tensor:
        """``count`` images from a shuffled look at the stream (for diagnostics), read apart from the training iterator."""
        look = self.dataset.shuffle(seed=self.config.seed, buffer_size=min(1000, self.config.shuffle_buffer_size)).take(count)
        try:
            return torch.from_numpy(np.stack([to_uint8_array(e[self.image_column], self.fmt) for e in look]))
        except UserError:
            raise
        except Exception as e:  # before the first step: nothing to checkpoint, only to say what failed
            raise UserError(f"reading the training data failed before training started: {cause_line(e)}; run the same command again "
                            "once the data can be read") from None

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
            class_names=class_names_of(dataset.features, label_column),
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


def held_out_images(config: TrainingConfig, split: str | None, count: int, seed: int, device: torch.device) -> tuple[ValidationImages, str]:
    """Up to ``count`` images to measure a model on, and a description of where they came from.

    ``split`` is a split name (test) or a fraction of the training split held out as
    --validation_split holds it out (the same examples for the same seed). Without one: the
    model's own validation split, else the dataset's test split, else a seeded sample of the
    training images (said in the description: a bound on seen images flatters the model)."""
    candidates = [split] if split is not None else [s for s in (config.validation_split, "test") if s is not None]
    for name in candidates:
        try:
            trial = dataclasses.replace(config, validation_split=name, max_validation_samples=count, streaming=False)
            _, held_out = load_data(trial, device)
        except UserError:
            if split is not None:
                raise
            continue
        kind = f"{float(name):g} of the training split held out with seed {config.seed}" if trial.validation_fraction else f"split '{name}'"
        return held_out, f"{len(held_out)} images: {kind}"
    training, _ = load_data(dataclasses.replace(config, validation_split=None, streaming=False), device)
    chosen = torch.randperm(len(training.images), generator=torch.Generator().manual_seed(seed))[:count].to(training.images.device)
    labels = training.labels[chosen] if training.labels is not None else None
    return ValidationImages(training.images[chosen], labels), f"{len(chosen)} training images (no held-out split: the model has seen them)"
