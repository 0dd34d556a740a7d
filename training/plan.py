"""What a `training/run_mopro.py` run will do, before the GPUs are paid for. Needs no data, GPU or network.

    python -m training.plan training/configs/webvision_v1_r50.yaml --num_processes 8 --num_train_samples 2439574
    python -m training.plan training/configs/webvision_v1_r50.yaml --num_processes 4 --bf16 true --json

The YAML and any `run_mopro` flag go through `training.arguments.parse_args`, so the plan reads what the run would read. It
prints which source supplied which values (the YAML file, or without one demo.yaml or, for `--train_dir` /
`--dataset_name`, own_data.yaml and the resolution rule, which reads the images' sizes; the command line), the batch
geometry (global batch, per-device batch, accumulation), steps per epoch and in total, the learning
rate from each milestone step, the steps where the prototype loss and the noise correction start, the precision of
each part, gradient clipping, backbone initialisation, shuffle-BN mode, the speed options that are on (README
"Speed", with their cost in fidelity), and every recipe value that differs from the official one (salesforce/MoPro `train.py`, the line named beside it). `--json` gives the same as one object.

Steps need the training-set size: `--num_train_samples` (WebVision V1: 2,439,574 images), or `samples_per_epoch`
from the config for streamed data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled

from modeling_mopro import MoProConfig, MoProPhase  # noqa: E402
from modeling_mopro.cli import run_command  # noqa: E402
from training.arguments import (  # noqa: E402
    OFFICIAL_GLOBAL_BATCH_SIZE,
    ConfigSource,
    build_config,
    load_config,
    parse_args,
    steps_per_epoch,
)
from training.correction_schedule import phase_for_epoch  # noqa: E402
from training.optim import milestone_learning_rates, sgd_momentum  # noqa: E402

_MODEL = MoProConfig()  # the model's official values are MoProConfig's defaults
# The official recipe: name -> (value, where salesforce/MoPro sets it). `tests/test_recipe.py` checks these against
# its own reading of the same lines, and the official YAMLs against both.
OFFICIAL_RECIPE: dict[str, tuple[Any, str]] = {
    "global_batch_size": (OFFICIAL_GLOBAL_BATCH_SIZE, "train.py L45: -b 256, the total over a node's GPUs (L187)"),
    "learning_rate": (0.1, "train.py L49: --lr 0.1 (for the global batch of 256)"),
    "lr_schedule": ("step", "train.py L53: --cos off; L396-405 step decay per epoch, no warm-up"),
    "lr_milestones": ([40, 80], "train.py L51: --schedule 40 80"),
    "lr_gamma": (0.1, "train.py L403: lr *= 0.1 per milestone passed"),
    "optimizer": ("sgd", "train.py L208: torch.optim.SGD over model.parameters()"),
    "momentum": (0.9, "train.py L55: --momentum 0.9"),
    "weight_decay": (1e-4, "train.py L57: --wd 1e-4"),
    "num_train_epochs": (90, "train.py L41: --epochs 90"),
    "prototype_start_epoch": (1, "train.py L284: is_proto=(epoch>0)"),
    "noise_correction_start_epoch": (11, "train.py L100: --start_clean_epoch 11"),
    "noise_correction_schedule": ("fixed", "train.py L284: is_clean=(epoch>=args.start_clean_epoch)"),
    "crop_min_scale": (
        0.2,
        "DataLoader/dataloader.py L85: RandomResizedCrop(224, scale=(crop_size, 1.0)), crop_size=0.2",
    ),
    "max_grad_norm": (0.0, "train.py L307-309: zero_grad, backward, step; no clipping"),
    "precision": ("fp32", "train.py L308: plain loss.backward(), no autocast or GradScaler"),
    "dataloader_drop_last": (True, "DataLoader/dataloader.py L125: drop_last=True"),
    "baseline": ("mopro", "train.py L283-298: the MoPro losses"),
    "initialisation": ("random", "train.py L169: a new MoPro(resnet50) model"),
    "backbone": (_MODEL.backbone, "train.py L38: --arch resnet50"),
    "backbone_kwargs": (_MODEL.backbone_kwargs, "train.py L169: width=1"),
    "image_size": (_MODEL.image_size, "DataLoader/dataloader.py L85: RandomResizedCrop(224)"),
    "embedding_size": (_MODEL.embedding_size, "train.py L83: --low-dim 128"),
    "projection_hidden_size": (_MODEL.projection_hidden_size, "resnet.py L130: fc1 = Linear(2048, 2048)"),
    "queue_size": (_MODEL.queue_size, "train.py L85: --moco_queue 8192"),
    "encoder_momentum": (_MODEL.encoder_momentum, "train.py L87: --moco_m 0.999"),
    "prototype_momentum": (_MODEL.prototype_momentum, "train.py L89: --proto_m 0.999"),
    "temperature": (_MODEL.temperature, "train.py L92: --temperature 0.1"),
    "instance_loss_weight": (_MODEL.instance_loss_weight, "train.py L95: --w-inst 1"),
    "prototype_loss_weight": (_MODEL.prototype_loss_weight, "train.py L97: --w-proto 1"),
    "pseudo_label_threshold": (_MODEL.pseudo_label_threshold, "train.py L102: --pseudo_th 0.8"),
    "alpha": (_MODEL.alpha, "train.py L104: --alpha 0.5"),
    "ood_rule": (_MODEL.ood_rule, "model.py L141-150: kept if s_y > 1/K or max s > pseudo_th"),
    "noise_correction_rule": (_MODEL.noise_correction_rule, "model.py L141-150: alpha p_cls + (1 - alpha) p_proto"),
    "backbone_zero_init_last": (_MODEL.backbone_zero_init_last, "resnet.py L137-138: every BatchNorm gamma 1"),
}

_HEADS = "heads, contrastive logits, noise-correction scores, prototype update and losses"


def _precision(training_args) -> str:
    # `mixed_precision` is what the run's Accelerator uses: --bf16/--fp16, else ACCELERATE_MIXED_PRECISION, which
    # `accelerate launch` sets from the user's accelerate config (MoProTrainer records it in the run's arguments).
    mixed = getattr(training_args, "mixed_precision", "no")
    if training_args.bf16 or mixed == "bf16":
        return "bf16"
    if training_args.fp16 or mixed == "fp16":
        return "fp16"
    return "tf32" if training_args.tf32 else "fp32"


def _precision_source(training_args) -> str:
    if training_args.bf16 or training_args.fp16 or _precision(training_args) not in ("bf16", "fp16"):
        return ""
    return f" (from the accelerate config: ACCELERATE_MIXED_PRECISION={training_args.mixed_precision})"


def apply_accelerate_config(path: str | None) -> str | None:
    """Set what `accelerate launch` would set from the accelerate config file `path` (default: accelerate's own
    default file, when it exists) and the environment does not already: the mixed precision and the dynamo backend.
    Returns the file read, or None."""
    if path is None:
        from accelerate.commands.config import default_config_file

        path = default_config_file if os.path.isfile(default_config_file) else None
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"--accelerate_config_file {path}: no such file.")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    precision = str(values.get("mixed_precision") or "no").lower()
    if precision != "no":
        os.environ.setdefault("ACCELERATE_MIXED_PRECISION", precision)
    backend = str((values.get("dynamo_config") or {}).get("dynamo_backend") or "no").lower()
    if backend != "no":
        os.environ.setdefault("ACCELERATE_DYNAMO_BACKEND", backend.upper())
    return path


def _compile(training_args) -> str:
    """What MoProTrainer compiles: the backbones, with the backend of --torch_compile or of the accelerate config."""
    backend = training_args.torch_compile_backend if training_args.torch_compile else None
    backend = backend or os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if backend == "no":
        return "off"
    return f"the backbones' forward_features (backend {backend}); heads, losses and phases eager"


def _first_step(phase: MoProPhase, spe: int, training_args) -> int:
    """The first optimizer step (0-indexed) that runs in `phase`, by the trainer's own `phase_for_epoch`."""
    starts = (training_args.prototype_start_epoch, training_args.noise_correction_start_epoch)
    start = starts[1] if phase == MoProPhase.NOISE_CORRECTION else starts[0]
    step = max(math.floor(start * spe) - 1, 0)
    while phase_for_epoch(step / spe, *starts) < phase:
        step += 1
    return step


