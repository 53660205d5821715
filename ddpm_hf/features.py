"""Feature extractors for FID: a digit classifier trained here, and torch-fidelity's Inception-v3.

Both take uint8 images (B, C, H, W) and return float64-ready feature vectors.

- `DigitFeatures`: a small CNN trained on the reference digits themselves. It needs no
  download, so digit-FID works offline; it is deterministic given its seed and saved as
  safetensors with the SHA-256 of the data it saw, and retrained when the data differ. Its
  softmax also gives two scores: the entropy of the predicted-class histogram (are all classes
  drawn?) and the mean top-class confidence (are the images recognisable?).
- `InceptionFeatures`: the standard FID network (pool3, 2048 features) from torch-fidelity,
  with weights from a local file: they cannot be downloaded here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
import types

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError, first_line
from .files import atomic_path, made_once

CLASSIFIER_SIDE = 28
# Bumped whenever the classifier's training changes, so cached classifiers and statistics are redone.
CLASSIFIER_VERSION = "2"


def _as_digit_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) to the classifier's input: grayscale, 28x28, floats in [-1, 1]."""
    x = images.float() / 127.5 - 1
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != CLASSIFIER_SIDE or x.shape[-2] != CLASSIFIER_SIDE:
        x = F.interpolate(x, size=(CLASSIFIER_SIDE, CLASSIFIER_SIDE), mode="bilinear", antialias=True, align_corners=False)
    return x


