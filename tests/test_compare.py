"""The comparison of runs, on two tiny runs that differ in their target."""

import csv
import json

import PIL.Image

from ddpm_hf.config import TrainingConfig
from ddpm_hf.training import train

from .conftest import run_module


def _run(out, prediction_type):
    train(TrainingConfig(output_dir=str(out), max_train_steps=4, train_batch_size=8, report_to="none", save_images_steps=4, checkpointing_steps=0,
                         eval_batch_size=2, num_inference_steps=2, validation_split="0.01", validation_steps=2,
                         prediction_type=prediction_type, logging_steps=2))
    return out


def test_compare_writes_the_differences_the_common_scale_curves_profiles_and_grids(tmp_path):
    eps, v = _run(tmp_path / "eps", "epsilon"), _run(tmp_path / "v", "v_prediction")
    scored = run_module("ddpm_hf.evaluate", str(v), "--bpd", "--bpd_timesteps", "2", "--bpd_images", "2")
    assert scored.returncode == 0, scored.stderr[-2000:]
    out = tmp_path / "report"
    result = run_module("ddpm_hf.compare", str(eps), str(v), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"compared 2 runs: {out / 'comparison.md'}"
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["run"] for r in rows] == ["eps", "v"] and [r["prediction_type"] for r in rows] == ["epsilon", "v_prediction"]
    assert list(rows[0])[:2] == ["run", "prediction_type"]  # the only setting that differs, before the results
    assert [r["steps"] for r in rows] == ["4", "4"] and rows[0]["bits_per_dim"] == "" and float(rows[1]["bits_per_dim"]) > 0
    for row in rows:
        validation = [json.loads(line) for line in (tmp_path / row["run"] / "validation.jsonl").read_text().splitlines()]
        assert float(row["final_val_eps_mse"]) == validation[-1]["val_eps_mse"] > 0
    # eps-prediction with simple weighting: the validation loss is the eps-MSE itself; v's loss is on another scale.
    assert float(rows[0]["final_val_loss"]) == float(rows[0]["final_val_eps_mse"])
    assert float(rows[1]["final_val_loss"]) != float(rows[1]["final_val_eps_mse"])
    assert "| run | prediction_type | steps |" in (out / "comparison.md").read_text()
    for name in ("validation_eps_mse.png", "timestep_profiles.png", "profiles_eps.png", "profiles_v.png"):
        assert PIL.Image.open(out / name).size[0] >= 800, name
    grids = PIL.Image.open(out / "grids.png")
    single = PIL.Image.open(eps / "samples/step_0000004.png")
    assert grids.size[0] > 2 * single.size[0] and grids.size[1] > single.size[1]  # two grids side by side, names above


def test_compare_refuses_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_module("ddpm_hf.compare", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'empty'} is not a run folder written by train_ddpm.py (it has no training_config.json)"
    missing = run_module("ddpm_hf.compare", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


def test_markdown_tables_align_numbers_and_mark_missing_values():
    from ddpm_hf.reports import markdown_table

    rows = [{"run": "a", "fid": 12.34567, "bits": None, "steps": 1100}, {"run": "b", "fid": 0.000123, "bits": 1.5, "steps": 20}]
    assert markdown_table(rows, {"run": "run", "fid": "FID", "bits": "bits/dim", "steps": "steps"}) == (
        "| run | FID | bits/dim | steps |\n|---|---:|---:|---:|\n| a | 12.3457 | – | 1100 |\n| b | 0.000123 | 1.5 | 20 |\n")
