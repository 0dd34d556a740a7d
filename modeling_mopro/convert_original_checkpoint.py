"""Convert an official MoPro checkpoint (salesforce/MoPro, `MoPro_V1_epoch90.tar` / `MoPro_V2_epoch90.tar`) to this
package's transformers models.

[0] MoPro: Webly Supervised Learning with Momentum Prototypes, Li, Xiong & Hoi, ICLR 2021, arXiv:2009.07995.

The official `train.py` saves `{"epoch", "arch", "state_dict", "optimizer"}` from a DDP-wrapped `MoPro` module, so
every key carries the `module.` prefix. Its ResNet (`resnet.py`) uses torchvision's parameter names, which are also
timm's `resnet*` names, so the backbone maps one to one:

    module.encoder_q.{conv1,bn1,layer1-4}.*   -> mopro.backbone.*
    module.encoder_q.fc1.* / fc2.*            -> mopro.projection.fc1.* / fc2.*
    module.encoder_q.classifier.*             -> classifier.*
    module.prototypes (K, D)                  -> mopro.prototypes
    module.encoder_k.<same as encoder_q>      -> momentum_encoder.{backbone,projection,classifier}.*
    module.queue (D, Q) / module.queue_ptr    -> queue / queue_ptr

The release model (`MoProForImageClassification`, the default) keeps the query side; `full_training_state=True`
gives `MoProForPreTraining` with the momentum encoder, queue and prototypes, to resume training. An official
checkpoint carries one pending momentum update: the official forward updates `encoder_k` *first*
(`_momentum_update_key_encoder`), so the saved `encoder_k` has not yet seen the last optimizer step of `encoder_q`,
while our models update after every optimizer step and save the result. The full-state conversion applies that
update once (parameters only, with `encoder_momentum`, the official `--moco_m`, 0.999 by default, which the
checkpoint does not store), so that training resumed from it runs the steps the official run would have. Every tensor of the
checkpoint must be recognised and every tensor of the model must be provided: a mismatch raises a `ValueError` that
lists the offending (official) key names, never a silent partial load. The optimizer state is not converted (the
Trainer's optimizer has its own parameter order) and may be absent.

Usage:
    python -m modeling_mopro.convert_original_checkpoint --checkpoint_path MoPro_V1_epoch90.tar --output_dir mopro-r50 \
        [--full_training_state] [--id2label_file webvision_classes.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .cli import check_output_dir
from .configuration_mopro import MoProConfig
from .modeling_mopro import MoProForImageClassification, MoProForPreTraining, MoProPhase, build_image_processor

logger = logging.getLogger(__name__)

# Official `train.py`: `is_proto = epoch > 0`, `is_clean = epoch >= start_clean_epoch` (default 11, 0-indexed).
OFFICIAL_START_CLEAN_EPOCH = 11

# Official encoder sub-module -> our sub-module, for the heads; everything else of an encoder is the backbone.
_HEAD_RENAMES = {"classifier": "classifier", "fc1": "projection.fc1", "fc2": "projection.fc2"}
# Official top-level buffers -> our names.
_BUFFER_RENAMES = {"prototypes": "mopro.prototypes", "queue": "queue", "queue_ptr": "queue_ptr"}
# Our tensors that exist only in the training model (dropped from the release conversion).
_TRAINING_ONLY = ("momentum_encoder.", "queue", "queue_ptr")

# (block type, blocks per stage) -> timm model name; other depths use the base name with `layers=`.
_TIMM_RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
_DEFAULT_CHANNELS = (64, 128, 256, 512)


def load_original_state_dict(checkpoint_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an official checkpoint safely (`weights_only=True`) and strip the DDP `module.` prefix.

    Args:
        checkpoint_path: the `.tar`/`.pth` file: the official dict wrapper or a bare state dict.

    Returns:
        The state dict with official names (`encoder_q.conv1.weight`, `queue`, ...) and the metadata of the wrapper
        (`epoch`, `arch`; empty for a bare state dict).
    """
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint_path} does not exist or is not a file; give the path of the official "
            "MoPro_V1_epoch90.tar / checkpoint_*.pth.tar"
        )
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's long message names the refused global, or what else the unpickler could not read.
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused is None:  # no refused object: bytes that are no pickle of a checkpoint at all
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
            raise ValueError(
                f"{checkpoint_path} is not a torch checkpoint (torch.load: "
                f"{detail.group(1) if detail else type(error).__name__}); give the official .tar / .pth file"
            ) from error
        # Stays refused: unpickling anything but tensors and plain containers can run code from the file.
        raise ValueError(
            f"{checkpoint_path} holds pickled objects other than tensors and plain containers, which are not "
            f"loaded because unpickling them can run code (it refers to {refused.group(1)}); convert a checkpoint "
            "that holds only tensors, e.g. the official MoPro_V1_epoch90.tar"
        ) from error
    except Exception as error:  # torch.load's errors for a file that is not a checkpoint vary (KeyError, RuntimeError)
        raise ValueError(
            f"{checkpoint_path} is not a torch checkpoint (torch.load failed: {type(error).__name__}: {error}); "
            "give the official .tar / .pth file"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{checkpoint_path} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    if "state_dict" in checkpoint:
        metadata = {k: checkpoint[k] for k in ("epoch", "arch") if k in checkpoint}
        state_dict = checkpoint["state_dict"]
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"{checkpoint_path}: 'state_dict' is a {type(state_dict).__name__}, not a dict of tensors."
            )
    else:
        metadata, state_dict = {}, checkpoint
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        if "state_dict" not in checkpoint:
            raise ValueError(
                f"{checkpoint_path} has no 'state_dict' entry and is not a bare state dict (non-tensor entries: "
                f"{not_tensors[:10]}); give a checkpoint of the official train.py ({{'epoch', 'arch', 'state_dict', "
                "'optimizer'}) or a state dict"
            )
        raise ValueError(f"{checkpoint_path}: these state-dict entries are not tensors: {not_tensors}")
    # A damaged or diverged checkpoint would convert into a model that outputs NaN: refuse it, naming the tensors.
    non_finite = sorted(str(k) for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all())
    if non_finite:
        raise ValueError(
            f"{checkpoint_path} holds non-finite values (NaN or inf) in {len(non_finite)} tensor(s), e.g. "
            f"{non_finite[:3]}: the checkpoint is damaged or its run diverged; convert another epoch's checkpoint"
        )
    return {k.removeprefix("module."): v for k, v in state_dict.items()}, metadata