class DigitClassifier(nn.Module):
    """Two conv blocks and a 128-unit hidden layer: about 99% accuracy on MNIST, trained in seconds on a CPU."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 of the pixels and labels: the classifier is retrained when this changes."""
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.cpu().contiguous().numpy().tobytes())
    digest.update(labels.cpu().long().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _outlier_images(count: int, generator: torch.Generator) -> torch.Tensor:
    """Images that are no digit: Gaussian and uniform noise, some of it blurred, in [-1, 1]."""
    gaussian = torch.randn(count, 1, CLASSIFIER_SIDE, CLASSIFIER_SIDE, generator=generator).clamp(-1, 1)
    uniform = torch.rand(count, 1, CLASSIFIER_SIDE, CLASSIFIER_SIDE, generator=generator) * 2 - 1
    pick = torch.rand(count, 1, 1, 1, generator=generator) < 0.5
    noise = torch.where(pick, gaussian, uniform)
    blurred = F.avg_pool2d(noise, 3, stride=1, padding=1) * 2
    return torch.where(torch.rand(count, 1, 1, 1, generator=generator) < 0.5, noise, blurred.clamp(-1, 1))


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0, epochs: int = 6) -> tuple[DigitClassifier, float]:
    """Train on 90% of the digits, report accuracy on the other 10%. Deterministic on the CPU for a given seed.

    Each batch also holds a quarter as many noise images whose target is the uniform distribution
    ("outlier exposure", Hendrycks et al. 2019): without it a classifier is confidently wrong on
    noise, and the mean-confidence score could not tell noise from digits.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    held = order[: max(1, len(images) // 10)]
    train = order[len(held):]
    x, y = _as_digit_input(images.cpu()), labels.cpu().long()
    model = DigitClassifier(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = 128
    model.train()
    for _ in range(epochs):
        shuffled = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(shuffled), batch):
            index = shuffled[start : start + batch]
            outliers = _outlier_images(max(1, len(index) // 4), generator)
            uniform_target = -F.log_softmax(model(outliers), dim=1).mean()
            loss = F.cross_entropy(model(x[index]), y[index]) + 0.5 * uniform_target
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[held]).argmax(1) == y[held]).float().mean().item()
    return model, accuracy


class DigitFeatures:
    """The digit classifier as a feature extractor (its 128-unit hidden layer) and a scorer."""

    def __init__(self, model: DigitClassifier, fingerprint: str, accuracy: float, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.fingerprint = fingerprint
        self.accuracy = accuracy
        self.device = torch.device(device)

    @property
    def name(self) -> str:
        return f"digits-v{CLASSIFIER_VERSION}-{self.fingerprint[:12]}"

    @classmethod
    def load_or_train(cls, path: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0, device="cpu") -> "DigitFeatures":
        """Load the classifier saved at ``path`` if it was trained on these digits with this seed; else train and save it.
        A lock beside the file makes processes sharing a cache wait for one training instead of each training its own."""
        with made_once(path):
            return cls._load_or_train(path, images, labels, num_classes, seed, device)

    @classmethod
    def _load_or_train(cls, path: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int, device) -> "DigitFeatures":
        fingerprint = data_fingerprint(images, labels)
        if os.path.isfile(path):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            if (metadata.get("data_sha256") == fingerprint and metadata.get("seed") == str(seed) and metadata.get("num_classes") == str(num_classes)
                    and metadata.get("version") == CLASSIFIER_VERSION):
                model = DigitClassifier(num_classes)
                model.load_state_dict(load_file(path))
                return cls(model, fingerprint, float(metadata["accuracy"]), device)
        model, accuracy = train_digit_classifier(images, labels, num_classes, seed)
        with atomic_path(path) as partial:
            save_file(model.state_dict(), partial, metadata={"data_sha256": fingerprint, "seed": str(seed), "num_classes": str(num_classes),
                                                           "accuracy": f"{accuracy:.6f}", "version": CLASSIFIER_VERSION})
        return cls(model, fingerprint, accuracy, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(_as_digit_input(images.to(self.device))).double().cpu()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_as_digit_input(images.to(self.device))).softmax(dim=1).double().cpu()


def classifier_scores(probabilities: torch.Tensor) -> dict:
    """What the digit classifier says about a set of images.

    - ``class_entropy_bits``: entropy of the histogram of predicted classes; log2(K) when every
      class is drawn equally often, 0 when all images look like one class.
    - ``mean_confidence``: the mean top-class probability; near 1 for recognisable digits.
    """
    num_classes = probabilities.shape[1]
    histogram = torch.bincount(probabilities.argmax(dim=1), minlength=num_classes).double() / len(probabilities)
    nonzero = histogram[histogram > 0]
    return {
        "class_entropy_bits": max(0.0, float(-(nonzero * nonzero.log2()).sum())),
        "max_entropy_bits": math.log2(num_classes),
        "mean_confidence": float(probabilities.max(dim=1).values.mean()),
        "class_histogram": histogram.tolist(),
    }


# ----------------------------------------------------------------------------------------------
# Inception-v3 (torch-fidelity)
# ----------------------------------------------------------------------------------------------
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def _torch_fidelity_inception():
    """torch-fidelity's FeatureExtractorInceptionV3 class.

    The package's __init__ also imports its CLIP and VGG extractors, which need torchvision;
    where torchvision is missing (PyPI has no CPU build of it for torch 2.13), the Inception
    module, which needs only torch, is imported on its own.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name not in ("torchvision", "torch_fidelity"):
            raise
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise UserError("Inception FID needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0 (see README)") from None
    for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
        del sys.modules[name]  # the half-imported package
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def inception_weights_path(given: str | None) -> str:
    """The local Inception weights: --inception_weights, else torch-fidelity's own download cache."""
    if given:
        if not os.path.isfile(given):
            raise UserError(f"--inception_weights {given} does not exist; download {INCEPTION_URL} and pass its path")
        return given
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if os.path.isfile(cached):
        return cached
    raise UserError(
        f"Inception-v3 FID weights are not on this machine and cannot be downloaded here: fetch {INCEPTION_URL} "
        f"on a machine with internet access and pass --inception_weights PATH (or put it in {os.path.dirname(cached)}); "
        "for digits, --extractor digits needs no download"
    )


class InceptionFeatures:
    """The 2048 pool3 features of the FID Inception-v3 (TensorFlow weights ported by torch-fidelity)."""

    name = "inception-v3"

    def __init__(self, weights_path: str | None = None, device: torch.device | str = "cpu"):
        extractor_class = _torch_fidelity_inception()
        path = inception_weights_path(weights_path)
        try:
            self.model = extractor_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=path).to(device)
        except (RuntimeError, OSError, KeyError) as e:
            raise UserError(f"cannot load Inception weights from {path}: {first_line(e)}") from None
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:  # grayscale digits: the network expects RGB
            images = images.repeat(1, 3, 1, 1)
        (features,) = self.model(images.to(self.device))
        return features.double().cpu()
