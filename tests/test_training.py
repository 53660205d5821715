"""The training loop end to end: learning, outputs, the saved pipeline, resume, several processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import PIL.Image
import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file

from ddpm_hf.config import TrainingConfig, parse_config
from ddpm_hf.checkpoints import checkpoint_problem, read_training_state
from ddpm_hf.data import to_model_input
from ddpm_hf.generation import CAPTION_HEIGHT
from ddpm_hf.models import build_noise_scheduler, build_unet, unet_config
from ddpm_hf.objective import DiffusionObjective
from ddpm_hf.pipeline import ClassConditionalDDPMPipeline
from ddpm_hf.sources import load_data
from ddpm_hf.training import train

from .conftest import FAST, REPO, cli_env, run_module, run_train


def _weights(path):
    return load_file(str(path))


def _assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def test_a_tiny_unet_learns_a_fixed_batch():
    config = TrainingConfig()
    torch.manual_seed(0)
    data, _ = load_data(TrainingConfig(max_train_samples=16, train_batch_size=16), torch.device("cpu"))
    x0 = to_model_input(data.images)
    model = build_unet(unet_config(config, channels=1, resolution=28))
    objective = DiffusionObjective.from_config(config, build_noise_scheduler(config).alphas_cumprod)
    noise, timesteps = torch.randn_like(x0), torch.randint(0, 1000, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = objective.losses(model, x0, noise, timesteps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One short run through the real command line (a YAML file plus flags), with every output switched on."""
    out = tmp_path_factory.mktemp("run") / "out"
    (out.parent / "run.yaml").write_text("timestep_sampling: stratified\nlr_warmup_steps: 3\n")
    args = [str(out.parent / "run.yaml"), *FAST, "--output_dir", str(out), "--save_images_steps", "2", "--checkpointing_steps", "2", "--report_to", "tensorboard"]
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, args


def test_a_short_run_writes_every_output(finished_run):
    out, result, args = finished_run
    assert "images per step: 8" in result.stdout
    for name in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "training_config.json", "metrics.jsonl", "loss_curve.png", "train_stats.json",
                 "samples/step_0000002.png", "samples/step_0000004.png"]:
        assert (out / name).is_file(), name
    saved_config = json.loads((out / "training_config.json").read_text())
    assert saved_config == parse_config(args).to_dict()
    assert saved_config["timestep_sampling"] == "stratified" and saved_config["lr_warmup_steps"] == 3  # from the YAML file

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and [r["images_seen"] for r in rows] == [16, 32]
    assert set(rows[0]) == {"step", "images_seen", "loss", "grad_norm", "lr", "images_per_s", "skipped_steps", "elapsed_s", "loss_by_t"}
    by_t = rows[0]["loss_by_t"]  # 16 draws over ten bins of t: some bins may be empty
    assert len(by_t) == 10 and any(v is not None for v in by_t) and all(v is None or v > 0 for v in by_t)
    assert all(0 < r["loss"] < 10 and r["images_per_s"] > 0 for r in rows)

    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["steps"] == 4 and stats["images_seen"] == 32 and stats["peak_memory_bytes"] > 10_000_000
    assert stats["final_loss_smoothed"] > 0 and stats["images_per_s"] > 0 and stats["wall_time_s"] > 0
    assert stats["parameters"] == sum(v.numel() for v in _weights(out / "unet/diffusion_pytorch_model.safetensors").values())

    grid = PIL.Image.open(out / "samples/step_0000004.png")
    # 4 images of 28 px, enlarged to 84, in a 2x2 grid with gutters, under a caption naming the sampler.
    assert grid.mode == "L" and grid.size[1] == CAPTION_HEIGHT + 2 + 2 * 86 and grid.size[0] >= 2 + 2 * 86
    assert PIL.Image.open(out / "loss_curve.png").size[0] > 400
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "run_info.json"} <= {p.name for p in (out / "checkpoints/checkpoint-4").iterdir()}
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_the_saved_pipeline_loads_samples_and_holds_the_ema_weights(finished_run):
    out = finished_run[0]
    pipeline = DDPMPipeline.from_pretrained(str(out))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=4, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (4, 28, 28, 1) and (0 <= images).all() and (images <= 1).all()

    ema_state = read_training_state(str(out / "checkpoints/checkpoint-4"))["ema"]
    assert ema_state["applied_updates"] == 4
    saved = [p.detach() for p in pipeline.unet.parameters()]
    assert all(torch.equal(s, e) for s, e in zip(saved, ema_state["shadow"])), "pipeline weights are not the EMA weights"
    live = _weights(out / "checkpoints/checkpoint-4/model.safetensors")
    assert any(not torch.equal(live[k], v) for k, v in pipeline.unet.state_dict().items()), "EMA equals the live weights"


