"""Compare finished runs side by side: what differed in their configs, what each reached, and
their curves on one common scale.

Training and validation losses are in each run's own units (eps, x0 or v; any weighting), so
they cannot be compared across those settings. The validation also logs ``val_eps_mse``: the MSE
of the eps each prediction implies, unweighted (`DiffusionObjective.losses_and_eps_errors`), and
the per-timestep profiles carry the same figure per bin of t. Those are what the plots compare.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import PIL.Image

from .errors import UserError
from .files import read_json
from .metrics import EVALUATION_FILE, METRICS_FILE, VALIDATION_FILE, MetricsLog
from .reports import write_csv, write_markdown

# Config keys that name where a run lives or how it was launched, not what it trained.
NOT_A_DIFFERENCE = {"output_dir", "logging_dir", "resume_from_checkpoint", "overwrite_output_dir", "hub_repo_id", "hub_token", "push_to_hub",
                    "push_checkpoints", "report_to", "tracker_project_name", "cache_dir"}


@dataclass
class RunRecord:
    """What one run folder holds, read once."""

    name: str
    path: str
    config: dict
    stats: dict
    metrics: list[dict]
    validation: list[dict]
    evaluation: dict  # evaluate's evaluation.json, {} when the model was not evaluated
    profiles: dict[int, list[dict]] = field(default_factory=dict)  # validation step -> per-timestep rows
    last_grid: str | None = None

    @classmethod
    def read(cls, path: str, name: str) -> "RunRecord":
        config_path = os.path.join(path, "training_config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"{path} is not a run folder written by train_ddpm.py (it has no training_config.json)")
        profiles = {}
        for csv_path in glob.glob(os.path.join(path, "diagnostics", "timestep_loss_step_*.csv")):
            step = int(os.path.basename(csv_path)[len("timestep_loss_step_"):-len(".csv")])
            profiles[step] = _read_csv(csv_path)
        grids = sorted(glob.glob(os.path.join(path, "samples", "step_*.png")))
        return cls(name=name, path=path, config=read_json(config_path), stats=read_json(os.path.join(path, "train_stats.json")),
                   metrics=MetricsLog(path, METRICS_FILE).read(), validation=MetricsLog(path, VALIDATION_FILE).read(),
                   evaluation=read_json(os.path.join(path, "evaluation", "evaluation.json")), profiles=dict(sorted(profiles.items())),
                   last_grid=grids[-1] if grids else None)


def _read_csv(path: str) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", "nan") else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def run_names(paths: list[str]) -> list[str]:
    """Each run's folder name, or its path where two folders share a name."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    return [os.path.normpath(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def config_differences(records: list[RunRecord]) -> list[str]:
    """The config keys whose values are not the same in every run."""
    keys = sorted({k for r in records for k in r.config} - NOT_A_DIFFERENCE)
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in records}) > 1]


def summary_row(record: RunRecord, differences: list[str]) -> dict:
    """One row of the comparison table: the run's settings that differ, then what it reached."""
    scores = record.evaluation.get("model_scores", {})
    last_validation = record.validation[-1] if record.validation else {}
    row = {"run": record.name}
    row.update({key: json.dumps(record.config.get(key)) if isinstance(record.config.get(key), (list, dict)) else record.config.get(key)
                for key in differences})
    row.update({
        "steps": record.stats.get("steps"),
        "images_seen": record.stats.get("images_seen"),
        "final_loss_smoothed": record.stats.get("final_loss_smoothed"),
        "final_val_loss": record.stats.get("final_val_loss"),
        "best_val_loss": record.stats.get("best_val_loss"),
        "final_val_eps_mse": last_validation.get("val_eps_mse"),
        "fid": scores.get("fid"),
        "mean_confidence": scores.get("mean_confidence"),
        "bits_per_dim": record.evaluation.get("bits_per_dim", {}).get("bits_per_dim"),
        **best_guidance(record.evaluation.get("guidance")),
        "images_per_s": record.stats.get("images_per_s"),
        "wall_time_s": record.stats.get("wall_time_s"),
    })
    return row


