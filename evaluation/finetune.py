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
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from modeling_mopro.cli import fraction
from training.arguments import per_device_batch_size
from training.data.image_datasets import (
    ImageLabelDataset,
    add_dataset_arguments,
    check_same_classes,
    collate_without_index,
    dataset_from_arguments,
)
from training.data.transforms import transforms_from_config
from training.optim import create_optimizer, step_lr_scheduler

from .classification import DATASET_CARDS, ClassificationOptions, evaluate_classification
from .features import resolve_device, save_eval_results


class StepDecayTrainer(Trainer):
    """A Trainer with the optimiser and schedule of the official evaluation recipes.

    The optimizer of `args` over the trainable parameters (SGD with the momentum of `optim_args`,
    `training.optim.create_optimizer`), a step decay by `gamma` at the milestone epochs, and optionally a custom
    training sampler and a frozen backbone kept in eval mode (BatchNorm statistics frozen, as the official
    classifier-only retraining runs `encoder.eval()`).

    Args:
        milestones: Epochs at whose start the learning rate is multiplied by `gamma`.
        gamma: Decay factor.
        train_sampler: Replaces the default random sampler.
        frozen_backbone: Put `mopro.backbone` in eval mode before every training forward.
    """

    def __init__(
        self,
        *args,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        train_sampler: Sampler | None = None,
        frozen_backbone: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.milestones, self.gamma = tuple(milestones), gamma
        self.train_sampler, self.frozen_backbone = train_sampler, frozen_backbone

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model if model is None else model, self.args)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        # With an integer epoch count the Trainer plans exactly epochs * steps_per_epoch optimizer steps.
        steps_per_epoch = num_training_steps / self.args.num_train_epochs
        self.lr_scheduler = step_lr_scheduler(optimizer or self.optimizer, self.milestones, steps_per_epoch, self.gamma)
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None) -> Sampler | None:
        # No public hook gives the Trainer a sampler: pinned in `training.trainer.PRIVATE_TRAINER_HOOKS`.
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


