"""Hub release: model card with model-index, release folder, timm export (and transformers' TimmWrapper), push guard."""

import json
import math
import os
import shutil
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, ModelCard, constants
from PIL import Image
from transformers import AutoModelForImageClassification, ConvNextImageProcessorPil, pipeline

import evaluation.release as release_module
from evaluation.release import HubUnavailableError, make_release, read_noise_summary, read_result_file
from modeling_mopro import MoProForImageClassification
from modeling_mopro.cli import run_command
from tests._tiny import MoProModelTester
from tests.fixtures_eval import forbid_hub_network

REPO_ID = "org/mopro-tiny"
TIMM_REPO_ID = "org/mopro-tiny-timm"
NAMES = ["cat", "dog", "car", "tree"]
WEBVISION = ("WebVision 1.0 (val)", "webvision")
RESULT_FILES = {
    # The Trainer's files: no dataset keys (the training data's val set), bookkeeping, train_* and noise_* keys.
    "all_results.json": {
        "epoch": 3.0,
        "eval_accuracy": 0.5,
        "eval_loss": 1.25,
        "eval_runtime": 0.5,
        "eval_samples_per_second": 10.0,
        "eval_steps_per_second": 1.0,
        "train_loss": 2.0,
        "total_flos": 1e9,
        "noise_relabelled_fraction": 0.2,
    },
    "eval_results.json": {"epoch": 3.0, "eval_accuracy": 0.5, "eval_loss": 1.25},  # same numbers again
    # The evaluation scripts' files (evaluation.features.save_eval_results).
    "eval_classification_webvision.json": {
        "top1": 73.9,
        "top5": 90.0,
        "num_samples": 50000,
        "dataset_name": WEBVISION[0],
        "dataset_type": WEBVISION[1],
        "task": "image-classification",
    },
    "eval_classification_imagenet.json": {
        "top1": 67.8,
        "top5": 87.0,
        "num_samples": 50000,
        "dataset_name": "ImageNet (ILSVRC2012 val)",
        "dataset_type": "imagenet-1k",
        "task": "image-classification",
    },
    "eval_lowshot_svm_voc07.json": {
        "map_k1_mean": 59.5,
        "map_k1_std": 1.5,
        "ap_definition": "voc_interpolated",
        "dataset_name": "PASCAL VOC 2007",
        "dataset_type": "voc2007",
        "task": "image-classification",
    },
    # A list of entries, a nested "metrics" object (so `k` is not a metric), the `dataset`/`split` aliases.
    "eval_knn.json": [
        {
            "dataset": WEBVISION[0],
            "dataset_type": "webvision",
            "split": "validation",
            "k": 200,
            "metrics": {"knn_top1": 70.1},
        }
    ],
}
# (dataset name, dataset type, split, metric) -> value: what the model-index must hold.
EXPECTED = {
    (*WEBVISION, None, "accuracy"): 0.5,
    (*WEBVISION, None, "loss"): 1.25,
    (*WEBVISION, None, "top1"): 73.9,
    (*WEBVISION, None, "top5"): 90.0,
    ("ImageNet (ILSVRC2012 val)", "imagenet-1k", None, "top1"): 67.8,
    ("ImageNet (ILSVRC2012 val)", "imagenet-1k", None, "top5"): 87.0,
    ("PASCAL VOC 2007", "voc2007", None, "map_k1_mean"): 59.5,
    ("PASCAL VOC 2007", "voc2007", None, "map_k1_std"): 1.5,
    (*WEBVISION, "validation", "knn_top1"): 70.1,
}
# What `training.run_mopro` records of a WebVision run (`run_args.json`: its dataclasses as JSON).
WEBVISION_RUN_ARGS = {
    "model_args": {"backbone": "resnet50", "image_size": 224},
    "data_args": {"webvision_dir": "/data/webvision", "webvision_version": "v1", "noise_rate": 0.4},
    "training_args": {
        "num_train_epochs": 90,
        "max_steps": -1,
        "learning_rate": 0.1,
        "lr_milestones": [40, 80],
        "lr_scheduler_type": "linear",  # replaced by the step schedule of the milestones: not reported
        "global_batch_size": 256,
        "noise_correction_start_epoch": 11,
        "baseline": "mopro",
    },
}
NOISE_SUMMARY = {"num_samples": 1000, "relabelled_fraction": 0.12, "ood_fraction": 0.05, "per_class": {"0": 0.1}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved tiny `MoProForPreTraining` (non-trivial prototypes and classifier) with result files beside it."""
    tester = MoProModelTester(num_labels=len(NAMES))
    config = tester.get_config(id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = tester.create_pretraining_model(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.mopro.prototypes.copy_(F.normalize(torch.randn(model.mopro.prototypes.shape, generator=generator)))
        model.classifier.bias.copy_(torch.randn(len(NAMES), generator=generator))
    model.eval()
    model_dir = tmp_path_factory.mktemp("trained") / "run"
    model.save_pretrained(model_dir)
    for name, content in RESULT_FILES.items():
        (model_dir / name).write_text(json.dumps(content))
    (model_dir / "eval_broken.json").write_text("{not json")  # skipped with a warning, not a crash
    (model_dir / "noise_report_summary.json").write_text(json.dumps(NOISE_SUMMARY))
    (model_dir / "trainer_state.json").write_text(json.dumps({"epoch": 3.0, "global_step": 120, "log_history": []}))
    (model_dir / "run_args.json").write_text(json.dumps(WEBVISION_RUN_ARGS))
    pixel_values, _, _ = tester.prepare_inputs(seed=1)
    with torch.no_grad():
        logits = model(pixel_values).logits
    return {"dir": model_dir, "model": model, "pixel_values": pixel_values, "logits": logits}


@pytest.fixture(scope="module")
def release(trained, tmp_path_factory):
    release_dir = tmp_path_factory.mktemp("release") / "mopro-tiny"
    result = make_release(trained["dir"], release_dir, repo_id=REPO_ID)
    return {"dir": release_dir, "result": result}


def _logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(pixel_values)
    return output if isinstance(output, torch.Tensor) else output.logits


def test_model_card_model_index_round_trips(release):
    card = ModelCard.load(release["dir"] / "README.md")
    loaded = {
        (r.dataset_name, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value
        for r in card.data.eval_results
    }
    assert loaded == EXPECTED
    assert {r.task_type for r in card.data.eval_results} == {"image-classification"}
    assert card.data.model_name == "mopro-tiny"
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    text = card.text
    for section in ("## Model description", "## Intended use", "## How to use", "## Training procedure"):
        assert section in text
    for section in ("### Training data noise", "## Evaluation results", "## Limitations", "## Citation"):
        assert section in text
    assert "@inproceedings{li2021mopro" in text and "2009.07995" in text
    assert "| relabelled_fraction | 0.12 |" in text and "per_class" not in text  # scalar statistics only
    assert "| optimizer steps (completed) | 120 |" in text
    # The run's own record: WebVision, its 90-epoch schedule (a WebVision-like folder is described as such).
    assert "| training data | WebVision 1.0 |" in text and "| epochs (planned) | 90 |" in text
    assert "| learning-rate milestones (epochs) | [40, 80] |" in text and "(bilinear)" in text
    assert "learning-rate schedule" not in text
    assert f'timm.create_model("hf-hub:{TIMM_REPO_ID}", pretrained=True)' in text
    # The files the card was built from travel with it; the broken one does not.
    assert sorted(p.name for p in (release["dir"] / "results").iterdir()) == sorted(
        [*RESULT_FILES, "noise_report_summary.json"]
    )


def test_release_folder_loads_with_identical_logits(trained, release):
    folder = release["dir"]
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_mopro.py", "README.md"):
        assert (folder / name).is_file(), name
    assert "AutoModelForImageClassification" in json.loads((folder / "config.json").read_text())["auto_map"]
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert isinstance(model, MoProForImageClassification)
    assert not any(k.startswith(("momentum_encoder", "queue")) for k in model.state_dict())
    torch.testing.assert_close(_logits(model, trained["pixel_values"]), trained["logits"], atol=0, rtol=0)
    assert torch.equal(model.mopro.prototypes, trained["model"].mopro.prototypes)
    classifier = pipeline("image-classification", model=str(folder))
    predictions = classifier(Image.new("RGB", (40, 50), (200, 30, 30)))
    assert {p["label"] for p in predictions} <= set(NAMES) and len(predictions) == len(NAMES)


def test_release_from_a_release_model_folder(trained, tmp_path):
    model_dir = tmp_path / "release_model"
    trained["model"].save_release_model(model_dir)
    result = make_release(model_dir, tmp_path / "out", repo_id=REPO_ID, timm_export=False)
    assert result.timm_dir is None and not (tmp_path / "out" / "timm").exists()
    assert result.eval_results == [] and "No evaluation results" in result.card.text
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(model, trained["pixel_values"]), trained["logits"], atol=0, rtol=0)


def test_timm_export_loads_offline_with_identical_logits(trained, release):
    timm_dir = release["dir"] / "timm"
    assert sorted(p.name for p in timm_dir.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval()
    torch.testing.assert_close(_logits(model, trained["pixel_values"]), trained["logits"], atol=0, rtol=0)
    config = json.loads((timm_dir / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == len(NAMES)
    assert config["label_names"] == NAMES
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 32, 32] and math.isclose(pretrained_cfg["crop_pct"], 0.875)
    assert pretrained_cfg["mean"] == [0.485, 0.456, 0.406] and pretrained_cfg["std"] == [0.229, 0.224, 0.225]
    assert pretrained_cfg["tag"] == "mopro" and "test_input_size" not in pretrained_cfg  # not timm's a1_in1k cfg


def test_timm_export_preprocesses_like_the_saved_image_processor(trained, release):
    """timm's eval transform from the export resizes bilinearly, as `build_image_processor` (and the official test
    transform) does: same pixels."""
    timm_dir = release["dir"] / "timm"
    model = timm.create_model(f"local-dir:{timm_dir}", pretrained=True)
    data_config = timm.data.resolve_data_config({}, model=model)
    assert data_config["interpolation"] == "bilinear"
    timm_transform = timm.data.create_transform(**data_config)
    processor = ConvNextImageProcessorPil.from_pretrained(release["dir"])  # the release's processor, PIL backend
    image = Image.fromarray(
        torch.randint(0, 256, (45, 61, 3), generator=torch.Generator().manual_seed(0)).byte().numpy()
    )
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(timm_transform(image), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("subfolder", [None, "timm"])
def test_transformers_timm_wrapper_loads_the_timm_export(trained, release, subfolder):
    """`AutoModelForImageClassification` on the timm export: the folder itself, or the release with `subfolder`."""
    folder = release["dir"] if subfolder else release["dir"] / "timm"
    model = AutoModelForImageClassification.from_pretrained(folder, subfolder=subfolder or "").eval()
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    assert model.config.id2label == dict(enumerate(NAMES))
    torch.testing.assert_close(_logits(model, trained["pixel_values"]), trained["logits"], atol=0, rtol=0)
    if subfolder is None:
        predictions = pipeline("image-classification", model=str(folder))(Image.new("RGB", (40, 50), (9, 99, 199)))
        assert {p["label"] for p in predictions} == set(NAMES)


def _fill_hub_cache(cache_dir, repo_id: str, folder, ignore=None) -> None:
    """Lay `folder` out as a downloaded snapshot of `repo_id` in a Hub cache, as `upload_folder` would leave it."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo_cache / "snapshots" / revision, ignore=ignore)


