"""The throughput benchmark runs (its short mode); its figures are in benchmarks/RESULTS.md, not checked here."""

import json
import subprocess
import sys

from .conftest import REPO, cli_env


def test_throughput_benchmark_short_mode_runs_and_writes_json(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, "benchmarks/throughput.py", "--short", "--json", str(out)], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "limit img/s" in result.stdout and "sampling tiny" in result.stdout
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["preset"] == "tiny" and row["limit"]["images_per_s"] > 0 and row["trainer"]["images_per_s"] > 0 and row["ratio"] > 0
    # Each side reports its best 50-step window: one window of the limit, one logging interval of the trainer.
    for side in ("limit", "trainer"):
        assert len(row[side]["window_images_per_s"]) == 1 and row[side]["images_per_s"] == max(row[side]["window_images_per_s"])
    assert report["sampling"]["tiny"]["ddim_50_images_per_s"] > 0


def test_time_to_quality_short_mode_runs_the_recipe_and_reports_its_evaluations(tmp_path):
    out = tmp_path / "ttq.json"
    result = subprocess.run([sys.executable, "benchmarks/time_to_quality.py", "--short", "--json", str(out), "--max_train_samples=600"],
                            cwd=REPO, env=cli_env(DDPM_HF_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "configs/fast-digits-cpu.yaml" in result.stdout and "not reached in 4 steps" in result.stdout  # 4 steps draw no digits
    report = json.loads(out.read_text())
    assert [r["step"] for r in report["evaluations"]] == [2, 4] and report["reached"] is None
    assert report["sampler"] == {"name": "ddpm", "steps": 2, "guidance_scale": 2.0}