def _config(out, **overrides) -> TrainingConfig:
    values = dict(output_dir=str(out), train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1, save_images_steps=0,
                  report_to="none", timestep_sampling="stratified", max_train_steps=6, checkpointing_steps=0, lr_warmup_steps=2,
                  eval_batch_size=4, num_inference_steps=2)  # the final grid: 4 images, 2 steps
    values.update(overrides)
    return TrainingConfig(**values)


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    train(_config(tmp_path / "straight"))
    train(_config(tmp_path / "split", max_train_steps=3, checkpointing_steps=3))
    train(_config(tmp_path / "split", checkpointing_steps=3, resume_from_checkpoint="latest"))
    for name in ["checkpoints/checkpoint-6/model.safetensors", "unet/diffusion_pytorch_model.safetensors"]:
        _assert_same_weights(_weights(tmp_path / "straight" / name), _weights(tmp_path / "split" / name), atol=1e-6)
    straight = [json.loads(x)["loss"] for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x)["loss"] for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert split == pytest.approx(straight, rel=1e-5) and len(split) == 6


def test_the_speed_options_compute_the_same_training_step(tmp_path):
    # Channels-last and foreach AdamW change how the step runs, not what it computes: the default
    # run (fused AdamW, NCHW) must agree, well below what one step at this rate moves (~1e-3).
    fast = [*FAST, "--learning_rate", "1e-3", "--lr_warmup_steps", "0"]
    default = run_train([*fast, "--output_dir", str(tmp_path / "default")])
    tuned = run_train([*fast, "--channels_last", "--optimizer_implementation", "foreach", "--output_dir", str(tmp_path / "tuned")])
    assert default.returncode == 0 and tuned.returncode == 0, tuned.stderr[-3000:]
    assert "| step: AdamW fused\n" in default.stdout
    assert "| step: AdamW foreach, channels-last\n" in tuned.stdout
    name = "unet/diffusion_pytorch_model.safetensors"
    _assert_same_weights(_weights(tmp_path / "default" / name), _weights(tmp_path / "tuned" / name), atol=2e-4)


def test_torch_compile_trains_like_eager_mode_with_the_backend_accelerate_was_given(tmp_path):
    # `accelerate launch --dynamo_backend aot_eager` sets this variable; with it, --torch_compile
    # compiles with that backend instead of inductor. Two real steps must move the weights as
    # eager mode does. (This CPU's inductor is refused by the gradient check: the next test shows
    # the check refusing a compiler that gets the gradients wrong.)
    fast = [*FAST, "--max_train_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0"]
    compiled = run_train([*fast, "--torch_compile", "--output_dir", str(tmp_path / "compiled")], ACCELERATE_DYNAMO_BACKEND="AOT_EAGER")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "| step: AdamW fused, torch.compile (aot_eager)\n" in compiled.stdout
    eager = run_train([*fast, "--output_dir", str(tmp_path / "eager")])
    assert eager.returncode == 0, eager.stderr[-3000:]
    name = "checkpoints/checkpoint-2/model.safetensors"  # the live weights: one step moves each by about the learning rate
    _assert_same_weights(_weights(tmp_path / "compiled" / name), _weights(tmp_path / "eager" / name), atol=2e-4)


