"""`MoProTrainer`: the transformers Trainer with MoPro's phase schedule, momentum update and loss logging.

Subclassed narrowly (as TRL does): `compute_loss` sets the phase from the epoch and records the loss components and
the noise decisions; `log` adds their averages; `create_optimizer` / `create_scheduler` take the official SGD and
step schedule from `training.optim`; the eval dataloader uses the test-view collator; `prepare_views` (called by
`compute_loss`) normalises uint8 batches on the device. The momentum
encoder is updated by a callback after every optimizer step. A checkpoint is checked (`check_checkpoint`) before it
is resumed from, and the count of skipped images is saved in it and continued on resume, as is the per-sample record
of the classifier's probabilities (`modeling_mopro.sample_dynamics`, saved by `save_sample_dynamics`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs, DynamoBackend, TorchDynamoPlugin
from safetensors import SafetensorError, safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from modeling_mopro import MoProForPreTraining, MoProPhase
from modeling_mopro.modeling_mopro import pixel_statistics_on
from modeling_mopro.sample_dynamics import MAX_AUTO_ELEMENTS, SAMPLE_DYNAMICS_FILE, SampleDynamics

from .arguments import steps_per_epoch
from .correction_schedule import AdaptiveCorrectionSchedule, chance_fit, phase_for_epoch, whole_epochs
from .data.gpu_augment import EncodedImages, GpuViewAugment, decode_on_device
from .data.sources import StreamedEpochs
from .data.transforms import normalize_pixels
from .optim import create_optimizer, step_lr_scheduler
from .run_folder import claim_output_dir, publish_checkpoint, staging_folder

logger = logging.getLogger(__name__)

# Order of the per-step statistics vector gathered across processes.
_STATS = (
    "loss_cls", "loss_instance", "loss_prototype", "samples", "kept", "relabeled", "skipped_images",
    "classifier_prototype_agreement", "fit_given_labels",
)  # fmt: skip
# The statistics a correction schedule reads at the end of each epoch (`training.correction_schedule`), followed in
# the epoch's signal vector, for the adaptive schedule, by two per-class counts (K each): the classifier's argmax and
# the given labels.
_SIGNALS = ("samples", "classifier_prototype_agreement", "fit_given_labels")


class MomentumEncoderCallback(TrainerCallback):
    """EMA of the query parameters into the momentum encoder, once per optimizer step.

    The official code updates at the start of each forward; updating right after each optimizer step gives the
    same key encoder for every forward (the very first official update is a no-op, since both encoders are
    equal), and unlike an update in `forward` it happens once per step under gradient accumulation.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if isinstance(model, MoProForPreTraining):
            model.update_momentum_encoder()


