"""The noise report: decisions equal the training rule on the model's own outputs; files are complete."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation import noise_report
from evaluation.features import extract_features, load_model
from evaluation.image_datasets import (
    hf_image_dataset,
    image_folder_dataset,
    pseudo_label_dataset,
    transforms_from_config,
)
from modeling_mopro import correct_noisy_labels, far_from_prototypes
from tests.fixtures_eval import noisy_hf_dataset, tiny_model, write_image_folder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def midpoint_quantile(values: np.ndarray, q: float) -> float:
    """A threshold between two neighbouring observed values (never on one), near quantile q."""
    ordered = np.sort(values)
    i = int(q * (len(ordered) - 1))
    return float((ordered[i] + ordered[i + 1]) / 2)


def save_noise_model(path, dataset, **config_overrides):
    """A tiny model whose relabel (and prototype-distance) thresholds sit inside its own score range, so that
    clean, relabelled and OOD samples all occur (seed 1: soft scores spread over 0.41-0.59 on this data)."""
    # alpha and T away from their defaults: a report that hard-codes the official (p + q) / 2 or T = 0.1 fails.
    model = tiny_model(seed=1, **{"alpha": 0.7, "temperature": 0.2, **config_overrides})
    alpha, view = model.config.alpha, transforms_from_config(model.config)
    features = extract_features(model, hf_image_dataset(dataset, view), num_workers=0, progress=False)
    similarities = features.prototype_similarities
    soft = alpha * F.softmax(torch.as_tensor(features.logits), 1) + (1 - alpha) * F.softmax(
        torch.as_tensor(similarities) / model.config.temperature, 1
    )
    model.config.pseudo_label_threshold = midpoint_quantile(soft.max(1).values.numpy(), 0.6)
    model.config.ood_similarity_threshold = midpoint_quantile(similarities.max(1), 0.3)
    model.save_pretrained(path)
    return path


def reference_decisions(model, dataset):
    """The training rule on a plain forward of the model: (decision names, corrected, outputs, prototype logits)."""
    view = transforms_from_config(model.config)
    wrapped = hf_image_dataset(dataset, view)
    pixel_values = torch.stack([wrapped[i]["pixel_values"] for i in range(len(wrapped))])
    labels = torch.as_tensor(dataset["label"])
    with torch.no_grad():
        outputs = model(pixel_values)
    prototypes = model.mopro.prototypes
    prototype_logits = outputs.embeddings @ prototypes.T / model.config.temperature
    corrected, kept = correct_noisy_labels(
        outputs.logits, prototype_logits, labels, model.config.alpha, model.config.pseudo_label_threshold
    )
    if model.config.ood_rule == "prototype_distance":
        kept &= ~far_from_prototypes(outputs.embeddings, prototypes, model.config.ood_similarity_threshold)
    names = np.where(~kept.numpy(), "ood", np.where((corrected != labels).numpy(), "relabelled", "clean"))
    return names, corrected.numpy(), outputs, prototype_logits, labels


@pytest.fixture(scope="module")
def noisy_data():
    return noisy_hf_dataset(num_samples=32)


@pytest.mark.parametrize("ood_rule", ["official", "prototype_distance"])
def test_noise_report_follows_training_rule(noisy_data, tmp_path, ood_rule):
    model_dir = save_noise_model(tmp_path / "model", noisy_data, ood_rule=ood_rule)
    summary = noise_report.write_noise_report(model_dir, noisy_data, tmp_path / "out", batch_size=10, num_workers=0)
    report = datasets.Dataset.from_parquet(str(tmp_path / "out" / "noise_report.parquet"))

    model = load_model(model_dir)
    names, corrected, outputs, prototype_logits, labels = reference_decisions(model, noisy_data)
    assert set(names) == {"clean", "relabelled", "ood"}  # the fixture exercises every branch
    assert report["decision"] == names.tolist()
    assert report["corrected_label"] == corrected.tolist()
    assert report["id"] == noisy_data["path"] and report["sample_id"] == noisy_data["sample_id"]
    assert report["given_label"] == noisy_data["label"]

    # Scores behind the decisions.
    probabilities = outputs.logits.softmax(1)
    soft = model.config.alpha * probabilities + (1 - model.config.alpha) * prototype_logits.softmax(1)
    np.testing.assert_allclose(report["prob_given_label"], probabilities[torch.arange(32), labels], atol=1e-5)
    np.testing.assert_allclose(report["soft_score_given_label"], soft[torch.arange(32), labels], atol=1e-5)
    np.testing.assert_allclose(report["max_soft_score"], soft.max(1).values, atol=1e-5)
    similarities = outputs.embeddings @ model.mopro.prototypes.T
    np.testing.assert_allclose(report["max_prototype_similarity"], similarities.max(1).values, atol=1e-5)

    # pseudo_label.json: exactly the kept samples, in order, with their corrected labels.
    pseudo = json.loads((tmp_path / "out" / "pseudo_label.json").read_text())
    kept = names != "ood"
    assert pseudo["images"] == np.asarray(noisy_data["path"])[kept].tolist()
    assert pseudo["labels"] == corrected[kept].tolist()

    # Summary: counts, and ground-truth precision / recall recomputed here.
    assert json.loads((tmp_path / "out" / "noise_report_summary.json").read_text()) == summary
    for name in noise_report.DECISIONS:
        assert summary[f"num_{name}"] == int((names == name).sum())
    assert summary["fraction_ood"] == pytest.approx((names == "ood").mean())
    assert summary["ood_rule"] == ood_rule
    is_ood, true = np.asarray(noisy_data["is_ood"]), np.asarray(noisy_data["true_label"])
    dropped, relabelled = names == "ood", names == "relabelled"
    assert summary["ood_recall"] == pytest.approx((dropped & is_ood).sum() / is_ood.sum())
    assert summary["ood_precision"] == pytest.approx((dropped & is_ood).sum() / dropped.sum())
    right = relabelled & ~is_ood & (corrected == true)
    assert summary["relabel_precision"] == pytest.approx(right.sum() / relabelled.sum())
    noisy = ~is_ood & (np.asarray(noisy_data["label"]) != true)
    assert summary["relabel_recall"] == pytest.approx((right & noisy).sum() / noisy.sum())

    png = tmp_path / "out" / "noise_report.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        image.verify()


def test_prototype_distance_drops_more(noisy_data, tmp_path):
    """Same weights and thresholds: the prototype-distance rule drops a superset of the official rule's OOD."""
    official = noise_report.build_noise_report(
        load_model(save_noise_model(tmp_path / "a", noisy_data)), noisy_data, num_workers=0
    )
    strict_model = load_model(tmp_path / "a")
    strict_model.config.ood_rule = "prototype_distance"
    strict = noise_report.build_noise_report(strict_model, noisy_data, num_workers=0)
    official_ood = np.asarray(official["decision"]) == "ood"
    strict_ood = np.asarray(strict["decision"]) == "ood"
    assert (strict_ood >= official_ood).all() and strict_ood.sum() > official_ood.sum()


