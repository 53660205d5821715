"""Pushing to the Hub, against a loopback server that speaks the upload protocol."""

import json

import yaml

from .conftest import FAST, run_train
from .test_cli_errors import assert_one_line_error


def test_push_to_hub_commits_the_pipeline_the_card_and_checkpoints(tmp_path, recording_hub):
    endpoint, hub = recording_hub
    out = tmp_path / "run"
    result = run_train([*FAST, "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "tester/ddpm-test", "--hub_token", "hf_secret_token",
                        "--hub_private_repo", "--push_checkpoints", "--checkpointing_steps", "2"], HF_ENDPOINT=endpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    # Every write the client made was one the loopback Hub understood (it may also GET optional registries).
    assert not [call for call in hub.unknown if call.startswith("POST")], hub.unknown
    assert hub.created == [{"name": "ddpm-test", "organization": "tester", "visibility": "private"}]
    assert hub.authorizations == {"Bearer hf_secret_token"}

    checkpoint_commits = sorted(c["summary"] for c in hub.commits if c["summary"].startswith("Checkpoint"))
    assert checkpoint_commits == ["Checkpoint checkpoint-2", "Checkpoint checkpoint-4"]
    pushed_2 = next(c for c in hub.commits if c["summary"] == "Checkpoint checkpoint-2")["files"]
    assert "checkpoints/checkpoint-2/model.safetensors" in pushed_2 and "checkpoints/checkpoint-2/run_info.json" in pushed_2
    assert not (out / ".hub-staging").exists() or not any((out / ".hub-staging").iterdir())  # staging copies cleaned up

    final = hub.commits[-1]
    assert final["repo"] == "tester/ddpm-test" and final["summary"] == "Training run: 4 steps"
    files = final["files"]
    for name in ["README.md", "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "training_config.json", "train_stats.json", "metrics.jsonl", "loss_curve.png", "samples/step_0000004.png"]:
        assert name in files, name
    assert not any(name.startswith(("checkpoints/", "logs/", ".hub-staging")) for name in files)
    assert files["unet/diffusion_pytorch_model.safetensors"] == (out / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert json.loads(files["training_config.json"])["hub_token"] is None
    everything = b"".join(f for c in hub.commits for f in c["files"].values())
    assert b"hf_secret_token" not in everything  # the token is never written or pushed

    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert hub.validated_cards == [metadata]  # huggingface_hub had the card's metadata checked before committing
    assert metadata["library_name"] == "diffusers" and "ddpm" in metadata["tags"] and "unconditional-image-generation" in metadata["tags"]
    assert "DDPMPipeline.from_pretrained(\"tester/ddpm-test\")" in card
    assert "![samples](samples/step_0000004.png)" in card and "![loss curve](loss_curve.png)" in card
    assert "| `learning_rate` | `0.0002` |" in card and "| `max_train_steps` | `4` |" in card
    assert "| final_loss_smoothed |" in card


def test_card_names_a_hub_dataset():
    from ddpm_hf.hub import model_card

    card = model_card("me/model", {"dataset_name": "uoft-cs/cifar10", "class_conditional": True, "model_preset": "cifar10"}, {"steps": 10}, None)
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["datasets"] == ["uoft-cs/cifar10"] and "classifier-free-guidance" in metadata["tags"]
    assert "ClassConditionalDDPMPipeline.from_pretrained(\"me/model\")" in card and "![samples]" not in card


def test_a_refused_repo_fails_before_training(tmp_path, recording_hub):
    endpoint, hub = recording_hub
    hub.refuse_create = True
    out = tmp_path / "run"
    result = run_train([*FAST, "--output_dir", str(out), "--push_to_hub", "--hub_token", "bad"], HF_ENDPOINT=endpoint)
    assert_one_line_error(result, "cannot create or open the Hub repo 'run'", "--hub_token")
    assert not (out / "checkpoints").exists() and hub.commits == []


def test_push_checkpoints_needs_push_to_hub(tmp_path):
    result = run_train([*FAST, "--output_dir", str(tmp_path / "o"), "--push_checkpoints"])
    assert_one_line_error(result, "--push_checkpoints needs --push_to_hub")


def test_the_card_lists_what_was_measured_as_model_index(tmp_path):
    import yaml

    from ddpm_hf.hub import measured_results, model_card

    from .loopback_hub import _check_card

    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation/evaluation.json").write_text(json.dumps({
        "extractor": "digits-v2-abc", "model_scores": {"fid": 20.21234, "num_images": 500, "sampler": "ddpm", "steps": 250},
        "bits_per_dim": {"bits_per_dim": 2.09578, "exact": False, "timesteps_per_image": 50, "images": "128 training images"}}))
    results = measured_results(str(tmp_path))
    assert results == [{"metric": "fid", "name": "digit-FID (500 samples, DDPM 250 steps)", "value": 20.2123},
                       {"metric": "bits_per_dim", "name": "bits/dim (50 stratified terms per image, 128 training images)", "value": 2.0958}]
    card = model_card("me/digits", {"dataset_name": "ylecun/mnist", "dataset_split": "train", "model_preset": "tiny"}, {"steps": 10}, None, results)
    problems, metadata = _check_card(card)
    assert problems == [] and metadata["model-index"][0]["name"] == "me/digits"
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m["value"]) for m in metrics] == [("fid", 20.2123), ("bits_per_dim", 2.0958)]
    assert metadata["model-index"][0]["results"][0]["dataset"] == {"name": "ylecun/mnist", "type": "ylecun/mnist", "split": "train"}
    assert "| digit-FID (500 samples, DDPM 250 steps) | 20.2123 |" in card
    assert "model-index" not in yaml.safe_load(model_card("me/x", {}, {}, None).split("---")[1])  # nothing measured: no model-index