class CollatorEpochCallback(TrainerCallback):
    """Tell the training collator the epoch, so per-sample augmentation seeds are (seed, epoch, sample id)."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(whole_epochs(state.epoch))


class ResumeCallback(TrainerCallback):
    """On a resumed run (the checkpoint's `trainer_state.json` is the state now), `MoProTrainer.restore_run_state`."""

    def __init__(self, trainer: MoProTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self.trainer.restore_run_state()


class SkippedImagesState(TrainerCallback, ExportableState):
    """Writes the trainer's count of skipped images into every checkpoint's `trainer_state.json`
    (`stateful_callbacks`), from which `MoProTrainer` continues it on resume."""

    def __init__(self, trainer: MoProTrainer | None = None):
        self.trainer = trainer

    def state(self) -> dict:
        return {"args": {}, "attributes": {"skipped_images": self.trainer.skipped_images if self.trainer else 0}}


class CorrectionScheduleState(TrainerCallback, ExportableState):
    """Writes the correction schedule's state and the current epoch's signal sums into every checkpoint, from which
    `MoProTrainer` restores them on resume, so that a resumed adaptive run starts correcting when the whole run
    would have."""

    def __init__(self, trainer: MoProTrainer | None = None):
        self.trainer = trainer

    def state(self) -> dict:
        trainer = self.trainer
        if trainer is None:
            return {"args": {}, "attributes": {}}
        sums = trainer._epoch_signals
        return {
            "args": {},
            "attributes": {
                "schedule": trainer.correction_schedule.state_dict(),
                "signals_epoch": trainer._signals_epoch,
                "epoch_signals": None if sums is None else sums.tolist(),
            },
        }


# The Trainer methods overridden here (and in `evaluation.finetune.StepDecayTrainer`) that transformers keeps private,
# for want of a public hook doing their job; `tests/test_trainer.py` fails if an upgrade renames or reshapes one.
PRIVATE_TRAINER_HOOKS = {
    "_build_accelerator_args": "compile only the backbones; DDP without the unused-parameter search for MoPro",
    "_save_checkpoint": "write each checkpoint under a staging name and publish it complete",
    "_get_output_dir": "the staging folder while a checkpoint is saved",
    "_get_train_sampler": "classifier retraining's class-balanced sampler",
}

# The files without which a checkpoint does not resume the run it was saved from (the Trainer would start the
# optimizer, learning-rate schedule or step count afresh without a word).
CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


def check_checkpoint(folder: str | os.PathLike) -> None:
    """Raise a `ValueError` naming the file if `folder` cannot resume a run: a missing weights, optimizer,
    scheduler or trainer-state file, or weights with non-finite values (a run resumed from them trains NaN)."""
    folder = str(folder)
    missing = [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(folder, name))]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        weight_files = ["model.safetensors"]
    missing += [name for name in weight_files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ValueError(
            f"checkpoint {folder} lacks {', '.join(missing)}: it cannot resume the run exactly; resume from another "
            "checkpoint-N folder, or start without --resume_from_checkpoint."
        )
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"checkpoint {folder}: trainer_state.json is not valid JSON ({error}; cut short?): resume from another "
            "checkpoint-N folder."
        ) from error
    for name in weight_files:
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as weights:
                for key in weights.keys():
                    tensor = weights.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise ValueError(
                            f"checkpoint {folder}: {name} holds non-finite values in {key!r} (corrupted, or the run "
                            "diverged): resume from an earlier checkpoint-N folder."
                        )
        except SafetensorError as error:  # a truncated or garbled file: its header or data cannot be read
            raise ValueError(
                f"checkpoint {folder}: {name} cannot be read ({error}; cut short?): resume from another "
                "checkpoint-N folder."
            ) from error


def _check_momentum_bn_groups(model, args) -> None:
    """One process: each virtual BatchNorm group of the key encoder needs 2 keys (a short batch uses fewer groups,
    but a per-device batch that can never fill them is a configuration error)."""
    if not isinstance(model, MoProForPreTraining) or args.world_size > 1:
        return
    groups = model.config.momentum_encoder_bn_groups
    if groups > 1 and args.per_device_train_batch_size < 2 * groups:
        raise ValueError(
            f"per-device batch {args.per_device_train_batch_size} is too small for `momentum_encoder_bn_groups`="
            f"{groups} (2 keys per group): raise the batch or pass --momentum_encoder_bn_groups "
            f"{max(args.per_device_train_batch_size // 2, 1)}."
        )


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask, as under a container's or a scheduler's CPU limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_dataloader_workers(cores: int, local_processes: int) -> tuple[int, int]:
    """(workers, prefetch factor) for one of `local_processes` training processes sharing `cores`.

    Each process gets its share of the cores, less one for itself (it feeds the GPU: collation results, copies,
    the optimizer step's Python). At ~480 images/s per core for the two views (BENCHMARKS.md), a 32-image
    per-rank step at 2,000 images/s needs 4-5 worker cores: 8 GPUs want 40+ cores. Prefetch 4 batches per worker
    rides out slow files (web JPEGs vary 10x in size) without much memory (uint8 views: ~10 MB per batch).
    """
    share = max(cores // max(local_processes, 1), 1)
    return max(share - 1, 1), 4


def compile_backbones(model: torch.nn.Module, backend: str, mode: str | None = None) -> list[str]:
    """`torch.compile` the feature extractor of every timm backbone in `model` (query and momentum encoder), in
    place; returns the names of the compiled backbones.

    Why not the whole model (what the Trainer's `torch_compile` does): the compiled wrapper hides the MoPro class
    from `compute_loss`, which then drops the key view and never advances the phase; and MoPro's forward branches on
    the phase and updates the queue and prototypes in place, which would break graphs and recompile. The backbones
    hold nearly all the compute. `forward_features` is what both encoders call (timm's `forward` is
    `forward_head(forward_features(x))`), and replacing it on the instance leaves the parameters, their names and
    the checkpoints unchanged."""
    compiled = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "backbone" and hasattr(module, "forward_features"):
            module.forward_features = torch.compile(module.forward_features, backend=backend, mode=mode)
            compiled.append(name)
    return compiled


class MoProTrainer(Trainer):
    """Trainer for `MoProForPreTraining` (or, with `args.baseline == "ce"`, for a plain CE classifier).

    Args:
        eval_data_collator: collator of the evaluation set (test view). Training batches use `data_collator`.
        Everything else as `transformers.Trainer`; `args` is a `MoProTrainingArguments`.
    """

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if hasattr(training_args, "resolve_batch_size"):
            # `global_batch_size` -> per-device batch for the real number of processes, before Trainer reads it.
            training_args.resolve_batch_size(training_args.world_size)
        self._compile_request: tuple[str, str | None] | None = None
        super().__init__(*args, **kwargs)
        self._apply_compile_request()
        self._record_effective_precision()
        _check_momentum_bn_groups(self.accelerator.unwrap_model(self.model), self.args)
        self._configure_speed_options()
        self.eval_data_collator = eval_data_collator
        self.add_callback(MomentumEncoderCallback())
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(CollatorEpochCallback(self.data_collator))
        self._stats_sum: torch.Tensor | None = None
        self._skipped_total = 0
        self.add_callback(SkippedImagesState(self))
        # The correction schedule reads each finished epoch's signals: their sums over the epoch so far, and the
        # epoch they belong to.
        self.correction_schedule = self.args.correction_schedule()
        self._epoch_signals: torch.Tensor | None = None
        self._signals_epoch = 0
        self.add_callback(CorrectionScheduleState(self))
        self.add_callback(ResumeCallback(self))
        # The per-sample record of the classifier's probabilities: sized at the first training step, from the
        # checkpoint resumed from when it holds one.
        self.sample_dynamics: SampleDynamics | None = None
        self._sample_dynamics_decided = False
        self._resumed_from: str | None = None

    # ------------------------------------------------------------------------------ compile and precision
    def _build_accelerator_args(self, **kwargs) -> dict:
        args = super()._build_accelerator_args(**kwargs)
        # torch.compile asked by `--torch_compile true` or by the accelerate config (ACCELERATE_DYNAMO_BACKEND): taken
        # from Accelerate, which would compile the whole model, and applied to the backbones (`compile_backbones`).
        plugin = args.get("dynamo_plugin")
        if plugin is not None and plugin.backend != DynamoBackend.NO:
            self._compile_request = (plugin.backend.value.lower(), plugin.mode)
            args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        if self.args.ddp_find_unused_parameters is None and isinstance(self.model, MoProForPreTraining):
            # MoPro uses every trainable parameter in every phase (tests/test_rehearsal_fixes.py checks it), so DDP
            # need not search the graph for unused ones after each backward (the Trainer's default for a
            # PreTrainedModel). The CE baseline leaves the projection head unused and keeps the default.
            args["kwargs_handlers"] = [
                DistributedDataParallelKwargs(**{**handler.to_kwargs(), "find_unused_parameters": False})
                if isinstance(handler, DistributedDataParallelKwargs)
                else handler
                for handler in args["kwargs_handlers"]
            ]
        return args

    def _apply_compile_request(self) -> None:
        if self._compile_request is None:
            return
        backend, mode = self._compile_request
        compiled = compile_backbones(self.model, backend, mode)
        if not compiled:
            raise ValueError(
                f"torch.compile was asked (backend {backend}) but {type(self.model).__name__} has no timm backbone to "
                "compile: drop --torch_compile (and ACCELERATE_DYNAMO_BACKEND)."
            )
        # What ran, where `run_args.json` and the model card read it (the accelerate config may have asked for it).
        self.args.torch_compile, self.args.torch_compile_backend, self.args.torch_compile_mode = True, backend, mode
        logger.info(
            "torch.compile (backend %s): %s; heads, losses and the MoPro phases run eagerly", backend, compiled
        )

    def _record_effective_precision(self) -> None:
        """The precision the accelerator trains in, written into `args`: the user's accelerate config
        (ACCELERATE_MIXED_PRECISION) applies bf16/fp16 autocast without `--bf16`, and `run_args.json`, the model card
        and the logs must say what ran."""
        precision = self.accelerator.mixed_precision
        for name in ("bf16", "fp16"):
            if precision == name and not getattr(self.args, name):
                logger.warning(
                    "precision %s from the accelerate config (ACCELERATE_MIXED_PRECISION=%s), not from --%s: the "
                    "backbones train under %s autocast, a departure from the official fp32",
                    name, precision, name, name,
                )  # fmt: skip
                setattr(self.args, name, True)

    # ------------------------------------------------------------------------------------------- schedule
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (`training.arguments.steps_per_epoch`, shared with `training.plan`); for
        streaming data, an epoch is `args.samples_per_epoch` samples."""
        args = self.args
        if args.samples_per_epoch:
            num_samples, streamed = args.samples_per_epoch, True
        elif hasattr(self.train_dataset, "__len__"):
            num_samples, streamed = len(self.train_dataset), False
        else:
            raise ValueError("a streamed training set has no length: set `samples_per_epoch` for the epoch schedule")
        return steps_per_epoch(
            num_samples,
            args.per_device_train_batch_size,
            args.world_size,
            args.gradient_accumulation_steps,
            streamed=streamed,
            drop_last=args.dataloader_drop_last,
        )

    def current_epoch(self) -> float:
        return self.state.global_step / self.steps_per_epoch()

    def current_phase(self) -> MoProPhase:
        epoch = self.current_epoch()
        if self.correction_schedule.strength(epoch) > 0:
            return MoProPhase.NOISE_CORRECTION
        return phase_for_epoch(epoch, self.args.prototype_start_epoch, math.inf)

    def _end_finished_epochs(self) -> None:
        """Feed the schedule the signals of every epoch that ended since the last step (one host sync per epoch)."""
        epoch = self.state.global_step // self.steps_per_epoch()
        while self._signals_epoch < epoch:
            values = [0.0] * len(_SIGNALS) if self._epoch_signals is None else self._epoch_signals.tolist()
            sums = dict(zip(_SIGNALS, values[: len(_SIGNALS)], strict=True))
            counts = values[len(_SIGNALS) :]  # empty in a checkpoint of a partial epoch saved before they existed
            if sums["samples"] > 0:
                decided = self.correction_schedule.start_epoch
                agreement = sums["classifier_prototype_agreement"] / sums["samples"]
                fit = sums["fit_given_labels"] / sums["samples"]
                half = len(counts) // 2
                chance = chance_fit(counts[:half], counts[half:]) if counts else None
                self.correction_schedule.end_epoch(self._signals_epoch, agreement, fit, chance)
                if self.correction_schedule.start_epoch != decided and self.is_world_process_zero():
                    logger.info(
                        f"noise correction starts at epoch {self._signals_epoch + 1}: classifier and prototypes agree "
                        f"on {agreement:.1%} of epoch {self._signals_epoch}'s samples, which fit their given label "
                        f"{fit:.1%} of the time" + ("" if chance is None else f" (class shares alone: {chance:.1%})")
                    )
            self._epoch_signals = None
            self._signals_epoch += 1

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model if model is None else model, self.args)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if not self.args.lr_milestones:
            return super().create_scheduler(num_training_steps, optimizer)
        # Built anew at every `train()` (the epoch length may have changed); a resume then loads its state.
        self.lr_scheduler = step_lr_scheduler(
            optimizer or self.optimizer, self.args.lr_milestones, self.steps_per_epoch(), self.args.lr_gamma
        )
        return self.lr_scheduler

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written under a staging name and renamed to ``checkpoint-N`` once complete
        (`training.run_folder`): a full disk or a kill during the save leaves no ``checkpoint-N`` that cannot
        resume. The main process checks first that it still owns the output folder."""
        run_dir = super()._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged_root = staging_folder(run_dir, name)
        if self.args.should_save:
            claim_output_dir(run_dir)
            shutil.rmtree(staged_root, ignore_errors=True)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()  # every process writes its RNG state into the staging folder
        self._staging_root = str(staged_root)
        try:
            super()._save_checkpoint(model, trial)  # into staged_root/checkpoint-N (`_get_output_dir`)
            self.save_sample_dynamics(staged_root / name)
            self.accelerator.wait_for_everyone()
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staged_root, ignore_errors=True)
            raise
        finally:
            self._staging_root = None
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staged_root:  # set by the Trainer to this checkpoint, where it is staged
                self.state.best_model_checkpoint = str(Path(run_dir) / Path(best).name)
                self.state.save_to_json(str(staged_root / name / "trainer_state.json"))
            publish_checkpoint(staged_root / name, Path(run_dir) / name)
            shutil.rmtree(staged_root, ignore_errors=True)
            # The Trainer rotated inside the staging folder (one checkpoint): rotate among the published ones.
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False,
            )  # fmt: skip
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, the Trainer's "run folder" is the staging folder (`_save_checkpoint`).
        return getattr(self, "_staging_root", None) or super()._get_output_dir(trial=trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the Trainer's own choice of checkpoint
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or resume_from_checkpoint
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_checkpoint(resume_from_checkpoint)  # before any weight is loaded
            self._resumed_from = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def restore_run_state(self) -> None:
        """On resume (`ResumeCallback`), continue the checkpoint's count of skipped images and correction schedule."""
        name = SkippedImagesState.__name__
        saved = self.state.stateful_callbacks.get(name)
        if saved is not None:
            self._skipped_total = int(saved["attributes"]["skipped_images"])
        else:  # a checkpoint written before the count was saved: its last logged value
            logged = [entry["skipped_images"] for entry in self.state.log_history if "skipped_images" in entry]
            self._skipped_total = int(logged[-1]) if logged else 0
            self.state.stateful_callbacks[name] = {}  # the Trainer updates the entries it finds when saving
        self._stats_sum = None
        name = CorrectionScheduleState.__name__
        saved = self.state.stateful_callbacks.get(name)
        self.correction_schedule = self.args.correction_schedule()
        self._epoch_signals, self._signals_epoch = None, 0
        if saved:
            attributes = saved["attributes"]
            self.correction_schedule.load_state_dict(attributes["schedule"])
            self._signals_epoch = attributes["signals_epoch"]
            if attributes["epoch_signals"] is not None:
                self._epoch_signals = torch.tensor(attributes["epoch_signals"], device=self.args.device)
        else:  # a checkpoint written before the schedule was saved: a fixed schedule needs nothing
            if self.args.noise_correction_schedule != "fixed":
                raise ValueError(
                    "this checkpoint holds no correction-schedule state (saved before the adaptive schedule existed): "
                    "resume it with --noise_correction_schedule fixed, or start the run again."
                )
            self._signals_epoch = self.state.global_step // self.steps_per_epoch()
            self.state.stateful_callbacks[name] = {}
        for callback in self.callback_handler.callbacks:  # re-created by the Trainer if it restored callbacks
            if isinstance(callback, (SkippedImagesState, CorrectionScheduleState)):
                callback.trainer = self

    # ------------------------------------------------------------------------------------------------ speed
    def _configure_speed_options(self) -> None:
        """The speed options of `MoProTrainingArguments` (README "Speed"): none changes what is computed beyond float
        rounding, except `gpu_augment`, whose views have the CPU path's distributions but other random draws."""
        args, model = self.args, self.accelerator.unwrap_model(self.model)
        # The official train.py sets cudnn.benchmark: fixed shapes (drop_last) make its one-off search pay. It only
        # changes which convolution algorithm runs; full determinism wants it off (transformers turns it off).
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark and not args.full_determinism)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)  # 4-d weights: both encoders' convolutions
        transforms = getattr(self.data_collator, "transforms", None)
        if isinstance(model, MoProForPreTraining):
            # The collator already checked every label against the model's classes (on the host, per example):
            # the model's own check would read the labels back from the device at every step.
            if getattr(self.data_collator, "num_labels", None) == model.config.num_labels:
                model.validate_labels = False
            if args.uint8_key_batches:
                if transforms is None:
                    raise ValueError("--uint8_key_batches needs a MoProCollator (its transforms hold mean and std).")
                model.set_key_pixel_normalization(transforms.mean, transforms.std)
        if args.auto_dataloader_workers:
            args.dataloader_num_workers, args.dataloader_prefetch_factor = auto_dataloader_workers(
                available_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            )
            logger.info(
                "--auto_dataloader_workers: %d workers per process, prefetch factor %d",
                args.dataloader_num_workers, args.dataloader_prefetch_factor,
            )  # fmt: skip
        self._view_augment = None
        if args.gpu_augment:
            view_augment = getattr(self.data_collator, "view_augment", None)
            if not isinstance(view_augment, GpuViewAugment):
                raise ValueError(
                    "--gpu_augment needs a `training.data.gpu_augment.GpuAugmentCollator` as data collator."
                )
            self._view_augment = view_augment

    # ----------------------------------------------------------------------------------------------- data
    def prepare_views(self, inputs: dict) -> dict:
        """The batch's views as the model takes them (`compute_loss` calls it on the batch the Trainer put on the
        device): decoded and augmented there with --gpu_augment, uint8 views normalised, channels_last."""
        # The GPU data path's encoded images stayed on the host side (not a tensor): nvJPEG reads its input there.
        encoded = inputs.pop("encoded_images", None)
        if isinstance(encoded, EncodedImages):
            inputs = self._views_on_device(encoded, inputs)
        # uint8 views (`MoProCollator(uint8_training_views=True)`) are normalised here, on the device, a batch at a
        # time: cheaper than in the workers, and 4x less data through shared memory and host-to-device copies.
        # The mean and std are those of the collator's own transforms, which made the views. With
        # --uint8_key_batches the model normalises the key batch itself, after shuffle-BN's gather.
        model = self.accelerator.unwrap_model(self.model)
        keys_in_model = getattr(model, "key_pixel_normalization", None) is not None
        for name in ("pixel_values", "pixel_values_key"):
            if (
                name in inputs
                and inputs[name].dtype == torch.uint8
                and not (name == "pixel_values_key" and keys_in_model)
            ):
                inputs[name] = normalize_pixels(inputs[name], *self._pixel_normalization(inputs[name].device))
        if self.args.channels_last:
            for name in ("pixel_values", "pixel_values_key"):
                if name in inputs and inputs[name].dim() == 4:
                    inputs[name] = inputs[name].contiguous(memory_format=torch.channels_last)
        return inputs

    def _pixel_normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The collator's mean and std as (3, 1, 1) tensors on `device`, made once (not copied at every step)."""
        transforms = getattr(self.data_collator, "transforms", None)
        if transforms is None:
            raise ValueError("uint8 pixel batches need a `MoProCollator` (its transforms hold mean and std).")
        return pixel_statistics_on(device, tuple(transforms.mean), tuple(transforms.std))

    def _views_on_device(self, encoded: EncodedImages, inputs: dict) -> dict:
        """`--gpu_augment`: decode the batch on the device and make its (weak, strong) uint8 views there."""
        device = self.args.device
        images, kept = decode_on_device(encoded, device)
        if len(kept) < len(encoded):  # JPEGs that neither nvJPEG nor PIL could read: skipped, as in the CPU path
            index = torch.tensor(kept, dtype=torch.long, device=inputs["labels"].device)
            for name in ("labels", "sample_ids"):
                if name in inputs:
                    inputs[name] = inputs[name][index]
            if "num_skipped_images" in inputs:
                inputs["num_skipped_images"] = inputs["num_skipped_images"] + (len(encoded) - len(kept))
        model = self.accelerator.unwrap_model(self.model)
        weak, strong = self._view_augment(images, key_view=isinstance(model, MoProForPreTraining), device=device)
        inputs["pixel_values"] = weak
        if strong is not None:
            inputs["pixel_values_key"] = strong
        return inputs

    def get_train_dataloader(self):
        # A streamed training set: epochs of `steps_per_epoch` steps on every process, whatever the shard layout
        # (`training.data.sources.StreamedEpochs`); map-style data keeps the Trainer's loader.
        dataloader = super().get_train_dataloader()
        if hasattr(self.train_dataset, "__len__") or not self.args.samples_per_epoch:
            return dataloader
        if self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0:
            raise ValueError(
                "--dataloader_persistent_workers true with a streamed training set: persistent workers keep the "
                "first pass's shard order and augmentation seeds for every pass; leave it false when streaming."
            )
        steps = self.steps_per_epoch()
        budget = self.args.max_steps if self.args.max_steps > 0 else math.ceil(self.args.num_train_epochs) * steps
        return StreamedEpochs(
            dataloader,
            batches_per_epoch=steps * self.args.gradient_accumulation_steps,
            num_epochs=math.ceil(budget / steps),
            batch_size=self.args.per_device_train_batch_size,
            drop_last=self.args.dataloader_drop_last,
            collator=self.data_collator,
        )

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        if isinstance(dataloader, StreamedEpochs):  # the epoch's stream from its start, the first batches left out
            return dataloader.skipping(num_batches)
        return super().get_resumed_dataloader(dataloader, num_batches)

    def get_eval_dataloader(self, eval_dataset=None):
        # Evaluation sees every sample: `dataloader_drop_last` (needed for equal training batches across
        # processes) would otherwise silently drop the test set's last partial batch.
        train_collator, drop_last = self.data_collator, self.args.dataloader_drop_last
        self.data_collator = self.eval_data_collator or train_collator
        self.args.dataloader_drop_last = False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator, self.args.dataloader_drop_last = train_collator, drop_last

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.prepare_views(inputs)
        num_skipped = inputs.pop("num_skipped_images", None)
        sample_ids = inputs.pop("sample_ids", None)  # per-sample bookkeeping
        unwrapped = self.accelerator.unwrap_model(model)
        correcting = False
        if not isinstance(unwrapped, MoProForPreTraining):
            inputs.pop("pixel_values_key", None)  # the CE baseline sees the weak view only
        elif model.training:
            self._end_finished_epochs()
            phase = self.current_phase()
            correcting = phase == MoProPhase.NOISE_CORRECTION
            unwrapped.set_phase(phase)  # a device-side fill: reading the phase first would wait for the device
            if phase == MoProPhase.NOISE_CORRECTION:
                unwrapped.set_correction_strength(self.correction_schedule.strength(self.current_epoch()))
        if isinstance(unwrapped, MoProForPreTraining) and unwrapped.config.noise_correction_rule == "queue_vote":
            inputs["sample_ids"] = sample_ids  # keeps a sample's own queued keys out of its neighbour vote
        outputs = model(**inputs)
        if model.training:
            self._record(outputs, inputs["labels"], num_skipped)
            # Until correction begins: from then on the classifier learns its own corrections, and its probabilities
            # would confirm them (`modeling_mopro.sample_dynamics`).
            if sample_ids is not None and not correcting and self._sample_dynamics_for(outputs.logits) is not None:
                self.sample_dynamics.update(sample_ids, outputs.logits, inputs["labels"])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    @torch.no_grad()
    def _record(self, outputs, labels: torch.Tensor, num_skipped: torch.Tensor | None) -> None:
        """Accumulate this step's statistics over all processes (one small all-gather, no host sync)."""
        device = labels.device
        zero = torch.zeros((), device=device)

        def value(name):
            v = outputs.get(name) if hasattr(outputs, "get") else None
            return zero if v is None else v.detach().float().reshape(())

        keep = outputs.get("keep_mask")
        relabel = outputs.get("relabel_mask")
        logits, prototype_logits = outputs.get("logits"), outputs.get("prototype_logits")
        predicted = logits.detach().argmax(1)
        agree = zero if prototype_logits is None else (predicted == prototype_logits.detach().argmax(1)).sum().float()
        n = torch.full((), float(labels.numel()), device=device)  # a fill: a host-to-device copy would sync
        stats = torch.stack(
            [
                value("loss_cls") * n,
                value("loss_instance") * n,
                value("loss_prototype") * n,
                n,
                n if keep is None else keep.sum().float(),
                zero if relabel is None else relabel.sum().float(),
                zero if num_skipped is None else num_skipped.to(device).float().reshape(()),
                agree,
                (predicted == labels).sum().float(),
            ]
        )
        if isinstance(self.correction_schedule, AdaptiveCorrectionSchedule):  # the fixed one reads no signal
            # Per-class counts of the classifier's argmax and of the given labels, for the schedule's chance fit:
            # scatter_add, not bincount or a boolean index, which would sync with the host on a GPU.
            num_classes = logits.shape[1]
            valid = (labels >= 0).float()  # no negative label reaches training; counted out all the same
            counts = torch.zeros(2, num_classes, device=device)
            counts[0].scatter_add_(0, predicted, torch.ones_like(valid))
            counts[1].scatter_add_(0, labels.clamp(0, num_classes - 1), valid)
            stats = torch.cat([stats, counts.flatten()])
        gathered = self.accelerator.gather(stats[None]).sum(0)  # summed over processes
        stats, counts = gathered[: len(_STATS)], gathered[len(_STATS) :]
        self._stats_sum = stats if self._stats_sum is None else self._stats_sum + stats
        signals = torch.cat([stats[[_STATS.index(name) for name in _SIGNALS]], counts])
        if self._epoch_signals is not None and len(self._epoch_signals) != len(signals):
            # resumed from a checkpoint saved before the counts existed (or by a run of the other schedule): keep
            # its sums, count from here on
            self._epoch_signals = torch.cat([self._epoch_signals[: len(_SIGNALS)], torch.zeros_like(counts)])
        self._epoch_signals = signals if self._epoch_signals is None else self._epoch_signals + signals

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._stats_sum is not None and "loss" in logs:  # training logs only
            s = dict(zip(_STATS, self._stats_sum.tolist(), strict=True))
            samples = max(s["samples"], 1.0)
            self._skipped_total += int(s["skipped_images"])
            logs.update(
                {
                    "loss_cls": s["loss_cls"] / samples,
                    "fraction_kept": s["kept"] / samples,
                    "fraction_relabeled": s["relabeled"] / samples,
                    "fraction_ood": 1.0 - s["kept"] / samples,
                    "fit_given_labels": s["fit_given_labels"] / samples,
                    "skipped_images": self._skipped_total,
                }
            )
            model = self.accelerator.unwrap_model(self.model)
            if isinstance(model, MoProForPreTraining):
                logs["loss_instance"] = s["loss_instance"] / samples
                logs["loss_prototype"] = s["loss_prototype"] / samples
                logs["phase"] = int(model.current_phase)  # the phase of the last step logged
                logs["classifier_prototype_agreement"] = s["classifier_prototype_agreement"] / samples
                logs["correction_strength"] = self.correction_schedule.strength(self.current_epoch())
            self._stats_sum = None
        super().log(logs, start_time)

    @property
    def skipped_images(self) -> int:
        """Undecodable images skipped so far in this run, over all processes."""
        pending = 0 if self._stats_sum is None else int(self._stats_sum[_STATS.index("skipped_images")])
        return self._skipped_total + pending

    # ------------------------------------------------------------------------------------- sample dynamics
    def _sample_dynamics_for(self, logits: torch.Tensor) -> SampleDynamics | None:
        """The run's record, made at the first training step (sized from the training set, continued from the
        checkpoint resumed from); None when it is not kept (`--record_sample_dynamics`), logged once."""
        if not self._sample_dynamics_decided:
            self._sample_dynamics_decided = True
            size, reason = sample_dynamics_size(self.train_dataset, logits.shape[1], self.args.record_sample_dynamics)
            if not size:
                logger.info("per-sample training dynamics not recorded: %s", reason)
                return None
            self.sample_dynamics = self._resumed_sample_dynamics(size, logits.shape[1], logits.device)
            logger.info(
                "recording per-sample training dynamics: %d samples x %d classes (%.0f MiB on %s)",
                size, logits.shape[1], size * logits.shape[1] * 4 / 2**20, logits.device,
            )  # fmt: skip
        return self.sample_dynamics

    def _resumed_sample_dynamics(self, size: int, num_classes: int, device: torch.device) -> SampleDynamics:
        saved = None if self._resumed_from is None else Path(self._resumed_from) / SAMPLE_DYNAMICS_FILE
        if saved is None:
            return SampleDynamics(size, num_classes, device)
        if not saved.is_file():
            logger.warning(
                "%s holds no per-sample record: the record covers the steps from the resume on", saved.parent
            )
            return SampleDynamics(size, num_classes, device)
        # The saved sums once, in the main process; the others add theirs from zero (the save sums them all).
        record = SampleDynamics.load(saved, device, main=self.is_world_process_zero())
        if (record.num_samples, record.num_classes) != (size, num_classes):
            logger.warning(
                "%s records %d samples x %d classes, this run's data %d x %d: the record starts afresh",
                saved, record.num_samples, record.num_classes, size, num_classes,
            )  # fmt: skip
            return SampleDynamics(size, num_classes, device)
        return record

    def save_sample_dynamics(self, folder: str | os.PathLike) -> None:
        """The record, summed over processes, into `folder/sample_dynamics.safetensors` (main process). Call it in
        every process (a collective when distributed); nothing when the run keeps no record."""
        if self.sample_dynamics is not None:
            self.sample_dynamics.save(folder, write=self.args.should_save)


