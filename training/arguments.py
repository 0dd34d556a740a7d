"""Argument dataclasses of `training/run_mopro.py`, parsed (`parse_args`) by `HfArgumentParser` from YAML and the
command line, and the model config they build (`build_config`, `load_config`; `training.plan` reads the same).

Model hyperparameters live in `MoProConfig`; these dataclasses only say how to build it, where the data is, and
the schedule (phase starts, learning-rate milestones), which belongs to training rather than to the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from modeling_mopro import MoProConfig

from .correction_schedule import SCHEDULES, AdaptiveCorrectionSchedule, FixedCorrectionSchedule
from .data.sources import DataArguments
from .own_data import (
    OWN_DATA_CONFIG,
    OWN_DATA_SOURCES,
    choose_image_size,
    choose_length,
    folder_listing,
    milestones_for,
)

logger = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


@dataclass
class _RunModelArguments:
    """Which model to train; with every `MoProConfig` field as a flag (`ModelArguments`: its type, and its help from
    the config's docstring). Those default to None ("not given"): a new model takes MoProConfig's (official) defaults,
    a model loaded with `model_name_or_path` keeps its own, and a given architecture field that differs is an error."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved MoPro folder to start from (release or training model)."}
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={
            "help": "Normalisation mean of the training views and of the image processor saved with the model. "
            "Default: the processor of --model_name_or_path, else ImageNet's."
        },
    )
    image_std: list[float] | None = field(default=None, metadata={"help": "Normalisation std, as --image_mean."})

    def __post_init__(self):
        _check_finite(self)

    def config_values(self) -> dict:
        """The MoProConfig fields that were given (YAML or command line), `backbone_kwargs` decoded."""
        values = {name: getattr(self, name) for name in MODEL_FIELDS}
        if values["backbone_kwargs"] is not None:
            values["backbone_kwargs"] = json.loads(values["backbone_kwargs"])
        return {name: value for name, value in values.items() if value is not None}


def _config_field_docs() -> dict[str, str]:
    """`MoProConfig`'s docstring, field name -> its description on one line."""
    docs, name = {}, None
    for line in MoProConfig.__doc__.split("Args:")[1].split("Example:")[0].splitlines():
        if match := re.match(r" {8}(\w+) \(", line):
            name = match.group(1)
            docs[name] = ""
        elif name and line.strip():
            docs[name] = f"{docs[name]} {line.strip()}".strip()
    return docs


# The MoPro hyperparameters, declared once: `MoProConfig`'s own fields (in its order).
_CONFIG_FIELDS = vars(MoProConfig)["__annotations__"]
MODEL_FIELDS = tuple(name for name, kind in _CONFIG_FIELDS.items() if "ClassVar" not in str(kind))
_FLAG_TYPES = {"str": str, "int": int, "float": float, "bool": bool}  # anything else (a dict) is given as JSON


def _model_argument(name: str, doc: str) -> tuple:
    kind = str(_CONFIG_FIELDS[name])
    default = MoProConfig.__dataclass_fields__[name].default
    help_text = f"{doc} {'' if kind in _FLAG_TYPES else 'Given as JSON. '}Unset: {default!r} for a new model."
    help_text = help_text.replace("%", "%%")  # argparse formats help with %
    return name, _FLAG_TYPES.get(kind, str) | None, field(default=None, metadata={"help": help_text})


_DOCS = _config_field_docs()
ModelArguments = dataclasses.make_dataclass(
    "ModelArguments", [_model_argument(name, _DOCS[name]) for name in MODEL_FIELDS], bases=(_RunModelArguments,)
)
ModelArguments.__module__ = __name__
# MoProConfig fields that shape the weights (or only their initialisation): fixed once a model exists.
ARCHITECTURE_FIELDS = (
    "backbone", "backbone_kwargs", "image_size", "embedding_size", "projection_hidden_size", "queue_size",
    "backbone_zero_init_last",
)  # fmt: skip
# The others are read at every step: a run may change them on a loaded model.
HYPERPARAMETER_FIELDS = tuple(name for name in MODEL_FIELDS if name not in ARCHITECTURE_FIELDS)


