"""PNG plots a person can open: the loss curve, the noise schedule, the loss per timestep."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import smooth_without_lag  # noqa: E402


def _save(figure, path: str) -> None:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_loss_curve(rows: list[dict], path: str, validation_rows: list[dict] | None = None) -> None:
    """Raw and smoothed training loss against optimizer step, from the metrics rows, and the
    validation loss when there is one."""
    steps = [row["step"] for row in rows]
    losses = [row["loss"] for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss (per logging interval)")
    axis.plot(steps, smooth_without_lag(losses), color="tab:blue", linewidth=2, label="smoothed")
    if validation_rows:
        axis.plot([r["step"] for r in validation_rows], [r["val_loss"] for r in validation_rows], "o-", color="tab:orange", label="validation loss")
        losses = losses + [r["val_loss"] for r in validation_rows]
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    if losses and min(losses) > 0:
        axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    _save(figure, path)


def plot_schedule(rows: list[dict], path: str) -> None:
    """beta_t, abar_t and log SNR(t) side by side."""
    t = [r["t"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5), dpi=120)
    for axis, key, label in zip(axes, ("beta", "alpha_bar", "log_snr"), ("beta_t", "alpha-bar_t", "log SNR(t)")):
        axis.plot(t, [r[key] for r in rows], color="tab:purple")
        axis.set_xlabel("t")
        axis.set_title(label)
        axis.grid(True, alpha=0.3)
    _save(figure, path)


def plot_timestep_profile(profile: list[dict], path: str, step: int) -> None:
    """The validation loss in equal bins of t, as bars over each bin's range."""
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    lefts = [r["t_start"] for r in profile]
    widths = [r["t_end"] - r["t_start"] + 1 for r in profile]
    axis.bar(lefts, [r["mean_loss"] for r in profile], width=widths, align="edge", color="tab:green", edgecolor="white")
    axis.set_xlabel("t (bins of equal width)")
    axis.set_ylabel("validation loss")
    axis.set_yscale("log")
    axis.set_title(f"validation loss per timestep, step {step}")
    axis.grid(True, which="both", axis="y", alpha=0.3)
    _save(figure, path)


def plot_sampler_comparison(rows: list[dict], path: str, extractor: str) -> None:
    """FID against seconds per image, one line per sampler, each point labelled with its step count."""
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == sampler]
        axis.plot([r["seconds_per_image"] for r in mine], [r["fid"] for r in mine], "o-", label=sampler)
        for r in mine:
            axis.annotate(str(r["steps"]), (r["seconds_per_image"], r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("seconds per image (log)")
    axis.set_ylabel(f"FID ({extractor})")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    _save(figure, path)


def plot_bits_per_dim_terms(rows: list[dict], path: str, title: str) -> None:
    """Left: the bound's terms L_t in bits/dim against t, with a band of two standard errors.
    Right: their running sum against t on a log axis: where the likelihood is spent (for a trained
    model, most of it in the first few steps, the decoder term alone about half)."""
    import math

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120)
    t = [r["t"] for r in rows]
    mean = [r["bits_per_dim"] for r in rows]
    error = [0.0 if math.isnan(r["std_error"]) else 2 * r["std_error"] for r in rows]
    left.plot(t, mean, ".-" if len(rows) < 200 else "-", color="tab:red", markersize=3, linewidth=1)
    left.fill_between(t, [max(m - e, 1e-12) for m, e in zip(mean, error)], [m + e for m, e in zip(mean, error)], color="tab:red", alpha=0.2)
    left.set_xlabel("t (0 is the decoder term)")
    left.set_ylabel("L_t (bits/dim)")
    if min(mean) > 0:
        left.set_yscale("log")
    left.grid(True, which="both", alpha=0.3)
    if len(rows) == t[-1] + 1:  # every term measured: the running sum is meaningful
        running, total = [], 0.0
        for m in mean:
            total += m
            running.append(total)
        right.plot([x + 1 for x in t], running, color="tab:red")
        right.set_xscale("log")
        right.set_xlabel("t + 1 (log)")
        right.set_ylabel("sum of L_0..L_t (bits/dim)")
        right.grid(True, which="both", alpha=0.3)
    else:
        right.text(0.5, 0.5, "running sum: measure every term (--bpd_timesteps all)", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def plot_guidance_sweep(rows: list[dict], path: str, kind: str = "classifier-free guidance") -> None:
    """Left: FID against the guidance scale. Right: the quality/diversity trade-off, one point per
    scale (mean confidence, or precision, against class recall when measured)."""
    scales = [r["guidance_scale"] for r in rows]
    symbol = "w" if kind == "autoguidance" else "s"
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    left.plot(scales, [r["fid"] for r in rows], "o-", color="tab:blue")
    left.set_xlabel(f"guidance scale {symbol}")
    left.set_ylabel("FID")
    left.grid(True, alpha=0.3)
    diversity = "class_recall" if "class_recall" in rows[0] else "class_entropy_bits"
    quality = "mean_confidence" if "mean_confidence" in rows[0] else "class_precision"
    if diversity in rows[0] and quality in rows[0]:
        x, y = [r[diversity] for r in rows], [r[quality] for r in rows]
        right.plot(x, y, "o-", color="tab:purple")
        for scale, xi, yi in zip(scales, x, y):
            right.annotate(f"{symbol}={scale:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        right.set_xlabel(f"diversity: {diversity.replace('_', ' ')}")
        right.set_ylabel(f"quality: {quality.replace('_', ' ')}")
        right.grid(True, alpha=0.3)
    figure.suptitle(f"{kind} sweep")
    _save(figure, path)


def plot_validation_curves(curves: dict[str, list[dict]], path: str) -> None:
    """Each run's validation eps-MSE against images seen: one scale for every target and weighting."""
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    for name, rows in curves.items():
        rows = [r for r in rows if "val_eps_mse" in r]
        axis.plot([r["images_seen"] for r in rows], [r["val_eps_mse"] for r in rows], "o-", markersize=3, label=name)
    axis.set_xlabel("images seen")
    axis.set_ylabel("validation eps-MSE")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, path)


def plot_timestep_profiles(profiles: dict[str, list[dict]], path: str, title: str) -> None:
    """Several per-timestep validation profiles as lines over the bins' centres: the eps-MSE where
    every profile has it (comparable across runs), else each run's own loss."""
    key = "mean_eps_mse" if all("mean_eps_mse" in p[0] for p in profiles.values()) else "mean_loss"
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    colours = plt.cm.viridis([i / max(1, len(profiles) - 1) for i in range(len(profiles))]) if len(profiles) > 6 else [None] * len(profiles)
    for (label, rows), colour in zip(profiles.items(), colours):
        centres = [(r["t_start"] + r["t_end"]) / 2 for r in rows]
        axis.plot(centres, [r[key] for r in rows], "o-", markersize=3, label=label, color=colour)
    axis.set_xlabel("t (bin centres)")
    axis.set_ylabel("validation eps-MSE" if key == "mean_eps_mse" else "validation loss (each run's own units)")
    axis.set_yscale("log")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, ncol=2 if len(profiles) > 6 else 1)
    _save(figure, path)
