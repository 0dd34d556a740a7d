"""Train MoPro (or the cross-entropy baseline) with the transformers Trainer.

    accelerate launch training/run_mopro.py                                  # offline noisy Fashion-MNIST demo
    accelerate launch training/run_mopro.py training/configs/webvision_v1_r50.yaml --webvision_dir /data/webvision
    python training/run_mopro.py training/configs/demo.yaml --baseline ce   # same data, plain CE

A YAML file (first argument) gives defaults; without one, `training/configs/webvision_<version>_r50.yaml` for
`--webvision_dir`, `training/configs/own_data.yaml` for `--train_dir`, `--dataset_name` or `--shard_dir` (the recipe
for real photos, its image size chosen from the images: `training/own_data.py`), else `training/configs/demo.yaml`
(the offline demo, on its own data only). Command-line flags override it. Every `TrainingArguments` flag works.
Where each value came from is logged at start (`training.plan` prints the same).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from accelerate.utils import broadcast_object_list, gather_object
from transformers import IntervalStrategy, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a clone, uninstalled

import modeling_mopro  # noqa: E402,F401  (registers the Auto classes)
from modeling_mopro import (  # noqa: E402
    MoProConfig,
    MoProForImageClassification,
    MoProForPreTraining,
    build_image_processor,
    image_processor_for,
)
from modeling_mopro.cli import check_output_dir, run_command  # noqa: E402
from modeling_mopro.sample_dynamics import SAMPLE_DYNAMICS_FILE  # noqa: E402
from training.arguments import (  # noqa: E402
    ARCHITECTURE_FIELDS,
    DEMO_CONFIG,
    DataArguments,
    ModelArguments,
    MoProTrainingArguments,
    build_config,
    load_config,
    milestones_past_the_run,
    parse_args,
)
from training.data.collator import MoProCollator  # noqa: E402
from training.data.gpu_augment import GpuAugmentCollator  # noqa: E402
from training.data.image_folder import passed_over_counts  # noqa: E402
from training.data.sources import _SOURCES as DATA_SOURCES  # noqa: E402  (the data-source flags)
from training.data.sources import build_datasets, training_set_for_report  # noqa: E402
from training.data.transforms import MoProViewTransforms  # noqa: E402
from training.run_folder import claim_output_dir, newest_complete_checkpoint, release_output_dir  # noqa: E402
from training.trainer import MoProTrainer, check_checkpoint  # noqa: E402

logger = logging.getLogger(__name__)


def classifier_accuracy(eval_pred) -> dict[str, float]:
    """`eval_accuracy`: the classifier's top-1 as a fraction (`evaluation.classification.topk_accuracy`)."""
    from evaluation.classification import topk_accuracy

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": topk_accuracy(logits, eval_pred.label_ids, top_k=(1,))["top1"] / 100}


def build_model(
    model_args: ModelArguments,
    training_args: MoProTrainingArguments,
    id2label: dict[int, str],
    config: MoProConfig | None = None,
):
    """A new model, or the `--model_name_or_path` one (with `config`, its `load_config`, when already read)."""
    model_class = MoProForImageClassification if training_args.baseline == "ce" else MoProForPreTraining
    if not model_args.model_name_or_path:
        return model_class(build_config(model_args, id2label))
    config = config or load_config(model_args)
    _check_labels(model_args.model_name_or_path, config, id2label)
    return model_class.from_pretrained(model_args.model_name_or_path, config=config)


