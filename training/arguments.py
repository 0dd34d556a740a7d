"""Argument dataclasses of `training/run_mopro.py` (parsed by `HfArgumentParser` from YAML and the command line).

Model hyperparameters live in `MoProConfig`; these dataclasses only say how to build it, where the data is, and
the schedule (phase starts, learning-rate milestones), which belongs to training rather than to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .data import DataArguments  # noqa: F401  (re-exported: the three argument groups of run_mopro.py)


@dataclass
class ModelArguments:
    """Which model to train. Unset MoPro hyperparameters keep the official defaults of `MoProConfig`."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved MoPro folder to start from (release or training model)."}
    )
    backbone: str = field(default="resnet50", metadata={"help": "Any timm model name."})
    backbone_kwargs: str | None = field(
        default=None, metadata={"help": "JSON dict for timm.create_model, e.g. '{\"layers\": [1, 1, 1, 1]}'."}
    )
    image_size: int = field(
        default=224, metadata={"help": "Crop size for training and for the image processor saved with the model."}
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={
            "help": "Normalisation mean of the training views and of the image processor saved with the model. "
            "Default: the processor of --model_name_or_path, else ImageNet's."
        },
    )
    image_std: list[float] | None = field(default=None, metadata={"help": "Normalisation std, as --image_mean."})
    embedding_size: int | None = field(default=None, metadata={"help": "Embedding size (official 128)."})
    projection_hidden_size: int | None = field(default=None, metadata={"help": "Projection width (official 2048)."})
    queue_size: int | None = field(default=None, metadata={"help": "MoCo queue length (official 8192)."})
    encoder_momentum: float | None = field(default=None, metadata={"help": "Momentum encoder EMA (official 0.999)."})
    prototype_momentum: float | None = field(default=None, metadata={"help": "Prototype EMA (official 0.999)."})
    temperature: float | None = field(default=None, metadata={"help": "Contrastive temperature (official 0.1)."})
    alpha: float | None = field(default=None, metadata={"help": "Classifier weight in the soft label (0.5)."})
    pseudo_label_threshold: float | None = field(default=None, metadata={"help": "Relabel threshold (0.8)."})
    instance_loss_weight: float | None = field(default=None, metadata={"help": "w_inst (official 1.0)."})
    prototype_loss_weight: float | None = field(default=None, metadata={"help": "w_proto (official 1.0)."})
    ood_rule: str | None = field(default=None, metadata={"help": "'official' or 'prototype_distance'."})
    ood_similarity_threshold: float | None = field(default=None, metadata={"help": "For 'prototype_distance'."})

    def config_overrides(self) -> dict:
        """The MoProConfig fields that were set explicitly."""
        names = (
            "embedding_size", "projection_hidden_size", "queue_size", "encoder_momentum", "prototype_momentum",
            "temperature", "alpha", "pseudo_label_threshold", "instance_loss_weight", "prototype_loss_weight",
            "ood_rule", "ood_similarity_threshold",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class MoProTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the MoPro schedule. Epochs are 0-indexed, as in the official code."""

    # The collators decode raw image columns, which the model's forward does not name.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for the collator."})
    # all_gather of keys and embeddings expects equal per-process batches, as in the official code.
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch."})
    baseline: str = field(
        default="mopro",
        metadata={"help": "'mopro', or 'ce' for the vanilla cross-entropy baseline (same data and backbone)."},
    )
    prototype_start_epoch: float = field(
        default=1, metadata={"help": "Prototypical loss from this epoch (official: epoch > 0)."}
    )
    noise_correction_start_epoch: float = field(
        default=11, metadata={"help": "Noise correction from this epoch (official `start_clean_epoch` 11)."}
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

    def __post_init__(self):
        super().__post_init__()
        if self.baseline not in ("mopro", "ce"):
            raise ValueError(f"`baseline` must be 'mopro' or 'ce', got {self.baseline!r}.")
        if self.noise_correction_start_epoch < self.prototype_start_epoch:
            raise ValueError("`noise_correction_start_epoch` must not come before `prototype_start_epoch`.")
        if self.samples_per_epoch is not None and self.samples_per_epoch <= 0:
            raise ValueError(f"`samples_per_epoch` must be positive, got {self.samples_per_epoch}.")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"`lr_gamma` must be in (0, 1], got {self.lr_gamma}.")
