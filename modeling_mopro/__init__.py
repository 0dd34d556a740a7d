"""MoPro (Webly Supervised Learning with Momentum Prototypes, ICLR 2021) as a transformers model.

Importing the package registers the MoPro classes with the Auto classes, so `AutoModel.from_pretrained(dir)` works
without `trust_remote_code`, and marks them for auto-class export, so a saved folder also loads with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_mopro import MoProConfig
from .distributed import concat_all_gather
from .losses import instance_contrastive_loss, instance_logits, masked_cross_entropy, prototype_logits
from .modeling_mopro import (
    MoProBackbone,
    MoProForImageClassification,
    MoProForPreTraining,
    MoProForPreTrainingOutput,
    MoProImageClassifierOutput,
    MoProModel,
    MoProModelOutput,
    MoProPhase,
    MoProPreTrainedModel,
    build_image_processor,
    image_processor_for,
)
from .noise_correction import (
    correct_noisy_labels,
    correction_thresholds,
    far_from_prototypes,
    neighbour_label_vote,
    queue_label_vote,
    update_prototypes,
)

AutoConfig.register("mopro", MoProConfig, exist_ok=True)
AutoModel.register(MoProConfig, MoProModel, exist_ok=True)
AutoModelForImageClassification.register(MoProConfig, MoProForImageClassification, exist_ok=True)
AutoModelForPreTraining.register(MoProConfig, MoProForPreTraining, exist_ok=True)
AutoBackbone.register(MoProConfig, MoProBackbone, exist_ok=True)

MoProConfig.register_for_auto_class()
MoProModel.register_for_auto_class("AutoModel")
MoProForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MoProForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MoProBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "MoProBackbone",
    "MoProConfig",
    "MoProForImageClassification",
    "MoProForPreTraining",
    "MoProForPreTrainingOutput",
    "MoProImageClassifierOutput",
    "MoProModel",
    "MoProModelOutput",
    "MoProPhase",
    "MoProPreTrainedModel",
    "build_image_processor",
    "concat_all_gather",
    "correct_noisy_labels",
    "correction_thresholds",
    "far_from_prototypes",
    "image_processor_for",
    "instance_contrastive_loss",
    "instance_logits",
    "masked_cross_entropy",
    "neighbour_label_vote",
    "prototype_logits",
    "queue_label_vote",
    "update_prototypes",
]
