"""Evaluation protocols end to end on a tiny model and tiny image fixtures, checked against sklearn / numpy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, top_k_accuracy_score
from sklearn.svm import LinearSVC

from evaluation import classification, classifier_retrain, finetune, knn, lowshot_svm, robustness
from evaluation.features import extract_features, l2_normalize, load_model, save_eval_results
from modeling_mopro import MoProForImageClassification, MoProForPreTraining, MoProModel
from tests.fixtures_eval import (
    IMAGE_SIZE,
    NUM_LABELS,
    noisy_hf_dataset,
    save_tiny_model,
    tiny_config,
    write_image_folder,
    write_places205,
    write_voc07,
)
from training.data.image_datasets import (
    image_dataset,
    places205_dataset,
    voc07_dataset,
)
from training.data.transforms import transforms_from_config
from training.optim import step_lr_scheduler

CLASS_NAMES = ["apple", "boat", "cloud", "dog"]
WNIDS = [f"n{i:08d}" for i in range(NUM_LABELS)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {
        "root": root,
        "model": save_tiny_model(root / "model"),
        "train": write_image_folder(root / "train", 8, CLASS_NAMES, seed=1),
        "val": write_image_folder(root / "val", 5, CLASS_NAMES, seed=2),
    }


def read_result(folder, name):
    result = json.loads((folder / name).read_text())
    assert {"dataset_name", "dataset_type", "task"} <= result.keys()
    assert all(math.isfinite(v) for v in result.values() if not isinstance(v, str))
    return result


def forward_all(model, dataset):
    """Reference outputs: one plain forward of the whole dataset through the model's own `forward`."""
    batch = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    labels = torch.as_tensor(dataset.labels)
    with torch.no_grad():
        return model(batch), labels


