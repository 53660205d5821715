"""Bad input: one line on stderr saying what was wrong and what to do, exit status 2, no
traceback, and nothing already on disk lost. Each case runs the real command line."""

import socket
import time

import datasets
import pytest

from .conftest import FAST, run_train


def assert_one_line_error(result, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def hub_that_knows_nothing(loopback_hub):
    """A loopback stand-in for the Hub that answers 404 to every request, as it does for unknown ids."""
    return loopback_hub(404, b'{"error": "Repository not found"}')


def test_unknown_dataset_name(tmp_path):
    result = run_train([*FAST, "--dataset_name", "./no/such/folder", "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(result, "unknown dataset './no/such/folder'", "--dataset_name mnist-5k-offline")


def test_dataset_unknown_to_the_hub(tmp_path, hub_that_knows_nothing):
    result = run_train([*FAST, "--dataset_name", "someone/not-a-dataset", "--output_dir", str(tmp_path / "o")], HF_ENDPOINT=hub_that_knows_nothing)
    assert_one_line_error(result, "dataset 'someone/not-a-dataset' was not found on the Hub", "answered 404")


def test_hub_unreachable_fails_within_seconds_and_names_the_offline_options(tmp_path, closed_port):
    started = time.monotonic()
    result = run_train([*FAST, "--dataset_name", "ylecun/mnist", "--output_dir", str(tmp_path / "o")], HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    assert_one_line_error(result, "cannot reach the Hugging Face Hub", "--dataset_name mnist-5k-offline", "--train_data_dir", "HF_HUB_OFFLINE=1")
    assert time.monotonic() - started < 60  # imports included; no minutes of retries


def test_hub_offline_without_a_cached_copy(tmp_path):
    result = run_train([*FAST, "--dataset_name", "uoft-cs/cifar10", "--output_dir", str(tmp_path / "o")], HF_HUB_OFFLINE="1")
    assert_one_line_error(result, "could not load 'uoft-cs/cifar10' from the local cache (HF_HUB_OFFLINE=1")


def test_missing_image_column(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(tmp_path / "texts")
    result = run_train([*FAST, "--dataset_name", str(tmp_path / "texts"), "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(result, "no image column found (columns: text, label)", "--image_column")
    result = run_train([*FAST, "--image_column", "pixels", "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(result, "image column 'pixels' is not in the dataset (columns: image, label)")
    result = run_train([*FAST, "--image_column", "label", "--output_dir", str(tmp_path / "o2")])
    assert_one_line_error(result, "column 'label' holds ClassLabel values, not images")


def test_empty_dataset(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    (tmp_path / "empty").mkdir()
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features).to_parquet(tmp_path / "empty" / "train.parquet")
    # (datasets' own "Generating train split" progress bar is switched off: it is not part of the message)
    result = run_train([*FAST, "--dataset_name", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")], HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    assert_one_line_error(result, "the dataset is empty")


def test_unreadable_image_in_a_local_folder_is_named(tmp_path, rgb_image_folder):
    broken = rgb_image_folder / "dogs" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    result = run_train([*FAST, "--train_data_dir", str(rgb_image_folder), "--resolution", "16", "--output_dir", str(tmp_path / "o")],
                       HF_DATASETS_DISABLE_PROGRESS_BARS="1")  # datasets' own progress bar is not part of the message
    assert_one_line_error(result, "cannot read image", "broken.png")


def test_class_conditional_without_labels(tmp_path, rgb_image_folder):
    unlabelled = datasets.load_dataset("imagefolder", data_dir=str(rgb_image_folder), split="train").remove_columns("label")
    unlabelled.save_to_disk(tmp_path / "unlabelled")
    result = run_train([*FAST, "--dataset_name", str(tmp_path / "unlabelled"), "--class_conditional", "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(result, "--class_conditional needs class labels", "--label_column")


def test_resolution_the_net_cannot_take(tmp_path):
    result = run_train([*FAST, "--model_preset", "cifar10", "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(result, "resolution 28 does not suit the 'cifar10' UNet", "--resolution 32 --resize_mode pad")


def test_unwritable_output_dir_and_output_dir_that_is_a_file(tmp_path):
    result = run_train([*FAST, "--output_dir", "/proc/ddpm-hf-cannot-write-here"])
    assert_one_line_error(result, "cannot write to --output_dir /proc/ddpm-hf-cannot-write-here")
    (tmp_path / "a-file").write_text("precious")
    result = run_train([*FAST, "--output_dir", str(tmp_path / "a-file")])
    assert_one_line_error(result, "is a file, not a folder")
    assert (tmp_path / "a-file").read_text() == "precious"


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--learning_rate", "3"], "--learning_rate must be in (0, 1]"),
        (["--train_batch_size", "0"], "--train_batch_size must be a positive integer"),
        (["--prediction_type", "noise"], "argument --prediction_type"),
        (["--ddpm_beta_schedule", "cosine"], "argument --ddpm_beta_schedule"),
        (["--loss_weighting", "edm"], "argument --loss_weighting"),
        (["--timestep_sampling", "importance"], "argument --timestep_sampling"),
        (["--cond_drop_prob", "1"], "--cond_drop_prob must be in [0, 1)"),
        (["--validation_split", "2"], "--validation_split as a fraction must be in (0, 1)"),
        (["--early_stopping_patience", "4"], "--early_stopping_patience needs a validation loss: add --validation_split"),
        (["--guide_step", "2", "--class_conditional"], "--guide_step (autoguidance) is for unconditional runs"),
        (["--guide_step", "4"], "--guide_step (4) must come before the last step (--max_train_steps 4)"),
        (["--eval_start_step", "-1"], "--eval_start_step must be >= 0"),
    ],
)
def test_out_of_range_or_unknown_options(tmp_path, flags, fragment):
    result = run_train([*FAST, *flags, "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o").exists(), "refused before any work"


def test_resume_errors_leave_the_existing_run_intact(tmp_path):
    out = tmp_path / "run"
    assert run_train([*FAST, "--output_dir", str(out), "--checkpointing_steps", "2"]).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    result = run_train([*FAST, "--output_dir", str(out), "--seed", "1"])  # another run: the same command would resume this one
    assert_one_line_error(result, "already holds a different training run", "seed: 0 there, 1 now", "--overwrite_output_dir")
    result = run_train([*FAST, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoints/checkpoint-99")])
    assert_one_line_error(result, "checkpoint-99 does not exist")
    # Every difference of network and schedule is named in the one line.
    result = run_train([*FAST, "--output_dir", str(out), "--resume_from_checkpoint", "latest", "--prediction_type", "v_prediction", "--model_preset", "mnist",
                        "--ddpm_beta_schedule", "squaredcos_cap_v2", "--class_conditional"])
    assert_one_line_error(result, "cannot resume", "model_preset: checkpoint 'tiny', now 'mnist'", "prediction_type",
                          "ddpm_beta_schedule: checkpoint 'linear', now 'squaredcos_cap_v2'", "class_conditional: checkpoint False, now True",
                          "unet.num_class_embeds")

    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() == before.keys() and all(after[p] == before[p] for p in before)