def test_hub_repos_serve_transformers_and_timm(trained, release, tmp_path, monkeypatch):
    """The two pushed repos (release folder without timm/, and timm/ alone), read offline from a Hub cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache_dir = tmp_path / "hub"
    _fill_hub_cache(cache_dir, REPO_ID, release["dir"], ignore=shutil.ignore_patterns("timm"))
    _fill_hub_cache(cache_dir, TIMM_REPO_ID, release["dir"] / "timm")

    from_transformers = AutoModelForImageClassification.from_pretrained(REPO_ID, cache_dir=cache_dir).eval()
    assert isinstance(from_transformers, MoProForImageClassification)
    from_timm = timm.create_model(f"hf-hub:{TIMM_REPO_ID}", pretrained=True, cache_dir=cache_dir).eval()
    wrapped = AutoModelForImageClassification.from_pretrained(TIMM_REPO_ID, cache_dir=cache_dir).eval()
    assert type(wrapped).__name__ == "TimmWrapperForImageClassification"
    for model in (from_transformers, from_timm, wrapped):
        torch.testing.assert_close(_logits(model, trained["pixel_values"]), trained["logits"], atol=0, rtol=0)


def test_push_offline_fails_before_any_network_call(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    forbid_hub_network(monkeypatch)
    with pytest.raises(HubUnavailableError, match="offline mode is on \\(HF_HUB_OFFLINE=1\\)"):
        make_release(trained["dir"], tmp_path / "out", repo_id=REPO_ID, push=True)
    assert not (tmp_path / "out").exists()  # checked before any work


def test_cli_push_offline_exits_with_the_message(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    forbid_hub_network(monkeypatch)
    argv = ["--model_dir", str(trained["dir"]), "--release_dir", str(tmp_path / "out"), "--push_to_hub"]
    with pytest.raises(SystemExit) as exit_info:
        run_command(release_module.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot push to the Hub: offline mode is on") and err.count("\n") == 1
    assert "without --push_to_hub" in err  # the fix
    assert not (tmp_path / "out").exists()


def _offline_mode_off_without_network(monkeypatch) -> None:
    """Offline mode off, as for a user with a network, while every real connection still fails."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    forbid_hub_network(monkeypatch)


