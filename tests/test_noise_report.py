"""The noise report: decisions equal the training rule on the model's own outputs; files are complete."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image

from evaluation import noise_report, noise_report_card
from evaluation.features import extract_features, load_model
from evaluation.noise_scores import noise_scores
from modeling_mopro import correct_noisy_labels, far_from_prototypes, neighbour_label_vote
from tests.fixtures_eval import forbid_hub_network, noisy_hf_dataset, tiny_model, write_image_folder
from training.data.image_datasets import (
    hf_image_dataset,
    image_dataset,
    pseudo_label_dataset,
)
from training.data.transforms import transforms_from_config

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
    options = noise_report.NoiseReportOptions(batch_size=10, num_workers=0, decision_rule="training")
    summary = noise_report.write_noise_report(model_dir, noisy_data, tmp_path / "out", options)
    report = datasets.load_from_disk(str(tmp_path / "out"))

    model = load_model(model_dir)
    names, corrected, outputs, prototype_logits, labels = reference_decisions(model, noisy_data)
    assert set(names) == {"clean", "relabelled", "ood"}  # the fixture exercises every branch
    assert report["decision"] == report["training_rule_decision"] == names.tolist()
    assert report["suggested_label"] == report["training_rule_label"] == corrected.tolist()
    assert report["id"] == noisy_data["path"] and report["sample_id"] == noisy_data["sample_id"]
    assert report["given_label"] == noisy_data["label"]

    # Scores behind the decisions.
    probabilities = outputs.logits.softmax(1)
    np.testing.assert_allclose(report["prob_given_label"], probabilities[torch.arange(32), labels], atol=1e-5)
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
    options = noise_report.NoiseReportOptions(num_workers=0)
    official = noise_report.build_noise_report(
        load_model(save_noise_model(tmp_path / "a", noisy_data)), noisy_data, options
    )
    strict_model = load_model(tmp_path / "a")
    strict_model.config.ood_rule = "prototype_distance"
    strict = noise_report.build_noise_report(strict_model, noisy_data, options)
    official_ood = np.asarray(official["training_rule_decision"]) == "ood"
    strict_ood = np.asarray(strict["training_rule_decision"]) == "ood"
    assert (strict_ood >= official_ood).all() and strict_ood.sum() > official_ood.sum()


def test_noise_report_script_on_image_folder(tmp_path):
    """File layouts: ids are relative paths, so pseudo_label.json reloads as the cleaned training set."""
    data = write_image_folder(tmp_path / "web", 5, ["a", "b", "c", "d"])
    model = tiny_model(seed=1)
    model.config.pseudo_label_threshold = 0.5  # inside this model's soft-score range: some relabelling
    model.save_pretrained(tmp_path / "model")
    arguments = ["--model_name_or_path", str(tmp_path / "model"), "--data_dir", str(data), "--num_workers", "0"]
    summary = noise_report.main([*arguments, "--decision_rule", "training"])
    assert summary["num_samples"] == 20 and "relabel_precision" not in summary
    out = tmp_path / "model" / "noise_report"  # the default output folder
    report = datasets.load_from_disk(str(out))
    assert {"relabelled", "clean"} <= set(report["decision"])
    cleaned = pseudo_label_dataset(data, out / "pseudo_label.json")
    kept = [i for i, d in enumerate(report["decision"]) if d != "ood"]
    assert cleaned.ids == [report["id"][i] for i in kept]
    assert cleaned.labels.tolist() == [report["suggested_label"][i] for i in kept]
    assert report["id"] == image_dataset("imagefolder", data, None).ids
    assert (
        json.loads((out / "noise_report_summary.json").read_text())["ids"]
        == f"paths relative to {os.path.abspath(data)}"
    )
    assert (out / "noise_report.png").read_bytes()[:8] == PNG_SIGNATURE
    # A second run does not overwrite the report unless asked to.
    with pytest.raises(FileExistsError, match="already holds a noise report"):
        noise_report.main(arguments)
    assert noise_report.main([*arguments, "--overwrite"])["decision_rule"] == "fitted"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_process_scores_a_contiguous_share_with_dataset_wide_ids(monkeypatch, world):
    """What one process of an `accelerate launch` run computes before the shares are gathered (the gather itself
    runs in the 2-process test of tests/test_trainer.py): shares partition the dataset in order, and their rows
    keep the dataset's ids and ground truth, not positions within the share."""
    dataset = noisy_hf_dataset(11)
    model = tiny_model(seed=1)
    options = noise_report.NoiseReportOptions(batch_size=4, num_workers=0)
    whole = noise_report.build_noise_report(model, dataset, options).to_dict()
    state = PartialState()  # one process here: `gather_object` passes each share through as that process's report
    monkeypatch.setattr(state, "num_processes", world)
    shares = []
    for process in range(world):
        monkeypatch.setattr(state, "process_index", process)
        shares.append(noise_report.build_noise_report(model, dataset, options).to_dict())
    # accelerate's split: the first 11 % world processes take one row more.
    assert [len(share["id"]) for share in shares] == [11 // world + (p < 11 % world) for p in range(world)]
    # The per-sample columns; the neighbour scores need every embedding and are computed after the gather.
    per_sample = [c for c in whole if c not in (*noise_report.SCORE_COLUMNS, "decision", "suggested_label")]
    for column in per_sample:
        values = whole[column]
        joined = [value for share in shares for value in share[column]]
        if isinstance(values[0], float):
            assert joined == pytest.approx(values, abs=1e-5), column
        else:
            assert joined == values, column


# --- the report as a dataset: columns, card, publishing --------------------------------------------------------------
DOCUMENTED_COLUMNS = [name for name, _ in noise_report_card.COLUMN_DOCS]


def test_report_reloads_as_a_dataset_with_the_documented_columns(noisy_data, tmp_path):
    model = tiny_model(seed=1)
    summary = noise_report.write_noise_report(
        model, noisy_data, tmp_path / "out", noise_report.NoiseReportOptions(batch_size=10, num_workers=0)
    )
    report = datasets.load_from_disk(str(tmp_path / "out"))
    assert report.column_names == DOCUMENTED_COLUMNS  # every documented column, in the documented order
    assert len(report) == 32 and report["id"] == noisy_data["path"]
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert report.features["given_label"].names == report.features["suggested_label"].names == names
    assert set(report["decision"]) <= set(noise_report.DECISIONS)
    for column in ("label_quality", "ood_score", "ood_probability"):
        values = np.asarray(report[column])
        assert ((values >= 0) & (values <= 1)).all(), column
    confident = np.asarray(report["confident_label"])
    assert ((confident >= -1) & (confident < model.config.num_labels)).all()
    # The scores are the dataset-wide ones of `noise_scores`, on the model's own outputs of every sample.
    features = extract_features(
        model, hf_image_dataset(noisy_data, transforms_from_config(model.config)), num_workers=0, progress=False
    )
    expected = noise_scores(features.embeddings, features.labels, model.config.num_labels, model.config.temperature)
    np.testing.assert_allclose(report["label_quality"], expected["label_quality"], atol=1e-5)
    np.testing.assert_allclose(report["ood_score"], expected["ood_score"], atol=1e-5)
    assert report["suggested_label"] == expected["suggested_label"].tolist()
    assert report["confident_label"] == expected["confident_label"].tolist()
    assert report["decision"] == [noise_report.DECISIONS[d] for d in expected["decision"]]
    # Ground truth in the data: the summary scores the report.
    error = np.asarray(noisy_data["label"]) != np.asarray(noisy_data["true_label"])
    flagged = np.asarray(report["decision"]) != "clean"
    precision = (flagged & error).sum() / max(flagged.sum(), 1)
    assert summary["label_error_precision"] == pytest.approx(precision) if flagged.any() else True
    assert summary["label_error_recall"] == pytest.approx((flagged & error).sum() / error.sum())
    from sklearn.metrics import roc_auc_score

    assert summary["ood_auroc"] == pytest.approx(roc_auc_score(noisy_data["is_ood"], report["ood_score"]))
    assert summary["label_quality_auroc"] == pytest.approx(roc_auc_score(error, -np.asarray(report["label_quality"])))


def test_dataset_card_renders_for_its_reader(noisy_data, tmp_path):
    from huggingface_hub import DatasetCard

    model = tiny_model(seed=1)
    summary = noise_report.write_noise_report(
        model, noisy_data, tmp_path / "out", noise_report.NoiseReportOptions(batch_size=10, num_workers=0),
        data_description="web crawl v3", model_name="org/web-model",
    )  # fmt: skip
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert "noisy-labels" in card.data.tags and card.data.task_categories == ["image-classification"]
    assert card.data.pretty_name == "MoPro noise report of web crawl v3"
    text = card.text
    assert "32 rows, one per sample of web crawl v3" in text and "Scored by the MoPro model `org/web-model`." in text
    for name in noise_report.DECISIONS:  # the counts table
        assert f"| {name} | {summary[f'num_{name}']} |" in text
    assert "](noise_report.png)" in text and (tmp_path / "out" / "noise_report.png").is_file()
    assert "## Against the ground truth" in text and "| label errors: F1 | " in text
    for name in DOCUMENTED_COLUMNS:
        assert f"| `{name}` |" in text
    # The per-class table: one row per class whose counts add up to the samples given that label.
    given = np.asarray(noisy_data["label"])
    for label, name in model.config.id2label.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} | {name} |"))
        samples, clean, relabelled, ood = (int(cell) for cell in row.strip("| ").split(" | ")[2:])
        assert samples == (given == label).sum() == clean + relabelled + ood
    assert "load_from_disk" in text and "{" not in text.split("## Use")[0].replace("{}", "")  # nothing unformatted

    # Data without ground truth: no section that would have nothing to say.
    plain = noisy_data.remove_columns(["true_label", "is_ood"])
    noise_report.write_noise_report(
        model, plain, tmp_path / "plain", noise_report.NoiseReportOptions(batch_size=10, num_workers=0)
    )
    plain_card = (tmp_path / "plain" / "README.md").read_text()
    assert "Against the ground truth" not in plain_card
    assert "Scored by a MoPro model that was not saved." in plain_card  # built in memory, no folder to name