def recipe_values(model_args, data_args, training_args, config: MoProConfig, num_processes: int) -> dict[str, Any]:
    """The run's value of every `OFFICIAL_RECIPE` field (batch size already resolved for `num_processes`)."""
    values = {
        "global_batch_size": training_args.per_device_train_batch_size
        * num_processes
        * training_args.gradient_accumulation_steps,
        "learning_rate": training_args.learning_rate,
        "lr_schedule": "step" if training_args.lr_milestones else str(training_args.lr_scheduler_type.value),
        "lr_milestones": [int(m) if float(m).is_integer() else m for m in training_args.lr_milestones or []],
        "lr_gamma": training_args.lr_gamma,
        "optimizer": str(training_args.optim.value),
        "momentum": sgd_momentum(training_args),
        "weight_decay": training_args.weight_decay,
        "num_train_epochs": training_args.num_train_epochs,
        "prototype_start_epoch": training_args.prototype_start_epoch,
        "noise_correction_start_epoch": training_args.noise_correction_start_epoch,
        "noise_correction_schedule": training_args.noise_correction_schedule,
        "crop_min_scale": data_args.crop_min_scale,
        "max_grad_norm": training_args.max_grad_norm,
        "precision": _precision(training_args),
        "dataloader_drop_last": training_args.dataloader_drop_last,
        "baseline": training_args.baseline,
        "initialisation": model_args.model_name_or_path or "random",
    }
    for name in OFFICIAL_RECIPE:
        if name not in values:
            values[name] = getattr(config, name)
    return values


