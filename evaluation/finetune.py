"""Fine-tuning on a 1% / 10% labelled subset of ImageNet (official `finetune_imagenet.py`), with the Trainer.

Recipe (official defaults, all configurable): the whole `MoProForImageClassification` (backbone + the MoPro
classifier, whose 1000 WebVision classes are ImageNet's) is trained for 40 epochs with SGD (momentum 0.9, weight
decay 0), learning rate 0.005 multiplied by 0.2 at epochs 20 and 30, global batch 256, RandomResizedCrop(224)
(scale 0.08-1) + horizontal flip; evaluation on ImageNet val with the test view after every epoch. As officially
(`finetune_imagenet.py` keeps `best_acc1` and `model_best.pth.tar`), the reported top-1/top-5 and the saved model are
those of the best epoch by validation top-1; the last epoch's are reported beside them (`final_top1`, `final_top5`).
`--no-select_best_epoch` evaluates once, after the last epoch (cheaper; a departure).

The labelled subset is either read from a file list (one image file name per line, e.g. SimCLR's
`1percent.txt`; matched on file names) or sampled *per class* (`max(1, round(fraction * n_c))` images of each
class, deterministic for a seed). The official script instead shuffles all images and keeps the first
`fraction * N` (per-class counts then vary).

    python -m evaluation.finetune --model_name_or_path DIR --train_data_dir IMAGENET/train \
        --data_dir IMAGENET/val --label_fraction 0.01 --output_dir runs/finetune_1pct
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from training.cli import fraction

from .classification import DATASET_CARDS, ClassificationOptions, evaluate_classification
from .features import resolve_device, save_eval_results
from .image_datasets import (
    ImageLabelDataset,
    add_dataset_arguments,
    check_same_classes,
    collate_without_index,
    dataset_from_arguments,
    transforms_from_config,
)


def milestone_lr_lambda(steps_per_epoch: float, milestones: Sequence[int], gamma: float) -> Callable[[int], float]:
    """LR factor of optimizer step s: `gamma ** #(milestones <= epoch(s))`, epoch(s) = floor(s / steps_per_epoch),
    i.e. the official per-epoch step decay (`adjust_learning_rate` at the start of every epoch)."""

    def factor(step: int) -> float:
        epoch = math.floor(step / steps_per_epoch)
        return gamma ** sum(epoch >= m for m in milestones)

    return factor


class StepDecayTrainer(Trainer):
    """A Trainer with the optimiser and schedule of the official evaluation recipes.

    SGD with momentum over the trainable parameters, a step decay by `gamma` at the milestone epochs, and
    optionally a custom training sampler and a frozen backbone kept in eval mode (BatchNorm statistics frozen, as
    the official classifier-only retraining runs `encoder.eval()`).

    Args:
        milestones: Epochs at whose start the learning rate is multiplied by `gamma`.
        gamma: Decay factor.
        momentum: SGD momentum.
        train_sampler: Replaces the default random sampler.
        frozen_backbone: Put `mopro.backbone` in eval mode before every training forward.
    """

    def __init__(
        self,
        *args,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        momentum: float = 0.9,
        train_sampler: Sampler | None = None,
        frozen_backbone: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.milestones, self.gamma, self.momentum = tuple(milestones), gamma, momentum
        self.train_sampler, self.frozen_backbone = train_sampler, frozen_backbone

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.SGD(
                params, lr=self.args.learning_rate, momentum=self.momentum, weight_decay=self.args.weight_decay
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            # With an integer epoch count the Trainer plans exactly epochs * steps_per_epoch optimizer steps.
            steps_per_epoch = max(num_training_steps / self.args.num_train_epochs, 1e-9)
            self.lr_scheduler = LambdaLR(
                optimizer or self.optimizer, milestone_lr_lambda(steps_per_epoch, self.milestones, self.gamma)
            )
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None) -> Sampler | None:
        return self.train_sampler if self.train_sampler is not None else super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.frozen_backbone:  # the Trainer calls model.train() before every step
            self.accelerator.unwrap_model(model).mopro.backbone.eval()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class BestEpochCallback(TrainerCallback):
    """Evaluates after every epoch on the main process and keeps the best epoch by top-1 (official
    `finetune_imagenet.py`: `is_best = acc1 > best_acc1`, so the first of equal epochs wins), with a CPU copy of its
    weights. The other processes wait at a barrier meanwhile, instead of inside the next step's all-reduce.

    Args:
        eval_dataset: Evaluation set with the test view.
        batch_size / num_workers: For `evaluate_classification`.
        wait_for_everyone: The trainer's `accelerator.wait_for_everyone`.
    """

    def __init__(self, eval_dataset, batch_size: int, num_workers: int, wait_for_everyone: Callable[[], None]):
        self.eval_dataset, self.batch_size, self.num_workers = eval_dataset, batch_size, num_workers
        self.wait_for_everyone = wait_for_everyone
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            options = ClassificationOptions(batch_size=self.batch_size, num_workers=self.num_workers)
            metrics = evaluate_classification(model, self.eval_dataset, options=options)
            metrics["epoch"] = round(state.epoch)
            self.history.append(metrics)
            if self.best is None or metrics["top1"] > self.best["top1"]:
                self.best = metrics
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.wait_for_everyone()


def load_for_training(model_name_or_path: str | os.PathLike, num_labels: int):
    """`MoProForImageClassification` from a MoPro folder; a new classifier (and prototypes) if the class count
    differs from the checkpoint's. The projection head is frozen: no fine-tuning loss uses it, and DDP rejects
    parameters that get no gradient."""
    import modeling_mopro

    model = modeling_mopro.MoProForImageClassification.from_pretrained(
        model_name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True
    )
    model.mopro.projection.requires_grad_(False)
    return model


def sample_labelled_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of `max(1, round(fraction * n_c))` random samples of every class c (deterministic by seed)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        chosen.append(rng.permutation(members)[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen))


def subset_from_file(ids: Sequence[str], path: str | os.PathLike) -> np.ndarray:
    """Indices of the samples whose file name is listed in `path` (first token per line, e.g. SimCLR subsets)."""
    wanted = {os.path.basename(line.split()[0]) for line in Path(path).read_text().splitlines() if line.strip()}
    indices = np.asarray([i for i, sample_id in enumerate(ids) if os.path.basename(sample_id) in wanted])
    if len(indices) != len(wanted):
        raise ValueError(f"{path}: {len(wanted)} images listed, {len(indices)} found in the training set")
    return indices


def training_arguments(
    output_dir: str | os.PathLike,
    epochs: float,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    num_workers: int,
    drop_last: bool,
    bf16: bool,
    logging_steps: int,
) -> TrainingArguments:
    """TrainingArguments for the protocol trainers; `batch_size` is global (split over the processes)."""
    per_device = max(1, batch_size // int(os.environ.get("WORLD_SIZE", 1)))
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=per_device,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=logging_steps,
        report_to="none",
        dataloader_num_workers=num_workers,
        dataloader_drop_last=drop_last,
        remove_unused_columns=False,
        seed=seed,
        bf16=bf16,
        use_cpu=resolve_device().type == "cpu",
    )


def finetune(
    model_name_or_path: str | os.PathLike,
    train_dataset: ImageLabelDataset,
    eval_dataset: ImageLabelDataset,
    output_dir: str | os.PathLike,
    label_fraction: float | None = 0.01,
    subset_file: str | os.PathLike | None = None,
    epochs: int = 40,
    learning_rate: float = 0.005,
    milestones: Sequence[int] = (20, 30),
    gamma: float = 0.2,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    num_workers: int = 8,
    bf16: bool = False,
    save_model: bool = True,
    logging_steps: int = 50,
    select_best_epoch: bool = True,
) -> dict[str, float]:
    """Fine-tunes on the labelled subset; returns top-1/top-5 (%) on `eval_dataset`, `train_samples`, `train_epochs`
    (an empty dict off the main process).

    Args:
        train_dataset: The full labelled training set with the training augmentation (`train_transform()`).
        eval_dataset: Evaluation set with the test view.
        label_fraction / subset_file: How to pick the labelled subset (the file wins when given).
        save_model: Save the fine-tuned model (and image processor) to `output_dir`.
        select_best_epoch: Evaluate after every epoch; report and save the best epoch by top-1 (official), with
            `best_epoch` (1-based) and the last epoch's `final_top1` / `final_top5`. Else evaluate the last epoch.
    """
    if subset_file is not None:
        indices = subset_from_file(train_dataset.ids, subset_file)
    elif label_fraction is not None and label_fraction < 1:
        indices = sample_labelled_subset(train_dataset.labels, label_fraction, seed)
    else:
        indices = np.arange(len(train_dataset))
    labelled = train_dataset.subset(indices)
    num_labels = int(max(train_dataset.labels.max(), eval_dataset.labels.max())) + 1
    model = load_for_training(model_name_or_path, num_labels)
    args = training_arguments(
        output_dir, epochs, learning_rate, weight_decay, batch_size, seed, num_workers, False, bf16, logging_steps
    )
    trainer = StepDecayTrainer(
        model=model,
        args=args,
        train_dataset=labelled,
        data_collator=collate_without_index,
        milestones=milestones,
        gamma=gamma,
        momentum=momentum,
    )
    best_epoch = None
    if select_best_epoch:
        best_epoch = BestEpochCallback(eval_dataset, batch_size, num_workers, trainer.accelerator.wait_for_everyone)
        trainer.add_callback(best_epoch)
    trainer.train()
    if best_epoch is not None and best_epoch.best_state is not None:
        trainer.model.load_state_dict(best_epoch.best_state)  # main process only, which alone saves
    if save_model:
        trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():  # evaluation runs in one process; the others return nothing
        return {}
    summary = {"train_samples": len(labelled), "train_epochs": epochs}
    if best_epoch is None:
        options = ClassificationOptions(batch_size=batch_size, num_workers=num_workers)
        metrics = evaluate_classification(trainer.model, eval_dataset, options=options)
        return {**metrics, **summary}
    best, final = best_epoch.best, best_epoch.history[-1]
    return {
        **{k: v for k, v in best.items() if k != "epoch"},
        "best_epoch": best["epoch"],
        "final_top1": final["top1"],
        "final_top5": final["top5"],
        **summary,
    }


def add_schedule_arguments(
    parser: argparse.ArgumentParser, epochs: int, learning_rate: float, milestones: list[int], gamma: float
) -> None:
    """The SGD step-schedule flags shared by fine-tuning and classifier retraining, with each recipe's defaults."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--learning_rate", type=float, default=learning_rate)
    parser.add_argument("--milestones", type=int, nargs="*", default=milestones)
    parser.add_argument("--gamma", type=float, default=gamma)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--batch_size", type=int, default=256, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--logging_steps", type=int, default=50)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="saved MoPro folder")
    parser.add_argument("--output_dir", required=True, help="where the fine-tuned model goes")
    parser.add_argument("--results_dir", default=None, help="where eval_*.json goes (default: the model folder)")
    add_dataset_arguments(parser, prefix="train_")
    add_dataset_arguments(parser)
    parser.add_argument("--dataset", default="imagenet", help="result key prefix")
    parser.add_argument("--label_fraction", type=fraction, default=0.01)
    parser.add_argument("--subset_file", default=None, help="file names of the labelled images (overrides fraction)")
    parser.add_argument(
        "--select_best_epoch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate every epoch and report/save the best by top-1 (official); --no-select_best_epoch: last epoch",
    )
    add_schedule_arguments(parser, epochs=40, learning_rate=0.005, milestones=[20, 30], gamma=0.2)
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    import modeling_mopro  # noqa: F401

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    train = dataset_from_arguments(args, transforms_from_config(config, train=True), "train_", "train")
    val = dataset_from_arguments(args, transforms_from_config(config))
    check_same_classes(train, val)  # the new classifier learns the training labels; validation must use them
    metrics = finetune(
        args.model_name_or_path, train, val, args.output_dir, args.label_fraction, args.subset_file, args.epochs,
        args.learning_rate, args.milestones, args.gamma, args.momentum, args.weight_decay, args.batch_size,
        args.seed, args.num_workers, args.bf16, logging_steps=args.logging_steps,
        select_best_epoch=args.select_best_epoch,
    )  # fmt: skip
    if not metrics:  # not the main process
        return metrics
    subset = Path(args.subset_file).stem if args.subset_file else f"{100 * args.label_fraction:g}pct"
    name, dataset_type = DATASET_CARDS.get(args.dataset, (args.dataset, args.dataset))
    path = save_eval_results(
        args.results_dir or args.model_name_or_path, "finetune", metrics,
        f"{name}, fine-tuned on {subset} of the labels", dataset_type, f"{args.dataset}_{subset}",
    )  # fmt: skip
    print(f"{metrics} -> {path}")
    return metrics


__all__ = [
    "BestEpochCallback",
    "StepDecayTrainer",
    "finetune",
    "load_for_training",
    "milestone_lr_lambda",
    "sample_labelled_subset",
    "subset_from_file",
    "training_arguments",
]

if __name__ == "__main__":
    from training.cli import run_command

    run_command(main)
