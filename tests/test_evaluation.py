"""FID and the feature extractors, the sampling command and the evaluation command."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from safetensors import safe_open

from ddpm_hf.config import TrainingConfig
from ddpm_hf.sources import load_data
from ddpm_hf.errors import UserError
from ddpm_hf.generation import CAPTION_HEIGHT, slerp
from ddpm_hf.scoring import Evaluator, features_of, noise_images
from ddpm_hf.features import DigitFeatures, InceptionFeatures, _torch_fidelity_inception, classifier_scores, train_digit_classifier
from ddpm_hf.fid import FeatureStatistics, frechet_distance, precision_recall
from ddpm_hf.training import train

from .conftest import OFFLINE_DIGITS_CLASSIFIER, run_module

CPU = torch.device("cpu")


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (as pytorch-fid does it), independent of ours."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    ours = frechet_distance(FeatureStatistics.of(a), FeatureStatistics.of(b))
    assert ours == pytest.approx(_scipy_frechet(a, b), rel=1e-8)
    assert frechet_distance(FeatureStatistics.of(a), FeatureStatistics.of(a)) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_has_the_closed_form_for_two_gaussians():
    # N(mu1, diag(v1)) and N(mu2, diag(v2)): d² = |mu1 - mu2|² + sum (sqrt v1 - sqrt v2)².
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = frechet_distance(FeatureStatistics(mu1, np.diag(v1), 2), FeatureStatistics(mu2, np.diag(v2), 2))
    assert got == pytest.approx(expected, rel=1e-12)
    # The same from samples, within sampling error.
    rng = np.random.default_rng(1)
    sampled = frechet_distance(FeatureStatistics.of(rng.normal(mu1, np.sqrt(v1), size=(200_000, 3))),
                               FeatureStatistics.of(rng.normal(mu2, np.sqrt(v2), size=(200_000, 3))))
    assert sampled == pytest.approx(expected, rel=0.02)


@pytest.fixture(scope="module")
def digits():
    train_set, _ = load_data(TrainingConfig(), CPU)
    return train_set.images, train_set.labels


def test_digit_classifier_is_deterministic_and_accurate(digits):
    images, labels = digits
    first, accuracy = train_digit_classifier(images[:1500], labels[:1500], 10, seed=0, epochs=3)
    second, _ = train_digit_classifier(images[:1500], labels[:1500], 10, seed=0, epochs=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert accuracy > 0.9


def test_the_classifier_is_cached_with_its_data_hash_and_retrained_when_the_data_change(digits, tmp_path):
    images, labels = digits
    path = tmp_path / "classifier.safetensors"
    first = DigitFeatures.load_or_train(str(path), images[:600], labels[:600], 10)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["data_sha256"] == first.fingerprint
    stamp = path.stat().st_mtime_ns
    again = DigitFeatures.load_or_train(str(path), images[:600], labels[:600], 10)
    assert path.stat().st_mtime_ns == stamp and again.fingerprint == first.fingerprint  # loaded, not retrained
    other = DigitFeatures.load_or_train(str(path), images[600:1200], labels[600:1200], 10)
    assert other.fingerprint != first.fingerprint and path.stat().st_mtime_ns != stamp
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["data_sha256"] == other.fingerprint


def test_real_against_real_is_far_below_real_against_noise(digits, shared_evaluation_cache):
    images, labels = digits
    features = DigitFeatures.load_or_train(str(shared_evaluation_cache / OFFLINE_DIGITS_CLASSIFIER), images, labels, 10)
    half_a, half_b = images[::2], images[1::2]
    reference = FeatureStatistics.of(features_of(features, half_a))
    real_vs_real = frechet_distance(reference, FeatureStatistics.of(features_of(features, half_b)))
    real_vs_noise = frechet_distance(reference, FeatureStatistics.of(features_of(features, noise_images(2500, 1, 28, seed=0))))
    assert real_vs_real * 20 < real_vs_noise, (real_vs_real, real_vs_noise)
    real_scores = classifier_scores(features.probabilities(half_b))
    assert real_scores["mean_confidence"] > 0.9 and real_scores["class_entropy_bits"] > 3.2  # all ten digits, recognised
    all_ones = classifier_scores(torch.eye(10)[torch.ones(50, dtype=torch.long)].double())
    assert all_ones["class_entropy_bits"] == 0 and all_ones["mean_confidence"] == 1


def test_inception_needs_local_weights_and_uses_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached there
    with pytest.raises(UserError, match="weights-inception-2015-12-05-6726825d.pth.*--inception_weights"):
        InceptionFeatures(None)
    with pytest.raises(UserError, match="does not exist"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    # The real weights cannot be downloaded here: a randomly initialised network of the same
    # architecture stands in, saved the way the real file is, to check the loading and the features.
    extractor_class = _torch_fidelity_inception()
    monkeypatch.setattr(extractor_class, "load_state_dict", lambda self, state, *a, **k: None)
    monkeypatch.setattr(sys.modules[extractor_class.__module__], "load_state_dict_from_url", lambda *a, **k: {})
    torch.save(extractor_class("inception-v3-compat", ["2048"]).state_dict(), tmp_path / "inception.pth")
    monkeypatch.undo()
    features = InceptionFeatures(str(tmp_path / "inception.pth"))(torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8))
    assert features.shape == (3, 2048) and torch.isfinite(features).all()


def test_slerp_keeps_the_norm_of_orthogonal_noises():
    a, b = torch.zeros(4), torch.zeros(4)
    a[0], b[1] = 2.0, 2.0
    middle = slerp(a, b, 0.5)
    assert torch.allclose(middle, torch.tensor([2 ** 0.5, 2 ** 0.5, 0, 0]))  # a straight line would give norm 1.41, not 2
    assert torch.equal(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)


# ----------------------------------------------------------------------------------------------
# The commands, on small trained pipelines
# ----------------------------------------------------------------------------------------------
def _trained(out, **overrides):
    train(TrainingConfig(output_dir=str(out), max_train_steps=3, train_batch_size=8, report_to="none", save_images_steps=0,
                         checkpointing_steps=0, eval_batch_size=2, num_inference_steps=2, **overrides))
    return out


@pytest.fixture(scope="module")
def unconditional_model(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("uncond") / "run")


@pytest.fixture(scope="module")
def conditional_model(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("cond") / "run", class_conditional=True)


def _command(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_module(module, *args)


def test_sample_command_writes_a_grid_and_files_and_repeats_with_the_same_seed(conditional_model, tmp_path):
    common = [str(conditional_model), "--scheduler", "ddim", "--num_inference_steps", "3", "--guidance_scale", "2"]
    first = _command("ddpm_hf.sample", *common, "--num_images", "10", "--batch_size", "4", "--grid", str(tmp_path / "grid.png"), "--out_dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "sampling 10 images" in first.stderr and "step" in first.stderr  # the progress bar counts denoising steps: a time estimate from the start
    # One column per class, each 28-pixel digit enlarged to 84 pixels, under a caption naming the sampler.
    assert PIL.Image.open(tmp_path / "grid.png").size == (2 + 10 * 86, CAPTION_HEIGHT + 2 + 86)
    second = _command("ddpm_hf.sample", *common, "--num_images", "3", "--batch_size", "3", "--out_dir", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 10 and files[0] == "00000.png"
    for name in ["00000.png", "00001.png", "00002.png"]:  # same seed: same images, whatever the batch size
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "a" / name)), np.asarray(PIL.Image.open(tmp_path / "b" / name)))
        assert PIL.Image.open(tmp_path / "a" / name).size == (28, 28)
    other_seed = _command("ddpm_hf.sample", *common, "--num_images", "1", "--seed", "1", "--out_dir", str(tmp_path / "c"))
    assert other_seed.returncode == 0, other_seed.stderr[-2000:]
    assert not np.array_equal(np.asarray(PIL.Image.open(tmp_path / "a/00000.png")), np.asarray(PIL.Image.open(tmp_path / "c/00000.png")))


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm++"])
def test_sample_command_runs_every_scheduler_on_an_unconditional_model(unconditional_model, tmp_path, scheduler):
    result = _command("ddpm_hf.sample", str(unconditional_model), "--scheduler", scheduler, "--num_inference_steps", "3", "--num_images", "2", "--grid", str(tmp_path / "g.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 3


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--class_label", "3", "--grid", "g.png"], "--class_label needs a class-conditional model"),
        (["--num_images", "0", "--grid", "g.png"], "--num_images must be a positive integer"),
        (["--num_images", "2"], "--grid PATH and/or --out_dir DIR"),
        (["--scheduler", "euler", "--grid", "g.png"], "argument --scheduler"),
    ],
)
def test_sample_command_mistakes(unconditional_model, args, fragment):
    result = _command("ddpm_hf.sample", str(unconditional_model), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]] and fragment in result.stderr


def test_sample_command_refuses_a_missing_folder(tmp_path):
    result = _command("ddpm_hf.sample", str(tmp_path / "nothing"), "--grid", "g.png")
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_command_scores_the_model_and_noise_compares_samplers_and_interpolates(unconditional_model, tmp_path, shared_evaluation_cache):
    cache, report = shared_evaluation_cache, tmp_path / "report"  # the session's classifier, trained on all the digits
    args = [str(unconditional_model), "--num_samples", "12", "--batch_size", "12", "--num_inference_steps", "2", "--report_dir", str(report), "--fid", "--noise_baseline", "--compare-samplers", "--sampler_steps", "2", "4",
            "--samplers", "ddpm", "dpm++", "--interpolation_grid", str(tmp_path / "interp.png")]
    result = _command("ddpm_hf.evaluate", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((report / "evaluation.json").read_text())
    assert results["reference"] == "mnist-5k-offline-train" and results["extractor"].startswith("digits-")
    for key in ("model_scores", "noise_scores"):
        assert results[key]["fid"] > 0 and 0 <= results[key]["mean_confidence"] <= 1 and 0 <= results[key]["class_entropy_bits"] <= results[key]["max_entropy_bits"]
    assert [(r["sampler"], r["steps"]) for r in results["samplers"]] == [("ddpm", 2), ("ddpm", 4), ("dpm++", 2), ("dpm++", 4)]
    assert "| dpm++ | 4 |" in (report / "samplers.md").read_text()
    assert (report / "samplers.csv").read_text().startswith("sampler,steps,seconds_per_image,fid")
    assert PIL.Image.open(report / "samplers.png").size[0] > 400
    assert PIL.Image.open(tmp_path / "interp.png").size == (2 + 8 * 86, 2 + 4 * 86)

    stats = [p for p in (cache / "stats").iterdir() if p.name.startswith("mnist-5k-offline-train-28px-5000-digits-") and p.suffix == ".npz"]
    assert len(stats) == 1, sorted(p.name for p in (cache / "stats").iterdir())
    stamp = stats[0].stat().st_mtime_ns
    again = _command("ddpm_hf.evaluate", str(unconditional_model), "--num_samples", "12", "--num_inference_steps", "2", "--report_dir", str(report))
    assert again.returncode == 0, again.stderr[-3000:]
    assert stats[0].stat().st_mtime_ns == stamp  # the cached reference statistics were reused
    assert json.loads((report / "evaluation.json").read_text())["model_scores"]["fid"] == pytest.approx(results["model_scores"]["fid"], rel=1e-9)


def test_evaluate_with_inception_and_no_weights_says_how_to_get_them(unconditional_model, tmp_path):
    result = run_module("ddpm_hf.evaluate", str(unconditional_model), "--extractor", "inception", "--num_samples", "4",
                        "--max_reference_samples", "10", "--cache_dir", str(tmp_path), timeout=300, TORCH_HOME=str(tmp_path / "th"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--inception_weights PATH" in result.stderr and "https://github.com/toshas/torch-fidelity/releases" in result.stderr


def test_evaluator_scores_real_digits_better_than_noise(shared_evaluation_cache):
    evaluator = Evaluator.build(TrainingConfig(), 1, 28, "digits", str(shared_evaluation_cache), device=CPU)
    real = load_data(TrainingConfig(), CPU)[0].images[1::10]  # every class: the offline digits are sorted by class
    real_score, noise_score = evaluator.score(real), evaluator.score(noise_images(500, 1, 28, seed=0))
    assert real_score["fid"] * 10 < noise_score["fid"]
    assert real_score["class_entropy_bits"] > 3.1
    # Trained with outlier exposure, the classifier is unsure about noise and sure about digits.
    assert real_score["mean_confidence"] > 0.9 and noise_score["mean_confidence"] < 0.5


def test_training_logs_fid_and_classifier_scores_every_eval_steps(tmp_path, shared_evaluation_cache):
    out = tmp_path / "run"
    train(TrainingConfig(output_dir=str(out), max_train_steps=4, train_batch_size=8, report_to="none", save_images_steps=0, checkpointing_steps=0,
                         eval_batch_size=8, num_inference_steps=2, eval_steps=2, eval_num_samples=8, max_train_samples=600))
    rows = [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["fid"] > 0 and 0 < r["mean_confidence"] <= 1 and r["class_entropy_bits"] >= 0 and r["eval_seconds"] > 0 for r in rows)
    # The time-to-quality clocks: optimisation time, and wall time less the evaluations.
    assert 0 < rows[0]["train_s"] < rows[1]["train_s"] and 0 < rows[0]["wall_s"] < rows[1]["wall_s"]
    assert (shared_evaluation_cache / OFFLINE_DIGITS_CLASSIFIER).is_file()  # the classifier is trained once and kept


def test_evaluate_bpd_measures_held_out_images_writes_its_terms_and_keeps_earlier_results(unconditional_model, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "evaluation.json").write_text(json.dumps({"model_scores": {"fid": 12.5}}))  # an earlier FID evaluation
    result = _command("ddpm_hf.evaluate", str(unconditional_model), "--bpd", "--bpd_timesteps", "3", "--bpd_images", "4", "--bpd_split", "0.01",
                      "--report_dir", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((report / "evaluation.json").read_text())
    assert results["model_scores"] == {"fid": 12.5}  # --bpd alone samples nothing and keeps the earlier figures
    bpd = results["bits_per_dim"]
    assert bpd["num_images"] == 4 and bpd["timesteps_per_image"] == 3 and bpd["exact"] is False and bpd["conditional_on_labels"] is False
    assert bpd["images"] == "4 images: 0.01 of the training split held out with seed 0"
    # Three weights of an untrained net: far from the digits' ~1 bit/dim, but a finite bound above the prior term.
    assert 1 < bpd["bits_per_dim"] < 100 and bpd["std_error"] > 0 and 0 < bpd["prior_bits_per_dim"] < 1e-3
    rows = (report / "bits_per_dim.csv").read_text().splitlines()
    assert rows[0] == "t,bits_per_dim,std_error,count" and 3 <= len(rows) - 1 <= 12  # each image draws one t in each third of 0..999
    assert PIL.Image.open(report / "bits_per_dim.png").size[0] > 400
    assert "bits/dim:" in result.stderr and "3 stratified of 1000 terms per image" in result.stderr

    unseen = _command("ddpm_hf.evaluate", str(unconditional_model), "--bpd", "--bpd_timesteps", "2", "--bpd_images", "2", "--report_dir", str(report))
    assert unseen.returncode == 0, unseen.stderr[-3000:]
    assert json.loads((report / "evaluation.json").read_text())["bits_per_dim"]["images"] == "2 training images (no held-out split: the model has seen them)"


@pytest.mark.parametrize("args, fragment", [
    (["--bpd_timesteps", "0"], "--bpd_timesteps must be 'all' or a whole number"),
    (["--bpd_timesteps", "1001"], "--bpd_timesteps 1001 is more than the model's 1000 timesteps"),
    (["--bpd_split", "test"], "has only a train split"),
])
def test_evaluate_bpd_mistakes(unconditional_model, tmp_path, args, fragment):
    result = _command("ddpm_hf.evaluate", str(unconditional_model), "--bpd", "--bpd_images", "2", "--report_dir", str(tmp_path), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr and fragment in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def test_precision_and_recall_follow_kynkaanniemi_et_al_on_hand_sized_sets():
    line = torch.arange(5.0)[:, None]  # real points 0..4: with k = 1 each ball has radius 1
    assert precision_recall(line, line, k=1) == (1.0, 1.0)
    # 0.5 lies in the real manifold and 10 does not; the two generated balls have radius 9.5 and cover every real point.
    assert precision_recall(line, torch.tensor([[0.5], [10.0]]), k=1) == (0.5, 1.0)
    # Mode collapse: realistic images of one corner of the data only.
    grid = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij"), dim=-1).reshape(-1, 2)
    corner = grid[(grid[:, 0] < 3) & (grid[:, 1] < 3)] + 0.1
    precision, recall = precision_recall(grid, corner, k=3)
    assert precision == 1.0 and recall < 0.25
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(grid, corner[:3])


def test_evaluate_sweeps_guidance_with_quality_and_diversity_per_scale(conditional_model, tmp_path):
    result = _command("ddpm_hf.evaluate", str(conditional_model), "--guidance_scales", "0,2.5", "--num_samples", "40", "--batch_size", "40",
                      "--num_inference_steps", "2", "--report_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "evaluation.json").read_text())["guidance"]
    assert [r["guidance_scale"] for r in rows] == [0.0, 2.5] and "model_scores" not in json.loads((tmp_path / "evaluation.json").read_text())
    for r in rows:
        assert set(r) == {"guidance_scale", "fid", "seconds_per_image", "mean_confidence", "label_accuracy", "class_precision", "class_recall",
                          "class_entropy_bits"}
        assert r["fid"] > 0 and all(0 <= r[k] <= 1 for k in ("mean_confidence", "label_accuracy", "class_precision", "class_recall"))
    assert (tmp_path / "guidance.csv").read_text().startswith("guidance_scale,fid,seconds_per_image,mean_confidence,label_accuracy")
    assert "| 2.5 |" in (tmp_path / "guidance.md").read_text()
    assert PIL.Image.open(tmp_path / "guidance.png").size[0] > 1000
    unconditional = _command("ddpm_hf.evaluate", str(tmp_path), "--guidance_scales", "x")
    assert unconditional.returncode == 2 and "--guidance_scales takes numbers separated by commas" in unconditional.stderr


def test_in_training_evaluations_sample_small_images_in_large_batches_and_large_images_in_the_grids_batches():
    from ddpm_hf.config import TrainingConfig
    from ddpm_hf.maintenance import evaluation_batch_size

    config = TrainingConfig(eval_batch_size=16, eval_num_samples=1000)
    assert [evaluation_batch_size(config, size) for size in (28, 32, 64, 256)] == [100, 76, 19, 16]
    assert evaluation_batch_size(TrainingConfig(eval_batch_size=16, eval_num_samples=40), 28) == 40


def test_compare_samplers_alone_does_not_also_score_the_default_sampler(unconditional_model, tmp_path):
    # --fid is the default only when nothing else is asked for: a sampler comparison asked alone
    # must not first draw --num_samples images with the default sampler (DDPM-1000 doubled a study's time).
    report = tmp_path / "report"
    result = _command("ddpm_hf.evaluate", str(unconditional_model), "--num_samples", "4", "--batch_size", "4", "--report_dir", str(report),
                      "--compare-samplers", "--samplers", "ddim", "--sampler_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((report / "evaluation.json").read_text())
    assert "model_scores" not in results and [(r["sampler"], r["steps"]) for r in results["samplers"]] == [("ddim", 2)]