# ----------------------------------------------------------------------------------------- data and features
def test_image_folder_labels_and_test_view(tmp_path):
    # Integer folder names (official `imagenet/val/<c>/`) in numeric order, not lexicographic ("2" before "10");
    # labels are positions, as in training (training/data/image_folder.py), so 0..N-1 folders keep their number.
    write_image_folder(tmp_path, 2, ["2", "10"])
    dataset = image_dataset("imagefolder", tmp_path, None, transforms_from_config(tiny_config()))
    assert dataset.classes == ["2", "10"]
    assert dataset.labels.tolist() == [0, 0, 1, 1] and dataset.ids[0].startswith("2/")
    item = dataset[0]
    assert item["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert item["labels"].dtype == torch.long
    assert dataset.ids[0].endswith(".png") and not dataset.ids[0].startswith("/")


def test_extract_features_equals_model_outputs(workspace, tmp_path):
    model = load_model(workspace["model"])
    dataset = image_dataset("imagefolder", workspace["val"], None, transforms_from_config(model.config))
    features = extract_features(model, dataset, batch_size=7, num_workers=2, progress=False)  # worker processes
    reference, labels = forward_all(model, dataset)
    np.testing.assert_allclose(features.logits, reference.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(features.embeddings, reference.embeddings.numpy(), atol=1e-5)
    np.testing.assert_array_equal(features.labels, labels.numpy())
    assert features.ids == dataset.ids

    # A MoProModel folder: pooled features and prototype similarities as its forward, no logits.
    model.mopro.save_pretrained(tmp_path / "base")
    base = load_model(tmp_path / "base")
    assert isinstance(base, MoProModel)
    base_features = extract_features(base, dataset, batch_size=64, num_workers=0, progress=False)
    base_reference, _ = forward_all(base, dataset)
    assert base_features.logits is None
    np.testing.assert_allclose(base_features.pooled, base_reference.pooler_output.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        base_features.prototype_similarities, base_reference.prototype_similarities.numpy(), atol=1e-5
    )

    # A pre-training model, in memory and as a folder (which loads as the release class).
    pretraining = MoProForPreTraining(model.config).eval()
    pretraining.load_state_dict(model.state_dict(), strict=False)
    pretraining.save_pretrained(tmp_path / "pretraining")
    assert isinstance(load_model(tmp_path / "pretraining"), MoProForImageClassification)
    for candidate in (pretraining, load_model(tmp_path / "pretraining")):
        logits = extract_features(candidate, dataset, ("logits",), num_workers=0, progress=False).logits
        np.testing.assert_allclose(logits, reference.logits.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------- classification
def test_topk_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 10)), rng.integers(0, 10, 200)
    result = classification.topk_accuracy(logits, labels, top_k=(1, 3, 5))
    for k in (1, 3, 5):
        expected = 100 * top_k_accuracy_score(labels, logits, k=k, labels=np.arange(10))
        assert result[f"top{k}"] == pytest.approx(expected, abs=1e-4)


def test_classification_script_matches_sklearn(workspace):
    metrics = classification.main(
        ["--model_name_or_path", str(workspace["model"]), "--data_dir", str(workspace["val"]),
         "--dataset", "imagenet", "--num_workers", "0", "--batch_size", "8"]
    )  # fmt: skip
    saved = read_result(workspace["model"], "eval_classification_imagenet.json")
    assert saved["top1"] == pytest.approx(metrics["top1"]) and saved["dataset_type"] == "imagenet-1k"
    model = load_model(workspace["model"])
    outputs, labels = forward_all(model, image_dataset("imagefolder", workspace["val"], None, transforms_from_config(model.config)))
    expected = 100 * top_k_accuracy_score(labels, outputs.logits.numpy(), k=1, labels=np.arange(NUM_LABELS))
    assert saved["top1"] == pytest.approx(expected, abs=1e-4)
    assert saved["top5"] == 100.0  # 4 classes: top-5 is clipped to top-4
    assert saved["num_samples"] == 20


def test_classification_on_webvision_and_datasets_layouts(workspace, tmp_path):
    """`--data_format auto` finds the WebVision val layout and a `save_to_disk` folder."""
    webvision = tmp_path / "webvision"
    (webvision / "info").mkdir(parents=True)
    (webvision / "val_images_256").mkdir()
    source = image_dataset("imagefolder", workspace["val"], None)
    lines = []
    for i, (path, label) in enumerate(zip(source.images, source.labels, strict=True)):
        (webvision / "val_images_256" / f"val{i:06d}.png").write_bytes(Path(path["path"]).read_bytes())
        lines.append(f"val{i:06d}.png {label}")
    (webvision / "info" / "val_filelist.txt").write_text("\n".join(lines) + "\n")
    common = ["--model_name_or_path", str(workspace["model"]), "--output_dir", str(tmp_path), "--num_workers", "0"]
    from_folder = classification.main([*common, "--data_dir", str(workspace["val"]), "--dataset", "imagenet"])
    from_webvision = classification.main([*common, "--data_dir", str(webvision), "--dataset", "webvision"])
    assert from_webvision == from_folder  # same images, same labels
    assert read_result(tmp_path, "eval_classification_webvision.json")["dataset_name"] == "WebVision 1.0 (val)"

    noisy_hf_dataset(12).save_to_disk(str(tmp_path / "hf"))
    classification.main([*common, "--data_dir", str(tmp_path / "hf"), "--dataset", "web_noisy"])
    assert read_result(tmp_path, "eval_classification_web_noisy.json")["num_samples"] == 12


def test_save_eval_results_rejects_non_finite(tmp_path):
    with pytest.raises(ValueError, match="not finite"):
        save_eval_results(tmp_path, "broken", {"top1": float("nan")}, "x", "x")
    path = save_eval_results(tmp_path, "ok", {"top1": np.float32(1.5), "n": np.int64(3)}, "x", "y", "z")
    assert path.name == "eval_ok_z.json"
    assert json.loads(path.read_text()) == {
        "top1": 1.5, "n": 3, "dataset_name": "x", "dataset_type": "y", "task": "image-classification"
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- low-shot SVM
def naive_voc07_11point(y_true, scores):
    order = np.argsort(-scores, kind="stable")
    hits = y_true[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    recall = np.cumsum(hits) / hits.sum()
    total = 0.0
    for t in np.arange(0, 1.1, 0.1):
        total += max([p for p, r in zip(precision, recall, strict=True) if r >= t - 1e-12], default=0.0) / 11
    return total


def naive_official_ap(y_true, scores):
    """The official `calculate_ap` loop, restated: precision envelope, summed over recall changes."""
    order = np.argsort(-scores, kind="stable")
    hits = y_true[order].astype(float)
    precision = list(np.cumsum(hits) / np.arange(1, len(hits) + 1))
    recall = list(np.cumsum(hits) / hits.sum())
    mrec, mpre = [0.0, *recall, 1.0], [0.0, *precision, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def test_average_precision_definitions():
    rng = np.random.default_rng(0)
    y_true, scores = rng.random(60) < 0.3, rng.normal(size=60)
    assert lowshot_svm.average_precision(y_true, scores) == pytest.approx(average_precision_score(y_true, scores))
    assert lowshot_svm.voc07_11point_ap(y_true, scores) == pytest.approx(naive_voc07_11point(y_true, scores))
    assert lowshot_svm.voc_interpolated_ap(y_true, scores) == pytest.approx(naive_official_ap(y_true, scores))
    # Hand-computed: ranking + - + : sklearn 1/2*(1 + 2/3) = 0.8333; envelope the same here; 11-point: 6/11*1 + 5/11*2/3.
    y, s = np.array([1, 0, 1]), np.array([3.0, 2.0, 1.0])
    assert lowshot_svm.average_precision(y, s) == pytest.approx(5 / 6)
    assert lowshot_svm.voc_interpolated_ap(y, s) == pytest.approx(5 / 6)
    assert lowshot_svm.voc07_11point_ap(y, s) == pytest.approx(6 / 11 + 5 / 11 * 2 / 3)
    with pytest.raises(ValueError, match="AP definition"):
        lowshot_svm.average_precision(y, s, "voc12")


def test_sample_low_shot():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 7)
    rows = lowshot_svm.sample_low_shot(labels, 3, rng)
    assert np.bincount(labels[rows]).tolist() == [3] * 5 and len(set(rows.tolist())) == 15
    multilabel = np.array([[1, -1], [1, 1], [0, 1], [-1, 1]])  # difficult (0) is not a positive
    rows = lowshot_svm.sample_low_shot(multilabel, 5, rng)
    assert sorted(rows.tolist()) == [0, 1, 1, 2, 3]  # image 1 has both classes: taken twice, as official
    runs = lowshot_svm.sample_low_shot_runs(labels, (1, 2), runs=3, seed=0)
    again = lowshot_svm.sample_low_shot_runs(labels, (1, 2), runs=3, seed=0)
    assert all(np.array_equal(a, b) for k in runs for a, b in zip(runs[k], again[k], strict=True))
    assert not np.array_equal(runs[2][0], runs[2][1])


def official_voc_svm(c_value=0.5):
    return LinearSVC(
        C=c_value, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
        tol=1e-4, dual=True, max_iter=2000, random_state=0,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_lowshot_svm_voc07_matches_sklearn(workspace):
    voc = write_voc07(workspace["root"] / "voc")
    args = ["--model_name_or_path", str(workspace["model"]), "--task", "voc07", "--data_dir", str(voc)]
    metrics = lowshot_svm.main([*args, "--shots", "1", "2", "--runs", "2", "--num_workers", "0"])
    saved = read_result(workspace["model"], "eval_lowshot_svm_voc07.json")
    assert set(metrics) == {"map_k1_mean", "map_k1_std", "map_k2_mean", "map_k2_std"}
    assert saved["ap_definition"] == "sklearn" and saved["difficult"] == "negative"

    model = load_model(workspace["model"])
    view = transforms_from_config(model.config)
    train, test = voc07_dataset(voc, "trainval", view), voc07_dataset(voc, "test", view)
    train_x = l2_normalize(extract_features(model, train, ("pooled",), num_workers=0, progress=False).pooled)
    test_x = l2_normalize(extract_features(model, test, ("pooled",), num_workers=0, progress=False).pooled)
    subsets = lowshot_svm.sample_low_shot_runs(train.labels, (1, 2), runs=2, seed=0)
    for k, runs in subsets.items():
        maps = []
        for rows in runs:
            aps = []
            for c in range(20):
                svm = official_voc_svm().fit(train_x[rows], np.where(train.labels[rows, c] > 0, 1, -1))
                aps.append(100 * average_precision_score(test.labels[:, c] > 0, svm.decision_function(test_x)))
            maps.append(np.mean(aps))
        assert saved[f"map_k{k}_mean"] == pytest.approx(np.mean(maps), abs=1e-3)
        assert saved[f"map_k{k}_std"] == pytest.approx(np.std(maps), abs=1e-3)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_lowshot_svm_places205_matches_sklearn(workspace):
    places = write_places205(workspace["root"] / "places")
    model = load_model(workspace["model"])
    view = transforms_from_config(model.config)
    train, test = places205_dataset(places, "train", view), places205_dataset(places, "val", view)
    options = lowshot_svm.LowShotOptions(shots=(1, 4), runs=2, num_workers=0)
    metrics = lowshot_svm.evaluate_lowshot_svm(model, "places205", train, test, options)
    train_x = l2_normalize(extract_features(model, train, ("pooled",), num_workers=0, progress=False).pooled)
    test_x = l2_normalize(extract_features(model, test, ("pooled",), num_workers=0, progress=False).pooled)
    for k, runs in lowshot_svm.sample_low_shot_runs(train.labels, (1, 4), runs=2, seed=0).items():
        accuracies = []
        for rows in runs:
            svm = LinearSVC(C=0.5, tol=1e-4, dual=True, max_iter=2000, random_state=0)
            accuracies.append(100 * np.mean(svm.fit(train_x[rows], train.labels[rows]).predict(test_x) == test.labels))
        assert metrics[f"accuracy_k{k}_mean"] == pytest.approx(np.mean(accuracies), abs=1e-6)


# ----------------------------------------------------------------------------------------------- robustness
def naive_rms_calibration(confidence, correct, beta=100):
    """Hendrycks et al.'s calib_err(p="2") restated, over every bin (last one absorbs the remainder)."""
    order = np.argsort(confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    bins = [[i * beta, (i + 1) * beta] for i in range(len(confidence) // beta)]
    bins[-1][1] = len(confidence)
    total = 0.0
    for start, end in bins:
        total += (end - start) / len(confidence) * (confidence[start:end].mean() - correct[start:end].mean()) ** 2
    return math.sqrt(total)


def naive_ece(confidence, correct, n_bins=15):
    total = 0.0
    edges = np.linspace(0, 1, n_bins + 1)
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence >= low) & (confidence < high)
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return total


def test_calibration_metrics_match_numpy():
    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(scale=2.0, size=(350, 6)))
    labels = torch.as_tensor(rng.integers(0, 6, 350))
    probabilities = logits.softmax(1).numpy()
    confidence, correct = probabilities.max(1), (probabilities.argmax(1) == labels.numpy()).astype(float)
    metrics = robustness.robustness_metrics(logits, labels)
    assert metrics["accuracy"] == pytest.approx(100 * correct.mean())
    assert metrics["rms_calibration_error"] == pytest.approx(100 * naive_rms_calibration(confidence, correct))
    assert metrics["ece"] == pytest.approx(100 * naive_ece(confidence, correct), abs=1e-4)
    # The reference code's loop leaves out the last bin (here the 150 most confident of 3 bins: 100, 100, 150).
    quirk = robustness.rms_calibration_error(confidence, correct, include_last_bin=False)
    lowest = np.argsort(confidence, kind="stable")[:200]
    first_two = np.sqrt(200 / 350) * naive_rms_calibration(confidence[lowest], correct[lowest])
    assert quirk == pytest.approx(first_two)
    # Adaptive bins differ from torchmetrics' equal-width norm="l2".
    from torchmetrics.functional.classification import multiclass_calibration_error

    equal_width = float(multiclass_calibration_error(logits.softmax(1).float(), labels, 6, n_bins=15, norm="l2"))
    assert abs(equal_width - metrics["rms_calibration_error"] / 100) > 1e-4


def test_subset_logit_indices():
    folders = ["n3", "n1", "n7"]
    assert robustness.subset_logit_indices(folders, {"n1": 10, "n3": 30, "n7": 70}).tolist() == [10, 30, 70]
    assert robustness.subset_logit_indices(folders, ["n7", "n1", "n3"], ["n0", "n1", "n3", "n5", "n7"]).tolist() == [
        1,
        2,
        4,
    ]
    assert robustness.subset_logit_indices(folders, [40, 4, 9]).tolist() == [4, 9, 40]
    with pytest.raises(ValueError, match="imagenet_classes"):
        robustness.subset_logit_indices(folders, ["n1", "n3", "n7"])
    with pytest.raises(ValueError, match="class folders not in the class subset"):
        robustness.subset_logit_indices(folders, {"n1": 1, "n3": 3})


def test_robustness_script_restricts_logits(workspace):
    subset = [WNIDS[0], WNIDS[2], WNIDS[3]]  # the dataset has 3 of the model's 4 classes
    data = write_image_folder(workspace["root"] / "imagenet-r", 6, subset, seed=3)
    (workspace["root"] / "subset.txt").write_text("\n".join(subset) + "\n")
    (workspace["root"] / "synsets.txt").write_text("\n".join(f"{w} class {i}" for i, w in enumerate(WNIDS)))
    robustness.main(
        ["--model_name_or_path", str(workspace["model"]), "--data_dir", str(data), "--dataset", "imagenet-r",
         "--class_subset", str(workspace["root"] / "subset.txt"), "--imagenet_classes",
         str(workspace["root"] / "synsets.txt"), "--bin_size", "5", "--num_workers", "0"]
    )  # fmt: skip
    saved = read_result(workspace["model"], "eval_robustness_imagenet_r.json")
    model = load_model(workspace["model"])
    outputs, labels = forward_all(model, image_dataset("imagefolder", data, None, transforms_from_config(model.config)))
    probabilities = outputs.logits[:, [0, 2, 3]].softmax(1).numpy()
    confidence, correct = probabilities.max(1), (probabilities.argmax(1) == labels.numpy()).astype(float)
    assert saved["accuracy"] == pytest.approx(100 * correct.mean())
    assert saved["rms_calibration_error"] == pytest.approx(
        100 * naive_rms_calibration(confidence, correct, 5), abs=1e-4
    )
    assert saved["ece"] == pytest.approx(100 * naive_ece(confidence, correct), abs=1e-3)
    assert saved["dataset_name"] == "ImageNet-R"


# ------------------------------------------------------------------------------------------------------ kNN
def naive_knn(train_x, train_y, test_x, k, temperature, majority, num_classes):
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    predictions = []
    for x in test_x:
        similarities = train_x @ x
        votes = np.zeros(num_classes)
        for j in np.argsort(-similarities)[:k]:
            votes[train_y[j]] += 1.0 if majority else np.exp(similarities[j] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


def test_knn_accuracy_matches_brute_force():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    train_y, test_y = rng.integers(0, 5, 120), rng.integers(0, 5, 40)
    train_x = centres[train_y] + rng.normal(scale=1.5, size=(120, 16))
    test_x = centres[test_y] + rng.normal(scale=1.5, size=(40, 16))
    for k, temperature, weighting in ((25, 0.1, "temperature"), (7, 0.5, "temperature"), (9, 0.1, "majority")):
        expected = naive_knn(train_x, train_y, test_x, k, temperature, weighting == "majority", 5)
        result = knn.knn_accuracy(train_x, train_y, test_x, test_y, k, temperature, weighting, num_classes=5)
        assert result == pytest.approx(100 * np.mean(expected == test_y))
    # k larger than the training set uses every sample; blocks of test rows give the same scores.
    full = knn.knn_class_scores(train_x, train_y, test_x, k=1000, batch_size=7)
    assert torch.allclose(full, knn.knn_class_scores(train_x, train_y, test_x, k=120, batch_size=64))


def test_knn_script(workspace):
    metrics = knn.main(
        ["--model_name_or_path", str(workspace["model"]), "--train_data_dir", str(workspace["train"]),
         "--data_dir", str(workspace["val"]), "--k", "10", "--majority_k", "5", "--num_workers", "0",
         "--dataset", "imagenet"]
    )  # fmt: skip
    saved = read_result(workspace["model"], "eval_knn_imagenet.json")
    model = load_model(workspace["model"])
    view = transforms_from_config(model.config)
    train, _ = forward_all(model, image_dataset("imagefolder", workspace["train"], None, view))
    test, test_y = forward_all(model, image_dataset("imagefolder", workspace["val"], None, view))
    train_y = image_dataset("imagefolder", workspace["train"], None, view).labels
    expected = naive_knn(train.embeddings.numpy(), train_y, test.embeddings.numpy(), 10, 0.1, False, NUM_LABELS)
    assert saved["knn_top1_k10"] == pytest.approx(100 * np.mean(expected == test_y.numpy()))
    assert saved["knn_majority_top1_k5"] == pytest.approx(metrics["knn_majority_top1_k5"])


# ------------------------------------------------------------------------------------- fine-tuning and cRT
def test_milestone_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=1.0)
    scheduler = step_lr_scheduler(optimizer, milestones=(20, 30), steps_per_epoch=10, gamma=0.2)
    factors = []
    for _ in range(400):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [factors[s] for s in (0, 199, 200, 299, 300, 399)] == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])


def test_step_decay_trainer_optimizer_and_schedule(workspace, tmp_path):
    model = finetune.load_for_training(workspace["model"], NUM_LABELS)
    recipe = finetune.TrainingRecipe(4, 0.5, (2, 3), 0.1, momentum=0.8, batch_size=4, num_workers=0, logging_steps=10)
    args = recipe.training_arguments(tmp_path, drop_last=False)
    trainer = finetune.StepDecayTrainer(model=model, args=args, milestones=(2, 3), gamma=0.1)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)  # 2 steps per epoch
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.8
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trained for p in model.mopro.projection.parameters())  # frozen, DDP-safe
    rates = []
    for _ in range(8):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.05, 0.05, 0.005, 0.005])


