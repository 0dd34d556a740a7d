"""Train MoPro (or the cross-entropy baseline) with the transformers Trainer.

    accelerate launch training/run_mopro.py                                  # offline noisy Fashion-MNIST demo
    accelerate launch training/run_mopro.py training/configs/webvision_v1_r50.yaml --webvision_dir /data/webvision
    python training/run_mopro.py training/configs/demo.yaml --baseline ce   # same data, plain CE

A YAML file (first argument) gives defaults, `training/configs/demo.yaml` when none is given; command-line flags
override it. Every `TrainingArguments` flag works.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
import yaml
from transformers import HfArgumentParser, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a clone, uninstalled

import modeling_mopro  # noqa: E402,F401  (registers the Auto classes)
from modeling_mopro import (  # noqa: E402
    MoProConfig,
    MoProForImageClassification,
    MoProForPreTraining,
    build_image_processor,
    image_processor_for,
)
from training.arguments import DataArguments, ModelArguments, MoProTrainingArguments  # noqa: E402
from training.collator import MoProCollator  # noqa: E402
from training.data import build_datasets  # noqa: E402
from training.trainer import MoProTrainer, accuracy_metrics  # noqa: E402
from training.transforms import MoProViewTransforms  # noqa: E402

logger = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, MoProTrainingArguments]:
    """`[config.yaml] [--flag value ...]`; without a YAML file the demo config gives the defaults."""
    cli = list(argv)
    config_file = cli.pop(0) if cli and cli[0].endswith((".yaml", ".yml")) else DEMO_CONFIG
    with open(config_file) as f:
        defaults = yaml.safe_load(f) or {}
    cli = _yaml_to_flags(defaults) + cli  # later flags win in argparse
    parser = HfArgumentParser((ModelArguments, DataArguments, MoProTrainingArguments))
    return parser.parse_args_into_dataclasses(args=cli)


def _yaml_to_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        flags.append(f"--{key}")
        flags.extend(str(v) for v in value) if isinstance(value, list) else flags.append(str(value))
    return flags


def build_config(model_args: ModelArguments, id2label: dict[int, str]) -> MoProConfig:
    """The model configuration of a new run (`training.plan` reads the same one)."""
    return MoProConfig(
        backbone=model_args.backbone,
        backbone_kwargs=json.loads(model_args.backbone_kwargs) if model_args.backbone_kwargs else None,
        image_size=model_args.image_size,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        **model_args.config_overrides(),
    )


def build_model(model_args: ModelArguments, training_args: MoProTrainingArguments, id2label: dict[int, str]):
    model_class = MoProForImageClassification if training_args.baseline == "ce" else MoProForPreTraining
    if model_args.model_name_or_path:
        return model_class.from_pretrained(model_args.model_name_or_path)
    return model_class(build_config(model_args, id2label))


def build_processor(model_args: ModelArguments, config: MoProConfig):
    """The image processor saved with the model; its mean and std also normalise the training views. Without
    --image_mean/--image_std it is the starting folder's (ImageNet's for a new model)."""
    default = image_processor_for(config)
    if model_args.image_mean is None and model_args.image_std is None:
        return default
    return build_image_processor(
        config.image_size, model_args.image_mean or default.image_mean, model_args.image_std or default.image_std
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    for name in (__name__, "training"):
        logging.getLogger(name).setLevel(logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    if data_args.streaming:
        # One sharding mechanism only: each process reads its own shards of the IterableDataset (stack notes:
        # a manual split with batch dispatching silently dropped half the data).
        training_args.accelerator_config.dispatch_batches = False
        if training_args.max_steps <= 0:
            raise ValueError("--streaming needs --max_steps (and --samples_per_epoch for the epoch-based schedule)")
    train_dataset, eval_dataset, id2label = build_datasets(data_args, seed=training_args.seed)
    model = build_model(model_args, training_args, id2label)
    config = model.config
    processor = build_processor(model_args, config)
    transforms = MoProViewTransforms(config.image_size, mean=processor.image_mean, std=processor.image_std)
    collator_kwargs = {
        "image_column": data_args.image_column_name,
        "label_column": data_args.label_column_name,
        "num_labels": config.num_labels,
    }
    trainer = MoProTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MoProCollator(
            transforms,
            train=True,
            seed=training_args.seed,
            key_view=training_args.baseline == "mopro",
            uint8_training_views=True,  # normalised on the model's device by MoProTrainer
            **collator_kwargs,
        ),
        eval_data_collator=MoProCollator(transforms, train=False, **collator_kwargs),
        compute_metrics=accuracy_metrics,
        processing_class=processor,  # saved with every checkpoint, so each one works with the pipeline
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(result.metrics)
        metrics["train_skipped_images"] = trainer.skipped_images
        trainer.save_state()
    if training_args.do_eval and eval_dataset is not None:
        metrics.update(trainer.evaluate())

    if trainer.is_world_process_zero():
        release = model.to_release_model() if isinstance(model, MoProForPreTraining) else model
        release.save_pretrained(training_args.output_dir)
        processor.save_pretrained(training_args.output_dir)
    if data_args.noise_report and isinstance(model, MoProForPreTraining):
        # Every process scores its share of the training set; the main process writes the report.
        metrics.update(noise_report(model, train_dataset, data_args, training_args))
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", metrics, combined=False)
        logger.info("results: %s", json.dumps(metrics, indent=2))

    if dist.is_available() and dist.is_initialized():
        # Without this, some gloo runs aborted at exit (see shared notes).
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def noise_report(model: MoProForPreTraining, train_dataset, data_args: DataArguments, training_args) -> dict:
    """Per-sample noise decisions of the trained model on the training set, scored against the ground truth
    when the dataset keeps it (the demo does; the columns never reach training).

    Call it in every process: each one scores its own contiguous share (`evaluation.noise_report.process_share`),
    the main process gathers the rows and writes them, and every process returns the summary. A 2.4M-image
    training set scored by the main process alone would outlast the other processes' barrier timeout."""
    from evaluation.noise_report import write_noise_report

    if isinstance(train_dataset, torch.utils.data.IterableDataset) or not hasattr(train_dataset, "column_names"):
        logger.info("noise report skipped: it needs a map-style training set")
        return {}
    summary = write_noise_report(
        model,
        train_dataset,
        output_dir=os.path.join(training_args.output_dir, "noise_report"),
        batch_size=training_args.per_device_eval_batch_size,
        num_workers=training_args.dataloader_num_workers,
        device=training_args.device,
        image_column=data_args.image_column_name,
        label_column=data_args.label_column_name,
    )
    # None (e.g. relabel precision with nothing relabelled) is kept: undefined, not zero.
    return {f"noise_{k}": v for k, v in summary.items() if v is None or isinstance(v, (int, float))}


if __name__ == "__main__":
    main()
