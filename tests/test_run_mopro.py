"""End to end: `training/run_mopro.py` on the real noisy Fashion-MNIST demo data (tiny sizes), MoPro and the CE
baseline, YAML + flag parsing, and the outputs a user is promised."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForImageClassification

from evaluation.model_card import describe_training_data
from modeling_mopro import MoProForImageClassification
from tests._tiny import tiny_model_flags
from training.data.noisy_fashion_mnist import FASHION_MNIST_DIR
from training.run_mopro import DEMO_CONFIG, main, parse_args

TINY = tiny_model_flags(queue_size=64, bn_groups=None) + [
    "--num_train", "160", "--num_test", "64", "--global_batch_size", "16",
    "--per_device_eval_batch_size", "64", "--num_train_epochs", "3", "--dataloader_num_workers", "0",
    "--prototype_start_epoch", "1", "--noise_correction_start_epoch", "2", "--lr_milestones", "2",
    "--eval_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "5",
]  # fmt: skip

needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)"
)


def test_no_arguments_means_the_demo_config():
    model_args, data_args, training_args = parse_args([])
    assert str(DEMO_CONFIG).endswith("training/configs/demo.yaml")
    assert data_args.dataset_name is None and data_args.webvision_dir is None  # the offline demo source
    assert model_args.image_size == 32 and training_args.use_cpu
    assert training_args.lr_milestones == [10, 17] and training_args.noise_correction_start_epoch == 2
    # the demo shows the method where it matters: whole-image views, under which CE memorises, and the adaptive
    # correction schedule (the official configs keep the fixed one: tests/test_recipe.py)
    assert data_args.crop_min_scale == 1.0 and training_args.noise_correction_schedule == "adaptive"


def test_flags_alone_keep_the_demo_config():
    _, data_args, training_args = parse_args(["--num_train_epochs", "2"])
    assert training_args.num_train_epochs == 2 and training_args.do_train and data_args.num_train == 4000


def test_flags_override_the_yaml():
    _, data_args, training_args = parse_args([str(DEMO_CONFIG), "--num_train_epochs", "2", "--noise_rate", "0.6"])
    assert training_args.num_train_epochs == 2 and data_args.noise_rate == 0.6
    assert training_args.optim_args == "momentum=0.9" and training_args.learning_rate == 0.1


@needs_fashion_mnist
@pytest.mark.parametrize("baseline", ["mopro", "ce"])
def test_demo_run_writes_model_results_and_noise_report(tmp_path, baseline):
    out = tmp_path / baseline
    # Adaptive gates that any signal passes: correction is decided at the end of epoch 1 and runs from epoch 2.
    gates = ["--correction_min_agreement", "0", "--correction_plateau_tolerance", "1"]
    metrics = main([str(DEMO_CONFIG), *TINY, *gates, "--output_dir", str(out), "--baseline", baseline])
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert results == pytest.approx(metrics)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert (out / "preprocessor_config.json").exists()
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")  # the run as a picture
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, MoProForImageClassification)
    assert model.config.image_size == 32 and model.config.id2label[0] == "T-shirt/top"
    # the run's own arguments, as plain JSON, for the release's model card: the demo's data, not WebVision
    run_args = json.loads((out / "run_args.json").read_text())
    assert run_args["training_args"]["baseline"] == baseline
    assert "Fashion-MNIST" in describe_training_data(run_args).name
    if baseline == "mopro":
        for key in ("noise_ood_precision", "noise_ood_recall", "noise_label_error_f1", "noise_ood_auroc"):
            assert key in results, key
        assert results["train_noise_correction_start_epoch"] == 2.0
        report = out / "noise_report"
        for name in ("README.md", "pseudo_label.json", "noise_report_summary.json", "noise_report.png"):
            assert (report / name).exists(), name
        assert len(datasets.load_from_disk(str(report))) == results["noise_num_samples"]
        # the release model carries the trained prototypes (unit rows for the classes seen)
        norms = model.mopro.prototypes.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-4)
        # the true labels were used for scoring only: the training columns never included them
        state = json.loads((out / "trainer_state.json").read_text())
        assert any("loss_prototype" in entry for entry in state["log_history"])
    else:
        assert not (out / "noise_report").exists()
        assert not model.mopro.prototypes.any()  # CE never trains prototypes


@needs_fashion_mnist
def test_streaming_demo_run(tmp_path):
    """The streaming path end to end: an IterableDataset, a step budget, and epochs counted in samples."""
    args = [*TINY, "--streaming", "true", "--max_steps", "12", "--samples_per_epoch", "64", "--noise_report", "false",
            "--correction_min_agreement", "0", "--correction_plateau_tolerance", "1"]  # fmt: skip
    metrics = main([str(DEMO_CONFIG), *args, "--output_dir", str(tmp_path)])
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    phases = [entry["phase"] for entry in state["log_history"] if "phase" in entry]
    assert state["global_step"] == 12 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    # 12 steps x 16 = 192 samples = epoch 3 of 64 samples: the adaptive schedule, fed at the ends of streamed
    # epochs 0 and 1 (4 steps each), started correction at epoch 2
    assert phases[-1] == 2 and metrics["train_noise_correction_start_epoch"] == 2.0
    with pytest.raises(ValueError, match="max_steps"):
        main([str(DEMO_CONFIG), *TINY, "--streaming", "true", "--output_dir", str(tmp_path / "no_steps")])
    with pytest.raises(ValueError, match="samples_per_epoch"):
        main([str(DEMO_CONFIG), *TINY, "--streaming", "true", "--max_steps", "2", "--output_dir", str(tmp_path / "x")])