def test_labelled_subsets(tmp_path):
    labels = np.repeat(np.arange(3), [10, 20, 40])
    subset = finetune.sample_labelled_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[subset]).tolist() == [1, 2, 4]
    assert np.array_equal(subset, finetune.sample_labelled_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, finetune.sample_labelled_subset(labels, 0.1, seed=4))
    (tmp_path / "1percent.txt").write_text("b_1.png\nc_0.png\n")
    assert finetune.subset_from_file(["a/a_0.png", "b/b_1.png", "c/c_0.png"], tmp_path / "1percent.txt").tolist() == [
        1,
        2,
    ]


def test_finetune_script_runs(workspace, tmp_path):
    metrics = finetune.main(
        ["--model_name_or_path", str(workspace["model"]), "--output_dir", str(tmp_path / "ft"),
         "--train_data_dir", str(workspace["train"]), "--data_dir", str(workspace["val"]),
         "--label_fraction", "0.5", "--epochs", "2", "--milestones", "1", "--batch_size", "8",
         "--num_workers", "0", "--logging_steps", "1"]
    )  # fmt: skip
    saved = read_result(workspace["model"], "eval_finetune_imagenet_50pct.json")
    assert saved["train_samples"] == 16 and saved["num_samples"] == 20 and saved["train_epochs"] == 2
    assert 0 <= saved["top1"] <= 100 and saved["top1"] == pytest.approx(metrics["top1"])
    assert (tmp_path / "ft" / "model.safetensors").exists()