def test_the_compile_check_refuses_a_compiler_whose_gradients_are_wrong_and_passes_a_correct_one():
    from accelerate import Accelerator

    from ddpm_hf.environment import check_compiled_gradients
    from ddpm_hf.errors import UserError

    def halves_gradients(graph, example_inputs):
        """A miscompiled backward: the forward values are right, the gradient through them is half."""
        def run(*inputs):
            return [o.detach() + 0.5 * (o - o.detach()) if isinstance(o, torch.Tensor) and o.requires_grad else o for o in graph(*inputs)]
        return run

    config = TrainingConfig(model_preset="tiny", train_batch_size=2)
    unet = build_unet(unet_config(config, 1, 28))
    objective = DiffusionObjective.from_config(config, build_noise_scheduler(config).alphas_cumprod)
    accelerator = Accelerator(cpu=True)
    with pytest.raises(UserError, match=r"^--torch_compile gives wrong gradients here: (\d+) of \1 weights disagree with eager mode \(a PyTorch compiler bug on cpu\); train without --torch_compile$"):
        check_compiled_gradients(accelerator, torch.compile(unet, backend=halves_gradients), unet, objective, config, None)
    torch._dynamo.reset()
    check_compiled_gradients(accelerator, torch.compile(unet, backend="aot_eager"), unet, objective, config, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Conditional, loss-aware and validated: every path that gathers across processes is taken.
TWO_PROCESS_ARGS = [*FAST, "--max_train_steps", "8", "--checkpointing_steps", "2", "--class_conditional", "--timestep_sampling", "loss_aware",
                    "--validation_split", "0.01", "--validation_steps", "4", "--train_batch_size", "4"]


def _launch_two_processes(out, *extra: str) -> list[str]:
    """`accelerate launch` of train_ddpm.py on two CPU processes (gloo), as a user types it."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "train_ddpm.py", *TWO_PROCESS_ARGS, "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    result = subprocess.run(_launch_two_processes(out), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 x 2 processes" in result.stdout
    return out


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(two_process_run, tmp_path):
    one = run_train([*TWO_PROCESS_ARGS, "--train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]

    two = two_process_run
    assert (two / "checkpoints/checkpoint-8/random_states_1.pkl").is_file()  # both processes' RNG states
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 4  # one set of outputs, not one per process
    stats = json.loads((two / "train_stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["ranks_identical"] is True  # every process ended with the same weights and EMA
    # Data, noise and timesteps are drawn for the global batch, so only float reduction order differs.
    _assert_same_weights(_weights(two / "checkpoints/checkpoint-8/model.safetensors"), _weights(tmp_path / "one/checkpoints/checkpoint-8/model.safetensors"), atol=1e-5)
    _assert_same_weights(_weights(two / "unet/diffusion_pytorch_model.safetensors"), _weights(tmp_path / "one/unet/diffusion_pytorch_model.safetensors"), atol=1e-5)
    # The validation set of 50 is split 25 + 25 over the processes and gathered back whole.
    validation = [[json.loads(x)["val_loss"] for x in (run / "validation.jsonl").read_text().splitlines()] for run in (two, tmp_path / "one")]
    assert len(validation[0]) == 2 and validation[0] == pytest.approx(validation[1], rel=1e-5)
    sampler_states = [read_training_state(str(run / "checkpoints/checkpoint-8"))["timestep_sampler"] for run in (two, tmp_path / "one")]
    assert torch.equal(sampler_states[0]["counts"], sampler_states[1]["counts"]) and sampler_states[0]["counts"].sum() == 64


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc), oldest first."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return sorted(children)


def test_a_worker_killed_in_a_two_process_run_ends_the_run_and_the_same_command_resumes_it_exactly(two_process_run, tmp_path):
    out = tmp_path / "killed"
    launcher = subprocess.Popen(_launch_two_processes(out), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints/checkpoint-2").is_dir() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _children(launcher.pid)
    assert launcher.poll() is None and len(workers) == 2, "the run ended before a worker could be killed"
    os.kill(workers[0], signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.monotonic() - killed_at < 60, stderr[-3000:]
    saved = sorted((out / "checkpoints").iterdir())
    assert saved and all(checkpoint_problem(str(p)) is None for p in saved if p.name.startswith("checkpoint-"))  # none half-written
    assert not (out / "checkpoints/checkpoint-8").exists(), "the kill landed after the run had finished"

    resumed = subprocess.run(_launch_two_processes(out, "--resume_from_checkpoint", "latest"), cwd=REPO, env=cli_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    for name in ("checkpoints/checkpoint-8/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        _assert_same_weights(_weights(two_process_run / name), _weights(out / name), atol=0.0)  # bitwise on the CPU


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar10_shaped_folder(tmp_path):
    """A local copy of uoft-cs/cifar10's layout: plain_text/{train,test}-*.parquet with `img` and `label`."""
    import datasets
    import numpy as np

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_CLASSES)})
    rng = np.random.default_rng(0)
    for split, count in [("train", 16), ("test", 4)]:
        images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
        ds = datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(count)]}, features=features)
        (tmp_path / "cifar10" / "plain_text").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(tmp_path / "cifar10" / "plain_text" / f"{split}-00000-of-00001.parquet")
    return tmp_path / "cifar10"


