"""The typed config: flags, YAML/JSON files, early refusal of invalid values."""

import json

import pytest

from ddpm_hf.config import TrainingConfig, config_from_dict, parse_config
from ddpm_hf.errors import UserError


def test_defaults_are_the_offline_digits_run():
    config = parse_config([])
    assert config.dataset_name == "mnist-5k-offline"
    assert config.model_preset == "tiny" and config.prediction_type == "epsilon" and config.use_ema
    assert config.sampler == "ddpm" and config.grid_inference_steps == 250  # ancestral grids, strided to 250 steps
    assert config.output_dir == "ddpm-mnist-5k-offline"  # named after the data


def test_flags_and_a_yaml_file_combine(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_preset: mnist\nlearning_rate: 1.0e-4\nprediction_type: v_prediction\n")
    config = parse_config([str(path), "--learning_rate", "3e-4", "--mixed_precision", "bf16"])
    assert config.model_preset == "mnist" and config.prediction_type == "v_prediction"
    assert config.learning_rate == 3e-4 and config.mixed_precision == "bf16"


def test_saved_config_round_trips(tmp_path):
    config = parse_config(["--model_preset", "cifar10", "--random_flip", "false", "--resolution", "32"])
    config.save(tmp_path / "c.json")
    again = config_from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again == config
    assert parse_config([str(tmp_path / "c.json")]) == config


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--prediction_type", "noise"], "prediction_type"),
        (["--ddpm_beta_schedule", "cosine"], "ddpm_beta_schedule"),
        (["--loss_weighting", "edm"], "loss_weighting"),
        (["--extra_ema_decays", "0.999", "0.999"], "listed once"),
        (["--extra_ema_decays", "0.9999"], "differ from --ema_max_decay 0.9999"),
        (["--extra_ema_decays", "1.5"], "must be in (0, 1)"),
        (["--extra_ema_decays", "0.99", "--use_ema", "false"], "--extra_ema_decays needs --use_ema"),
        (["--p2_gamma", "-1"], "--p2_gamma must be >= 0"),
        (["--train_batch_size", "0"], "--train_batch_size must be a positive integer"),
        (["--learning_rate=-1e-4"], "--learning_rate must be in (0, 1]"),
        (["--learning_rate", "5"], "--learning_rate must be in (0, 1]"),
        (["--num_inference_steps", "2000"], "cannot exceed --ddpm_num_steps"),
        (["--no_such_flag", "1"], "unrecognized arguments"),
    ],
)
def test_invalid_values_are_refused_before_any_work(argv, fragment):
    with pytest.raises(UserError, match=None) as error:
        parse_config(argv)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_config_file_with_unknown_or_invalid_values_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("learning_rat: 1e-4\n")
    with pytest.raises(UserError, match="unknown options: learning_rat"):
        parse_config([str(tmp_path / "a.yaml")])
    (tmp_path / "b.json").write_text('{"sampler": "euler"}')
    with pytest.raises(UserError, match="--sampler must be one of ddpm, ddim"):
        parse_config([str(tmp_path / "b.json")])


def test_literal_fields_are_checked_when_built_directly():
    with pytest.raises(UserError, match="mixed_precision"):
        TrainingConfig(mixed_precision="fp8")