def rename_key(original_key: str) -> str | None:
    """Our name of an official key (without `module.`), or None if the key is not part of a MoPro checkpoint."""
    if original_key in _BUFFER_RENAMES:
        return _BUFFER_RENAMES[original_key]
    encoder, _, rest = original_key.partition(".")
    if encoder not in ("encoder_q", "encoder_k") or not rest:
        return None
    head, _, tail = rest.partition(".")
    if head in _HEAD_RENAMES:
        if not tail:
            return None
        rest = f"{_HEAD_RENAMES[head]}.{tail}"
    else:
        rest = f"backbone.{rest}"
    if encoder == "encoder_q":
        # The query classifier sits beside `mopro`, not inside it.
        return rest if rest.startswith("classifier.") else f"mopro.{rest}"
    return f"momentum_encoder.{rest}"


def original_key(key: str) -> str:
    """Inverse of `rename_key`, for error messages (with the `module.` prefix, as in the file)."""
    inverse_buffers = {v: k for k, v in _BUFFER_RENAMES.items()}
    if key in inverse_buffers:
        return f"module.{inverse_buffers[key]}"
    if key.startswith("momentum_encoder."):
        encoder, rest = "encoder_k", key.removeprefix("momentum_encoder.")
    else:
        encoder, rest = "encoder_q", key.removeprefix("mopro.")
    for official, ours in _HEAD_RENAMES.items():
        if rest.startswith(f"{ours}."):
            return f"module.{encoder}.{official}.{rest.removeprefix(ours + '.')}"
    return f"module.{encoder}.{rest.removeprefix('backbone.')}"


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    num_labels: int | None = None,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    **config_kwargs,
) -> MoProConfig:
    """Build the `MoProConfig` that matches an official state dict (official names, no `module.`).

    The number of classes comes from the classifier, the projection sizes from `fc1`/`fc2`, the queue size from the
    queue, and the timm backbone (depth, width: `resnet50x2`/`x4` are `resnet50` with wider `channels`) from the
    ResNet tensors.

    Args:
        state_dict: official state dict.
        num_labels: expected number of classes; a `ValueError` if the classifier disagrees.
        id2label: class names, as a list or `{index: name}`; `LABEL_i` when not given.
        config_kwargs: further `MoProConfig` fields (e.g. `image_size`).
    """
    required = [
        "encoder_q.classifier.weight",
        "encoder_q.fc1.weight",
        "encoder_q.fc2.weight",
        "encoder_q.conv1.weight",
    ]
    missing = [f"module.{k}" for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"Not an official MoPro checkpoint: missing {missing}.")
    classes, features = state_dict["encoder_q.classifier.weight"].shape
    hidden = state_dict["encoder_q.fc1.weight"].shape[0]
    embedding = state_dict["encoder_q.fc2.weight"].shape[0]
    if num_labels is not None and num_labels != classes:
        raise ValueError(f"`num_labels`={num_labels} but the checkpoint's classifier has {classes} classes.")
    backbone, backbone_kwargs = _infer_timm_resnet(state_dict, features)
    if "queue" in state_dict:
        config_kwargs.setdefault("queue_size", state_dict["queue"].shape[1])
    labels = _normalise_id2label(id2label, classes)
    return MoProConfig(
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
        projection_hidden_size=hidden,
        embedding_size=embedding,
        num_labels=classes,
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
        **config_kwargs,
    )