def test_rgb_cifar10_layout_trains_in_bf16_and_saves_an_rgb_pipeline(tmp_path, cifar10_shaped_folder):
    out = tmp_path / "out"
    result = run_train([*FAST, "--dataset_name", str(cifar10_shaped_folder), "--mixed_precision", "bf16", "--validation_split", "test", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "examples: 16 " in result.stdout and "32x32x3" in result.stdout and "precision: bf16" in result.stdout
    assert "validation: 4 " in result.stdout  # the dataset's own test split
    config = json.loads((out / "train_stats.json").read_text())
    assert config["mixed_precision"] == "bf16" and config["config"]["random_flip"] is None  # None = on for RGB
    pipeline = DDPMPipeline.from_pretrained(str(out))
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 32, 32, 3)


def test_streaming_trains_and_records_its_position(tmp_path):
    stats = train(_config(tmp_path / "s", streaming=True, max_train_samples=24, dataloader_num_workers=0, max_train_steps=4,
                          gradient_accumulation_steps=1, checkpointing_steps=4, shuffle_buffer_size=8))
    assert stats["images_seen"] == 16
    state = read_training_state(str(tmp_path / "s/checkpoints/checkpoint-4"))
    assert state["progress"]["step"] == 4 and state["data"] == {"epoch": 0, "consumed": 16}


def test_loss_aware_sampler_state_is_restored_on_resume(tmp_path):
    # T = 4 so that every timestep has its 10 losses within the first few steps.
    loss_aware = dict(timestep_sampling="loss_aware", ddpm_num_steps=4, gradient_accumulation_steps=1, train_batch_size=16, max_train_steps=10)
    train(_config(tmp_path / "straight", **loss_aware, checkpointing_steps=10))
    train(_config(tmp_path / "split", **{**loss_aware, "max_train_steps": 5}, checkpointing_steps=5))
    train(_config(tmp_path / "split", **loss_aware, checkpointing_steps=5, resume_from_checkpoint="latest"))
    states = [read_training_state(str(tmp_path / run / "checkpoints/checkpoint-10"))["timestep_sampler"] for run in ("straight", "split")]
    at_5 = read_training_state(str(tmp_path / "split/checkpoints/checkpoint-5"))["timestep_sampler"]
    assert (at_5["counts"] == 10).all(), "the sampler should be past its warm-up at the checkpoint"
    assert torch.equal(states[0]["losses"], states[1]["losses"]) and torch.equal(states[0]["counts"], states[1]["counts"])
    _assert_same_weights(_weights(tmp_path / "straight/checkpoints/checkpoint-10/model.safetensors"),
                         _weights(tmp_path / "split/checkpoints/checkpoint-10/model.safetensors"), atol=1e-6)


def test_class_conditional_training_saves_a_guided_pipeline_and_draws_one_row_per_class(tmp_path):
    out = tmp_path / "cond"
    result = run_train([*FAST, "--class_conditional", "--eval_batch_size", "20", "--save_images_steps", "4", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "10 classes + null" in result.stdout
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "ClassConditionalDDPMPipeline"
    grid = PIL.Image.open(out / "samples/step_0000004.png")
    assert grid.size[1] == CAPTION_HEIGHT + 2 + 10 * 86  # 20 images: 10 rows (one per digit) of 2

    pipeline = ClassConditionalDDPMPipeline.from_pretrained(str(out))
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.num_classes == 10 and pipeline.unet.config.num_class_embeds == 11
    images = pipeline([0, 7, 9], guidance_scale=3.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (3, 28, 28, 1)

    # The labels reached the network: class embeddings moved from their initial values.
    config = TrainingConfig(class_conditional=True)
    torch.manual_seed(config.seed)
    initial = build_unet(unet_config(config, 1, 28, num_class_embeds=11)).class_embedding.weight
    moved = (pipeline.unet.class_embedding.weight - initial).abs().amax(dim=1) > 0
    assert moved.sum() >= 5, moved


def test_checkpoint_rotation_keeps_the_newest(tmp_path):
    train(_config(tmp_path / "r", max_train_steps=4, gradient_accumulation_steps=1, checkpointing_steps=1, checkpoints_total_limit=2))
    assert sorted(p.name for p in (tmp_path / "r/checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_extra_ema_lengths_give_loadable_pipelines_to_choose_from_and_resume_bitwise(tmp_path):
    extra = dict(extra_ema_decays=[0.6, 0.5], learning_rate=1e-3)
    train(_config(tmp_path / "straight", **extra))
    train(_config(tmp_path / "split", max_train_steps=3, checkpointing_steps=3, **extra))
    train(_config(tmp_path / "split", checkpointing_steps=3, resume_from_checkpoint="latest", **extra))
    index = json.loads((tmp_path / "straight/weights.json").read_text())
    assert index == {"default": "ema-0.9999", "choices": {"ema-0.9999": ".", "raw": "weights/raw", "ema-0.6": "weights/ema-0.6", "ema-0.5": "weights/ema-0.5"}}
    name = "unet/diffusion_pytorch_model.safetensors"
    weights = {}
    for choice, folder in index["choices"].items():
        straight, split = _weights(tmp_path / "straight" / folder / name), _weights(tmp_path / "split" / folder / name)
        assert all(torch.equal(straight[k], split[k]) for k in straight), f"{choice} differs after a resume"
        weights[choice] = straight
        assert isinstance(DDPMPipeline.from_pretrained(str(tmp_path / "straight" / folder)), DDPMPipeline)
    # Four different weight sets, the shorter the average the closer to the raw weights: the warm-up decay
    # 1 - n^-0.75 passes 0.5 at update 3 and 0.6 at update 4, and reaches only 0.74 by update 6.
    distance = {c: sum((w[k] - weights["raw"][k]).pow(2).sum().item() for k in w) for c, w in weights.items()}
    assert 0 == distance["raw"] < distance["ema-0.5"] < distance["ema-0.6"] < distance["ema-0.9999"]


def test_the_weights_choice_is_checked_by_the_commands(tmp_path):
    train(_config(tmp_path / "run", max_train_steps=2, extra_ema_decays=[0.99]))
    drawn = run_module("ddpm_hf.sample", str(tmp_path / "run"), "--weights", "raw", "--num_images", "1", "--num_inference_steps", "2",
                       "--grid", str(tmp_path / "raw.png"))
    assert drawn.returncode == 0 and (tmp_path / "raw.png").is_file(), drawn.stderr[-2000:]
    wrong = run_module("ddpm_hf.sample", str(tmp_path / "run"), "--weights", "ema-0.5", "--grid", str(tmp_path / "g.png"))
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1] == f"error: --weights 'ema-0.5' is not a choice of {tmp_path / 'run'}; its choices are ema-0.9999, raw, ema-0.99"


@pytest.mark.parametrize("avx512_bf16, amx, noted", [(False, False, True), (True, False, False), (False, True, False)])
def test_bf16_on_an_x86_cpu_without_bf16_instructions_gets_a_note(monkeypatch, avx512_bf16, amx, noted):
    # Without them autocast emulates bf16 and runs slower than fp32: the user should hear it at start-up.
    from ddpm_hf import environment
    monkeypatch.setattr(environment.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    note = environment.bf16_note(TrainingConfig(mixed_precision="bf16"), torch.device("cpu"))
    assert (note is not None and "no bf16 instructions" in note and "--mixed_precision no" in note) == noted
    assert environment.bf16_note(TrainingConfig(mixed_precision="no"), torch.device("cpu")) is None
    assert environment.bf16_note(TrainingConfig(mixed_precision="bf16"), torch.device("cuda")) is None