def test_finetune_reports_and_saves_the_best_epoch(workspace, tmp_path, monkeypatch):
    """Official `finetune_imagenet.py` keeps the best top-1 over the epochs (and `model_best`): so do we, with the
    last epoch beside it."""
    scripted_top1 = iter([30.0, 70.0, 70.0, 50.0])  # epoch 2 is best; epoch 3 only ties it (first one wins)
    weights = []

    def fake_evaluate(model, dataset, **kwargs):
        weights.append(model.classifier.weight.detach().clone())
        top1 = next(scripted_top1)
        return {"top1": top1, "top5": top1 + 1, "num_samples": len(dataset)}

    monkeypatch.setattr(finetune, "evaluate_classification", fake_evaluate)
    metrics = finetune.main(
        ["--model_name_or_path", str(workspace["model"]), "--output_dir", str(tmp_path / "ft"),
         "--results_dir", str(tmp_path), "--train_data_dir", str(workspace["train"]), "--data_dir", str(workspace["val"]),
         "--label_fraction", "0.5", "--epochs", "4", "--learning_rate", "0.5", "--batch_size", "8",
         "--num_workers", "0"]
    )  # fmt: skip
    assert len(weights) == 4  # evaluated after every epoch
    assert (metrics["top1"], metrics["top5"], metrics["best_epoch"]) == (70.0, 71.0, 2)
    assert (metrics["final_top1"], metrics["final_top5"]) == (50.0, 51.0)
    assert read_result(tmp_path, "eval_finetune_imagenet_50pct.json")["best_epoch"] == 2
    saved = load_model(tmp_path / "ft").classifier.weight
    assert not torch.equal(weights[1], weights[3])  # the weights moved after the best epoch...
    torch.testing.assert_close(saved, weights[1], rtol=0, atol=0)  # ...and the saved model is the best epoch's