def test_push_without_network_fails_before_upload(trained, tmp_path, monkeypatch):
    _offline_mode_off_without_network(monkeypatch)
    probes = []
    monkeypatch.setattr(release_module, "_can_connect", lambda host, port, timeout: probes.append(host) or False)
    with pytest.raises(HubUnavailableError, match="did not answer within 3 s"):
        make_release(trained["dir"], tmp_path / "out", repo_id=REPO_ID, push=True)
    assert probes == [urlparse(constants.ENDPOINT).hostname]  # one probe, no Hub request


def test_push_uploads_the_release_folder(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(release_module, "_can_connect", lambda host, port, timeout: True)
    monkeypatch.setattr(release_module, "get_token", lambda: "hf_test")
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    result = make_release(trained["dir"], out, repo_id=REPO_ID, push=True, private=True)
    assert [c[:2] for c in calls] == [
        ("create_repo", REPO_ID),
        ("upload_folder", REPO_ID),
        ("create_repo", TIMM_REPO_ID),
        ("upload_folder", TIMM_REPO_ID),
    ]
    assert calls[0][2]["private"] is True and calls[2][2]["private"] is True
    assert calls[1][2]["folder_path"] == str(out) and calls[1][2]["ignore_patterns"] == ["timm/*"]
    assert calls[3][2]["folder_path"] == str(out / "timm")
    assert result.urls == {repo: f"https://huggingface.co/{repo}/commit/0" for repo in (REPO_ID, TIMM_REPO_ID)}


def test_result_reader_is_tolerant(tmp_path):
    path = tmp_path / "eval_mixed.json"
    path.write_text(
        json.dumps(
            {
                "eval_top1": 71.0,
                "flag": True,
                "bad": float("nan"),
                "note": "text",
                "values": [1, 2],
                "num_samples": 10,
                "train_loss": 1.0,
                "test_runtime": 2.0,
            }
        )
    )
    (result,) = read_result_file(path, default_dataset_name="My Val Set")
    assert (result.metric_type, result.metric_value) == ("top1", 71.0)
    assert (result.dataset_name, result.dataset_type, result.task_type) == (
        "My Val Set",
        "my-val-set",
        "image-classification",
    )
    # The training script's layout of the noise report: `<output_dir>/noise_report/noise_report_summary.json`.
    (tmp_path / "noise_report").mkdir()
    summary_file = tmp_path / "noise_report" / "noise_report_summary.json"
    summary_file.write_text(json.dumps({"num_samples": 8, "fraction_ood": 0.25, "ood_precision": None}))
    assert read_noise_summary([tmp_path]) == ({"num_samples": 8, "fraction_ood": 0.25}, summary_file)


def test_release_dir_guards(trained, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "old.bin").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_release(trained["dir"], occupied, repo_id=REPO_ID, timm_export=False)
    with pytest.raises(ValueError, match="outside model_dir"):
        make_release(trained["dir"], trained["dir"] / "release", repo_id=REPO_ID, timm_export=False)


# ------------------------------------------------------------------------------------ the card describes its run
def _run_folder(trained, folder, run_args=None, results=None, epochs=None):
    trained["model"].save_release_model(folder)
    for name, content in (results or {}).items():
        (folder / name).write_text(json.dumps(content))
    if run_args is not None:
        (folder / "run_args.json").write_text(json.dumps(run_args))
    if epochs is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"epoch": float(epochs), "global_step": 40}))
    return folder


