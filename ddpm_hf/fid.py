"""The Fréchet distance between two sets of features, and feature statistics cached on disk.

FID (Heusel et al. 2017) fits a Gaussian to each set's features and measures

    d² = ||mu_1 - mu_2||² + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2}).

tr((S_1 S_2)^{1/2}) is computed as the sum of the square roots of the eigenvalues of the
symmetric PSD matrix S_1^{1/2} S_2 S_1^{1/2} (similar to S_1 S_2), in float64: no complex
round-off as a general matrix square root gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .files import atomic_path


@dataclass
class FeatureStatistics:
    """Mean and covariance of N feature vectors."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    count: int

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> "FeatureStatistics":
        array = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
        if array.ndim != 2 or len(array) < 2:
            raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {array.shape}")
        return cls(mu=array.mean(axis=0), sigma=np.cov(array, rowvar=False), count=len(array))

    def save(self, path: str) -> None:
        with atomic_path(path) as partial, open(partial, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count)

    @classmethod
    def load(cls, path: str) -> "FeatureStatistics":
        with np.load(path) as values:
            return cls(mu=values["mu"], sigma=values["sigma"], count=int(values["count"]))


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """d² between the Gaussians fitted to two feature sets (the number reported as FID)."""
    mu1, mu2 = torch.from_numpy(a.mu).double(), torch.from_numpy(b.mu).double()
    s1, s2 = torch.from_numpy(np.atleast_2d(a.sigma)).double(), torch.from_numpy(np.atleast_2d(b.sigma)).double()
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * trace_sqrt
    return float(distance.clamp(min=0))


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of two feature sets (N, D).

    Each set's manifold is the union of balls around its points, each reaching to the point's k-th
    nearest neighbour in its own set. Precision: the share of generated points inside the real
    manifold (are the images realistic?). Recall: the share of real points inside the generated
    manifold (does the model cover the data's variety?). FID mixes the two in one number."""
    real, generated = real.double().cpu(), generated.double().cpu()
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"precision and recall with k = {k} need more than {k} points in each set, got {len(real)} and {len(generated)}")

    def radii(points: torch.Tensor) -> torch.Tensor:
        return torch.cdist(points, points).kthvalue(k + 1, dim=1).values  # the (k+1)-th smallest: the point itself is at 0

    distances = torch.cdist(generated, real)  # (G, R)
    precision = (distances <= radii(real)[None, :]).any(dim=1).double().mean().item()
    recall = (distances.T <= radii(generated)[None, :]).any(dim=1).double().mean().item()
    return precision, recall