def test_finetune_last_epoch_only_is_a_flag(workspace, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        finetune, "evaluate_classification",
        lambda model, dataset, **kwargs: calls.append(1) or {"top1": 1.0, "top5": 2.0, "num_samples": len(dataset)},
    )  # fmt: skip
    metrics = finetune.main(
        ["--model_name_or_path", str(workspace["model"]), "--output_dir", str(tmp_path / "ft"),
         "--results_dir", str(tmp_path), "--train_data_dir", str(workspace["train"]), "--data_dir", str(workspace["val"]),
         "--label_fraction", "0.5", "--epochs", "2", "--batch_size", "8", "--num_workers", "0",
         "--no-select_best_epoch"]
    )  # fmt: skip
    assert len(calls) == 1 and "best_epoch" not in metrics and metrics["top1"] == 1.0


def test_class_balanced_weights_and_sampler():
    labels = np.array([0] * 64 + [1] * 16 + [2] * 4)
    weights = classifier_retrain.class_balanced_weights(labels, num_classes=4)
    np.testing.assert_allclose(weights, [1 / 8, 1 / 4, 1 / 2, 0.0])
    sampler = classifier_retrain.ClassBalancedSampler(labels, num_samples=20_000, seed=0)
    draws = np.bincount(labels[list(sampler)], minlength=3) / 20_000
    expected = np.sqrt([64, 16, 4]) / np.sqrt([64, 16, 4]).sum()  # a class is drawn in proportion to sqrt(n_c)
    np.testing.assert_allclose(draws, expected, atol=0.02)
    assert list(sampler) != list(sampler)  # a new draw every epoch
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first and len(sampler) == 20_000


