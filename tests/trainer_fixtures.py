"""Tiny model, tiny in-memory image dataset and trainer factory shared by the trainer tests and the
2-process script (`tests/distributed_train.py`)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image

from modeling_mopro import MoProConfig, MoProForPreTraining
from tests.fixtures_eval import IMAGE_SIZE, NUM_LABELS
from tests.fixtures_eval import tiny_config as eval_tiny_config
from training.arguments import MoProTrainingArguments
from training.data.collator import MoProCollator
from training.data.transforms import MoProViewTransforms
from training.trainer import MoProTrainer


def tiny_config(**overrides) -> MoProConfig:
    """The evaluation tests' tiny config, with faster EMAs so a few steps move the momentum encoder and prototypes,
    and two BatchNorm groups for the momentum encoder (the default 8 needs 16 keys; the batch here is 6)."""
    values = {"encoder_momentum": 0.9, "prototype_momentum": 0.9, "momentum_encoder_bn_groups": 2}
    return eval_tiny_config(**{**values, **overrides})


def tiny_image_dataset(num_samples: int = 48, seed: int = 0) -> Dataset:
    """Random 40x40 PNGs whose mean colour depends on the label, with a unique `sample_id`."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(num_samples):
        label = i % NUM_LABELS
        pixels = rng.integers(0, 80, size=(40, 40, 3)) + 40 * label
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
        labels.append(label)
    return Dataset.from_dict({"image": images, "label": labels, "sample_id": list(range(num_samples))})


def tiny_trainer(output_dir: str, dataset: Dataset, model=None, collator=None, **training_overrides) -> MoProTrainer:
    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=6,
        max_steps=6,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=1e-4,
        prototype_start_epoch=1,
        noise_correction_start_epoch=2,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    values.update(training_overrides)
    args = MoProTrainingArguments(**values)
    model = model if model is not None else MoProForPreTraining(tiny_config())
    transforms = MoProViewTransforms(IMAGE_SIZE)
    return MoProTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        # uint8 training batches, normalised by the trainer on the device: the path `run_mopro.py` ships
        data_collator=collator
        or MoProCollator(transforms, train=True, num_labels=NUM_LABELS, seed=args.seed, uint8_training_views=True),
        eval_data_collator=MoProCollator(transforms, train=False, num_labels=NUM_LABELS),
    )


def run_distributed_train(output_dir: Path, *script_args: str, port: int) -> subprocess.CompletedProcess:
    """`tests/distributed_train.py output_dir *script_args` under `accelerate launch` with 2 gloo processes on CPU,
    one thread each (`--multi_gpu` is what starts 2 processes on CPU: `--cpu` runs one)."""
    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(repo),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", str(port), str(repo / "tests" / "distributed_train.py"), str(output_dir), *script_args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=output_dir)