def _model_index(release_dir):
    card = ModelCard.load(release_dir / "README.md")  # the card re-loads: valid YAML and model-index
    return card, {(r.dataset_name, r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}


def test_card_of_a_demo_run_describes_the_demo_not_webvision(trained, tmp_path):
    demo_args = {
        "model_args": {"backbone": "resnet18", "image_size": 64},
        "data_args": {
            "dataset_name": None,
            "train_dir": None,
            "webvision_dir": None,
            "shard_dir": None,
            "num_train": 10000,
            "noise_rate": 0.4,
            "ood_fraction": 0.2,
        },
        "training_args": {
            **{"num_train_epochs": 20, "max_steps": -1, "learning_rate": 0.05, "baseline": "mopro"},
            **{"lr_scheduler_type": "cosine", "lr_milestones": None, "lr_gamma": 0.1},
        },
    }
    results = {
        "all_results.json": {"epoch": 20.0, "eval_accuracy": 0.7387, "eval_loss": 0.8},
        "eval_knn_fashion.json": {"knn_top1": 71.5, "dataset_name": "Fashion-MNIST (test)", "dataset_type": "fmnist"},
    }
    folder = _run_folder(trained, tmp_path / "demo", demo_args, results, epochs=20)
    make_release(folder, tmp_path / "out", repo_id=REPO_ID, timm_export=False)
    card, index = _model_index(tmp_path / "out")
    assert index == {
        ("Fashion-MNIST (clean test set)", "fashion_mnist", "accuracy"): 0.7387,
        ("Fashion-MNIST (clean test set)", "fashion_mnist", "loss"): 0.8,
        ("Fashion-MNIST (test)", "fmnist", "knn_top1"): 71.5,  # the eval file's own dataset
    }
    text = card.text
    assert "noisy Fashion-MNIST demo (10000 images, label noise rate 0.4, out-of-distribution fraction 0.2)" in text
    assert "| epochs (planned) | 20 |" in text and "| epochs (completed) | 20.0 |" in text
    assert "| learning-rate schedule | cosine |" in text and "milestone" not in text
    assert "WebVision" not in text and "90 epochs" not in text and "| 90 |" not in text and "bicubic" not in text
    assert "web search queries" not in text


def test_card_without_a_run_record_says_not_recorded(trained, tmp_path):
    results = {"all_results.json": {"eval_accuracy": 0.5}}
    folder = _run_folder(trained, tmp_path / "bare", results=results)
    make_release(folder, tmp_path / "out", repo_id=REPO_ID, timm_export=False)
    card, index = _model_index(tmp_path / "out")
    assert index == {("validation set (not recorded)", "not-recorded", "accuracy"): 0.5}
    text = card.text
    assert "| training data | not recorded |" in text
    assert "| training schedule (epochs, learning rate, batch) | not recorded |" in text
    assert "| epochs / optimizer steps completed | not recorded (no trainer_state.json) |" in text
    assert "WebVision" not in text and "90 epochs" not in text and "| 90 |" not in text


# ------------------------------------------------------------------------------------------------ bad inputs
def _not_a_mopro_folder(kind, folder):
    if kind == "missing":
        return folder / "missing", "does not exist"
    folder.mkdir()
    if kind == "no_config":
        (folder / "model.safetensors").write_bytes(b"")
        return folder, "has no config.json"
    if kind == "other_model":
        (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
        return folder, "holds a 'vit' model, not a MoPro one"
    (folder / "config.json").write_text(json.dumps({"model_type": "mopro"}))
    return folder, r"no weights \(model.safetensors\)"


@pytest.mark.parametrize("kind", ["missing", "no_config", "other_model", "no_weights"])
def test_model_dir_that_is_not_a_mopro_folder(kind, tmp_path):
    model_dir, message = _not_a_mopro_folder(kind, tmp_path / "model")
    with pytest.raises((ValueError, OSError), match=message + ".*training.run_mopro"):
        make_release(model_dir, tmp_path / "out", repo_id=REPO_ID)
    assert not (tmp_path / "out").exists()


def test_previous_release_is_not_overwritten_silently(trained, tmp_path):
    out = tmp_path / "out"
    make_release(trained["dir"], out, repo_id=REPO_ID, timm_export=False)
    card = (out / "README.md").read_bytes()
    with pytest.raises(FileExistsError, match=r"holds a previous release: .*README.md.*pass --overwrite"):
        make_release(trained["dir"], out, repo_id="org/other-name", timm_export=False)
    assert (out / "README.md").read_bytes() == card
    make_release(trained["dir"], out, repo_id="org/other-name", timm_export=False, overwrite=True)
    assert "org/other-name" in (out / "README.md").read_text()


@pytest.mark.parametrize("repo_id", ["org/has space", "a/b/c", "-bad-/name"])
def test_bad_repo_id(trained, tmp_path, repo_id):
    with pytest.raises(ValueError, match=r"--repo_id .* is not a Hub repo id.*org/name"):
        make_release(trained["dir"], tmp_path / "out", repo_id=repo_id)
    assert not (tmp_path / "out").exists()


def test_push_without_login_fails_before_any_work(trained, tmp_path, monkeypatch):
    _offline_mode_off_without_network(monkeypatch)
    monkeypatch.setattr(release_module, "_can_connect", lambda host, port, timeout: True)
    monkeypatch.setattr(release_module, "get_token", lambda: None)
    with pytest.raises(HubUnavailableError, match=r"not logged in .*hf auth login"):
        make_release(trained["dir"], tmp_path / "out", repo_id=REPO_ID, push=True)
    assert not (tmp_path / "out").exists()


def test_missing_results_dir(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--results_dir .*evals is not a folder"):
        make_release(trained["dir"], tmp_path / "out", repo_id=REPO_ID, results_dirs=[tmp_path / "evals"])
    assert not (tmp_path / "out").exists()


def test_card_and_timm_export_follow_the_saved_image_processor(trained, tmp_path):
    from PIL.Image import Resampling

    from modeling_mopro import build_image_processor

    folder = _run_folder(trained, tmp_path / "bicubic")
    image_size = trained["model"].config.image_size
    processor = build_image_processor(image_size)
    processor.resample, processor.crop_pct = Resampling.BICUBIC, 0.5
    processor.save_pretrained(folder)
    make_release(folder, tmp_path / "out", repo_id=REPO_ID)
    text = (tmp_path / "out" / "README.md").read_text()
    assert f"resize the short side to {2 * image_size} px, centre-crop {image_size} px\n  (bicubic)" in text
    timm_config = json.loads((tmp_path / "out" / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert (timm_config["interpolation"], timm_config["crop_pct"]) == ("bicubic", 0.5)


def test_complexity_is_counted_not_looked_up(trained):
    """MACs and activations against an independent count: each convolution's output elements times its
    in-channels-per-group x kernel area, each linear layer's output elements times its in-features."""
    from torch import nn

    from evaluation.release import measure_complexity

    model = trained["model"].to_release_model().eval()
    macs, activations = [], []

    def count(module, inputs, output):
        activations.append(output.numel())
        if isinstance(module, nn.Conv2d):
            macs.append(output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size))
        else:
            macs.append(output.numel() * module.in_features)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, model.config.image_size, model.config.image_size))
    for hook in hooks:
        hook.remove()
    complexity = measure_complexity(model)
    assert complexity.macs == sum(macs) > 0 and complexity.activations == sum(activations)
    assert complexity.parameters == sum(p.numel() for p in model.parameters())
    assert complexity.image_size == model.config.image_size == 32


def test_card_at_a_glance_curves_and_noise_report_links(trained, tmp_path):
    from evaluation.release import measure_complexity

    results = {"all_results.json": {"epoch": 20.0, "eval_accuracy": 0.7157}}
    folder = _run_folder(trained, tmp_path / "run", WEBVISION_RUN_ARGS, results, epochs=20)
    (folder / "noise_report_summary.json").write_text(json.dumps({"num_samples": 5000, "num_ood": 893}))
    png = b"\x89PNG\r\n\x1a\n" + b"curves"
    (folder / "training_curves.png").write_bytes(png)
    make_release(folder, tmp_path / "out", repo_id=REPO_ID, timm_export=False)
    text = (tmp_path / "out" / "README.md").read_text()
    complexity = measure_complexity(trained["model"].to_release_model())
    glance = text.split("## At a glance", 1)[1].split("\n## ", 1)[0]
    assert f"| parameters (M) | {complexity.parameters / 1e6:.3g} |" in glance
    assert f"| GMACs | {complexity.macs / 1e9:.3g} |" in glance and "one MAC = two FLOPs" in glance
    assert f"| activations (M) | {complexity.activations / 1e6:.3g} |" in glance
    assert (
        "| image size | 32 x 32 |" in glance and "| training data | WebVision 1.0; 5000 training samples |" in glance
    )
    assert "| accuracy (WebVision 1.0 (val)) | 0.7157 |" in glance
    # The curves travel with the card; the noise report and its gallery are named where they are.
    assert (tmp_path / "out" / "training_curves.png").read_bytes() == png
    assert "![training curves](training_curves.png)" in text
    assert "`noise_report/index.html`" in text and str(tmp_path) not in text
    summary = {"num_samples": 5000, "dataset_repo": "org/web-noise"}
    from evaluation.model_card import build_model_card

    pushed = str(build_model_card(trained["model"].config, REPO_ID, noise_summary=summary))
    assert "https://huggingface.co/datasets/org/web-noise/viewer/flagged_images" in pushed
    assert "https://huggingface.co/datasets/org/web-noise/blob/main/index.html" in pushed
    # Without a curves file or a measured model, the card says nothing of them.
    bare = str(build_model_card(trained["model"].config, REPO_ID))
    assert "training curves" not in bare and "GMACs" not in bare
