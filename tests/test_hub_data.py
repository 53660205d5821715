"""The Hub paths for real, against a loopback Hub (tests/loopback_hub.py) that serves ylecun/mnist
and uoft-cs/cifar10 in their published layouts: downloads, the cache, streaming, offline reruns,
pushed models sampled by id, and faults on the wire. Each test runs the real command line; the
server's request log shows what came over HTTP. `pytest -k 'hub and (mnist or cifar or stream)'`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from .conftest import FAST, REPO, cli_env, run_module, run_train
from .hub_repos import cifar10_repo, mnist_repo
from .loopback_hub import Fault, LoopbackHub

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    mnist_repo(root)
    cifar10_repo(root)
    server = LoopbackHub(root)
    server.shared_cache = tmp_path_factory.mktemp("hf-home")
    yield server
    server.close()


@pytest.fixture
def through(hub):
    """The environment of a command that talks to the loopback Hub; the request log starts empty. The
    Hugging Face cache is shared by the module's tests (so their commands share one zygote, see
    forked_cli.py); a test about downloading gives its commands a fresh one."""
    hub.requests.clear()
    hub.faults.clear()
    hub.gone, hub.valid_tokens = False, None
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(hub.shared_cache), "HF_TOKEN": "hf_loopback"}


@pytest.fixture(scope="module")
def streamed_straight(hub, tmp_path_factory):
    """An uninterrupted streaming run: the weights an interrupted one must end with."""
    out = tmp_path_factory.mktemp("streamed") / "straight"
    result = run_train(_streaming_args(out, STREAM_STEPS), HF_ENDPOINT=hub.url, HF_HOME=str(hub.shared_cache), HF_TOKEN="hf_loopback")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _same_weights(a, b) -> bool:
    a, b = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_mnist_is_downloaded_trained_on_and_a_second_run_offline_asks_nothing(hub, through, tmp_path):
    through = {**through, "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache: everything must come over HTTP
    first = run_train([*FAST, "--dataset_name", "ylecun/mnist", "--output_dir", str(tmp_path / "online")], **through)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "examples: 96 |" in first.stdout
    shards = sorted({p.rsplit("/", 1)[-1] for p in hub.requested("/datasets/ylecun/mnist/resolve/") if p.endswith(".parquet")})
    assert shards == ["test-00000-of-00001.parquet"] + [f"train-0000{i}-of-00003.parquet" for i in range(3)]  # datasets prepares every split
    assert hub.requested("/api/datasets/ylecun/mnist")  # the repo info came from the server too
    asked = len(hub.requests)
    offline = run_train([*FAST, "--dataset_name", "ylecun/mnist", "--output_dir", str(tmp_path / "offline")], HF_HUB_OFFLINE="1", **through)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert len(hub.requests) == asked  # everything came from the cache
    assert _same_weights(tmp_path / "online", tmp_path / "offline")  # the same data, the same seed: the same run


def test_hub_mnist_config_and_named_splits(hub, through, tmp_path):
    out = tmp_path / "run"
    result = run_train([*FAST, "--dataset_name", "ylecun/mnist", "--dataset_config_name", "mnist", "--dataset_split", "test",
                        "--validation_split", "test", "--validation_steps", "2", "--output_dir", str(out)], **through)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "examples: 60 |" in result.stdout and "validation: 60 |" in result.stdout
    config = json.loads((out / "training_config.json").read_text())
    assert (config["dataset_name"], config["dataset_config_name"], config["dataset_split"]) == ("ylecun/mnist", "mnist", "test")
    assert [json.loads(line)["step"] for line in (out / "validation.jsonl").read_text().splitlines()] == [2, 4]
    wrong = run_train([*FAST, "--dataset_name", "ylecun/mnist", "--dataset_split", "validation", "--output_dir", str(tmp_path / "w")], **through)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr and "validation" in wrong.stderr.strip().splitlines()[-1]


def test_hub_cifar10_trains_in_bf16_with_random_flips(hub, through, tmp_path):
    out = tmp_path / "run"
    result = run_train([*FAST, "--dataset_name", "uoft-cs/cifar10", "--mixed_precision", "bf16", "--random_flip", "--output_dir", str(out)], **through)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "examples: 120 |" in result.stdout and "precision: bf16" in result.stdout
    assert hub.requested("/datasets/uoft-cs/cifar10/resolve/") and all("plain_text/" in p or "README" in p or ".py" in p or ".json" in p or ".yaml" in p
                                                                       for p in hub.requested("/datasets/uoft-cs/cifar10/resolve/"))
    config = json.loads((out / "training_config.json").read_text())
    assert config["random_flip"] is True and config["mixed_precision"] == "bf16"
    unet = json.loads((out / "unet/config.json").read_text())
    assert (unet["in_channels"], unet["sample_size"]) == (3, 32)


STREAM_STEPS = 9  # 96 examples in batches of 16: 6 steps an epoch, so the run reads every shard twice


def _streaming_args(out, steps: int) -> list[str]:
    return [*FAST, "--dataset_name", "ylecun/mnist", "--streaming", "--dataloader_num_workers", "2", "--train_batch_size", "16",
            "--max_train_steps", str(steps), "--checkpointing_steps", "3", "--output_dir", str(out), "--resume_from_checkpoint", "latest"]


def test_hub_mnist_streams_several_shards_with_workers_and_resumes_exactly_after_a_kill(hub, through, streamed_straight, tmp_path):
    # The same command as the straight run, killed once a checkpoint is on disk, then run again.
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "train_ddpm.py", *_streaming_args(out, STREAM_STEPS)], cwd=REPO, env=cli_env(**through),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints/checkpoint-3").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and not (out / "unet").exists()  # killed before the end
    resumed = run_train(_streaming_args(out, STREAM_STEPS), **through)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert len({p for p in hub.requested("/datasets/ylecun/mnist/resolve/") if "/mnist/train-" in p}) == 3  # every shard over HTTP
    assert _same_weights(streamed_straight, out)


def test_hub_model_pushed_then_sampled_evaluated_and_loaded_by_its_id(hub, through, tmp_path):
    out = tmp_path / "run"
    pushed = run_train([*FAST, "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "local-user/tiny-digits", "--guide_step", "2",
                        "--guidance_scale", "1.5"], **through)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    sampled = run_module("ddpm_hf.sample", "local-user/tiny-digits", "--num_images", "2", "--num_inference_steps", "2",
                         "--grid", str(tmp_path / "grid.png"), **through)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert PIL.Image.open(tmp_path / "grid.png").size[0] > 100
    downloaded = hub.requested("/local-user/tiny-digits/resolve/")
    assert any(p.endswith(WEIGHTS) for p in downloaded) and any(p.endswith("guide/diffusion_pytorch_model.safetensors") for p in downloaded)
    # The pushed run's guide came with it: sampled by id, it is autoguided at the run's weight.
    assert json.loads(sampled.stdout.strip().splitlines()[-1])["guidance_scale"] == 1.5
    # A model without a guide (the Hub answers EntryNotFound for guide/guidance.json) is sampled plainly.
    (hub.repo_path("models", "local-user/plain")).mkdir(parents=True)
    for name in ["model_index.json", "unet/config.json", WEIGHTS, "scheduler/scheduler_config.json"]:
        (hub.repo_path("models", "local-user/plain") / name).parent.mkdir(parents=True, exist_ok=True)
        (hub.repo_path("models", "local-user/plain") / name).write_bytes((out / name).read_bytes())
    plain = run_module("ddpm_hf.sample", "local-user/plain", "--num_images", "1", "--num_inference_steps", "2", "--grid", str(tmp_path / "plain.png"),
                       **through)
    assert plain.returncode == 0 and json.loads(plain.stdout.strip().splitlines()[-1])["autoguidance"] is False, plain.stderr[-3000:]
    scored = run_module("ddpm_hf.evaluate", "local-user/tiny-digits", "--bpd", "--bpd_images", "2", "--bpd_timesteps", "2",
                        "--report_dir", str(tmp_path / "report"), **through)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads((tmp_path / "report/evaluation.json").read_text())["bits_per_dim"]["bits_per_dim"] > 0
    loaded = subprocess.run([sys.executable, "-c", "from diffusers import DDPMPipeline; p = DDPMPipeline.from_pretrained('local-user/tiny-digits'); "
                             "print(type(p).__name__, p.unet.config.sample_size); from ddpm_hf.pipeline import AutoGuidedDDPMPipeline as A; "
                             "g = A.from_run('local-user/tiny-digits'); print(type(g.guide).__name__, g.config.guidance_scale)"],
                            cwd=tmp_path, env=cli_env(**through, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.split() == ["DDPMPipeline", "28", "UNet2DModel", "1.5"], loaded.stderr[-2000:]


def test_hub_mnist_download_cut_off_is_retried_and_when_it_keeps_failing_refused_with_nothing_partial_kept(hub, through, tmp_path):
    through = {**through, "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache: the cut-off file must be downloaded
    hub.faults.append(Fault("train-00001-of-00003.parquet", drop_after=2000, times=1))
    once = run_train([*FAST, "--dataset_name", "ylecun/mnist", "--output_dir", str(tmp_path / "once")], **through)
    assert once.returncode == 0 and "examples: 96 |" in once.stdout, once.stderr[-3000:]
    statuses = [s for m, p, s in hub.requests if m == "GET" and p.endswith("train-00001-of-00003.parquet")]
    assert statuses == [-1, 200]  # cut off after 2,000 bytes, then fetched whole
    # A connection that drops every time: huggingface_hub's retries run out, and the run says what to do.
    hub.faults.append(Fault("train-00001-of-00003.parquet", drop_after=2000, times=1000))
    fresh = {**through, "HF_HOME": str(tmp_path / "fresh-cache")}
    failing = run_train([*FAST, "--dataset_name", "ylecun/mnist", "--output_dir", str(tmp_path / "failing")], **fresh)
    assert failing.returncode == 2 and "Traceback" not in failing.stderr
    last = failing.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not load 'ylecun/mnist' from the Hub: RemoteProtocolError: peer closed connection")
    assert "run the same command again" in last and "a partial one is never used" in last
    cached = {p.name: p for p in (tmp_path / "fresh-cache").rglob("*.parquet")}
    assert "train-00001-of-00003.parquet" not in cached and not list((tmp_path / "fresh-cache").rglob("*.incomplete"))
    hub.faults.clear()
    again = run_train([*FAST, "--dataset_name", "ylecun/mnist", "--output_dir", str(tmp_path / "failing")], **fresh)
    assert again.returncode == 0 and "examples: 96 |" in again.stdout, again.stderr[-3000:]
    served = hub.repo_path("datasets", "ylecun/mnist") / "mnist"
    for path in (tmp_path / "fresh-cache").rglob("train-*.parquet"):
        assert path.read_bytes() == (served / path.name).read_bytes()  # every cached shard is whole


def test_hub_mnist_stream_failing_mid_run_stops_with_a_checkpoint_and_the_same_command_resumes_exactly(hub, through, streamed_straight, tmp_path):
    out = tmp_path / "broken"
    fault = Fault("/mnist/train-", status=500, times=10**6, active=False)
    hub.faults.append(fault)
    process = subprocess.Popen([sys.executable, "train_ddpm.py", *_streaming_args(out, STREAM_STEPS)], cwd=REPO, env=cli_env(**through),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints/checkpoint-3").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    fault.active = True  # the Hub starts failing while the run streams: the next shard read gets a 500
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: reading the training data failed: Server error '500") and "the run is checkpointed at step" in last
    step = int(last.split("the run is checkpointed at step ")[1].split()[0])
    assert 3 <= step < STREAM_STEPS and (out / f"checkpoints/checkpoint-{step}").is_dir() and not (out / "unet").exists()
    fault.active = False
    resumed = run_train(_streaming_args(out, STREAM_STEPS), **through)
    assert resumed.returncode == 0 and f"resumed from {out / 'checkpoints'}/checkpoint-{step}" in resumed.stdout, resumed.stderr[-3000:]
    assert _same_weights(streamed_straight, out)


def _pushed_run(out, repo: str, checkpoints: bool) -> list[str]:
    return [*FAST, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out), "--push_to_hub", "--hub_model_id", repo,
            *(["--push_checkpoints"] if checkpoints else [])]


# The Hub gone (503) during the final push (huggingface_hub retries a commit five times, about 25 s of
# waiting each, so the checkpoint uploads are left to the next case), and a token that expires
# mid-run (401, not retried) during the checkpoint uploads and the final push.
@pytest.mark.parametrize("status, checkpoints, says", [(503, False, "Service Unavailable"), (401, True, "the Hub refused the token: log in again")])
def test_hub_push_failing_mid_run_leaves_a_complete_run_and_the_push_command_pushes_it_later(hub, through, tmp_path, status, checkpoints, says):
    """The repo is created at the start; then every commit fails."""
    out, repo = tmp_path / "run", f"local-user/pushed-later-{status}"
    hub.faults.append(Fault("/commit/", status=status, times=10**6, method="POST"))
    result = run_train(_pushed_run(out, repo, checkpoints), **through)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "done: 4 steps" in result.stdout and ("warning: a checkpoint upload failed" in result.stdout) == checkpoints
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the run is saved in {out}, but pushing it to the Hub failed: ") and says in last
    assert last.endswith(f"push it later with `python -m ddpm_hf.push {out} --hub_model_id {repo}`")
    for name in ("model_index.json", WEIGHTS, "train_stats.json", "README.md", "checkpoints/checkpoint-4/model.safetensors"):
        assert (out / name).is_file(), name  # the local run is complete
    assert not (hub.repo_path("models", repo) / "model_index.json").exists()
    hub.faults.clear()
    measured = run_module("ddpm_hf.evaluate", str(out), "--bpd", "--bpd_images", "2", "--bpd_timesteps", "2", **through)
    assert measured.returncode == 0, measured.stderr[-3000:]
    pushed = run_module("ddpm_hf.push", str(out), "--hub_model_id", repo, **through)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    served = hub.repo_path("models", repo)
    assert (served / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes() and (served / "README.md").is_file()
    # The card carries what evaluate measured as model-index metadata, which the server's YAML check accepted.
    (metadata,) = [card for card in hub.validated_cards if card.get("model-index", [{}])[0].get("name") == repo]
    (result,) = metadata["model-index"][0]["results"]
    assert result["task"]["type"] == "unconditional-image-generation" and result["dataset"]["name"] == "mnist-5k-offline"
    (metric,) = result["metrics"]
    bpd = json.loads((out / "evaluation/evaluation.json").read_text())["bits_per_dim"]["bits_per_dim"]
    assert metric["type"] == "bits_per_dim" and metric["value"] == round(bpd, 4) and "2 stratified terms per image" in metric["name"]
    assert (served / "samples/step_0000004.png").is_file() and not (served / "checkpoints").exists()
    refused = run_module("ddpm_hf.push", str(tmp_path), **through)
    assert refused.returncode == 2 and "holds no finished pipeline" in refused.stderr
