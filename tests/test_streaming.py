"""Streamed training (issue 19): epochs of `samples_per_epoch // global batch` steps on every process whatever the
shard layout, fresh augmentation seeds per pass, `dataloader_drop_last`, evaluation every epoch, an exact resume,
and the noise report of a streamed run. The 2-process runs launch `training/run_mopro.py` itself (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import IntervalStrategy, TrainerCallback, set_seed

from tests._tiny import tiny_model_flags
from tests.trainer_fixtures import tiny_image_dataset, tiny_trainer
from training.data.collator import MoProCollator
from training.data.make_shards import main as make_shards_main
from training.data.transforms import MoProViewTransforms
from training.run_mopro import main

REPO = Path(__file__).resolve().parent.parent
MODEL = tiny_model_flags(queue_size=32)


class EpochCollator(MoProCollator):
    """Adds to each batch the epoch number its views were seeded with (``view_epoch``), and records the sample ids
    of the batches it decodes (workers = 0: in this process)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoded: list[list[int]] = []

    def __call__(self, examples):
        batch = super().__call__(examples)
        if "sample_ids" in batch:
            self.decoded.append(batch["sample_ids"].tolist())
        return {**batch, "view_epoch": torch.tensor(self.epoch)}


def record_trained_batches(trainer) -> list[tuple[int, list[int]]]:
    """The (view epoch, sample ids) of every batch the trainer trains on, in order (not those only collated: the
    loader reads one batch ahead, and short batches are dropped)."""
    trained, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        if "view_epoch" in inputs:  # training batches (evaluation uses the test-view collator)
            trained.append((int(inputs.pop("view_epoch")), inputs["sample_ids"].tolist()))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return trained


def ids_only(rows):
    return {"sample_ids": torch.tensor([row["sample_id"] for row in rows])}


def streamed(num_samples: int, num_shards: int) -> datasets.IterableDataset:
    return tiny_image_dataset(num_samples).to_iterable_dataset(num_shards=num_shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_process_share_gives_the_same_batches_per_epoch(tmp_path, workers):
    """Accelerate gives each process whole shards (`IterableDataset.shard`); with 5 shards of 5, 5, 5, 4, 4 samples
    over 2 processes the shares hold 15 and 8 samples, split again over the workers. Each share still gives one
    epoch of `samples_per_epoch // batch` batches (a process running out is a hang in the real run)."""
    stream = streamed(23, 5)
    counts = []
    for rank in (0, 1):
        share = stream.shard(num_shards=2, index=rank)  # what Accelerate hands process `rank`
        trainer = tiny_trainer(
            str(tmp_path / f"rank{rank}"), share, collator=ids_only, per_device_train_batch_size=4,
            samples_per_epoch=24, max_steps=12, dataloader_num_workers=workers,
            accelerator_config={"dispatch_batches": False},
        )  # fmt: skip
        loader = trainer.get_train_dataloader()
        per_epoch = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            per_epoch.append([len(batch["sample_ids"]) for batch in loader])
        counts.append(per_epoch)
    assert counts[0] == counts[1] == [[4] * 6, [4] * 6]  # 24 // 4 full batches, every epoch, on both shares


def test_a_share_without_a_full_batch_is_an_error_not_a_hang(tmp_path):
    trainer = tiny_trainer(
        str(tmp_path), streamed(3, 2), collator=ids_only, per_device_train_batch_size=4, samples_per_epoch=24
    )
    loader = trainer.get_train_dataloader()
    with pytest.raises(ValueError, match="no full batch of 4 in a whole pass"):
        next(iter(loader))


def streamed_trainer(tmp_path, name, **overrides):
    collator = EpochCollator(MoProViewTransforms(16), train=True, num_labels=4, seed=0, uint8_training_views=True)
    values = dict(
        collator=collator, per_device_train_batch_size=6, samples_per_epoch=24, max_steps=8,
        per_device_eval_batch_size=8, accelerator_config={"dispatch_batches": False},  # as run_mopro.py streams
    )  # fmt: skip
    values.update(overrides)
    set_seed(0)  # the same initial weights in every trainer built here
    trainer = tiny_trainer(str(tmp_path / name), streamed(20, 3), **values)
    trainer.eval_dataset = tiny_image_dataset(10, seed=1)  # the fixture passes none: evaluation set afterwards
    trainer.args.eval_strategy = IntervalStrategy.EPOCH
    return trainer, record_trained_batches(trainer)


def test_streamed_epochs_follow_samples_per_epoch(tmp_path):
    """20 streamed samples, batch 6, `samples_per_epoch` 24: an epoch is 4 steps, which a pass of 3 full batches
    cannot fill: the stream restarts within the epoch. Every batch is full (`dataloader_drop_last`), evaluation
    runs at the end of each 4-step epoch, and no sample is drawn twice with the same augmentation seed."""
    trainer, trained = streamed_trainer(tmp_path, "run")
    trainer.train()
    assert len(trained) == 8 and all(len(ids) == 6 for _, ids in trained)
    eval_steps = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert eval_steps == [4, 8]
    seeds = [(epoch, sample_id) for epoch, ids in trained for sample_id in ids]
    assert len(seeds) == len(set(seeds))  # (epoch number, sample id) seeds the views: never the same twice
    # passes: epoch 0 = pass 0 (3 batches) + pass 2 (1 batch), epoch 1 = pass 1 + pass 3 (2 epochs: stride 2)
    assert [epoch for epoch, _ in trained] == [0, 0, 0, 2, 1, 1, 1, 3]


class StopAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_a_resumed_streamed_run_ends_as_the_straight_one(tmp_path):
    """A checkpoint after step 5 (epoch 1, step 1) resumes in epoch 1: its stream from the start with the first
    batch left out (read, neither decoded nor trained on), then the 3 batches the straight run took, with the same
    views."""
    straight, straight_batches = streamed_trainer(tmp_path, "straight")
    straight.train()
    first, _ = streamed_trainer(tmp_path, "resumed", save_strategy="steps", save_steps=5)
    first.add_callback(StopAfterStep(5))  # the run is interrupted after its checkpoint at step 5
    first.train()
    resumed, resumed_batches = streamed_trainer(tmp_path, "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-5"))
    assert resumed.state.global_step == 8 and resumed_batches == straight_batches[5:]
    assert straight_batches[4][1] not in resumed.data_collator.decoded  # the skipped batch was never decoded
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_persistent_workers_are_refused_when_streaming(tmp_path):
    trainer = tiny_trainer(
        str(tmp_path), streamed(12, 2), collator=ids_only, samples_per_epoch=12, dataloader_num_workers=1,
        dataloader_persistent_workers=True, accelerator_config={"dispatch_batches": False},
    )  # fmt: skip
    with pytest.raises(ValueError, match="persistent workers keep the first pass"):
        trainer.get_train_dataloader()