def _differs(value: Any, official: Any) -> bool:
    if isinstance(official, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return not math.isclose(value, official, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(official, list) and isinstance(value, list):
        return len(value) != len(official) or any(_differs(v, o) for v, o in zip(value, official, strict=True))
    return value != official


def _departure(name: str, value: Any, official: Any, source: str, note: str | None = None) -> dict[str, Any]:
    return {"name": name, "value": value, "official": official, "source": source, **({"note": note} if note else {})}


def _schedule(training_args) -> dict[str, Any]:
    if training_args.noise_correction_schedule == "fixed":
        return {"name": "fixed"}
    return {
        "name": "adaptive",
        "min_agreement": training_args.correction_min_agreement,
        "min_fit_beyond_chance": training_args.correction_min_fit_beyond_chance,
        "plateau_tolerance": training_args.correction_plateau_tolerance,
        "ramp_epochs": training_args.correction_ramp_epochs,
    }


def _correction_row(result: dict[str, Any]) -> str:
    step = f"step {_number(result['noise_correction_start_step'])}"
    schedule = result["noise_correction_schedule"]
    if schedule["name"] == "fixed":
        return step
    return (
        f"adaptive: not before {step}, from the first epoch on which classifier and prototypes agree on "
        f">= {schedule['min_agreement']:.0%} of the samples, the fit to the given labels rose < "
        f"{schedule['plateau_tolerance']:.0%} and beats the class shares' chance fit by kappa >= "
        f"{schedule['min_fit_beyond_chance']:g}; full strength {schedule['ramp_epochs']:g} epochs later"
    )


def _shuffle_bn(num_processes: int, groups: int) -> str:
    if num_processes > 1:
        return f"cross-process shuffle-BN over {num_processes} processes (official)"
    if groups > 1:
        return f"one process: the momentum encoder's BatchNorm in {groups} virtual groups (shuffle-BN stand-in)"
    return "none: one process, the momentum encoder's BatchNorm sees the whole batch"


def _backbone_precision(precision: str, tf32: bool | None) -> str:
    if precision in ("bf16", "fp16"):
        return f"{precision} autocast"
    if precision == "tf32":
        return "fp32 with TF32 matmuls and convolutions (--tf32 true)"
    if tf32 is False:
        return "fp32 (IEEE, --tf32 false)"
    # PyTorch's default `torch.backends.cudnn.conv.fp32_precision` is "tf32": so it is for the official code there.
    return "fp32 (cuDNN convolutions in TF32 on Ampere or newer GPUs, PyTorch's default; --tf32 false for IEEE)"


# The speed options (README "Speed"): flag, whether it is on, and what it costs in fidelity.
SPEED_OPTIONS = (
    ("cudnn_benchmark", lambda args: args.cudnn_benchmark and not args.full_determinism,
     "on CUDA: cuDNN picks the fastest convolution algorithm per shape, as the official train.py "
     "(cudnn.benchmark = True); float rounding may differ from run to run"),
    ("channels_last", lambda args: args.channels_last,
     "both encoders and the pixel batches in channels_last: the same values to float rounding"),
    ("uint8_key_batches", lambda args: args.uint8_key_batches,
     "key batches gathered as uint8 (1/4 of the bytes) and normalised after shuffle-BN's gather: the same keys"),
    ("auto_dataloader_workers", lambda args: args.auto_dataloader_workers,
     "DataLoader workers = the process's share of the CPU cores - 1, prefetch 4: speed only"),
    ("gpu_augment", lambda args: args.gpu_augment,
     "JPEG decode and both views on the GPU: the CPU path's distributions, other random draws (views no longer "
     "tied to (seed, epoch, sample id))"),
)  # fmt: skip


def speed_options(training_args) -> list[dict[str, str]]:
    """The speed options that are on, each with what it costs in fidelity."""
    return [{"name": name, "effect": effect} for name, is_on, effect in SPEED_OPTIONS if is_on(training_args)]


def _without_plan_flag(sources: list[ConfigSource]) -> list[ConfigSource]:
    """The run's config sources: `--use_cpu`, which the plan adds for itself, taken out of the command line's."""
    kept = []
    for source in sources:
        if source.name == "command line":
            source = dataclasses.replace(source, fields=tuple(f for f in source.fields if f != "use_cpu"))
        if source.fields:
            kept.append(source)
    return kept


def plan(argv: Sequence[str], num_processes: int, num_train_samples: int | None = None) -> dict[str, Any]:
    """The plan of `run_mopro.py argv` on `num_processes` processes, as a JSON-ready dict."""
    # `use_cpu` only keeps TrainingArguments from asking this machine for the GPU features (bf16) the run will use.
    model_args, data_args, training_args = parse_args([*argv, "--use_cpu", "true"])
    if not any(arg.split("=", 1)[0] == "--use_cpu" for arg in argv):  # the plan's own flag, not the run's
        model_args.config_sources = _without_plan_flag(model_args.config_sources)
    training_args.resolve_batch_size(num_processes)  # the per-device batch the run would get on N processes
    if model_args.model_name_or_path:
        config = load_config(model_args)  # the folder's config with the run's hyperparameters
    else:
        config = build_config(model_args, {0: "0"})  # the recipe fields do not depend on the classes
    per_device, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    global_batch = per_device * num_processes * accumulation

    # Epoch length: what the trainer uses (`samples_per_epoch` when streaming), else the given data size.
    streamed = bool(training_args.samples_per_epoch)
    num_samples = training_args.samples_per_epoch or num_train_samples
    if num_samples and not streamed and data_args.max_train_samples:
        num_samples = min(num_samples, data_args.max_train_samples)
    spe = None
    if num_samples:
        spe = steps_per_epoch(
            num_samples, per_device, num_processes, accumulation,
            streamed=streamed, drop_last=training_args.dataloader_drop_last,
        )  # fmt: skip
    values = recipe_values(model_args, data_args, training_args, config, num_processes)
    total_steps = None
    if training_args.max_steps > 0:
        total_steps = training_args.max_steps
        values["num_train_epochs"] = total_steps / spe if spe else None
    elif spe:
        total_steps = math.ceil(training_args.num_train_epochs * spe)  # as the Trainer plans it

    departures = []
    for name, (official, source) in OFFICIAL_RECIPE.items():
        if values[name] is None and name == "num_train_epochs":
            note = "max_steps is set: give --num_train_samples to check the epochs"
            departures.append(_departure(name, None, official, source, note))
        elif _differs(values[name], official):
            departures.append(_departure(name, values[name], official, source))
    if spe and spe != num_samples // global_batch:
        note = f"the last step of each epoch accumulates fewer than {accumulation} micro-batches"
        source = "DataLoader/dataloader.py L125: drop_last over the global batch"
        departures.append(_departure("steps_per_epoch", spe, num_samples // global_batch, source, note))
    shuffle_bn = _shuffle_bn(num_processes, config.momentum_encoder_bn_groups)
    if num_processes == 1:
        source = "model.py L113-116: _batch_shuffle_ddp / _batch_unshuffle_ddp"
        departures.append(_departure("shuffle_bn", shuffle_bn, "cross-process shuffle-BN", source))

    lr_schedule = [{"epoch": 0, "step": 0, "learning_rate": training_args.learning_rate}]
    # The run's scheduler (`training.optim`); without the epoch length, its rates from epoch-long steps.
    rates = milestone_learning_rates(
        training_args.learning_rate, values["lr_milestones"], spe or 1, training_args.lr_gamma
    )
    for epoch in sorted(values["lr_milestones"]):
        lr = rates[round(epoch * (spe or 1))]
        lr_schedule.append(
            {"epoch": epoch, "step": round(epoch * spe) if spe else None, "learning_rate": float(f"{lr:.12g}")}
        )
    if model_args.model_name_or_path:
        initialisation = f"weights from {model_args.model_name_or_path}"
    elif config.backbone_zero_init_last:
        initialisation = "timm zero-init: the last BatchNorm gamma of each residual block is 0"
    else:
        initialisation = "every BatchNorm gamma 1 (official ResNet)"
    return {
        "config": _shown_path(model_args.config_file),
        # Which source supplied which values (`training.arguments.parse_args`; the run logs the same lines at start).
        "config_sources": [
            {"name": source.name, "why": source.why, "fields": list(source.fields)}
            for source in model_args.config_sources
        ],
        "num_processes": num_processes,
        "global_batch_size": global_batch,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "num_train_samples": num_samples,
        "streamed_epoch": streamed,
        "steps_per_epoch": spe,
        "num_train_epochs": values["num_train_epochs"],
        "total_steps": total_steps,
        "learning_rate": training_args.learning_rate,
        "lr_schedule": lr_schedule if training_args.lr_milestones else values["lr_schedule"],
        "prototype_loss_start_step": _first_step(MoProPhase.PROTOTYPES, spe, training_args) if spe else None,
        "noise_correction_start_step": _first_step(MoProPhase.NOISE_CORRECTION, spe, training_args) if spe else None,
        "noise_correction_schedule": _schedule(training_args),
        "precision": {
            "backbone": _backbone_precision(values["precision"], training_args.tf32)
            + _precision_source(training_args),
            _HEADS: "fp32",
        },
        "torch_compile": _compile(training_args),
        "max_grad_norm": training_args.max_grad_norm or None,
        "backbone_initialisation": initialisation,
        "shuffle_bn": shuffle_bn,
        "optimizer": {
            "name": values["optimizer"],
            "momentum": values["momentum"],
            "weight_decay": values["weight_decay"],
        },
        "speed_options": speed_options(training_args),
        "departures_from_official": departures,
    }


def _shown_path(path: str) -> str:
    """A path inside the repository relative to it (`training/configs/demo.yaml`), any other as given."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return str(path)


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "unknown" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6g}" if not value.is_integer() or abs(value) < 1e6 else f"{int(value):,}"
    return str(value)


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a readable table."""
    unknown = "unknown (pass --num_train_samples)"
    rows = [
        ("config", result["config"]),
        ("processes", _number(result["num_processes"])),
        ("global batch", _number(result["global_batch_size"])),
        ("per-device batch", _number(result["per_device_train_batch_size"])),
        ("gradient accumulation", _number(result["gradient_accumulation_steps"])),
        ("training samples", _number(result["num_train_samples"]) if result["num_train_samples"] else unknown),
        ("steps per epoch", _number(result["steps_per_epoch"]) if result["steps_per_epoch"] else unknown),
        ("epochs", _number(result["num_train_epochs"])),
        ("total steps", _number(result["total_steps"])),
    ]
    if isinstance(result["lr_schedule"], list):
        for entry in result["lr_schedule"]:
            rows.append(
                (f"lr from epoch {entry['epoch']:g}", f"{entry['learning_rate']:.6g} (step {_number(entry['step'])})")
            )
    else:
        rows.append(("lr schedule", f"Trainer '{result['lr_schedule']}' from {result['learning_rate']:.6g}"))
    optimizer = result["optimizer"]
    rows += [
        (
            "optimizer",
            f"{optimizer['name']}, momentum {optimizer['momentum']}, weight decay {optimizer['weight_decay']}",
        ),
        ("prototype loss from", f"step {_number(result['prototype_loss_start_step'])}"),
        ("noise correction from", _correction_row(result)),
        ("precision, backbone", result["precision"]["backbone"]),
        ("precision, the rest", f"{result['precision'][_HEADS]}: {_HEADS}"),
        ("torch.compile", result["torch_compile"]),
        ("gradient clipping", "off" if result["max_grad_norm"] is None else f"max norm {result['max_grad_norm']}"),
        ("backbone initialisation", result["backbone_initialisation"]),
        ("shuffle-BN", result["shuffle_bn"]),
    ]
    for option in result.get("speed_options", []):
        rows.append((f"speed: {option['name']}", option["effect"]))
    width = max(len(name) for name, _ in rows)
    # Where the values came from, one line per source, as the run logs them at start.
    lines = ["values from (a later source wins):"]
    lines += [f"  {s['name']} ({s['why']}): {', '.join(s['fields'])}" for s in result["config_sources"]]
    lines += [""] + [f"{name:<{width}}  {value}" for name, value in rows]
    departures = result["departures_from_official"]
    lines.append(f"\ndepartures from the official recipe: {len(departures) or 'none'}")
    for d in departures:
        note = f"; {d['note']}" if "note" in d else ""
        lines.append(f"  {d['name']}: {d['value']!r} (official {d['official']!r}, {d['source']}{note})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--num_processes", type=int, required=True, help="processes (GPUs) the run will use")
    parser.add_argument("--num_train_samples", type=int, default=None, help="training images (V1: 2439574)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--accelerate_config_file",
        default=None,
        help="the accelerate config the run will be launched with (default: accelerate's default config, if any): "
        "its mixed precision and dynamo backend apply, as `accelerate launch` applies them",
    )
    own, run_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if own.num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {own.num_processes}.")
    apply_accelerate_config(own.accelerate_config_file)
    # A bad recipe (e.g. a global batch that does not split) raises a ValueError: `run_command` makes it one line.
    result = plan(run_argv, own.num_processes, own.num_train_samples)
    print(json.dumps(result, indent=2) if own.json else format_plan(result))
    return result


if __name__ == "__main__":
    run_command(main)
