"""`python -m training.plan`: the batch geometry, steps and departures a run will have, before it runs; and the one
`steps_per_epoch` the plan and `MoProTrainer` share, against the Trainer's own count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_mopro.cli import run_command
from tests.trainer_fixtures import tiny_image_dataset, tiny_trainer
from training import plan as plan_module
from training.arguments import per_device_batch_size, steps_per_epoch

REPO = Path(__file__).resolve().parent.parent
V1 = str(REPO / "training" / "configs" / "webvision_v1_r50.yaml")
WEBVISION_V1_TRAIN_IMAGES = 2_439_574


def run_plan(capsys, *argv) -> dict:
    plan_module.main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def departures(result: dict) -> dict:
    return {d["name"]: d for d in result["departures_from_official"]}


def test_official_v1_on_8_gpus_from_the_command_line():
    """The issue's command, as a user runs it."""
    cmd = [sys.executable, "-m", "training.plan", V1, "--num_processes", "8", "--num_train_samples",
           str(WEBVISION_V1_TRAIN_IMAGES), "--json"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert plan["global_batch_size"] == 256 and plan["per_device_train_batch_size"] == 32
    assert plan["gradient_accumulation_steps"] == 1 and plan["steps_per_epoch"] == 9529
    assert plan["max_grad_norm"] is None and plan["departures_from_official"] == []


def test_official_v1_on_4_gpus(capsys):
    plan = run_plan(capsys, V1, "--num_processes", "4", "--num_train_samples", str(WEBVISION_V1_TRAIN_IMAGES))
    assert plan["global_batch_size"] == 256 and plan["per_device_train_batch_size"] == 64
    assert plan["gradient_accumulation_steps"] == 1 and plan["steps_per_epoch"] == 9529
    assert plan["max_grad_norm"] is None and plan["departures_from_official"] == []
    # the schedule in optimizer steps: x0.1 at epochs 40 and 80, prototypes from epoch 1, correction from epoch 11
    assert [(e["step"], e["learning_rate"]) for e in plan["lr_schedule"]] == [
        (0, 0.1), (40 * 9529, pytest.approx(0.01)), (80 * 9529, pytest.approx(0.001))
    ]  # fmt: skip
    assert plan["prototype_loss_start_step"] == 9529 and plan["noise_correction_start_step"] == 11 * 9529
    assert plan["total_steps"] == 90 * 9529
    assert all(kind.startswith("fp32") for kind in plan["precision"].values())
    assert "every BatchNorm gamma 1" in plan["backbone_initialisation"]
    assert plan["shuffle_bn"].startswith("cross-process shuffle-BN over 4")


def test_the_readable_table(capsys):
    plan_module.main([V1, "--num_processes", "8", "--num_train_samples", str(WEBVISION_V1_TRAIN_IMAGES)])
    text = capsys.readouterr().out
    assert "global batch             256" in text and "steps per epoch          9,529" in text
    assert "gradient clipping        off" in text and "departures from the official recipe: none" in text


@pytest.mark.parametrize(
    ("flags", "name", "value"),
    [
        (["--max_grad_norm", "1.0"], "max_grad_norm", 1.0),
        (["--learning_rate", "0.2"], "learning_rate", 0.2),
        (["--bf16", "true"], "precision", "bf16"),
        (["--backbone_zero_init_last", "true"], "backbone_zero_init_last", True),
        (["--lr_milestones", "30", "60"], "lr_milestones", [30, 60]),
        (["--queue_size", "4096"], "queue_size", 4096),
        (["--noise_correction_schedule", "adaptive"], "noise_correction_schedule", "adaptive"),
        (["--crop_min_scale", "1.0"], "crop_min_scale", 1.0),
    ],
)
def test_a_departure_is_listed(capsys, flags, name, value):
    plan = run_plan(capsys, V1, "--num_processes", "8", *flags)
    assert list(departures(plan)) == [name] and departures(plan)[name]["value"] == value
    assert departures(plan)[name]["source"]  # the official line is named


def test_the_adaptive_schedule_shows_its_earliest_step_and_gates(capsys):
    plan_module.main([V1, "--num_processes", "8", "--num_train_samples", str(WEBVISION_V1_TRAIN_IMAGES),
                      "--noise_correction_schedule", "adaptive", "--correction_min_agreement", "0.7"])  # fmt: skip
    text = capsys.readouterr().out
    assert "adaptive: not before step 104,819" in text and "agree on >= 70% of the samples" in text
    assert "chance fit by kappa >= 0.1;" in text
    plan = run_plan(capsys, V1, "--num_processes", "8", "--noise_correction_schedule", "adaptive")
    assert plan["noise_correction_schedule"] == {
        "name": "adaptive", "min_agreement": 0.6, "min_fit_beyond_chance": 0.1, "plateau_tolerance": 0.01,
        "ramp_epochs": 4.0,
    }  # fmt: skip


def test_clipping_and_bf16_show_in_the_plan(capsys):
    plan = run_plan(capsys, V1, "--num_processes", "8", "--max_grad_norm", "1.0", "--bf16", "true")
    assert plan["max_grad_norm"] == 1.0 and plan["precision"]["backbone"] == "bf16 autocast"
    assert set(plan["precision"].values()) == {"bf16 autocast", "fp32"}  # everything but the backbone stays fp32


def test_linear_scaling_is_a_named_flag(capsys):
    plan = run_plan(capsys, V1, "--num_processes", "8", "--global_batch_size", "512")
    assert plan["per_device_train_batch_size"] == 64 and plan["learning_rate"] == 0.1  # no silent scaling
    assert set(departures(plan)) == {"global_batch_size"}
    plan = run_plan(
        capsys, V1, "--num_processes", "8", "--global_batch_size", "512", "--scale_lr_with_global_batch", "true"
    )
    assert plan["learning_rate"] == pytest.approx(0.2)
    assert set(departures(plan)) == {"global_batch_size", "learning_rate"}


def test_accumulation_keeps_the_global_batch(capsys):
    plan = run_plan(
        capsys, V1, "--num_processes", "4", "--gradient_accumulation_steps", "2",
        "--num_train_samples", str(WEBVISION_V1_TRAIN_IMAGES),
    )  # fmt: skip
    assert plan["global_batch_size"] == 256 and plan["per_device_train_batch_size"] == 32
    # 19,059 micro-batches per process: the Trainer's last step of each epoch takes the one left over
    assert plan["steps_per_epoch"] == 9530 and list(departures(plan)) == ["steps_per_epoch"]


def test_a_global_batch_that_does_not_split_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_command(plan_module.main, [V1, "--num_processes", "3"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "global_batch_size 256 does not split into 3 processes" in message and "Traceback" not in message


def test_an_explicit_per_device_batch_must_agree(capsys):
    plan = run_plan(capsys, V1, "--num_processes", "8", "--per_device_train_batch_size", "32")
    assert plan["per_device_train_batch_size"] == 32 and plan["departures_from_official"] == []
    with pytest.raises(SystemExit):
        run_command(plan_module.main, [V1, "--num_processes", "4", "--per_device_train_batch_size", "32"])
    assert "disagrees with global_batch_size 256" in capsys.readouterr().err


def test_one_process_lists_the_shuffle_bn_stand_in(capsys):
    plan = run_plan(capsys, V1, "--num_processes", "1", "--gradient_accumulation_steps", "1")
    assert plan["per_device_train_batch_size"] == 256
    assert "8 virtual groups" in departures(plan)["shuffle_bn"]["value"]
    plan = run_plan(capsys, V1, "--num_processes", "1", "--momentum_encoder_bn_groups", "1")
    assert departures(plan)["shuffle_bn"]["value"].startswith("none")


def test_streamed_epoch_is_samples_per_epoch(capsys):
    plan = run_plan(
        capsys, V1, "--num_processes", "8", "--streaming", "true", "--max_steps", str(90 * 9529),
        "--samples_per_epoch", str(WEBVISION_V1_TRAIN_IMAGES),
    )  # fmt: skip
    assert plan["streamed_epoch"] and plan["steps_per_epoch"] == 9529 and plan["num_train_epochs"] == 90
    assert plan["departures_from_official"] == []


# ------------------------------------------------------------------------------------- one steps-per-epoch


def test_per_device_batch_size():
    assert per_device_batch_size(256, 8) == 32 and per_device_batch_size(256, 4, 2) == 32
    with pytest.raises(ValueError, match="choose a global batch divisible by 24"):
        per_device_batch_size(256, 8, 3)
    with pytest.raises(ValueError, match="pass --global_batch_size 128"):
        per_device_batch_size(256, 4, 1, requested=32)


@pytest.mark.parametrize(("num_samples", "batch", "accumulation"), [(48, 6, 1), (50, 6, 1), (48, 6, 3), (50, 4, 4)])
def test_trainer_and_plan_count_the_steps_the_trainer_takes(tmp_path, num_samples, batch, accumulation):
    """`MoProTrainer.steps_per_epoch` (phases, milestones) equals the Trainer's own optimizer steps per epoch."""
    trainer = tiny_trainer(
        str(tmp_path), tiny_image_dataset(num_samples), per_device_train_batch_size=None,
        global_batch_size=batch * accumulation, gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    assert trainer.args.per_device_train_batch_size == batch  # derived from the global batch, one process
    hf_steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[1]
    assert trainer.steps_per_epoch() == hf_steps == steps_per_epoch(num_samples, batch, 1, accumulation)


def test_trainer_streamed_epoch(tmp_path):
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(8), samples_per_epoch=70, per_device_train_batch_size=16)
    assert trainer.steps_per_epoch() == 4  # whole steps of 16, as the official drop_last epoch


def test_plan_lists_the_speed_options_that_are_on():
    from training.plan import plan

    config = "training/configs/webvision_v1_r50.yaml"
    default = plan([config], num_processes=8)
    assert [o["name"] for o in default["speed_options"]] == ["cudnn_benchmark"]  # on by default, as official
    assert default["departures_from_official"] == []
    options = ["--channels_last", "true", "--uint8_key_batches", "true", "--gpu_augment", "true",
               "--auto_dataloader_workers", "true", "--cudnn_benchmark", "false"]  # fmt: skip
    listed = plan([config, *options], num_processes=8)["speed_options"]
    assert [o["name"] for o in listed] == [
        "channels_last",
        "uint8_key_batches",
        "auto_dataloader_workers",
        "gpu_augment",
    ]
    assert all(o["effect"] for o in listed)
