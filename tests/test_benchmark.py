"""The throughput benchmark runs (its short mode); its figures are in benchmarks/RESULTS.md, not checked here."""

import json
import math

import pytest

from .conftest import run_module


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_throughput_benchmark_short_mode_runs_and_writes_json(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_module("benchmarks/throughput.py", "--short", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "limit img/s" in result.stdout and "sampling tiny" in result.stdout
    report = json.loads(out.read_text())
    # The schema that benchmarks/RESULTS.md and the GPU script read, key for key.
    assert set(report) == {"device", "torch", "date", "rounds", "window_steps", "rows", "sampling"}
    assert report["rounds"] == 1 and report["window_steps"] == 50 and isinstance(report["device"], str)
    (row,) = report["rows"]
    assert set(row) == {"preset", "precision", "step_options", "batch_size", "limit", "trainer", "ratio"}
    assert (row["preset"], row["precision"], row["step_options"], row["batch_size"]) == ("tiny", "fp32", "fused", 8)
    for side in ("limit", "trainer"):
        figures = row[side]
        assert set(figures) == {"images_per_s", "window_images_per_s", "peak_memory_bytes", "peak_memory_kind"}
        # Each side reports its best 50-step window: one window of the limit, one logging interval of the trainer.
        assert len(figures["window_images_per_s"]) == 1 and figures["images_per_s"] == max(figures["window_images_per_s"])
        assert _finite_positive(figures["images_per_s"]) and figures["peak_memory_bytes"] > 10_000_000 and figures["peak_memory_kind"] == "peak_rss"
    assert _finite_positive(row["ratio"]) and row["ratio"] == pytest.approx(row["trainer"]["images_per_s"] / row["limit"]["images_per_s"])
    assert set(report["sampling"]) == {"tiny"} and set(report["sampling"]["tiny"]) == {"ddim_50_images_per_s", "ddpm_1000_images_per_s"}
    assert all(_finite_positive(v) for v in report["sampling"]["tiny"].values())


def test_time_to_quality_short_mode_runs_the_recipe_and_reports_its_evaluations(tmp_path):
    out = tmp_path / "ttq.json"
    result = run_module("benchmarks/time_to_quality.py", "configs/fast-digits-cpu.yaml", "--short", "--json", str(out), "--max_train_samples=600")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "configs/fast-digits-cpu.yaml" in result.stdout and "not reached in 4 steps" in result.stdout  # 4 steps draw no digits
    report = json.loads(out.read_text())
    assert set(report) == {"date", "machine", "device", "config", "overrides", "short", "bar", "sampler", "reached", "evaluations",
                           "process_seconds_with_evaluations", "training_images_per_s"}
    assert [r["step"] for r in report["evaluations"]] == [2, 4] and report["reached"] is None and report["short"] is True
    assert report["sampler"] == {"name": "ddpm", "steps": 2, "guidance_scale": 2.0, "guide_step": None}
    for row in report["evaluations"]:
        assert set(row) == {"step", "images_seen", "fid", "mean_confidence", "class_entropy_bits", "eval_seconds", "autoguided", "train_s", "wall_s"}
        assert row["autoguided"] is False  # a class-conditional run: classifier-free guidance
        assert all(_finite_positive(float(row[k])) for k in ("images_seen", "fid", "mean_confidence", "eval_seconds", "train_s", "wall_s"))
    assert _finite_positive(float(report["process_seconds_with_evaluations"])) and _finite_positive(float(report["training_images_per_s"]))