@dataclass
class MoProTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the MoPro schedule. Epochs are 0-indexed, as in the official code."""

    # The collators decode raw image columns, which the model's forward does not name.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for the collator."})
    # all_gather of keys and embeddings expects equal per-process batches, as in the official code.
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch."})
    # The official step is zero_grad, backward, SGD step (train.py L307-309): no clipping. Trainer's default of 1.0
    # would rescale every update whose gradient norm exceeds 1, as the early MoPro updates' norms do.
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Clip the gradient norm to this value; 0 = off (official). A value > 0 is a departure."},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per optimizer step over all processes (official 256). The per-device batch is derived: "
            "global / (processes x gradient_accumulation_steps), which must divide exactly."
        },
    )
    # `None` means "not given": derived from `global_batch_size`, else the Trainer's default of 8.
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Per-process batch. Leave unset with `global_batch_size` (it is derived), or make it agree."
        },
    )
    scale_lr_with_global_batch: bool = field(
        default=False,
        metadata={
            "help": "Linear scaling: multiply `learning_rate` (the rate for a global batch of 256) by "
            "global_batch_size / 256. Off in the official recipe."
        },
    )
    baseline: str = field(
        default="mopro",
        metadata={"help": "'mopro', or 'ce' for the vanilla cross-entropy baseline (same data and backbone)."},
    )
    prototype_start_epoch: float = field(
        default=1, metadata={"help": "Prototypical loss from this epoch (official: epoch > 0)."}
    )
    noise_correction_start_epoch: float = field(
        default=11,
        metadata={
            "help": "Noise correction from this epoch (official `start_clean_epoch` 11); with the adaptive schedule, "
            "not before it."
        },
    )
    noise_correction_schedule: str = field(
        default="fixed",
        metadata={
            "help": "'fixed' (official): full correction from `noise_correction_start_epoch`. 'adaptive': from the "
            "first epoch at which classifier and prototypes agree and the fit to the given labels has plateaued, "
            "ramped up (training/correction_schedule.py)."
        },
    )
    correction_min_agreement: float = field(
        default=0.6,
        metadata={"help": "Adaptive schedule: share of samples on which classifier and nearest prototype agree."},
    )
    correction_min_fit_beyond_chance: float = field(
        default=0.1,
        metadata={"help": "Adaptive schedule: least Cohen's kappa of the classifier's argmax against the given labels "
                  "(0: chance, e.g. one class predicted for all; 1: a perfect fit) before correction may start."},
    )  # fmt: skip
    correction_plateau_tolerance: float = field(
        default=0.01,
        metadata={"help": "Adaptive schedule: largest rise per epoch of the fit to the given labels on a plateau."},
    )
    correction_ramp_epochs: float = field(
        default=4.0, metadata={"help": "Adaptive schedule: epochs from the start to full-strength correction."}
    )
    samples_per_epoch: int | None = field(
        default=None,
        metadata={"help": "Samples in one epoch, for streaming data whose length is unknown (WebVision-V1: 2.4M)."},
    )
    lr_milestones: list[float] | None = field(
        default=None,
        metadata={"help": "Epochs at which the learning rate is multiplied by `lr_gamma` (official 40 80)."},
    )
    lr_gamma: float = field(default=0.1, metadata={"help": "Step-schedule factor."})
    # transformers 5 dropped this flag from TrainingArguments; its example scripts' rule is kept by run_mopro.py.
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the run already in `output_dir` (its model, results, noise report and checkpoints are "
            "removed first). Without it, a folder holding a run is refused unless resuming."
        },
    )

    # Speed options (README "Speed"). None changes what the model computes beyond float rounding; those that could
    # (a different data path) are off by default and listed by `training.plan` when on.
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "Both encoders' weights and the pixel batches in channels_last memory format (GPU convolutions, "
            "above all in bf16, run faster on it). Same values to float rounding."
        },
    )
    cudnn_benchmark: bool = field(
        default=True,
        metadata={
            "help": "torch.backends.cudnn.benchmark on CUDA (the official train.py sets it): cuDNN times its "
            "convolution algorithms once per input shape and keeps the fastest. Off under --full_determinism."
        },
    )
    uint8_key_batches: bool = field(
        default=False,
        metadata={
            "help": "Key (strong-view) batches stay uint8 until after shuffle-BN's all-gather and are normalised "
            "on the device: a quarter of the bytes through the gather, the same keys."
        },
    )
    auto_dataloader_workers: bool = field(
        default=False,
        metadata={
            "help": "Size the DataLoader to the machine: workers = this process's share of the CPU cores - 1 (one "
            'core feeds the GPU), prefetch_factor 4 (README "Speed"). Replaces --dataloader_num_workers.'
        },
    )
    gpu_augment: bool = field(
        default=False,
        metadata={
            "help": "The GPU data path (training/data/gpu_augment.py): JPEGs decoded on the device (batched decode_jpeg), "
            "the two views' crops, flips, grayscale and colour jitter drawn and applied there. Same distributions "
            "as the CPU path, other random draws. Off: the workers decode and augment (official)."
        },
    )
    record_sample_dynamics: str = field(
        default="auto",
        metadata={
            "help": "Keep the sum of the classifier's probabilities per training sample over the run and save it as "
            "`sample_dynamics.safetensors` (modeling_mopro/sample_dynamics.py), the noise report's label evidence. "
            "'auto': for a map-style training set with a sample_id column of at most 2^27 samples x classes "
            "(512 MiB); 'on': whatever its size; 'off': never."
        },
    )
    allow_changed_resume: bool = field(
        default=False,
        metadata={
            "help": "Resume although the seed, batch size or data differ from the run's `run_args.json` (each change "
            "is recorded there). Without it such a resume is refused, the differences named."
        },
    )

    def __post_init__(self):
        # Kept apart: an explicit per-device batch must agree with `global_batch_size` (checked in
        # `resolve_batch_size`, once the number of processes is known).
        self.requested_per_device_train_batch_size = self.per_device_train_batch_size
        if self.per_device_train_batch_size is None:
            self.per_device_train_batch_size = 8  # Trainer's default; replaced when a global batch is derived
        super().__post_init__()
        _check_finite(self)
        if self.do_train and self.max_steps == 0:
            raise ValueError("`max_steps` 0 would train nothing: give a positive number of steps, or -1 for epochs.")
        if self.do_train and self.max_steps < 0 and not self.num_train_epochs > 0:
            raise ValueError(
                f"`num_train_epochs` {self.num_train_epochs} would train nothing (and save an untrained model as a "
                "finished run): give a positive number of epochs, or --max_steps."
            )
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise ValueError(f"`global_batch_size` must be positive, got {self.global_batch_size}.")
        if self.scale_lr_with_global_batch:
            if self.global_batch_size is None:
                raise ValueError("`scale_lr_with_global_batch` needs `global_batch_size`: set both, or neither.")
            self.learning_rate *= self.global_batch_size / OFFICIAL_GLOBAL_BATCH_SIZE
        if self.max_grad_norm is None or self.max_grad_norm < 0:
            raise ValueError(f"`max_grad_norm` must be >= 0 (0 = no clipping, official), got {self.max_grad_norm}.")
        if self.baseline not in ("mopro", "ce"):
            raise ValueError(f"`baseline` must be 'mopro' or 'ce', got {self.baseline!r}.")
        if self.record_sample_dynamics not in ("auto", "on", "off"):
            raise ValueError(
                f"`record_sample_dynamics` must be 'auto', 'on' or 'off', got {self.record_sample_dynamics!r}."
            )
        if self.noise_correction_schedule not in SCHEDULES:
            raise ValueError(
                f"`noise_correction_schedule` must be one of {SCHEDULES}, got {self.noise_correction_schedule!r}."
            )
        self.correction_schedule(adaptive=True)  # its settings checked by the schedule itself, whichever runs
        if self.noise_correction_start_epoch < self.prototype_start_epoch:
            raise ValueError("`noise_correction_start_epoch` must not come before `prototype_start_epoch`.")
        if self.samples_per_epoch is not None and self.samples_per_epoch <= 0:
            raise ValueError(f"`samples_per_epoch` must be positive, got {self.samples_per_epoch}.")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"`lr_gamma` must be in (0, 1], got {self.lr_gamma}.")

    def correction_schedule(self, adaptive: bool = False) -> FixedCorrectionSchedule | AdaptiveCorrectionSchedule:
        """A new schedule object for this run (`training.correction_schedule`); `adaptive`: that one, whichever runs."""
        if self.noise_correction_schedule == "fixed" and not adaptive:
            return FixedCorrectionSchedule(self.noise_correction_start_epoch)
        return AdaptiveCorrectionSchedule(
            earliest_epoch=self.noise_correction_start_epoch,
            min_agreement=self.correction_min_agreement,
            min_fit_beyond_chance=self.correction_min_fit_beyond_chance,
            plateau_tolerance=self.correction_plateau_tolerance,
            ramp_epochs=self.correction_ramp_epochs,
        )

    def resolve_batch_size(self, num_processes: int) -> int:
        """Set (and return) `per_device_train_batch_size` for `num_processes` processes.

        With `global_batch_size`, the per-device batch is derived (`per_device_batch_size`); without it, the given
        per-device batch stands. `MoProTrainer` calls this with the real world size, `training.plan` with
        `--num_processes`. Calling it again with the same number is a no-op.
        """
        if self.global_batch_size is not None:
            self.per_device_train_batch_size = per_device_batch_size(
                self.global_batch_size,
                num_processes,
                self.gradient_accumulation_steps,
                self.requested_per_device_train_batch_size,
            )
            self.requested_per_device_train_batch_size = self.per_device_train_batch_size
        return self.per_device_train_batch_size


@dataclass(frozen=True)
class ConfigSource:
    """One place a run's argument values came from (`parse_args`), logged at start and printed by
    `training.plan`, in the order they apply (a later source wins).

    Attributes:
        name: "demo.yaml", "own_data.yaml", another YAML file's path, "resolution rule", "length rule", "command line" or
            "built-in defaults".
        why: Why it applies (which command chose it, or what the resolution rule read).
        fields: The argument names whose values it supplies (those a later source overrides are left out).
    """

    name: str
    why: str
    fields: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.name} ({self.why}): {', '.join(self.fields)}"


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, MoProTrainingArguments]:
    """`[config.yaml] [--flag value ...]`; without a YAML file, the own-data config for `--train_dir` /
    `--dataset_name`, else the demo config, gives the defaults.

    `model_args.command_line_fields` names the fields given on the command line (not by the YAML file), and
    `model_args.config_sources` (`ConfigSource`s) says which source supplied which values."""
    cli = list(argv)
    given = {arg[2:].split("=", 1)[0] for arg in cli if arg.startswith("--")}
    config_file, why = _default_config(given, cli)
    if cli and cli[0].endswith((".yaml", ".yml")):
        config_file, why = cli.pop(0), "the YAML file given"
    with open(config_file) as f:
        try:
            defaults = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{config_file} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(defaults, dict):
        raise ValueError(
            f"{config_file} holds a YAML {type(defaults).__name__}, not a mapping of flag names to values "
            "(e.g. `learning_rate: 0.1`)"
        )
    argument_classes = (ModelArguments, DataArguments, MoProTrainingArguments)
    _check_yaml_booleans(config_file, defaults, argument_classes)
    cli = _yaml_to_flags(defaults) + cli  # later flags win in argparse
    parser = HfArgumentParser(argument_classes)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=cli)
    model_args.command_line_fields = given
    model_args.config_file = str(config_file)
    from_yaml = [name for name in defaults if name not in given]
    resolved, rule = Path(config_file).resolve(), None
    listing = folder_listing(data_args.train_dir) if data_args.train_dir else None  # listed once, for both rules
    if resolved == OWN_DATA_CONFIG and "image_size" in from_yaml and not model_args.model_name_or_path:
        # The own-data recipe's resolution rule (a loaded model keeps its own image size).
        rule = choose_image_size(data_args, listing=listing)
        if rule is None:
            why += f"; no training image could be read for the resolution rule: image_size {defaults['image_size']}"
        else:
            model_args.image_size = rule.image_size
            from_yaml.remove("image_size")
    length = None
    if resolved == OWN_DATA_CONFIG and "lr_milestones" in from_yaml and "max_steps" not in given:
        length, why = _own_data_length(model_args, data_args, training_args, defaults, given, why, listing)
        if length is not None:
            from_yaml = [field for field in from_yaml if field not in length.fields]
    name = resolved.name if resolved.parent == DEMO_CONFIG.parent else str(config_file)  # a shipped config: its name
    sources = [ConfigSource(name, why, tuple(from_yaml))]
    if rule is not None:
        sources.append(ConfigSource("resolution rule", rule.describe(), ("image_size",)))
    if length is not None:
        sources.append(length)
    if given:
        sources.append(ConfigSource("command line", "flags given", tuple(sorted(given))))
    defaults_why = "MoProConfig's official values, the argument classes' defaults"
    sources.append(ConfigSource("built-in defaults", defaults_why, ("every other field",)))
    model_args.config_sources = sources
    return model_args, data_args, training_args


def milestones_past_the_run(training_args) -> str:
    """A warning when learning-rate steps lie at or past the run's last epoch ("" otherwise): a recipe's steps with
    fewer epochs given (demo.yaml's or a WebVision recipe's with `--num_train_epochs` alone) never step the rate down,
    and nothing else would say so. Runs sized in steps (`--max_steps`) are not checked: their epochs come later."""
    if training_args.max_steps > 0 or not training_args.lr_milestones:
        return ""
    past = [m for m in training_args.lr_milestones if m >= training_args.num_train_epochs]
    if not past:
        return ""
    return (
        f"lr_milestones {', '.join(f'{m:g}' for m in past)} lie at or past the run's {training_args.num_train_epochs:g} "
        "epochs: the learning rate never steps down there; give --lr_milestones inside the run"
    )


def _own_data_length(
    model_args, data_args, training_args, defaults, given, why, listing
) -> tuple[ConfigSource | None, str]:
    """The own-data recipe's length rule (`training.own_data`), applied to `training_args`: the epochs and their
    learning-rate steps from the data's size, or, with `--num_train_epochs` given, the recipe's steps at their place in
    the epochs given (its 18 and 36 of 40 would fall past a shorter run, or early in a longer one). Returns the source
    to log (None: the recipe's values stand) and `why`, extended when the data's size is unknown. `listing`: the
    training folder's `own_data.folder_listing` (shared with the resolution rule), or None."""
    if "num_train_epochs" in given:
        epochs = training_args.num_train_epochs
        training_args.lr_milestones = list(milestones_for(epochs))
        steps = ", ".join(f"{m:g}" for m in training_args.lr_milestones)
        return ConfigSource("length rule", f"the recipe's learning-rate steps at {steps} of the {epochs:g} epochs "
                            "given", ("lr_milestones",)), why  # fmt: skip
    if model_args.model_name_or_path:  # a loaded model starts trained: the recipe's epochs stand
        return None, why
    batch = training_args.global_batch_size or (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    )
    choice = choose_length(data_args, batch, int(defaults["num_train_epochs"]), listing)
    if choice is None:
        unknown = "the training data's size is unknown before it is read (streamed or sharded): the recipe's epochs"
        return None, f"{why}; {unknown}"
    training_args.num_train_epochs = choice.num_train_epochs
    training_args.lr_milestones = list(choice.lr_milestones)
    return ConfigSource("length rule", choice.describe(), ("num_train_epochs", "lr_milestones")), why


def _default_config(given: set[str], cli: list[str]) -> tuple[Path, str]:
    """The config of a command without a YAML file, and why: WebVision's official recipe for `--webvision_dir` (of
    its `--webvision_version`), the own-data recipe for the user's images (`--train_dir`, `--dataset_name`, shards),
    the demo's only without any data source (the demo's own data): never the demo's 32-px model on other data."""
    if "webvision_dir" in given:
        version = _flag_value(cli, "webvision_version") or DataArguments.webvision_version
        config = DEMO_CONFIG.with_name(f"webvision_{version.lower()}_r50.yaml")
        if config.is_file():  # an unknown version is left to the WebVision reader's error
            return config, f"no YAML file and --webvision_dir given: the official recipe of WebVision {version}"
    own = [name for name in (*OWN_DATA_SOURCES, "shard_dir") if name in given]
    if own:
        return OWN_DATA_CONFIG, f"no YAML file and --{own[0]} given: the recipe for real photos"
    return DEMO_CONFIG, "no YAML file and no data source given: the offline demo"


def _flag_value(cli: list[str], name: str) -> str | None:
    """The last value given to `--name` (`--name value` or `--name=value`) on the command line, None if not given."""
    value = None
    for i, arg in enumerate(cli):
        if arg == f"--{name}" and i + 1 < len(cli):
            value = cli[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _check_yaml_booleans(config_file, values: dict, argument_classes) -> None:
    """YAML reads an unquoted yes/no/on/off/true/false as a boolean: for a flag that is not a boolean (e.g.
    `eval_strategy: no`) that is never what was meant, and argparse would only say "invalid choice: 'False'"."""
    kinds = {f.name: str(f.type) for cls in argument_classes for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if isinstance(value, bool) and key in kinds and "bool" not in kinds[key]:
            raise ValueError(
                f"{config_file}: `{key}: {value}` was read as a YAML boolean, but {key} is not a boolean flag; quote "
                f'the value (e.g. {key}: "no")'
            )


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
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        **model_args.config_values(),
    )


def load_config(model_args: ModelArguments) -> MoProConfig:
    """The config of `--model_name_or_path` with the given hyperparameters applied (and logged).

    Architecture fields cannot change on a loaded model: one given on the command line with another value than the
    folder's is an error; one from the YAML file yields to the folder's value, with a warning.
    """
    path = model_args.model_name_or_path
    try:
        config = MoProConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model_name_or_path {path}: no MoPro config could be read there ({' '.join(str(error).split())}); "
            "give a folder written by run_mopro.py, the release or the converter (it holds config.json)."
        ) from error
    values = model_args.config_values()
    given_here = getattr(model_args, "command_line_fields", set(values))
    conflicts = []
    for name in ARCHITECTURE_FIELDS:
        if name in values and values[name] != getattr(config, name):
            if name in given_here:
                conflicts.append(f"--{name} {values[name]!r} (the folder's: {getattr(config, name)!r})")
            else:
                logger.warning(
                    "%s=%r from %s ignored: %s keeps its %r (the architecture of a saved model is fixed)",
                    name, values[name], getattr(model_args, "config_file", "the YAML file"), path, getattr(config, name),
                )  # fmt: skip
    if conflicts:
        raise ValueError(
            f"--model_name_or_path {path} fixes the architecture, and {', '.join(conflicts)} would change it: "
            "drop the flag(s) to continue from the folder, or drop --model_name_or_path to train a new model."
        )
    changed = {name: values[name] for name in HYPERPARAMETER_FIELDS if name in values}
    changed = {name: value for name, value in changed.items() if value != getattr(config, name)}
    for name, value in changed.items():
        logger.info("%s: %s=%r (the folder's: %r)", path, name, value, getattr(config, name))
        setattr(config, name, value)
    config._validate_hyperparameters()
    return config


def _check_finite(arguments) -> None:
    """Every float argument must be a finite number: a NaN or infinite learning rate (or momentum, weight decay,
    ...) trains to the end on NaN weights and fails much later, far from the flag."""
    for argument in dataclasses.fields(arguments):
        value = getattr(arguments, argument.name, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"`{argument.name}` must be a finite number, got {value}.")


# The official recipe's global batch, for which its learning rate 0.1 is set (train.py L45, L49).
OFFICIAL_GLOBAL_BATCH_SIZE = 256


def per_device_batch_size(
    global_batch_size: int,
    num_processes: int,
    gradient_accumulation_steps: int = 1,
    requested: int | None = None,
) -> int:
    """`global_batch_size / (num_processes * gradient_accumulation_steps)`, which must be a whole number.

    The official code states the global batch and splits it over the GPUs (train.py L187). `requested` is a
    per-device batch the user also gave: it must agree, else a `ValueError` says what to change.
    """
    if num_processes <= 0 or gradient_accumulation_steps <= 0:
        raise ValueError(
            f"processes ({num_processes}) and gradient_accumulation_steps ({gradient_accumulation_steps}) must be >= 1."
        )
    slots = num_processes * gradient_accumulation_steps
    if global_batch_size % slots:
        raise ValueError(
            f"global_batch_size {global_batch_size} does not split into {num_processes} processes x "
            f"{gradient_accumulation_steps} accumulation steps: choose a global batch divisible by {slots}, or "
            f"another number of processes / --gradient_accumulation_steps."
        )
    derived = global_batch_size // slots
    if requested is not None and requested != derived:
        raise ValueError(
            f"per_device_train_batch_size {requested} disagrees with global_batch_size {global_batch_size} over "
            f"{num_processes} processes x {gradient_accumulation_steps} accumulation steps ({derived}): drop "
            f"--per_device_train_batch_size (it is derived), or pass --global_batch_size {requested * slots}."
        )
    return derived


def steps_per_epoch(
    num_samples: int,
    per_device_batch_size: int,
    num_processes: int,
    gradient_accumulation_steps: int = 1,
    *,
    streamed: bool = False,
    drop_last: bool = True,
) -> int:
    """Optimizer steps in one epoch of `num_samples` training samples, as the run takes them.

    Map-style data (the Trainer's DataLoader, sharded by Accelerate): each process gets `N // (b * P)` whole
    batches with `drop_last` (else `ceil(ceil(N / b) / P)`), and the Trainer makes one optimizer step per
    `gradient_accumulation_steps` of them, the last step of an epoch taking what is left. Streamed data has no
    epoch boundary: an epoch is the whole steps of the official `drop_last` epoch, `N // global batch`.
    With one accumulation step and `drop_last`, both are the official `N // global batch` (train.py with
    DistributedSampler + drop_last: 2,439,574 // 256 = 9,529 for WebVision V1).
    """
    global_batch = per_device_batch_size * num_processes * gradient_accumulation_steps
    if streamed:
        return max(num_samples // global_batch, 1)
    if drop_last:
        batches = num_samples // (per_device_batch_size * num_processes)
    else:
        batches = math.ceil(math.ceil(num_samples / per_device_batch_size) / num_processes)
    return max(math.ceil(batches / gradient_accumulation_steps), 1)