@dataclass
class TrainingRecipe:
    """The SGD step-schedule recipe of a protocol that trains (flags of `add_schedule_arguments`).

    Attributes:
        epochs / learning_rate / milestones / gamma: The step schedule: `learning_rate` times `gamma` from each
            milestone epoch on.
        momentum / weight_decay: SGD's (weight decay on every parameter).
        batch_size: The global batch, split over the processes (`training.arguments.per_device_batch_size`).
        save_model: Save the trained model (and image processor) to the output folder.
    """

    epochs: int
    learning_rate: float
    milestones: tuple[int, ...]
    gamma: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    seed: int = 0
    num_workers: int = 8
    bf16: bool = False
    logging_steps: int = 50
    save_model: bool = True

    def training_arguments(self, output_dir: str | os.PathLike, drop_last: bool) -> TrainingArguments:
        """TrainingArguments of the protocol trainers."""
        return TrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=self.epochs,
            per_device_train_batch_size=per_device_batch_size(self.batch_size, int(os.environ.get("WORLD_SIZE", 1))),
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            optim="sgd",
            optim_args=f"momentum={self.momentum!r}",
            save_strategy="no",
            eval_strategy="no",
            logging_steps=self.logging_steps,
            report_to="none",
            dataloader_num_workers=self.num_workers,
            dataloader_drop_last=drop_last,
            remove_unused_columns=False,
            seed=self.seed,
            bf16=self.bf16,
            use_cpu=resolve_device().type == "cpu",
        )

    @classmethod
    def from_flags(cls, args: argparse.Namespace):
        """The options from the parsed flags of the protocol's command line."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


@dataclass
class FinetuneOptions(TrainingRecipe):
    """Official `finetune_imagenet.py` defaults (L34 epochs, L42 lr, L44-45 decay 0.2 at 20 and 30).

    Attributes:
        label_fraction / subset_file: How to pick the labelled subset (the file wins when given).
        select_best_epoch: Evaluate after every epoch; report and save the best epoch by top-1 (official), with
            `best_epoch` (1-based) and the last epoch's `final_top1` / `final_top5`. Else evaluate the last epoch.
    """

    epochs: int = 40
    learning_rate: float = 0.005
    milestones: tuple[int, ...] = (20, 30)
    gamma: float = 0.2
    label_fraction: float | None = 0.01
    subset_file: str | None = None
    select_best_epoch: bool = True


def finetune(
    model_name_or_path: str | os.PathLike,
    train_dataset: ImageLabelDataset,
    eval_dataset: ImageLabelDataset,
    output_dir: str | os.PathLike,
    options: FinetuneOptions | None = None,
) -> dict[str, float]:
    """Fine-tunes on the labelled subset; returns top-1/top-5 (%) on `eval_dataset`, `train_samples`, `train_epochs`
    (an empty dict off the main process).

    Args:
        train_dataset: The full labelled training set with the training augmentation (`transforms_from_config(config, train=True)`).
        eval_dataset: Evaluation set with the test view.
        options: The recipe (official defaults).
    """
    options = options or FinetuneOptions()
    if options.subset_file is not None:
        indices = subset_from_file(train_dataset.ids, options.subset_file)
    elif options.label_fraction is not None and options.label_fraction < 1:
        indices = sample_labelled_subset(train_dataset.labels, options.label_fraction, options.seed)
    else:
        indices = np.arange(len(train_dataset))
    labelled = train_dataset.subset(indices)
    num_labels = int(max(train_dataset.labels.max(), eval_dataset.labels.max())) + 1
    model = load_for_training(model_name_or_path, num_labels)
    trainer = StepDecayTrainer(
        model=model,
        args=options.training_arguments(output_dir, drop_last=False),
        train_dataset=labelled,
        data_collator=collate_without_index,
        milestones=options.milestones,
        gamma=options.gamma,
    )
    batch_size, num_workers = options.batch_size, options.num_workers
    best_epoch = None
    if options.select_best_epoch:
        best_epoch = BestEpochCallback(eval_dataset, batch_size, num_workers, trainer.accelerator.wait_for_everyone)
        trainer.add_callback(best_epoch)
    trainer.train()
    if best_epoch is not None and best_epoch.best_state is not None:
        trainer.model.load_state_dict(best_epoch.best_state)  # main process only, which alone saves
    if options.save_model:
        trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():  # evaluation runs in one process; the others return nothing
        return {}
    summary = {"train_samples": len(labelled), "train_epochs": options.epochs}
    if best_epoch is None:
        evaluation = ClassificationOptions(batch_size=options.batch_size, num_workers=options.num_workers)
        metrics = evaluate_classification(trainer.model, eval_dataset, options=evaluation)
        return {**metrics, **summary}
    best, final = best_epoch.best, best_epoch.history[-1]
    return {
        **{k: v for k, v in best.items() if k != "epoch"},
        "best_epoch": best["epoch"],
        "final_top1": final["top1"],
        "final_top5": final["top5"],
        **summary,
    }


def add_schedule_arguments(parser: argparse.ArgumentParser, recipe: TrainingRecipe) -> None:
    """The SGD step-schedule flags shared by fine-tuning and classifier retraining, with each recipe's defaults."""
    parser.add_argument("--epochs", type=int, default=recipe.epochs)
    parser.add_argument("--learning_rate", type=float, default=recipe.learning_rate)
    parser.add_argument("--milestones", type=int, nargs="*", default=list(recipe.milestones))
    parser.add_argument("--gamma", type=float, default=recipe.gamma)
    parser.add_argument("--momentum", type=float, default=recipe.momentum)
    parser.add_argument("--weight_decay", type=float, default=recipe.weight_decay)
    parser.add_argument("--batch_size", type=int, default=recipe.batch_size, help="global batch size")
    parser.add_argument("--seed", type=int, default=recipe.seed)
    parser.add_argument("--num_workers", type=int, default=recipe.num_workers)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--logging_steps", type=int, default=recipe.logging_steps)


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
    add_schedule_arguments(parser, FinetuneOptions())
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    import modeling_mopro  # noqa: F401

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    train, _ = dataset_from_arguments(args, transforms_from_config(config, train=True), "train_", "train")
    val, _ = dataset_from_arguments(args, transforms_from_config(config))
    check_same_classes(train, val)  # the new classifier learns the training labels; validation must use them
    metrics = finetune(args.model_name_or_path, train, val, args.output_dir, FinetuneOptions.from_flags(args))
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
    "FinetuneOptions",
    "StepDecayTrainer",
    "TrainingRecipe",
    "finetune",
    "load_for_training",
    "sample_labelled_subset",
    "subset_from_file",
]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
