"""Talking to the Hugging Face Hub: a fast reachability check before `datasets` starts retrying."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from huggingface_hub import constants, get_token

from .errors import UserError, first_line

OFFLINE_HINT = (
    "train offline with --dataset_name mnist-5k-offline (bundled digits) or --train_data_dir DIR (local images), "
    "or set HF_HUB_OFFLINE=1 to use a dataset already in the local cache"
)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), read now rather than at import time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def check_dataset_on_hub(repo_id: str, timeout: float = 5.0) -> None:
    """Ask the Hub about ``repo_id`` once, within ``timeout`` seconds.

    `datasets` retries an unreachable Hub for minutes before failing; one quick request lets
    us fail in seconds with a message naming the offline options instead.
    """
    url = f"{hub_endpoint()}/api/datasets/{repo_id}"
    request = urllib.request.Request(url, headers={"User-Agent": "ddpm-hf"})
    token = get_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            json.load(response)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403, 404):
            raise UserError(
                f"dataset '{repo_id}' was not found on the Hub ({hub_endpoint()} answered {e.code}); "
                "check the id, log in with `hf auth login` if it is private, or pass a local folder"
            ) from None
        raise UserError(f"the Hub answered {e.code} for dataset '{repo_id}'; try again later, or {OFFLINE_HINT}") from None
    except json.JSONDecodeError:
        raise UserError(f"{hub_endpoint()} did not answer like the Hugging Face Hub (no JSON for dataset '{repo_id}'); check HF_ENDPOINT, or {OFFLINE_HINT}") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot reach the Hugging Face Hub at {hub_endpoint()} ({reason}); {OFFLINE_HINT}") from None


# ----------------------------------------------------------------------------------------------
# Pushing a run: the final pipeline with a model card, and checkpoints in the background
# ----------------------------------------------------------------------------------------------
# What a pushed run holds: the pipeline, the card and the run's record; not checkpoints (pushed
# separately with --push_checkpoints), TensorBoard logs, or the evaluation cache.
PUSHED_PATTERNS = ["README.md", "model_index.json", "unet/*", "scheduler/*", "training_config.json", "train_stats.json",
                   "metrics.jsonl", "validation.jsonl", "loss_curve.png", "diagnostics/*", "best/**", "evaluation/*",
                   "guide/*"]


class HubPusher:
    """Creates the model repo at the start of a run (so a bad token or name fails in seconds, not
    after hours of training), pushes checkpoints without blocking training, and the final run."""

    def __init__(self, repo_id: str, token: str | None, private: bool):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=hub_endpoint(), token=token)
        try:
            self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        except Exception as e:  # HfHubHTTPError, connection errors, ...: all about the user's setup
            raise UserError(f"cannot create or open the Hub repo '{repo_id}' at {hub_endpoint()}: {first_line(e)}; "
                            "check --hub_model_id and your token (`hf auth login` or --hub_token)") from None
        self.pending = []  # futures of checkpoint uploads

    def push_checkpoint_in_background(self, checkpoint: str, staging_root: str) -> None:
        """Upload a checkpoint from a hard-linked copy, so rotation can delete the original meanwhile."""
        import shutil

        staging = os.path.join(staging_root, os.path.basename(checkpoint))
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(checkpoint, staging, copy_function=os.link)
        except OSError:  # another file system: a real copy
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(checkpoint, staging)
        future = self.api.upload_folder(repo_id=self.repo_id, folder_path=staging, path_in_repo=f"checkpoints/{os.path.basename(checkpoint)}",
                                        commit_message=f"Checkpoint {os.path.basename(checkpoint)}", run_as_future=True)
        future.add_done_callback(lambda _: shutil.rmtree(staging, ignore_errors=True))
        self.pending.append(future)

    def wait_for_checkpoints(self) -> list[str]:
        """Wait for the background uploads; the messages of those that failed."""
        failures = []
        for future in self.pending:
            error = future.exception()
            if error is not None:
                failures.append(first_line(error))
        self.pending = []
        return failures

    def push_run(self, output_dir: str, commit_message: str, extra_files: tuple[str, ...] = ()) -> str:
        """Upload the pipeline, the card and the run's record (plus ``extra_files``, relative paths) in one commit."""
        try:
            info = self.api.upload_folder(repo_id=self.repo_id, folder_path=output_dir, allow_patterns=[*PUSHED_PATTERNS, *extra_files],
                                          commit_message=commit_message)
        except Exception as e:
            raise UserError(f"the run is saved in {output_dir}, but pushing it to the Hub failed: {first_line(e)}{_token_hint(e)}; "
                            f"push it later with `python -m ddpm_hf.push {output_dir} --hub_model_id {self.repo_id}`") from None
        return getattr(info, "commit_url", str(info))


def _token_hint(error: BaseException) -> str:
    """A refused token (expired, revoked, read-only) is worth naming: the fix is to log in again."""
    text = first_line(error)
    if "401" in text or "403" in text or "Invalid credentials" in text:
        return " (the Hub refused the token: log in again with `hf auth login` or pass a valid --hub_token)"
    return ""


def last_grid_of(output_dir: str) -> str | None:
    """The newest samples/step_*.png of a run, relative to its folder (pushed with the run for the model card)."""
    folder = os.path.join(output_dir, "samples")
    grids = sorted(name for name in os.listdir(folder) if name.startswith("step_") and name.endswith(".png")) if os.path.isdir(folder) else []
    return f"samples/{grids[-1]}" if grids else None