def _infer_timm_resnet(state_dict: Mapping[str, torch.Tensor], features: int) -> tuple[str, dict]:
    """timm name and kwargs of the official ResNet: block type, blocks per stage and stage widths."""
    block = "bottleneck" if "encoder_q.layer1.0.conv3.weight" in state_dict else "basic"
    layers, channels = [], []
    for stage in range(1, 5):
        prefix = f"encoder_q.layer{stage}."
        indices = {k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)}
        blocks = {int(i) for i in indices if i.isdigit()}  # anything else is reported as unknown later
        if not blocks:
            raise ValueError(f"Not an official MoPro checkpoint: no `module.{prefix}*` tensors.")
        layers.append(max(blocks) + 1)
        # Block input width of the official `_make_layer` ("planes"), which is timm's `channels`.
        channels.append(state_dict[f"{prefix}0.conv1.weight"].shape[0])
    expansion = 4 if block == "bottleneck" else 1
    if channels[-1] * expansion != features:
        raise ValueError(
            f"The classifier reads {features} features but the last stage gives {channels[-1] * expansion}."
        )
    name = _TIMM_RESNETS.get((block, tuple(layers)))
    kwargs: dict = {}
    if name is None:
        name, kwargs["layers"] = ("resnet50" if block == "bottleneck" else "resnet18"), layers
    if tuple(channels) != _DEFAULT_CHANNELS:
        kwargs["channels"] = channels
    # Both the official ResNet and timm's default stem have 64 channels whatever the width.
    stem_width = state_dict["encoder_q.conv1.weight"].shape[0]
    if stem_width != 64:
        raise ValueError(f"`module.encoder_q.conv1.weight` has {stem_width} output channels; a ResNet stem has 64.")
    return name, kwargs