def best_guidance(sweep: list[dict] | None) -> dict:
    """The guidance scale with the lowest FID in an evaluated sweep, and that FID (empty without a sweep)."""
    if not sweep:
        return {}
    best = min(sweep, key=lambda row: row["fid"])
    return {"best_guidance_scale": best["guidance_scale"], "fid_at_best_guidance": best["fid"]}


def write_comparison(paths: list[str], out_dir: str) -> list[dict]:
    """comparison.csv and comparison.md (one row per run), validation_eps_mse.png, timestep_profiles.png,
    grids.png, and profiles_<run>.png (every validation's profile) for each run that has them."""
    from . import plots

    records = [RunRecord.read(p, n) for p, n in zip(paths, run_names(paths))]
    differences = config_differences(records)
    rows = [summary_row(r, differences) for r in records]
    columns = list(dict.fromkeys(k for row in rows for k in row))  # a sweep's columns appear where any run has one
    rows = [{k: row.get(k) for k in columns} for row in rows]
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, "comparison.csv"), rows)
    shown = {"run": "run", **{k: k for k in differences}, **{k: v for k, v in TABLE_HEADERS.items() if k in columns}}
    intro = (f"{len(records)} runs. Settings: only those that differ ({', '.join(differences) or 'none'}). Losses are in each run's own "
             "units; `final val eps-MSE` is the validation's unweighted eps-space MSE, comparable across targets and weightings. FID, "
             "confidence and bits/dim come from each run's `evaluation/evaluation.json` (run `python -m ddpm_hf.evaluate RUN` first).")
    write_markdown(os.path.join(out_dir, "comparison.md"), intro, rows, shown)
    curves = {r.name: r.validation for r in records if any("val_eps_mse" in v for v in r.validation)}
    if curves:
        plots.plot_validation_curves(curves, os.path.join(out_dir, "validation_eps_mse.png"))
    profiles = {r.name: r.profiles[max(r.profiles)] for r in records if r.profiles}
    if profiles:
        plots.plot_timestep_profiles(profiles, os.path.join(out_dir, "timestep_profiles.png"), "last validation of each run")
    for record in records:
        if len(record.profiles) > 1:
            by_step = {f"step {step}": profile for step, profile in record.profiles.items()}
            plots.plot_timestep_profiles(by_step, os.path.join(out_dir, f"profiles_{_file_safe(record.name)}.png"), f"{record.name}: every validation")
    grids = [(r.name, r.last_grid) for r in records if r.last_grid]
    if grids:
        side_by_side(grids).save(os.path.join(out_dir, "grids.png"))
    return rows


TABLE_HEADERS = {"steps": "steps", "images_seen": "images seen", "final_loss_smoothed": "final loss (smoothed)", "final_val_loss": "final val loss",
                 "best_val_loss": "best val loss", "final_val_eps_mse": "final val eps-MSE", "fid": "FID", "mean_confidence": "mean confidence",
                 "bits_per_dim": "bits/dim", "best_guidance_scale": "best guidance s", "fid_at_best_guidance": "FID at best s",
                 "images_per_s": "images/s", "wall_time_s": "wall time (s)"}


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def side_by_side(grids: list[tuple[str, str]]):
    """The runs' last grids in one row, padded white to the largest, each run's name above its grid."""
    from .generation import image_grid

    pictures = [np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float32) / 255 for _, path in grids]
    height, width = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
    padded = np.ones((len(pictures), height, width, 3), dtype=np.float32)
    for i, picture in enumerate(pictures):
        padded[i, : picture.shape[0], : picture.shape[1]] = picture
    return image_grid(padded, columns=len(pictures), column_labels=[name for name, _ in grids], caption="last sample grid of each run")