def sample_dynamics_size(dataset, num_classes: int, mode: str = "auto") -> tuple[int, str]:
    """How many samples the per-sample record holds for `dataset` (max sample_id + 1), or 0 and why it is not kept.

    `mode` "off" keeps none; "auto" keeps it for a map-style `datasets.Dataset` with a ``sample_id`` column up to
    `MAX_AUTO_ELEMENTS` entries (samples x classes); "on" whatever the size."""
    import datasets
    import pyarrow.compute as pc

    if mode == "off":
        return 0, "--record_sample_dynamics off"
    if not isinstance(dataset, datasets.Dataset) or "sample_id" not in dataset.column_names:
        return (
            0,
            "the training set is not a map-style `datasets.Dataset` with a sample_id column (a stream, or no ids)",
        )
    if len(dataset) == 0:
        return 0, "the training set is empty"
    bounds = pc.min_max(dataset.data.column("sample_id"))  # the whole table: a superset of a `select`ed view's
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low < 0:
        return 0, f"the training set has a negative sample_id ({low}); ids must be positions 0..N-1"
    size = high + 1
    if mode == "auto" and size * num_classes > MAX_AUTO_ELEMENTS:
        return 0, (
            f"{size} samples x {num_classes} classes would take {size * num_classes * 4 / 2**30:.1f} GiB of device "
            f"memory, above the automatic limit of {MAX_AUTO_ELEMENTS * 4 / 2**30:.1f} GiB (--record_sample_dynamics "
            "on keeps it)"
        )
    return size, ""