def _normalise_id2label(id2label: Mapping | Sequence[str] | None, num_labels: int) -> dict[int, str]:
    if id2label is None:
        return {i: f"LABEL_{i}" for i in range(num_labels)}
    labels = dict(enumerate(id2label)) if isinstance(id2label, Sequence) else {int(k): v for k, v in id2label.items()}
    if sorted(labels) != list(range(num_labels)):
        raise ValueError(
            f"id2label must name every class 0..{num_labels - 1} exactly once; got {len(labels)} entries."
        )
    return {i: str(labels[i]) for i in range(num_labels)}


def load_id2label_file(path: str | os.PathLike) -> dict[int, str]:
    """Class names from a json file: a list of names (index = class id) or an `{"0": "name", ...}` object."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, list):
        return dict(enumerate(map(str, data)))
    if isinstance(data, dict):
        return {int(k): str(v) for k, v in data.items()}
    raise ValueError(f"{path}: expected a json list of class names or an object {{index: name}}.")


def convert_state_dict(
    original: Mapping[str, torch.Tensor], model: MoProForImageClassification | MoProForPreTraining
) -> dict[str, torch.Tensor]:
    """Rename an official state dict to `model`'s keys and check that the two match exactly.

    Tensors of the training state (`encoder_k.*`, `queue`, `queue_ptr`) are dropped for the release model.

    Raises:
        ValueError: listing the official keys that are unknown, missing or of the wrong shape.
    """
    expected = model.state_dict()
    release = not isinstance(model, MoProForPreTraining)
    converted, unknown = {}, []
    for key, tensor in original.items():
        new_key = rename_key(key)
        if new_key is not None and release and new_key.startswith(_TRAINING_ONLY):
            continue
        if new_key is None or new_key not in expected:
            unknown.append(f"module.{key}")
        else:
            converted[new_key] = tensor
    if isinstance(model, MoProForPreTraining):
        # Not in the official checkpoint: the phase of the schedule, set by the caller, and the given labels and
        # sample ids of the queued keys (-1: unknown, such keys never vote in the `queue_vote` rule).
        for name in ("phase", "queue_labels", "queue_sample_ids"):
            converted[name] = expected[name].clone()
    missing = [original_key(k) for k in expected if k not in converted]
    wrong_shape = [
        f"{original_key(k)}: {tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} expected"
        for k, v in converted.items()
        if v.shape != expected[k].shape
    ]
    problems = []
    if unknown:
        problems.append(f"unknown keys (not part of a {type(model).__name__}): {_summarise(unknown)}")
    if missing:
        problems.append(f"missing keys: {_summarise(missing, [original_key(k) for k in expected])}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_summarise(wrong_shape)}")
    if problems:
        raise ValueError("The checkpoint does not match the MoPro layout; " + "; ".join(problems))
    # The official buffers are float32; keep each tensor's dtype as the model declares it (e.g. long queue_ptr).
    return {k: v.to(expected[k].dtype) for k, v in converted.items()}


def _summarise(keys: list[str], all_keys: list[str] | None = None, limit: int = 20) -> str:
    """Sorted key names for an error message; an encoder missing as a whole is one entry (`module.encoder_k.*`)."""
    keys = sorted(keys)
    if all_keys is not None:
        for encoder in ("module.encoder_q.", "module.encoder_k."):
            expected = [k for k in all_keys if k.startswith(encoder)]
            if expected and all(k in keys for k in expected):
                keys = [f"{encoder}* (all {len(expected)} tensors)"] + [k for k in keys if not k.startswith(encoder)]
    shown = ", ".join(keys[:limit])
    return f"[{shown}, ... and {len(keys) - limit} more]" if len(keys) > limit else f"[{shown}]"


def phase_from_epoch(epoch: int | None) -> MoProPhase:
    """The phase of the next epoch after an official checkpoint (`epoch` = epochs completed, 90 for the release)."""
    if epoch is None or epoch >= OFFICIAL_START_CLEAN_EPOCH:
        return MoProPhase.NOISE_CORRECTION
    return MoProPhase.PROTOTYPES if epoch >= 1 else MoProPhase.WARMUP


def _model_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*") if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))


def convert_original_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    full_training_state: bool = False,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    overwrite: bool = False,
    **config_kwargs,
) -> MoProForImageClassification | MoProForPreTraining:
    """Convert an official MoPro checkpoint, and save it with `save_pretrained` when `output_dir` is given.

    Args:
        checkpoint_path: `MoPro_V1_epoch90.tar`, `MoPro_V2_epoch90.tar` or any `checkpoint_%04d.pth.tar` of the
            official `train.py` (the dict wrapper or a bare state dict; with or without the `module.` prefix).
        output_dir: where to write safetensors weights, config (with `auto_map`), modeling code and image processor.
        full_training_state: return `MoProForPreTraining` (momentum encoder, queue, prototypes, phase from the
            checkpoint's epoch: NOISE_CORRECTION at epoch 90) instead of the release `MoProForImageClassification`,
            with the pending momentum update applied (see the module docstring).
        num_labels: expected number of classes (checked against the classifier; inferred when None).
        id2label: class names (WebVision's are not shipped with the checkpoint); `LABEL_i` when None.
        overwrite: save over a model already in `output_dir` (refused otherwise, before the checkpoint is read).
        config_kwargs: further `MoProConfig` fields, e.g. `image_size`, or `encoder_momentum` when the run used
            another `--moco_m` than 0.999.

    Returns:
        The converted model, in eval mode.
    """
    if output_dir is not None:
        check_output_dir(output_dir, overwrite, _model_files, "a model ({names})")
    original, metadata = load_original_state_dict(checkpoint_path)
    config = infer_config(original, num_labels=num_labels, id2label=id2label, **config_kwargs)
    model_class = MoProForPreTraining if full_training_state else MoProForImageClassification
    model = model_class(config)
    model.load_state_dict(convert_state_dict(original, model), strict=True)
    if isinstance(model, MoProForPreTraining):
        model.set_phase(phase_from_epoch(metadata.get("epoch")))
        # The update the official forward would run first on resume; ours runs after the optimizer step instead.
        model.update_momentum_encoder()
    model.eval()
    logger.info(
        "Converted %s (arch=%s, epoch=%s) to %s: backbone %s %s, %d classes, embedding %d, queue %d.",
        checkpoint_path,
        metadata.get("arch"),
        metadata.get("epoch"),
        model_class.__name__,
        config.backbone,
        config.backbone_kwargs,
        config.num_labels,
        config.embedding_size,
        config.queue_size,
    )
    if output_dir is not None:
        model.save_pretrained(output_dir)
        # The official test transform (ImageNet mean and std), for the pipeline.
        build_image_processor(config.image_size).save_pretrained(output_dir)
        logger.info("Saved to %s", output_dir)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_path", required=True, help="Official MoPro checkpoint (.tar / .pth).")
    parser.add_argument("--output_dir", required=True, help="Folder for the converted model (save_pretrained).")
    parser.add_argument(
        "--full_training_state",
        action="store_true",
        help="Save MoProForPreTraining (momentum encoder, queue, prototypes) instead of the release model.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a model already in --output_dir.")
    parser.add_argument("--id2label_file", help="json list of class names, or {index: name}.")
    parser.add_argument("--num_labels", type=int, help="Expected number of classes (checked).")
    parser.add_argument("--image_size", type=int, default=224, help="Crop size of the saved image processor.")
    parser.add_argument(
        "--encoder_momentum",
        type=float,
        default=0.999,
        help="The run's official --moco_m; with --full_training_state it applies the pending momentum update.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert_original_checkpoint(
        args.checkpoint_path,
        output_dir=args.output_dir,
        full_training_state=args.full_training_state,
        num_labels=args.num_labels,
        overwrite=args.overwrite,
        id2label=load_id2label_file(args.id2label_file) if args.id2label_file else None,
        image_size=args.image_size,
        encoder_momentum=args.encoder_momentum,
    )


if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
