"""Issue 11 for the training command: every user error is one line naming the thing and the fix (exit 2 from
the command line), and nothing a run produced is replaced or lost without being asked. Tiny image folders and a
tiny ResNet, a few steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._tiny import tiny_model_flags
from training.run_mopro import main

REPO = Path(__file__).resolve().parent.parent
MODEL = tiny_model_flags(queue_size=64)
RUN = [
    "--global_batch_size", "8", "--max_steps", "2", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    "--logging_steps", "1", "--per_device_eval_batch_size", "16",
]  # fmt: skip


def image_folder(root: Path, per_class: int = 8, classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, size=(40, 40, 3)) + 60 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def train(data: Path, out: Path, *flags: str) -> dict:
    return main([*MODEL, *RUN, "--train_dir", str(data), "--output_dir", str(out), *flags])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data") / "train")


@pytest.fixture(scope="module")
def start(tmp_path_factory, data) -> Path:
    """A first run: `--train_dir` alone, although the demo YAML it inherits evaluates every epoch."""
    out = tmp_path_factory.mktemp("start") / "run"
    metrics = train(data, out)
    assert "eval_accuracy" not in metrics and metrics["train_skipped_images"] == 0
    return out


def test_train_dir_without_validation_dir_trains_without_evaluation(start):
    state = json.loads((start / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (start / "model.safetensors").exists() and (start / "noise_report").is_dir()


def test_hyperparameters_apply_to_a_loaded_model(start, data, tmp_path):
    train(data, tmp_path / "out", "--model_name_or_path", str(start), "--alpha", "0.9", "--temperature", "0.2")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["alpha"] == 0.9 and config["temperature"] == 0.2
    assert json.loads((start / "config.json").read_text())["alpha"] == 0.5  # the starting folder is untouched


def test_architecture_values_of_the_yaml_yield_to_a_loaded_model_with_a_warning(start, data, tmp_path, caplog):
    # the demo YAML's backbone_kwargs, projection_hidden_size and queue_size differ from the starting folder's
    main([*RUN, "--train_dir", str(data), "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(start),
          "--momentum_encoder_bn_groups", "2", "--noise_report", "false"])  # fmt: skip
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "projection_hidden_size=512 from" in warned and "queue_size=4096 from" in warned
    assert json.loads((tmp_path / "out" / "config.json").read_text())["projection_hidden_size"] == 32


@pytest.mark.parametrize("flag, value", [("--image_size", "64"), ("--backbone", "resnet34"), ("--queue_size", "128")])
def test_an_architecture_flag_that_differs_from_the_loaded_model_is_an_error(start, data, tmp_path, flag, value):
    with pytest.raises(ValueError, match=rf"--model_name_or_path .* fixes the architecture, and {flag} "):
        train(data, tmp_path / "out", "--model_name_or_path", str(start), flag, value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_model_folder_that_is_not_one_is_an_error(data, tmp_path):
    with pytest.raises(ValueError, match=r"--model_name_or_path .*nowhere: no MoPro config could be read there"):
        train(data, tmp_path / "out", "--model_name_or_path", str(tmp_path / "nowhere"))


def test_a_loaded_model_with_other_class_names_is_an_error(start, tmp_path):
    other = image_folder(tmp_path / "other", classes=("bird", "fish"))
    with pytest.raises(ValueError, match=r"2 classes \(cat, dog\) but the training data has 2 \(bird, fish\)"):
        train(other, tmp_path / "out", "--model_name_or_path", str(start))


def test_a_second_run_into_the_same_folder_is_refused_or_replaces_it_cleanly(data, tmp_path):
    out = tmp_path / "run"
    train(data, out, "--save_strategy", "steps", "--save_steps", "1")
    assert (out / "noise_report").is_dir() and (out / "checkpoint-2").is_dir()
    with pytest.raises(ValueError, match=r"already holds a run .*--resume_from_checkpoint .*checkpoint-2 .*"
                       r"--overwrite_output_dir true"):  # fmt: skip
        train(data, out, "--baseline", "ce")
    # resuming into the folder is allowed: `last` is its newest checkpoint
    train(data, out, "--resume_from_checkpoint", "last", "--max_steps", "3", "--save_strategy", "no")
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    with pytest.raises(ValueError, match=r"--output_dir .* is the --model_name_or_path folder"):
        train(data, out, "--model_name_or_path", str(out), "--overwrite_output_dir", "true")
    # replaced on request: nothing of the first run is left beside the new model
    (out / "checkpoint-x").mkdir()  # not the Trainer's: left alone
    train(data, out, "--baseline", "ce", "--overwrite_output_dir", "true")
    assert not (out / "noise_report").exists() and [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-x"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MoProForImageClassification"]
    assert "noise_ood_recall" not in json.loads((out / "all_results.json").read_text())
    # after the overwrite no checkpoint is left to resume from
    with pytest.raises(ValueError, match="no complete checkpoint-\\* folder"):
        train(data, out, "--resume_from_checkpoint", "last")


def test_a_training_set_smaller_than_one_batch_is_an_error(tmp_path):
    small = image_folder(tmp_path / "small", per_class=3)
    with pytest.raises(ValueError, match=r"6 samples, fewer than one batch of 8 .*dataloader_drop_last true"):
        train(small, tmp_path / "out")


def test_a_missing_checkpoint_folder_is_one_line_and_exit_2(tmp_path):
    """The command itself: a user error is `error: ...` on stderr, exit status 2, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MOPRO_TRACEBACK", None)
    missing = tmp_path / "checkpoint-7"
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "run_mopro.py"), "--resume_from_checkpoint", str(missing),
         "--output_dir", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --resume_from_checkpoint {missing}: no such folder; give a checkpoint-N folder of an "
                     "earlier run (or `last` for the newest in --output_dir)."]  # fmt: skip
    assert not (tmp_path / "out").exists()
