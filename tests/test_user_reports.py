"""What a new user hit (issue 14), each through the real command line: a finished run rerun, the
clocks of a resumed run, the record of the data, class names, the grids' sampler and labels,
logs after a resume, readable diagnostics, rerunning an interrupted command, diffusers' flags."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import torch

from ddpm_hf.checkpoints import checkpoint_problem
from ddpm_hf.config import TrainingConfig
from ddpm_hf.generation import CAPTION_HEIGHT
from ddpm_hf.pipeline import ClassConditionalDDPMPipeline
from ddpm_hf.sources import load_data

from .conftest import FAST, REPO, cli_env, run_module, run_train
from .test_cli_errors import assert_one_line_error


def _files(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_resumed_run_adds_up_its_clocks_leaves_no_empty_logs_and_a_finished_one_is_left_alone(tmp_path):
    args = [*FAST, "--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "2"]
    assert run_train([*args, "--max_train_steps", "2"]).returncode == 0
    resumed = run_train([*args, "--max_train_steps", "4"])  # train longer: the same command, a longer run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    # Whole-run totals and this process's share, each labelled, and adding up.
    stats = json.loads((tmp_path / "run/train_stats.json").read_text())
    mine = stats["this_process"]
    assert stats["images_seen"] == 32 and mine["images"] == 16
    # The figures add up, to the file's rounding: seconds and rates each to 0.01 (up to 0.005 off; 0.006 leaves room for float error).
    for images, seconds, rate in ((stats["images_seen"], stats["train_time_s"], stats["images_per_s"]), (mine["images"], mine["train_time_s"], mine["images_per_s"])):
        assert images / (seconds + 0.006) - 0.006 <= rate <= images / (seconds - 0.006) + 0.006, stats
    assert 0 < mine["train_time_s"] < stats["train_time_s"] <= stats["wall_time_s"], stats
    assert mine["wall_time_s"] < stats["wall_time_s"], stats
    done = resumed.stdout.strip().splitlines()[-1]
    assert done.startswith("done: 4 steps, 32 images in ") and "this process: 16 images" in done

    # No validation or evaluation: the resume left no empty logs of them.
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert "metrics.jsonl" in names and not names & {"validation.jsonl", "evaluation.jsonl"}

    # The same command once more: the run has finished, and its record stays as it was.
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("train_stats.json", "README.md", "unet/diffusion_pytorch_model.safetensors")}
    again = run_train([*args, "--max_train_steps", "4"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "finished at step 4: nothing to train" in again.stdout
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before


def test_a_folder_run_records_the_folder_and_names_its_classes(tmp_path, rgb_image_folder):
    out = tmp_path / "run"
    result = run_train([*FAST, "--train_data_dir", str(rgb_image_folder), "--class_conditional", "--resolution", "32",
                        "--eval_batch_size", "4", "--save_images_steps", "4", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "training_config.json").read_text())
    assert config["dataset_name"] is None and config["train_data_dir"] == str(rgb_image_folder)
    assert json.loads((out / "model_index.json").read_text())["class_names"] == ["cats", "dogs"]
    card = (out / "README.md").read_text()
    assert f"on `{rgb_image_folder}`" in card and "0: cats, 1: dogs" in card and "mnist-5k-offline" not in card.split("## Training configuration")[0]

    # The grid: a caption above, the class names left of their rows (dark text on the white margin).
    grid = np.asarray(PIL.Image.open(out / "samples/step_0000004.png").convert("L"))
    assert grid.shape[0] == CAPTION_HEIGHT + 2 + 2 * (64 + 2)  # 2 rows of 32-pixel images enlarged to 64
    assert (grid[:CAPTION_HEIGHT] < 128).any() and (grid[CAPTION_HEIGHT:, :20] < 128).any()

    sampled = run_module("ddpm_hf.sample", str(out), "--class_label", "dogs", "--num_images", "2", "--num_inference_steps", "2",
                         "--out_dir", str(tmp_path / "dogs"))
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    pipeline = ClassConditionalDDPMPipeline.from_pretrained(str(out))
    assert pipeline.class_names == ["cats", "dogs"]
    assert pipeline.class_index("dogs") == pipeline.class_index("Dogs") == pipeline.class_index("1") == pipeline.class_index(1) == 1
    drawn = pipeline(["dogs", "cats"], num_inference_steps=2, generator=[torch.Generator().manual_seed(0)] * 2, output_type="np").images
    assert drawn.shape == (2, 32, 32, 3)
    wrong = run_module("ddpm_hf.sample", str(out), "--class_label", "horse", "--grid", str(tmp_path / "g.png"))
    assert_one_line_error(wrong, "--class_label 'horse' is not a class of this model", "cats, dogs")


def test_grids_default_to_ancestral_sampling_and_diagnostics_are_readable_and_show_several_classes(tmp_path):
    assert TrainingConfig().sampler == "ddpm" and TrainingConfig().grid_inference_steps == 250
    data, _ = load_data(TrainingConfig(), torch.device("cpu"))
    preview_labels = data.labels[torch.linspace(0, len(data.images) - 1, 4).round().long()]
    assert torch.equal(data.preview(4), data.images[torch.linspace(0, len(data.images) - 1, 4).round().long()])
    assert len(set(preview_labels.tolist())) == 4  # the offline digits are sorted by class: spread, not the first four
    assert run_train([*FAST, "--output_dir", str(tmp_path / "run")]).returncode == 0
    strip = PIL.Image.open(tmp_path / "run/diagnostics/forward_process.png")
    # Six t columns of 84-pixel images (28 enlarged 3 times) under a caption and a row of t labels.
    assert strip.size == (2 + 6 * 86, 2 * CAPTION_HEIGHT + 2 + 4 * 86)
    assert (np.asarray(strip.convert("L"))[CAPTION_HEIGHT : 2 * CAPTION_HEIGHT] < 128).any()  # the t labels


def test_rerunning_an_interrupted_command_resumes_it_and_another_run_is_refused_with_its_differences(tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "--max_train_steps", "16", "--checkpointing_steps", "4", "--output_dir", str(out)]
    process = subprocess.Popen([sys.executable, "train_ddpm.py", *args], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = process.communicate(timeout=120)
    last = stderr.strip().splitlines()[-1]
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-2000:]
    assert last.startswith("stopped by SIGINT after step ") and "run the same command again" in last
    step = int(last.split("after step ")[1].split(":")[0])
    assert 0 < step < 16 and checkpoint_problem(str(out / f"checkpoints/checkpoint-{step}")) is None
    before = _files(out)

    other = run_train([*args, "--learning_rate", "1e-3", "--prediction_type", "v_prediction"])
    assert_one_line_error(other, "already holds a different training run", "learning_rate: 0.0002 there, 0.001 now",
                          "prediction_type: 'epsilon' there, 'v_prediction' now", "--overwrite_output_dir")
    assert _files(out) == before  # refused before anything was written

    again = run_train(args)  # exactly as it was typed
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/checkpoint-" in again.stdout
    assert json.loads((out / "train_stats.json").read_text())["steps"] == 16


def test_the_diffusers_example_command_line_runs_unchanged_but_for_the_dataset(tmp_path, recording_hub):
    # diffusers/examples/unconditional_image_generation/README.md, with --dataset_name replaced by a
    # local folder of two images (so that its 100 epochs are 13 steps of 16).
    endpoint, hub = recording_hub
    rng = np.random.default_rng(0)
    for label in ("roses", "tulips"):
        (tmp_path / "flowers" / label).mkdir(parents=True)
        PIL.Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(tmp_path / "flowers" / label / "0.png")
    example = ["--train_data_dir=" + str(tmp_path / "flowers"), "--resolution=64", "--center_crop", "--random_flip",
               "--output_dir=ddpm-ema-flowers-64", "--train_batch_size=16", "--num_epochs=100", "--gradient_accumulation_steps=1",
               "--use_ema", "--learning_rate=1e-4", "--lr_warmup_steps=500", "--mixed_precision=no", "--push_to_hub",
               # accelerate's old launcher and the script's own logging flags, as its users pass them:
               "--local_rank=0", "--logger=tensorboard", "--logging_dir=logs", "--save_images_epochs=100", "--save_model_epochs=100",
               "--ddpm_num_inference_steps=8"]
    result = subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), *example], cwd=tmp_path, env=cli_env(HF_ENDPOINT=endpoint),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ddpm-ema-flowers-64"
    config = json.loads((out / "training_config.json").read_text())
    assert (config["random_flip"], config["resize_mode"], config["report_to"], config["num_inference_steps"]) == (True, "crop", "tensorboard", 8)
    assert json.loads((out / "train_stats.json").read_text())["steps"] == 13  # 100 epochs of 2 images at 16 a step
    assert (out / "samples/step_0000013.png").is_file() and (out / "checkpoints/checkpoint-13").is_dir()
    assert hub.commits and hub.commits[-1]["repo"] == "local-user/ddpm-ema-flowers-64"
    default = subprocess.run([sys.executable, "-c", "from ddpm_hf.config import parse_config; print(parse_config(['--dataset_name', 'uoft-cs/cifar10']).output_dir)"],
                             cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert default.stdout.strip() == "ddpm-cifar10"  # named after the dataset, as diffusers' examples name theirs