def test_noise_report_script_on_image_folder(tmp_path):
    """File layouts: ids are relative paths, so pseudo_label.json reloads as the cleaned training set."""
    data = write_image_folder(tmp_path / "web", 5, ["a", "b", "c", "d"])
    model = tiny_model(seed=1)
    model.config.pseudo_label_threshold = 0.5  # inside this model's soft-score range: some relabelling
    model.save_pretrained(tmp_path / "model")
    summary = noise_report.main(
        ["--model_name_or_path", str(tmp_path / "model"), "--data_dir", str(data), "--num_workers", "0"]
    )
    assert summary["num_samples"] == 20 and "relabel_precision" not in summary
    report = datasets.Dataset.from_parquet(str(tmp_path / "model" / "noise_report.parquet"))
    cleaned = pseudo_label_dataset(data, tmp_path / "model" / "pseudo_label.json")
    kept = [i for i, d in enumerate(report["decision"]) if d != "ood"]
    assert cleaned.ids == [report["id"][i] for i in kept]
    assert cleaned.labels.tolist() == [report["corrected_label"][i] for i in kept]
    assert report["id"] == image_folder_dataset(data).ids
    assert (tmp_path / "model" / "noise_report.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_process_scores_a_contiguous_share_with_dataset_wide_ids(monkeypatch, world):
    """What one process of an `accelerate launch` run computes before the shares are gathered (the gather itself
    runs in the 2-process test of tests/test_trainer.py): shares partition the dataset in order, and their rows
    keep the dataset's ids and ground truth, not positions within the share."""
    dataset = noisy_hf_dataset(11)
    model = tiny_model(seed=1)
    whole = noise_report.build_noise_report(model, dataset, batch_size=4, num_workers=0).to_dict()
    monkeypatch.setattr(noise_report, "world_size", lambda: world)
    shares = []
    for process in range(world):
        monkeypatch.setattr(noise_report, "rank", lambda process=process: process)
        shares.append(noise_report.build_noise_report(model, dataset, batch_size=4, num_workers=0).to_dict())
    assert [len(share["id"]) for share in shares] == [(p + 1) * 11 // world - p * 11 // world for p in range(world)]
    for column, values in whole.items():
        joined = [value for share in shares for value in share[column]]
        if isinstance(values[0], float):
            assert joined == pytest.approx(values, abs=1e-5), column
        else:
            assert joined == values, column