def _check_labels(path: str, config: MoProConfig, id2label: dict[int, str]) -> None:
    """A loaded classifier's rows are its classes: training it on data with other class names (or another order)
    would silently give every row a new meaning."""
    ours = [config.id2label[i] for i in range(config.num_labels)]
    theirs = [id2label[i] for i in range(len(id2label))]
    if ours != theirs:

        def preview(names):
            return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

        raise ValueError(
            f"--model_name_or_path {path} has {len(ours)} classes ({preview(ours)}) but the training data has "
            f"{len(theirs)} ({preview(theirs)}): give data with the folder's class names, or drop "
            "--model_name_or_path to train a new model on these classes."
        )


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
    check_data_source(model_args.config_file, data_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    for name in (__name__, "training"):
        logging.getLogger(name).setLevel(logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    check_one_process_group(training_args)
    # Path checks first: a wrong folder is known before any data is read or model built.
    if training_args.do_train:
        training_args.resume_from_checkpoint = resolve_checkpoint(training_args)
    prepare_output_dir(model_args, training_args, remove=False)
    check_output_dir_shared(training_args)
    start_config = load_config(model_args) if model_args.model_name_or_path else None  # flags checked before data
    for source in model_args.config_sources:  # one line per source of the run's values (after the one-line errors)
        logger.info("config: %s", source.describe())
    if warning := milestones_past_the_run(training_args):
        logger.warning(warning)
    set_seed(training_args.seed)

    if data_args.streaming:
        # One sharding mechanism only: each process reads its own shards of the IterableDataset (stack notes:
        # a manual split with batch dispatching silently dropped half the data).
        training_args.accelerator_config.dispatch_batches = False
        if training_args.max_steps <= 0:
            raise ValueError("--streaming needs --max_steps (and --samples_per_epoch for the epoch-based schedule)")
    train_dataset, eval_dataset, id2label = build_datasets(data_args, seed=training_args.seed)
    if eval_dataset is None and training_args.eval_strategy != IntervalStrategy.NO:
        # The YAML files evaluate every epoch; a source without an evaluation split trains without it.
        logger.warning(
            "no evaluation data (give --validation_dir, or a dataset with a validation split): evaluation is off "
            "(--eval_strategy %s ignored)",
            training_args.eval_strategy.value,
        )
        training_args.eval_strategy = IntervalStrategy.NO
    if len(id2label) < 2:
        raise ValueError(
            f"the training data has {len(id2label)} class ({', '.join(map(str, id2label.values()))}): a classifier "
            "needs at least 2 (with one, every sample is called clean); check the data source flags"
        )
    if training_args.do_train:
        check_train_size(train_dataset, training_args)
    model = build_model(model_args, training_args, id2label, start_config)
    config = model.config
    processor = build_processor(model_args, config)
    transforms = MoProViewTransforms(
        config.image_size, mean=processor.image_mean, std=processor.image_std,
        crop_scale=(data_args.crop_min_scale, 1.0), processor=processor,
    )  # fmt: skip
    resume_changes = []
    if training_args.do_train and training_args.resume_from_checkpoint:
        check_resume_model(training_args.resume_from_checkpoint, config)
        resume_changes = check_resume_arguments(
            training_args.resume_from_checkpoint, model_args, data_args, training_args
        )
    if training_args.should_save:
        # The folder is this run's from its first write to its last (`training.run_folder`): a second run started
        # into it now is refused, and the start-up check is repeated under the lock.
        claim_output_dir(training_args.output_dir)
        prepare_output_dir(model_args, training_args)
        # Written now (and again at the end): a resume of this run, finished or not, is compared with it.
        save_run_args(training_args.output_dir, model_args, data_args, training_args, resume_changes)
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
        # --gpu_augment: the workers only read the bytes; MoProTrainer decodes and augments on the device.
        data_collator=(GpuAugmentCollator if training_args.gpu_augment else MoProCollator)(
            transforms,
            train=True,
            seed=training_args.seed,
            key_view=training_args.baseline == "mopro",
            uint8_training_views=True,  # normalised on the model's device by MoProTrainer
            **collator_kwargs,
        ),
        eval_data_collator=MoProCollator(transforms, train=False, **collator_kwargs),
        compute_metrics=classifier_accuracy,
        processing_class=processor,  # saved with every checkpoint, so each one works with the pipeline
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(result.metrics)
        metrics["train_skipped_images"] = trainer.skipped_images
        metrics.update(passed_over_metrics(data_args))
        if isinstance(model, MoProForPreTraining):
            # When correction began (an adaptive schedule decides it during the run; -1: it never did).
            start = trainer.correction_schedule.start_epoch
            began = start is not None and start < trainer.current_epoch()
            metrics["train_noise_correction_start_epoch"] = start if began else -1
        trainer.save_state()
        trainer.save_sample_dynamics(training_args.output_dir)  # every process: the record is summed over them
    if training_args.do_eval and eval_dataset is not None:
        metrics.update(trainer.evaluate())

    if trainer.is_world_process_zero():
        claim_output_dir(training_args.output_dir)  # still ours (not removed or replaced during the run)
        release = model.to_release_model() if isinstance(model, MoProForPreTraining) else model
        release.save_pretrained(training_args.output_dir)
        processor.save_pretrained(training_args.output_dir)
        save_run_args(training_args.output_dir, model_args, data_args, training_args, resume_changes)
    if data_args.noise_report and isinstance(model, MoProForPreTraining):
        # Every process scores its share of the training set; the main process writes the report.
        metrics.update(noise_report(model, train_dataset, data_args, training_args))
    if trainer.is_world_process_zero():
        claim_output_dir(training_args.output_dir)
        trainer.save_metrics("all", metrics, combined=False)
        logger.info("results: %s", json.dumps(metrics, indent=2))
        if training_args.do_train:  # the run as one picture, linked from the release's model card
            from evaluation.training_curves import plot_training_curves

            logger.info("training curves: %s", plot_training_curves(training_args.output_dir))
        release_output_dir(training_args.output_dir)

    if dist.is_available() and dist.is_initialized():
        # Without this, some gloo runs aborted at exit (see shared notes).
        dist.barrier()
        dist.destroy_process_group()
    return metrics


# What a run writes into its output folder (besides checkpoint-* folders): a second run must not mix with them.
RUN_OUTPUTS = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
    "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json", "run_args.json",
    "noise_report", "training_curves.png", SAMPLE_DYNAMICS_FILE,
)  # fmt: skip


def resolve_checkpoint(training_args: MoProTrainingArguments) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `true`/`last` for the newest one in `output_dir`;
    checked (`check_checkpoint`) before anything else runs."""
    path = training_args.resume_from_checkpoint
    if path is None:
        return None
    if str(path).lower() in ("true", "last"):
        # The newest checkpoint that can resume: one cut short (a full disk, a kill during the save) is passed over,
        # named in a warning, and the one before it is taken.
        path, refused = newest_complete_checkpoint(training_args.output_dir, check_checkpoint)
        for reason in refused:
            logger.warning("--resume_from_checkpoint last: passing over an incomplete checkpoint: %s", reason)
        if path is None:
            refused_note = f" ({len(refused)} incomplete: {refused[0]})" if refused else ""
            raise ValueError(
                f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no complete checkpoint-* folder in "
                f"--output_dir {training_args.output_dir}{refused_note}; name a checkpoint folder, or start without "
                "the flag."
            )
        return path
    elif not os.path.isdir(path):
        raise ValueError(
            f"--resume_from_checkpoint {path}: no such folder; give a checkpoint-N folder of an earlier run "
            "(or `last` for the newest in --output_dir)."
        )
    check_checkpoint(path)
    return str(path)


def prepare_output_dir(model_args: ModelArguments, training_args: MoProTrainingArguments, remove: bool = True) -> None:
    """Refuse an `output_dir` that holds a run, unless resuming or `--overwrite_output_dir true` (then, with
    `remove`, the old run's outputs are removed, so no stale noise report or results sit beside the new model).

    Called twice: at start-up to refuse early (`remove=False`), and again under the folder's lock
    (`claim_output_dir`) just before the first write, where a run that began meanwhile is seen."""
    out = Path(training_args.output_dir)
    if not out.is_dir() or (training_args.do_train and training_args.resume_from_checkpoint):
        return
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    checkpoints = sorted(p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-", 1)[1].isdigit())
    if not found and not checkpoints:
        return
    if model_args.model_name_or_path and Path(model_args.model_name_or_path).resolve() == out.resolve():
        raise ValueError(
            f"--output_dir {out} is the --model_name_or_path folder: write the new run to another --output_dir."
        )

    def resume() -> str:  # only on a refusal
        last = newest_complete_checkpoint(out, check_checkpoint)[0]
        return f"--resume_from_checkpoint {last} to continue it, " if last else ""

    held = [*found, *(p.name for p in checkpoints)]
    overwrite, flag = training_args.overwrite_output_dir, "--overwrite_output_dir true"
    check_output_dir(out, overwrite, lambda _: held, "a run ({names})", overwrite_flag=flag, hint=resume)
    if remove and training_args.should_save:  # one process removes
        logger.warning("--overwrite_output_dir: removing the earlier run's %s from %s", found + checkpoints, out)
        for path in [out / name for name in found] + checkpoints:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_one_process_group(training_args: MoProTrainingArguments) -> None:
    """The processes a launcher started must form one group. On a machine without a GPU, `accelerate launch
    --multi_gpu` (or torchrun) of a run that is not on the CPU starts N processes that each train alone as rank 0 of
    1: each claims the output folder, reads all the data and writes the same files (seen: the second one refused the
    folder as "in use by another run", which names the wrong cause)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise ValueError(
            f"launched as {launched} processes, but they do not form one process group (this one sees "
            f"{training_args.world_size}; device {training_args.device}): on a machine without a GPU, pass --cpu to "
            "accelerate launch or set use_cpu: true in the YAML"
        )


def check_output_dir_shared(training_args: MoProTrainingArguments) -> None:
    """On several nodes, check that `output_dir` is one folder all of them see; refuse it with one line if not.

    The model, optimizer and trainer state of a checkpoint are written from global rank 0 only: on a folder that is
    not shared, the other nodes' checkpoints would hold only their RNG states and no node but the first could
    resume. `--save_on_each_node` does not help here: transformers 5's `save_pretrained` writes weights on global
    rank 0 only whenever torch.distributed is up, so the other nodes' checkpoints lacked `model.safetensors`
    (`bench/rehearsal.py`, row 3); it is refused on several nodes. Each node's main process writes a marker file,
    and every node reports which markers it sees; all processes raise the same error."""
    if training_args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    rank, is_node_main = training_args.process_index, training_args.local_process_index == 0
    token = broadcast_object_list([os.urandom(8).hex() if rank == 0 else None])  # one name: no stale marker counts
    out = Path(training_args.output_dir)
    marker = out / f".node-check-{token[0]}-{rank}"
    if is_node_main:
        out.mkdir(parents=True, exist_ok=True)
        marker.touch()
    dist.barrier()
    seen = sorted(p.name for p in out.glob(f".node-check-{token[0]}-*")) if is_node_main else None
    reports = gather_object([(is_node_main, rank, seen)])  # one entry per process, in rank order
    dist.barrier()  # every node has looked before any marker goes
    if is_node_main:
        marker.unlink(missing_ok=True)
    node_mains = [(r, names) for main, r, names in reports if main]
    if len(node_mains) == 1:
        return
    if training_args.save_on_each_node:
        raise ValueError(
            f"--save_on_each_node true on {len(node_mains)} nodes: transformers writes the model weights from global "
            "rank 0 only, so the other nodes' checkpoints could not resume; drop the flag and give an --output_dir "
            "that every node mounts (a shared filesystem)."
        )
    expected = sorted(f".node-check-{token[0]}-{r}" for r, _ in node_mains)
    if any(names != expected for _, names in node_mains):
        raise ValueError(
            f"--output_dir {out} is not one folder shared by the {len(node_mains)} nodes (each node's main process "
            "sees only its own files there): only global rank 0 writes the model and optimizer, so no other node "
            "could resume; put --output_dir on a filesystem every node mounts."
        )


def check_data_source(config_file: str | os.PathLike, data_args: DataArguments) -> None:
    """Only the demo config may train on the built-in demo data: another YAML (a WebVision recipe) without a data
    source would otherwise train on Fashion-MNIST and save the result under the recipe's name."""
    if Path(config_file).resolve() == DEMO_CONFIG.resolve():
        return
    if any(getattr(data_args, name) for name in DATA_SOURCES):
        return
    raise ValueError(
        f"{config_file} gives no data source and none was passed: add {' or '.join(f'--{n}' for n in DATA_SOURCES)} "
        "(e.g. --webvision_dir /data/webvision for a WebVision recipe); the built-in Fashion-MNIST data is the demo "
        "config's only."
    )


def check_train_size(train_dataset, training_args: MoProTrainingArguments) -> None:
    """A training set smaller than one batch per process gives no step with `drop_last`: a run that would
    silently train nothing is refused."""
    if not hasattr(train_dataset, "__len__"):
        return  # streamed: the step budget (`max_steps`) decides
    per_device = training_args.resolve_batch_size(training_args.world_size)
    batch = per_device * training_args.world_size
    size = len(train_dataset)
    if size == 0:
        raise ValueError("the training set is empty: check the data source flags (--train_dir, --dataset_name, ...).")
    if training_args.dataloader_drop_last and size < batch:
        raise ValueError(
            f"the training set has {size} samples, fewer than one batch of {batch} ({per_device} per process x "
            f"{training_args.world_size} processes) with --dataloader_drop_last true: no training step would run. "
            "Give more data, or a smaller --global_batch_size (or --per_device_train_batch_size)."
        )


def passed_over_metrics(data_args: DataArguments) -> dict[str, int]:
    """`train_passed_over_<reason>`: the files of `--train_dir` its reader passed over (`training.data.image_folder`),
    by reason, so that a folder half made of unreadable entries shows in the results, not only in the log."""
    counts = passed_over_counts(data_args.train_dir) if data_args.train_dir else None
    return {f"train_passed_over_{reason.replace(' ', '_')}": count for reason, count in (counts or {}).items()}


def save_run_args(output_dir: str, model_args, data_args, training_args, resume_changes: list[str] = ()) -> None:
    """The run's arguments as plain JSON (`run_args.json`), which the release's model card reads to describe the
    data and schedule this model was trained with (the Trainer's `training_args.bin` is a pickle, never read).

    A resume allowed to change arguments (`--allow_changed_resume`) appends its changes to ``resumes``, which keeps
    those of earlier resumes: the file then says that the run was not trained with one set of arguments."""
    from evaluation.model_card import RUN_ARGS_FILE

    path = os.path.join(output_dir, RUN_ARGS_FILE)
    resumes = []
    if training_args.resume_from_checkpoint and os.path.isfile(path):
        with open(path) as f:
            resumes = json.load(f).get("resumes", [])
        entry = {"from": str(training_args.resume_from_checkpoint), "changes": list(resume_changes)}
        if entry not in resumes:
            resumes.append(entry)
    run_args = {
        "model_args": dataclasses.asdict(model_args),
        "data_args": dataclasses.asdict(data_args),
        "training_args": training_args.to_dict(),  # tokens masked
        "resumes": resumes,
    }
    with open(path, "w") as f:
        json.dump(run_args, f, indent=2, default=str)


# What a resume must keep from the run it continues (else the checkpoint's optimizer state, sample order and queue
# belong to another run): compared with the run's `run_args.json`.
RESUME_FIXED_ARGUMENTS = {
    "training_args": ("seed", "global_batch_size", "gradient_accumulation_steps", "baseline"),
    "data_args": (
        "dataset_name", "dataset_config_name", "train_dir", "webvision_dir", "webvision_version", "shard_dir",
        "max_train_samples", "num_train", "noise_rate", "asymmetric_fraction", "ood_fraction",
    ),
}  # fmt: skip


def check_resume_arguments(checkpoint: str, model_args, data_args, training_args) -> list[str]:
    """The differences ("name: old -> new") between this resume's arguments and those of the run that wrote
    `checkpoint` (its folder's `run_args.json`, when there is one).

    Raises:
        ValueError: Differences, without `--allow_changed_resume`.
    """
    from evaluation.model_card import RUN_ARGS_FILE

    earlier = Path(checkpoint).resolve().parent / RUN_ARGS_FILE
    if not earlier.is_file():
        return []
    try:
        old = json.loads(earlier.read_text())
    except ValueError as error:
        raise ValueError(f"{earlier} is not valid JSON ({error}): cannot compare the resume with its run") from error
    new = {"training_args": training_args.to_dict(), "data_args": dataclasses.asdict(data_args)}
    changes = []
    for group, names in RESUME_FIXED_ARGUMENTS.items():
        for name in names:
            before, now = old.get(group, {}).get(name), new[group].get(name)
            if name in old.get(group, {}) and before != now and str(before) != str(now):
                changes.append(f"{name}: {before!r} -> {now!r}")
    if changes and not training_args.allow_changed_resume:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: this run differs from the one that wrote it ({'; '.join(changes)}): "
            "resume with its arguments, or pass --allow_changed_resume true (the changes are recorded in run_args.json)."
        )
    for change in changes:
        logger.warning("resuming with a changed argument (--allow_changed_resume): %s", change)
    return changes


def check_resume_model(checkpoint: str, config: MoProConfig) -> None:
    """The checkpoint's weights must fit the model of this run: the same classes, in the same order, and the same
    architecture (loading them would fail on shapes, or silently give the classifier's rows other meanings)."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return  # `check_checkpoint` names a checkpoint that cannot be read
    differences = []
    saved_labels = [
        str(saved.get("id2label", {}).get(str(i)))
        for i in range(int(saved.get("num_labels", len(saved.get("id2label", {})))))
    ]
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    if saved_labels != labels:
        differences.append(f"classes {saved_labels[:5]} in the checkpoint, {labels[:5]} in the data")
    for name in ARCHITECTURE_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            differences.append(f"{name} {saved[name]!r} in the checkpoint, {getattr(config, name)!r} here")
    if differences:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} belongs to another model: {'; '.join(differences)}; resume with "
            "the run's data and model flags, or start a new run without the flag."
        )


def noise_report(model: MoProForPreTraining, train_dataset, data_args: DataArguments, training_args) -> dict:
    """Per-sample noise decisions of the trained model on the training set, scored against the ground truth
    when the dataset keeps it (the demo does; the columns never reach training).

    Call it in every process: each one scores its own contiguous share (`PartialState.split_between_processes` in `evaluation.noise_report`),
    the main process gathers the rows and writes them, and every process returns the summary. A 2.4M-image
    training set scored by the main process alone would outlast the other processes' barrier timeout."""
    from evaluation.model_card import describe_training_data
    from evaluation.noise_report import NoiseReportOptions, write_noise_report

    if isinstance(train_dataset, torch.utils.data.IterableDataset):
        # A stream cannot be split into exact shares: the same source, read map-style (paths, or cached shards).
        train_dataset = training_set_for_report(data_args, seed=training_args.seed)
    if not hasattr(train_dataset, "column_names"):
        logger.info("noise report skipped: it needs a `datasets` training set")
        return {}
    dynamics = os.path.join(training_args.output_dir, SAMPLE_DYNAMICS_FILE)  # this run's, when it kept one
    summary = write_noise_report(
        model,
        train_dataset,
        output_dir=os.path.join(training_args.output_dir, "noise_report"),
        options=NoiseReportOptions(
            batch_size=training_args.per_device_eval_batch_size,
            num_workers=training_args.dataloader_num_workers,
            device=training_args.device,
            image_column=data_args.image_column_name,
            label_column=data_args.label_column_name,
            sample_dynamics=dynamics if os.path.isfile(dynamics) else None,
        ),
        data_description=f"the training set of {describe_training_data({'data_args': vars(data_args)}).name}",
        model_name=training_args.output_dir,  # where the model is saved
        passed_over=passed_over_counts(data_args.train_dir) if data_args.train_dir else None,
        # Rows named by their files: paths relative to the image folder or WebVision root, as `pseudo_label.json`
        # is read back (`evaluation.classifier_retrain --train_data_dir`); a `datasets` source by its id column.
        id_root=data_args.train_dir or data_args.webvision_dir,
    )
    # None (e.g. relabel precision with nothing relabelled) is kept: undefined, not zero.
    return {f"noise_{k}": v for k, v in summary.items() if v is None or isinstance(v, (int, float))}


if __name__ == "__main__":
    run_command(main)