def test_classifier_retrain_script_runs(workspace, tmp_path):
    dataset = image_dataset("imagefolder", workspace["train"], None)
    keep = list(range(0, len(dataset), 2))
    annotation = {"images": [dataset.ids[i] for i in keep], "labels": [int(dataset.labels[i]) for i in keep]}
    (tmp_path / "pseudo_label.json").write_text(json.dumps(annotation))
    results = classifier_retrain.main(
        ["--model_name_or_path", str(workspace["model"]), "--output_dir", str(tmp_path / "crt"),
         "--results_dir", str(tmp_path), "--train_data_dir", str(workspace["train"]),
         "--annotation", str(tmp_path / "pseudo_label.json"), "--imagenet_dir", str(workspace["val"]),
         "--epochs", "2", "--batch_size", "4", "--num_workers", "0", "--logging_steps", "1"]
    )  # fmt: skip
    saved = read_result(tmp_path, "eval_classifier_retrain_imagenet.json")
    assert saved["train_samples"] == len(keep) and 0 <= saved["top1"] <= 100
    assert saved["top1"] == pytest.approx(results["imagenet"]["top1"])
    # Classifier-only: the backbone (BatchNorm statistics included) is unchanged, the classifier moved.
    before = load_model(workspace["model"]).state_dict()
    after = load_model(tmp_path / "crt").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("mopro."))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_prototype_similarities_are_cosines(workspace):
    model = load_model(workspace["model"])
    dataset = image_dataset("imagefolder", workspace["val"], None, transforms_from_config(model.config))
    features = extract_features(
        model, dataset, ("embeddings", "prototype_similarities"), num_workers=0, progress=False
    )
    expected = F.normalize(torch.as_tensor(features.embeddings), dim=1) @ model.mopro.prototypes.T
    np.testing.assert_allclose(features.prototype_similarities, expected.numpy(), atol=1e-5)
    assert features.pooled is None and features.logits is None