def test_streamed_epochs_validates_its_arguments():
    from training.data.sources import StreamedEpochs

    with pytest.raises(ValueError, match="at least one batch"):
        StreamedEpochs([], batches_per_epoch=0, num_epochs=1, batch_size=2)


# ------------------------------------------------------------------------------------------ run_mopro, end to end
def image_folder(root: Path, per_class: int, classes=("cat", "dog", "eel")) -> Path:
    rng = np.random.default_rng(len(str(root)))
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 80, size=(24, 24, 3)) + 60 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.jpg")
    return root


def shard_dir(tmp_path: Path) -> Path:
    """30 training images in shards of 7 (7, 7, 7, 7, 2: unequal), 7 validation images in shards of 3."""
    out = tmp_path / "shards"
    for split, per_class, size in (("train", 10, "7"), ("validation", 3, "3")):
        folder = image_folder(tmp_path / split, per_class)
        make_shards_main(["--image_folder", str(folder), "--split", split, "--output_dir", str(out),
                          "--samples_per_shard", size])  # fmt: skip
    return out


def webvision_dir(tmp_path: Path, num_classes: int = 3) -> Path:
    """A WebVision tree in the official layout, 24 training images (Google and Flickr) and 5 validation images."""
    root = tmp_path / "webvision"
    rng = np.random.default_rng(0)
    lines = {"train_filelist_google.txt": [], "train_filelist_flickr.txt": [], "val_filelist.txt": []}
    for index in range(24):
        source = "google" if index % 2 else "flickr"
        label = index % num_classes
        relative = f"{source}/q{label:04d}/{index}.jpg"
        lines[f"train_filelist_{source}.txt"].append(f"{relative} {label}")
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.integers(0, 80, (24, 24, 3)) + 60 * label).astype(np.uint8)).save(root / relative)
    (root / "val_images_256").mkdir(parents=True)
    for index in range(5):
        lines["val_filelist.txt"].append(f"val{index:06d}.jpg {index % num_classes}")
        pixels = (rng.integers(0, 80, (24, 24, 3)) + 60 * (index % num_classes)).astype(np.uint8)
        Image.fromarray(pixels).save(root / "val_images_256" / f"val{index:06d}.jpg")
    (root / "info").mkdir()
    for name, rows in lines.items():
        (root / "info" / name).write_text("".join(f"{row}\n" for row in rows))
    (root / "info" / "synsets.txt").write_text("".join(f"n{i:08d} class {i}\n" for i in range(1000)))
    return root