def measured_results(output_dir: str) -> list[dict]:
    """What the run's model was measured at, newest source first: `python -m ddpm_hf.evaluate`'s
    evaluation/evaluation.json (FID and bits/dim), else the last evaluation during training.
    Each: {"metric": "fid" | "bits_per_dim", "name", "value"}."""
    import json

    from .files import read_json

    measured = read_json(os.path.join(output_dir, "evaluation", "evaluation.json"))
    results = []
    scores = measured.get("model_scores")
    if scores and scores.get("fid") is not None:
        results.append(_fid_result(scores["fid"], measured.get("extractor", ""), scores.get("num_images"), f"{scores.get('sampler', '').upper()} {scores.get('steps')} steps"))
    if measured.get("bits_per_dim"):
        bpd = measured["bits_per_dim"]
        terms = "exact" if bpd.get("exact") else f"{bpd.get('timesteps_per_image')} stratified terms per image"
        results.append({"metric": "bits_per_dim", "name": f"bits/dim ({terms}, {bpd.get('images')})", "value": round(bpd["bits_per_dim"], 4)})
    if not scores:  # the last evaluation during training (--eval_steps)
        try:
            with open(os.path.join(output_dir, "evaluation.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):
            rows = []
        if rows and rows[-1].get("fid") is not None:
            results.insert(0, _fid_result(rows[-1]["fid"], rows[-1].get("extractor", ""), rows[-1].get("num_images"), f"step {rows[-1].get('step')}"))
    return results


def _fid_result(value: float, extractor: str, count, how: str) -> dict:
    kind = "digit-FID" if extractor.startswith("digits") else "FID"
    return {"metric": "fid", "name": f"{kind} ({count} samples, {how})", "value": round(float(value), 4)}


def model_card(repo_id: str, config: dict, stats: dict, sample_grid: str | None, measured: list[dict] | None = None) -> str:
    """README.md for the Hub: metadata (library diffusers, tags, dataset, and the measured results as
    `model-index`, which the Hub shows), usage, samples, loss curve, results, the config."""
    from huggingface_hub import EvalResult, ModelCardData

    conditional = bool(config.get("class_conditional"))
    dataset = config.get("dataset_name")
    hub_dataset = dataset if dataset and "/" in dataset and not os.path.exists(dataset) and not config.get("train_data_dir") else None
    tags = ["pytorch", "diffusers", "ddpm", "ddpm-hf", "image-generation"]
    tags += ["class-conditional", "classifier-free-guidance"] if conditional else ["unconditional-image-generation"]
    source = config.get("train_data_dir") or dataset
    evaluated = [EvalResult(task_type="unconditional-image-generation", task_name="image generation", dataset_type=hub_dataset or str(source),
                            dataset_name=str(source), dataset_split=config.get("dataset_split"), metric_type=r["metric"],
                            metric_name=r["name"], metric_value=r["value"]) for r in measured or []]
    card_data = ModelCardData(library_name="diffusers", tags=tags, datasets=[hub_dataset] if hub_dataset else None,
                              pipeline_tag="unconditional-image-generation", model_name=repo_id if evaluated else None,
                              eval_results=evaluated or None)
    class_names = stats.get("class_names") or []
    if conditional:
        examples = [repr(name) for name in class_names[:2]] or ["0", "1"]
        usage = ("from ddpm_hf.pipeline import ClassConditionalDDPMPipeline  # the ddpm_hf package that trained it\n\n"
                 f"pipeline = ClassConditionalDDPMPipeline.from_pretrained(\"{repo_id}\")\n"
                 f"images = pipeline(class_labels=[{', '.join(examples)}], guidance_scale=2.0, num_inference_steps=250).images  # names or indices")
    else:
        usage = ("from diffusers import DDPMPipeline\n\n"
                 f"pipeline = DDPMPipeline.from_pretrained(\"{repo_id}\")\n"
                 "images = pipeline(batch_size=16, num_inference_steps=1000).images")
        if config.get("guide_step") is not None:
            usage += ("\n\n# With autoguidance by its own EMA at step " + str(config["guide_step"]) + " (guide/), at the weight the run chose:\n"
                      "from ddpm_hf.pipeline import AutoGuidedDDPMPipeline  # the ddpm_hf package that trained it\n\n"
                      f"pipeline = AutoGuidedDDPMPipeline.from_run(\"{repo_id}\")\n"
                      f"images = pipeline(batch_size=16, num_inference_steps={config.get('num_inference_steps') or 1000}).images  # guidance_scale=w for another weight")
    lines = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# {repo_id}",
        "",
        f"A {'class-conditional ' if conditional else ''}denoising diffusion probabilistic model (Ho et al. 2020) trained with "
        f"ddpm-hf on `{source}`: {stats.get('steps')} optimizer steps, {stats.get('images_seen')} images, "
        f"UNet preset `{config.get('model_preset')}` ({(stats.get('parameters') or 0) / 1e6:.2f}M parameters), "
        f"{config.get('prediction_type')} prediction, EMA weights.",
        "",
        *([f"Classes (label: name): {', '.join(f'{i}: {name}' for i, name in enumerate(class_names))}.", ""] if conditional and class_names else []),
        "## Usage",
        "",
        "```python",
        usage,
        "```",
        "",
    ]
    if sample_grid:
        lines += ["## Samples", "", f"![samples]({sample_grid})", ""]
    lines += ["## Training loss", "", "![loss curve](loss_curve.png)", ""]
    results = {k: stats.get(k) for k in ("final_loss_smoothed", "final_val_loss", "best_val_loss", "images_per_s", "train_time_s", "wall_time_s",
                                         "device", "mixed_precision")}
    table = [f"| {k} | {v} |" for k, v in results.items() if v is not None] + [f"| {r['name']} | {r['value']} |" for r in measured or []]
    lines += ["## Results", "", "| | |", "|---|---|"] + table + [""]
    lines += ["## Training configuration", "", "| option | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(config.items()) if k != "hub_token"]
    return "\n".join(lines) + "\n"