def test_push_fails_fast_offline(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from modeling_mopro.cli import run_command

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    forbid_hub_network(monkeypatch)
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    capsys.readouterr()
    argv = ["--model_name_or_path", str(model_dir), "--data_dir", str(tmp_path / "data"), "--push_to_hub", "org/rep"]
    with pytest.raises(SystemExit) as exit_info:
        run_command(noise_report.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot push to the Hub: offline mode is on") and err.count("\n") == 1
    assert "The noise report can be built offline without --push_to_hub" in err
    assert not (model_dir / "noise_report").exists()  # refused before any work (the data folder does not even exist)
    with pytest.raises(SystemExit):
        run_command(noise_report.main, [*argv[:-1], "not a repo id"])
    assert "--push_to_hub 'not a repo id' is not a Hub repo id" in capsys.readouterr().err


def test_push_publishes_the_report_and_the_model_card_links_it(noisy_data, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from evaluation import release
    from evaluation.model_card import build_model_card

    monkeypatch.setattr(release, "check_hub_reachable", lambda **kwargs: None)
    monkeypatch.setattr(release, "check_hub_login", lambda **kwargs: None)
    calls = []
    monkeypatch.setattr(
        datasets.Dataset, "push_to_hub", lambda self, repo, **kw: calls.append(("rows", repo, len(self)))
    )
    upload = lambda self, **kw: calls.append((kw["path_in_repo"], kw["repo_id"], kw["repo_type"]))  # noqa: E731
    monkeypatch.setattr(HfApi, "upload_file", upload)
    monkeypatch.setattr(HfApi, "upload_folder", upload)
    model = tiny_model(seed=1)
    noise_report.write_noise_report(
        model, noisy_data, tmp_path / "out", noise_report.NoiseReportOptions(batch_size=10, num_workers=0)
    )
    url = noise_report.push_noise_report(tmp_path / "out", "org/web-noise")
    assert url == "https://huggingface.co/datasets/org/web-noise"
    flagged = len(datasets.load_from_disk(str(tmp_path / "out" / "flagged_images")))
    assert calls[:2] == [("rows", "org/web-noise", 32), ("rows", "org/web-noise", flagged)]
    assert {c[0] for c in calls[2:]} == {
        "README.md",
        "noise_report.png",
        "noise_report_summary.json",
        "pseudo_label.json",
        "index.html",
        "gallery",
    }
    assert calls[-1][0] == "README.md"  # last: Dataset.push_to_hub rewrites the card
    assert all(c[1:] == ("org/web-noise", "dataset") for c in calls[2:])
    summary, _ = release.read_noise_summary([tmp_path / "out"])
    assert summary["dataset_repo"] == "org/web-noise"
    card = str(build_model_card(model.config, "org/model", noise_summary=summary))
    assert "[org/web-noise](https://huggingface.co/datasets/org/web-noise)" in card
    assert "| dataset_repo |" not in card  # a link, not a table row


@pytest.mark.parametrize("source", ["webvision", "shards"])
def test_report_reads_every_source_the_trainer_reads(source, tmp_path):
    """WebVision lists and make_shards folders (auto-detected), besides `datasets` folders and image folders."""
    from training.data.make_shards import records_from_dataset, write_id2label, write_shards
    from training.data.sources import load_source

    folder = write_image_folder(tmp_path / "folder", 4, ["a", "b", "c", "d"])
    if source == "webvision":
        data = tmp_path / "webvision"
        lines = []
        for label, name in enumerate("abcd"):
            for path in sorted((folder / name).iterdir()):
                target = data / "google" / f"q{label:04d}" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
                lines.append(f"google/q{label:04d}/{path.name} {label}\n")
        (data / "info").mkdir()
        (data / "info" / "train_filelist_google.txt").write_text("".join(lines))
        (data / "info" / "train_filelist_flickr.txt").write_text("")
        model = tiny_model(seed=1, num_labels=1000)  # WebVision V1: 1,000 classes
    else:
        data = tmp_path / "shards"
        write_shards(records_from_dataset(load_source("imagefolder", folder)[0]), data / "train", samples_per_shard=5)
        write_id2label(data, dict(enumerate("abcd")))
        model = tiny_model(seed=1, id2label=dict(enumerate("abcd")), label2id={n: i for i, n in enumerate("abcd")})
    model.save_pretrained(tmp_path / "model")
    summary = noise_report.main(
        ["--model_name_or_path", str(tmp_path / "model"), "--data_dir", str(data), "--num_workers", "0"]
    )
    report = datasets.load_from_disk(str(tmp_path / "model" / "noise_report"))
    assert summary["num_samples"] == len(report) == 16
    assert sorted(report["given_label"]) == sorted([0, 1, 2, 3] * 4)
    if source == "webvision":  # ids are the list's relative paths, as in the official pseudo_label.json
        assert report["id"][0].startswith("google/q0000/") and report["id"][0].endswith(".png")
    assert (
        f"MoPro noise report of {source} {data} (train split)"
        in (tmp_path / "model" / "noise_report" / "README.md").read_text()
    )


# --- decisions that know when they do not know; ids that name files; pseudo labels that read back --------------------
def test_an_untrusted_ood_fit_is_said_in_summary_card_gallery_and_output(noisy_data, tmp_path, monkeypatch, capsys):
    """Whatever the OOD scores of this tiny model, no dip passes MAX_DIP < 0: the fallback decides, and every
    human-readable output says so."""
    from evaluation import noise_scores as scores_module

    monkeypatch.setattr(scores_module, "MAX_DIP", -1.0)
    summary = noise_report.write_noise_report(
        tiny_model(seed=1), noisy_data, tmp_path / "out", noise_report.NoiseReportOptions(num_workers=0)
    )
    assert summary["ood_fallback"] is True and summary["ood_fallback_rule"] == scores_module.FALLBACK_OOD_RULE
    assert summary["fraction_ood"] <= scores_module.FALLBACK_MAX_SHARE
    warning = summary["warning"]
    assert warning.startswith("the fitted OOD threshold was not used: ") and scores_module.FALLBACK_OOD_RULE in warning
    assert json.loads((tmp_path / "out" / "noise_report_summary.json").read_text())["warning"] == warning
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"> **Warning:** The fitted OOD threshold was not used: {warning.split(': ', 1)[1]}" in card
    page = (tmp_path / "out" / "index.html").read_text()
    assert '<p class="warning"><b>Warning:</b> The fitted OOD threshold was not used' in page
    assert f"noise report: WARNING: {warning}" in capsys.readouterr().out
    report = datasets.load_from_disk(str(tmp_path / "out"))
    assert max(report["ood_probability"]) == 0  # the untrusted posterior is not shown as a decision


def test_report_ids_come_from_paths_an_id_column_or_row_indices(tmp_path):
    folder = write_image_folder(tmp_path / "train", 2, ["a", "b"])
    from training.data.sources import build_datasets

    train = build_datasets(train_dir=str(folder))[0]  # what run_mopro trains on: image dicts with absolute paths
    with_ids, column, source = noise_report.with_report_ids(train, id_root=folder)
    assert column == "path" and with_ids["path"] == image_dataset("imagefolder", folder, None).ids == [
        "a/a_0.png",
        "a/a_1.png",
        "b/b_0.png",
        "b/b_1.png",
    ]
    assert source == f"paths relative to {os.path.abspath(folder)}"
    # A `datasets` source without paths: its file or id column when it has one, else the row index, said as such.
    plain = train.remove_columns("path")
    named = plain.add_column("file_name", [f"img{i}.png" for i in range(4)])
    assert noise_report.with_report_ids(named)[1:] == ("file_name", "the data's `file_name` column")
    _, column, source = noise_report.with_report_ids(plain)
    assert column == "sample_id" and source.startswith("row indices (`sample_id`)")
    with pytest.raises(ValueError, match="id column 'name' is not in the data"):
        noise_report.with_report_ids(train, id_column="name")
    # A WebVision list read by training.data.sources: root-relative or absolute path strings.
    strings = datasets.Dataset.from_dict({"image": [str(folder / "a" / "a_0.png"), "b/b_1.png"], "label": [0, 1]})
    assert noise_report.with_report_ids(strings, id_root=folder)[0]["path"] == ["a/a_0.png", "b/b_1.png"]


def test_run_mopro_report_names_files_and_its_pseudo_labels_retrain_the_classifier(tmp_path, monkeypatch):
    """End of `training/run_mopro.py` on an image folder: the report's ids are the files' paths relative to the
    folder, and `evaluation.classifier_retrain` trains on its `pseudo_label.json` over the same folder."""
    from evaluation import classifier_retrain
    from tests.test_cli_errors import MODEL, RUN, image_folder
    from training.run_mopro import main as run_mopro

    data = image_folder(tmp_path / "train", per_class=8, classes=("cat", "dog", "fox"))
    out = tmp_path / "run"
    run_mopro([*MODEL, *RUN, "--image_size", "32", "--train_dir", str(data), "--output_dir", str(out),
               "--report_to", "none", "--noise_report", "true"])  # fmt: skip
    report = datasets.load_from_disk(str(out / "noise_report"))
    assert report["id"] == image_dataset("imagefolder", data, None).ids  # "cat/0.png", ...: every file, in the folder's order
    summary = json.loads((out / "noise_report" / "noise_report_summary.json").read_text())
    assert summary["ids"] == f"paths relative to {os.path.abspath(data)}"
    annotation = out / "noise_report" / "pseudo_label.json"
    pseudo = json.loads(annotation.read_text())
    kept = [i for i, d in enumerate(report["decision"]) if d != "ood"]
    assert pseudo["images"] == [report["id"][i] for i in kept] and len(kept) > 0
    given = report["given_label"]  # only relabelled samples change label; clean ones keep theirs
    assert pseudo["labels"] == [
        given[i] if report["decision"][i] == "clean" else report["suggested_label"][i] for i in kept
    ]

    trained_on = {}
    real_retrain = classifier_retrain.classifier_retrain

    def recording(model, train_dataset, *args, **kwargs):
        trained_on["ids"], trained_on["labels"] = list(train_dataset.ids), train_dataset.labels.tolist()
        return real_retrain(model, train_dataset, *args, **kwargs)

    monkeypatch.setattr(classifier_retrain, "classifier_retrain", recording)
    crt = tmp_path / "crt"
    classifier_retrain.main([
        "--model_name_or_path", str(out), "--annotation", str(annotation), "--train_data_dir", str(data),
        "--output_dir", str(crt), "--epochs", "1", "--batch_size", "4", "--num_workers", "0", "--logging_steps", "1",
    ])  # fmt: skip
    assert trained_on == {"ids": pseudo["images"], "labels": pseudo["labels"]}  # the cleaned labels, by file
    from safetensors.torch import load_file

    before, after = load_file(out / "model.safetensors"), load_file(crt / "model.safetensors")
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])  # it trained the classifier
    backbone = [
        name for name in before if ".backbone." in name and "running" not in name and "num_batches" not in name
    ]
    assert backbone and all(torch.equal(before[name], after[name]) for name in backbone)  # on a frozen backbone
    # The image-folder reading of the same annotation (`--train_data_format imagefolder`) matches it too.
    from training.data.image_datasets import apply_pseudo_labels

    assert apply_pseudo_labels(image_dataset("imagefolder", data, None), annotation).labels.tolist() == pseudo["labels"]


@pytest.mark.parametrize("num_neighbours", [5, 7])  # the report's own k: equal to the rule's (its vote reused) or not
def test_noise_report_training_rule_follows_queue_vote(noisy_data, tmp_path, num_neighbours):
    """A model trained with `noise_correction_rule="queue_vote"`: the report's training rule mixes in the neighbours'
    vote of the given labels (the dataset's own embeddings standing in for the queue, each sample left out of its
    own vote), with the config's k and weight -- not the official rule the model was not trained with."""
    overrides = {"noise_correction_rule": "queue_vote", "queue_vote_k": 5, "queue_vote_weight": 0.9}
    model_dir = save_noise_model(tmp_path / "model", noisy_data, **overrides)
    options = noise_report.NoiseReportOptions(
        batch_size=10, num_workers=0, decision_rule="training", num_neighbours=num_neighbours
    )
    noise_report.write_noise_report(model_dir, noisy_data, tmp_path / "out", options)
    report = datasets.load_from_disk(str(tmp_path / "out"))

    model = load_model(model_dir)
    official, _, outputs, prototype_logits, labels = reference_decisions(model, noisy_data)
    cosine = outputs.embeddings @ outputs.embeddings.T
    cosine.fill_diagonal_(float("-inf"))
    similarities, neighbours = cosine.topk(5, dim=1)
    vote = neighbour_label_vote(similarities, labels[neighbours], model.config.num_labels, model.config.temperature)
    corrected, kept = correct_noisy_labels(
        outputs.logits, prototype_logits, labels, model.config.alpha, model.config.pseudo_label_threshold, None,
        vote, 0.9,
    )  # fmt: skip
    names = np.where(~kept.numpy(), "ood", np.where((corrected != labels).numpy(), "relabelled", "clean"))
    assert names.tolist() != official.tolist()  # the vote changes decisions here: the test can tell the rules apart
    assert report["training_rule_decision"] == report["decision"] == names.tolist()
    assert report["training_rule_label"] == corrected.tolist()