# The demo's YAML file named, as these runs had it before `--shard_dir` / `--webvision_dir` without one took their own
# recipes (a tiny model on CPU processes either way; `use_cpu` comes from it).
STREAMED_RUN = [
    str(REPO / "training" / "configs" / "demo.yaml"), *MODEL, "--image_size", "16", "--streaming", "true", "--samples_per_epoch", "16", "--max_steps", "6",
    "--global_batch_size", "4", "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "0",
    "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
    "--prototype_start_epoch", "0", "--noise_correction_start_epoch", "1", "--noise_correction_schedule", "fixed",
    "--lr_milestones", "10", "--shuffle_buffer_size", "8",
]  # fmt: skip


def _check_streamed_run(out: Path, train_ids: list[str]) -> None:
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # 16 samples per epoch / 4 per step: epochs end at steps 4 and 6 (the step budget), each evaluated
    assert {entry["step"] for entry in state["log_history"] if "eval_accuracy" in entry} == {4, 6}
    report = datasets.load_from_disk(str(out / "noise_report"))
    assert sorted(report["id"]) == sorted(train_ids)  # every training sample once, named by its path


def test_a_streamed_run_from_shards_ends_with_its_noise_report(tmp_path):
    shards = shard_dir(tmp_path)
    out = tmp_path / "run"
    main([*STREAMED_RUN, "--shard_dir", str(shards), "--output_dir", str(out), "--report_to", "none"])
    paths = sorted(str(path) for path in (tmp_path / "train").rglob("*.jpg"))
    _check_streamed_run(out, paths)


def test_a_streamed_webvision_run_ends_with_its_noise_report(tmp_path):
    root = webvision_dir(tmp_path)
    out = tmp_path / "run"
    main([*STREAMED_RUN, "--webvision_dir", str(root), "--output_dir", str(out), "--report_to", "none"])
    relative = sorted(str(path.relative_to(root)) for path in root.glob("*/q*/*.jpg"))
    _check_streamed_run(out, relative)


# ------------------------------------------------------------------------------------ 2 processes, gloo on CPU
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shards", "webvision"])
def test_two_process_streamed_run_evaluates_every_epoch_and_ends_with_its_noise_report(tmp_path, source):
    """`training/run_mopro.py` under `accelerate launch` with 2 gloo processes and 2 DataLoader workers each, streamed
    from shards of unequal sizes (make_shards: 7, 7, 7, 7, 2 training images; the processes' shares hold 21 and 9,
    and one worker of the second holds 2) or from a WebVision tree (5 shards of 5, 5, 5, 5, 4 lines), 9 or 5
    validation images (not divisible by 2), evaluation and a checkpoint every epoch. Before the fix a share's last
    short batch reached the model (a BatchNorm error here; a hang when evaluation starts on one rank only)."""
    if source == "shards":
        data = ["--shard_dir", str(shard_dir(tmp_path))]
        train_ids = sorted(str(path) for path in (tmp_path / "train").rglob("*.jpg"))
    else:
        root = webvision_dir(tmp_path)
        data = ["--webvision_dir", str(root), "--num_streaming_shards", "5"]
        train_ids = sorted(str(path.relative_to(root)) for path in root.glob("*/q*/*.jpg"))
    out = tmp_path / "run"
    # --ddp_timeout: a collective left waiting fails in 2 minutes, naming the step in the log
    run = [
        *STREAMED_RUN, *data, "--max_steps", "12", "--dataloader_num_workers", "2", "--save_strategy", "epoch",
        "--ddp_timeout", "120", "--report_to", "none", "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    port = {"shards": "29541", "webvision": "29542"}[source]
    command = [*LAUNCH, "--main_process_port", port, str(REPO / "training" / "run_mopro.py"), *run]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    # 16 samples per epoch / 4 per step: 3 epochs of 4 steps, each evaluated and saved
    assert [entry["step"] for entry in state["log_history"] if "eval_accuracy" in entry][:3] == [4, 8, 12]
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    report = datasets.load_from_disk(str(out / "noise_report"))
    assert sorted(report["id"]) == train_ids  # every training sample exactly once, named by its path
