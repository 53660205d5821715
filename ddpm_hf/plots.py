"""PNG plots a person can open: the loss curve."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import smooth  # noqa: E402


def plot_loss_curve(rows: list[dict], path: str) -> None:
    """Raw and smoothed training loss against optimizer step, from the metrics rows."""
    steps = [row["step"] for row in rows]
    losses = [row["loss"] for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss (per logging interval)")
    axis.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="smoothed")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    if losses and min(losses) > 0:
        axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
