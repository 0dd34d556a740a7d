"""MoPro model configuration.

[0] MoPro: Webly Supervised Learning with Momentum Prototypes, Li, Xiong & Hoi, ICLR 2021, arXiv:2009.07995.
Defaults are those of the official code (salesforce/MoPro `train.py`), which produced the published numbers.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

OOD_RULES = ("official", "prototype_distance")
NOISE_CORRECTION_RULES = ("official", "queue_vote")


class MoProConfig(PreTrainedConfig):
    r"""Configuration of a MoPro model: a timm backbone, a linear classifier, a 2-layer projection to an
    L2-normalised embedding, a momentum (EMA) copy of all three, a MoCo queue of keys and one momentum prototype
    per class.

    Args:
        backbone (`str`, defaults to `"resnet50"`):
            Any `timm` model name. It is built with `num_classes=0` so that it returns pooled features.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `{"layers": [1, 1, 1, 1], "channels": [8, 16,
            32, 64]}` for a tiny ResNet). `pretrained` is never passed: weights come from `from_pretrained`.
        projection_hidden_size (`int`, defaults to 2048):
            Width of the projection's hidden layer (official `fc1`).
        embedding_size (`int`, defaults to 128):
            Size of the L2-normalised embedding (official `low_dim`), shared by queue and prototypes.
        queue_size (`int`, defaults to 8192):
            Number of momentum keys kept as negatives (official `moco_queue`). It need not be a multiple of the
            global batch: the write pointer wraps around.
        encoder_momentum (`float`, defaults to 0.999):
            EMA coefficient of the momentum encoder (official `moco_m`), in [0, 1).
        prototype_momentum (`float`, defaults to 0.999):
            EMA coefficient of the class prototypes (official `proto_m`), in [0, 1).
        temperature (`float`, defaults to 0.1):
            Temperature of the instance and prototypical contrastive logits.
        alpha (`float`, defaults to 0.5):
            Weight of the classifier in the soft label `alpha * p_cls + (1 - alpha) * p_proto`, in [0, 1].
        pseudo_label_threshold (`float`, defaults to 0.8):
            A sample is relabelled when the largest soft-label score exceeds it (official `pseudo_th`), in (0, 1].
        instance_loss_weight (`float`, defaults to 1.0):
            Weight of the instance contrastive loss (official `w_inst`), >= 0.
        prototype_loss_weight (`float`, defaults to 1.0):
            Weight of the prototypical contrastive loss (official `w_proto`), >= 0.
        ood_rule (`str`, defaults to `"official"`):
            How out-of-distribution samples are found once correction runs. `"official"`: a sample that is not
            relabelled is OOD when the soft score of its given label is <= 1/K (official code). `"prototype_distance"`:
            additionally, a sample whose embedding has cosine similarity below `ood_similarity_threshold` to every
            prototype is OOD (the paper's description: "far from every prototype").
        ood_similarity_threshold (`float`, defaults to 0.5):
            Cosine-similarity threshold of the `"prototype_distance"` rule, in [-1, 1].
        noise_correction_rule (`str`, defaults to `"official"`):
            The soft label the correction decides from. `"official"`: `alpha * p_cls + (1 - alpha) * p_proto`.
            `"queue_vote"` (not official; see BENCHMARKS.md, "Regime grid"): that soft label mixed with the vote of
            the given labels of the `queue_vote_k` momentum-queue keys nearest to the sample (cosine, weights
            `exp(similarity / temperature)`), `(1 - queue_vote_weight) * official + queue_vote_weight * vote`; the
            relabel and OOD thresholds are unchanged. The queue keeps each key's given label (`queue_labels`) for it.
            Meant for natural confusions (shirt labelled T-shirt), where the classifier and the prototypes, trained
            on the wrong label, confirm it while the image's neighbours mostly carry its true class. Where a confused
            class has 30-45% of its labels flipped, no vote reaches the official 0.8: the development benchmark chose
            `pseudo_label_threshold=0.6` with it (and the defaults below).
        queue_vote_k (`int`, defaults to 50):
            Neighbours of the `"queue_vote"` rule, at most `queue_size` under that rule (only filled queue slots
            vote).
        queue_vote_weight (`float`, defaults to 0.5):
            Weight of the neighbour vote in the `"queue_vote"` soft label, in (0, 1] (1: the vote alone).
        backbone_zero_init_last (`bool`, defaults to `False`):
            Whether the backbone zero-initialises the last BatchNorm gamma of each residual block (timm's default
            for ResNets). The official ResNet sets every gamma to 1, hence `False`. Passed to timm as
            `zero_init_last` for the backbones that take it (older configs that set `"zero_init_last"` in
            `backbone_kwargs` load with it moved here).
        momentum_encoder_bn_groups (`int`, defaults to 8):
            With a single process, MoCo's cross-process shuffle-BN is the identity and the momentum encoder's
            BatchNorm would see the whole batch the query saw, letting the instance task cheat through batch
            statistics. Then the shuffled key batch is normalised in this many virtual groups (8: the official
            8-GPU split of the global batch of 256). `1` turns this off. Ignored with several processes, where
            the cross-process shuffle-BN runs.
        image_size (`int`, defaults to 224):
            Input resolution the model is trained and evaluated at (as `image_size` in transformers' ViT and ConvNeXt
            configs); `build_image_processor` crops to it by default. The normalisation mean and std are not model
            fields: they live in the image processor saved beside the model (`preprocessor_config.json`).

    Example:
    ```python
    >>> from modeling_mopro import MoProConfig, MoProForPreTraining
    >>> config = MoProConfig(num_labels=1000)  # WebVision-V1, ResNet-50
    >>> model = MoProForPreTraining(config)
    ```
    """

    model_type = "mopro"
    # Extra fields of the training output that must not leak into Trainer eval predictions.
    keys_to_ignore_at_inference: ClassVar[list[str]] = [
        "embeddings",
        "prototype_logits",
        "instance_logits",
        "corrected_labels",
        "keep_mask",
        "relabel_mask",
        "loss_cls",
        "loss_instance",
        "loss_prototype",
    ]

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] | None = None
    projection_hidden_size: int = 2048
    embedding_size: int = 128
    queue_size: int = 8192
    encoder_momentum: float = 0.999
    prototype_momentum: float = 0.999
    temperature: float = 0.1
    alpha: float = 0.5
    pseudo_label_threshold: float = 0.8
    instance_loss_weight: float = 1.0
    prototype_loss_weight: float = 1.0
    ood_rule: str = "official"
    ood_similarity_threshold: float = 0.5
    noise_correction_rule: str = "official"
    queue_vote_k: int = 50
    queue_vote_weight: float = 0.5
    backbone_zero_init_last: bool = False
    momentum_encoder_bn_groups: int = 8
    image_size: int = 224

    def __post_init__(self, **kwargs):
        # Folders saved before the normalisation moved to the image processor carry it in config.json too; their
        # preprocessor_config.json holds the same values, and that file is what the pipeline and evaluation read.
        for name in ("image_mean", "image_std"):
            if kwargs.pop(name, None) is not None:
                logger.warning_once(
                    f"`{name}` in a MoPro config is ignored: the normalisation belongs to the image processor "
                    "(`build_image_processor(image_mean=..., image_std=...)`, saved as preprocessor_config.json)."
                )
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        if "zero_init_last" in self.backbone_kwargs:  # configs written before `backbone_zero_init_last` existed
            # The field's default (False) cannot be told from an explicit False, so only True vs False conflicts.
            legacy = self.backbone_kwargs.pop("zero_init_last")
            if self.backbone_zero_init_last is True and legacy is False:
                raise ValueError(
                    "`backbone_kwargs['zero_init_last']=False` contradicts `backbone_zero_init_last=True`: "
                    "set only `backbone_zero_init_last`."
                )
            self.backbone_zero_init_last = legacy
        self._validate_hyperparameters()
        super().__post_init__(**kwargs)

    def _validate_hyperparameters(self) -> None:
        """Raise a `ValueError` naming the first invalid field. Runs before anything is built."""
        _check_backbone(self.backbone)
        if "pretrained" in self.backbone_kwargs or "num_classes" in self.backbone_kwargs:
            raise ValueError("`backbone_kwargs` may not set `pretrained` or `num_classes`: the model controls both.")
        if not isinstance(self.backbone_zero_init_last, bool):
            raise ValueError(f"`backbone_zero_init_last` must be a bool, got {self.backbone_zero_init_last!r}.")
        for name in (
            "projection_hidden_size", "embedding_size", "queue_size", "image_size", "momentum_encoder_bn_groups",
            "queue_vote_k",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("encoder_momentum", "prototype_momentum"):
            _check_range(name, getattr(self, name), 0.0, 1.0, "[0, 1)", low_open=False, high_open=True)
        _check_range("temperature", self.temperature, 0.0, float("inf"), "(0, inf)", low_open=True, high_open=True)
        _check_range("alpha", self.alpha, 0.0, 1.0, "[0, 1]", low_open=False, high_open=False)
        _check_range(
            "pseudo_label_threshold", self.pseudo_label_threshold, 0.0, 1.0, "(0, 1]", low_open=True, high_open=False
        )
        for name in ("instance_loss_weight", "prototype_loss_weight"):
            _check_range(name, getattr(self, name), 0.0, float("inf"), "[0, inf)", low_open=False, high_open=True)
        if self.ood_rule not in OOD_RULES:
            raise ValueError(f"`ood_rule` must be one of {OOD_RULES}, got {self.ood_rule!r}.")
        _check_range(
            "ood_similarity_threshold",
            self.ood_similarity_threshold,
            -1.0,
            1.0,
            "[-1, 1]",
            low_open=False,
            high_open=False,
        )
        if self.noise_correction_rule not in NOISE_CORRECTION_RULES:
            raise ValueError(
                f"`noise_correction_rule` must be one of {NOISE_CORRECTION_RULES}, got {self.noise_correction_rule!r}."
            )
        if self.noise_correction_rule == "queue_vote" and self.queue_vote_k > self.queue_size:
            raise ValueError(
                f"`queue_vote_k` must be at most `queue_size` ({self.queue_size}), got {self.queue_vote_k!r}."
            )
        _check_range("queue_vote_weight", self.queue_vote_weight, 0.0, 1.0, "(0, 1]", low_open=True, high_open=False)


def _check_backbone(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"`backbone` must be a timm model name, got {name!r}.")
    try:
        import timm
    except ImportError:  # validated again when the model is built
        return
    if not timm.is_model(name):
        raise ValueError(f"`backbone`={name!r} is not a known timm model (see `timm.list_models()`).")


def _check_range(name: str, value: Any, low: float, high: float, text: str, *, low_open: bool, high_open: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number in {text}, got {value!r}.")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or math.isnan(value):
        raise ValueError(f"`{name}` must be in {text}, got {value!r}.")


__all__ = ["MoProConfig"]
