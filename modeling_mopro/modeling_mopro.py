"""MoPro models: a timm backbone with classifier, projection head, momentum encoder, queue and class prototypes.

[0] MoPro: Webly Supervised Learning with Momentum Prototypes, Li, Xiong & Hoi, ICLR 2021, arXiv:2009.07995.
References read while writing this file: MoCo `builder.py` (queue, shuffle-BN), salesforce/MoPro `model.py`
(the semantics followed here), transformers `modeling_resnet.py` (the PreTrainedModel conventions).

Three classes share one weight layout (`mopro.backbone.*`, `mopro.projection.*`, `mopro.prototypes`, `classifier.*`):
- `MoProModel` (AutoModel): pooled features, the L2-normalised embedding and its similarity to every prototype.
- `MoProForImageClassification` (AutoModelForImageClassification, the pipeline): classifier logits.
- `MoProForPreTraining` (AutoModelForPreTraining): the training model, which adds the momentum encoder and the queue.
`MoProBackbone` (AutoBackbone) loads the backbone of any of them and returns multi-scale feature maps.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from enum import IntEnum

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConvNextImageProcessorPil, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.modeling_outputs import BackboneOutput
from transformers.utils import ModelOutput

from .configuration_mopro import MoProConfig
from .distributed import batch_shuffle, batch_unshuffle, concat_all_gather, gather_sizes, is_distributed
from .losses import instance_contrastive_loss, instance_logits, masked_cross_entropy, prototype_logits
from .noise_correction import (
    correct_noisy_labels,
    correction_thresholds,
    far_from_prototypes,
    queue_label_vote,
    update_prototypes,
)


class MoProPhase(IntEnum):
    """Training phases of the official schedule (`train.py`: `is_proto=epoch>0`, `is_clean=epoch>=11`)."""

    WARMUP = 0  # CE + instance loss; prototypes follow the given labels
    PROTOTYPES = 1  # + prototypical loss
    NOISE_CORRECTION = 2  # + relabelling and OOD removal; prototypes follow the corrected, kept samples


@dataclass
class MoProModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state: the backbone's last feature map before pooling, (N, F, h, w) for a CNN (timm
            `forward_features`).
        pooler_output: (N, F) pooled backbone features.
        embeddings: (N, D) L2-normalised projection of the features.
        prototype_similarities: (N, K) cosine similarity of each embedding to each class prototype (zeros for a
            model whose prototypes were never trained); `1 - max` is a simple OOD score.
        hidden_states: with `output_hidden_states=True`, one feature map per stage of the backbone's
            `feature_info` (timm `forward_intermediates`), e.g. 5 for a ResNet (stem and 4 stages).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    prototype_similarities: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MoProImageClassifierOutput(ModelOutput):
    """
    Args:
        loss: when `labels` are given, the loss `config.problem_type` selects (cross-entropy for single-label
            classification, BCE-with-logits for multi-label, MSE for regression), as in transformers' classifiers.
        logits: (N, K) classifier logits.
        embeddings: (N, D) L2-normalised embeddings.
        hidden_states: with `output_hidden_states=True`, the backbone's per-stage feature maps.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MoProForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss: `loss_cls + instance_loss_weight * loss_instance + prototype_loss_weight * loss_prototype`.
        loss_cls / loss_instance / loss_prototype: the components (the prototype term is 0 during warm-up).
        logits: (N, K) classifier logits of the query (weak) view.
        embeddings: (N, D) query embeddings q.
        instance_logits: (N, 1 + Q) `[q.k, q.queue] / T`, target column 0.
        prototype_logits: (N, K) `q.prototypes^T / T`.
        corrected_labels: (N,) labels after noise correction (the given labels before it starts).
        keep_mask: (N,) False for samples found out-of-distribution (left out of the CE and prototype losses).
        relabel_mask: (N,) True where the corrected label differs from the given one.
    """

    loss: torch.FloatTensor | None = None
    loss_cls: torch.FloatTensor | None = None
    loss_instance: torch.FloatTensor | None = None
    loss_prototype: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    instance_logits: torch.FloatTensor | None = None
    prototype_logits: torch.FloatTensor | None = None
    corrected_labels: torch.LongTensor | None = None
    keep_mask: torch.BoolTensor | None = None
    relabel_mask: torch.BoolTensor | None = None


def build_image_processor(
    image_size: int = 224,
    image_mean: list[float] | tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    image_std: list[float] | tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> ConvNextImageProcessorPil:
    """A stock transformers image processor reproducing the official test transform at `image_size` (a MoPro
    model's `config.image_size`): resize the short side to `int(image_size / (224 / 256))` (bilinear, as
    torchvision's `Resize(256)`), centre-crop `image_size`, normalise with `image_mean` / `image_std`.

    Greyscale, palette and RGBA images are converted to RGB first (`do_convert_rgb`), as the evaluation and training
    loaders do; without it the 3-value mean does not broadcast over their 1 or 4 channels. Save it beside the model
    (`processor.save_pretrained(dir)`) so that `pipeline("image-classification", model=dir)` works.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"`image_size` must be a positive integer, got {image_size!r}.")
    for name, values in (("image_mean", image_mean), ("image_std", image_std)):
        if len(values) != 3:
            raise ValueError(f"`{name}` must have 3 values (RGB), got {values!r}.")
    if any(v <= 0 for v in image_std):
        raise ValueError(f"`image_std` must be positive, got {image_std!r}.")
    return ConvNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_pct=224 / 256,
        resample=PILImageResampling.BILINEAR,
        image_mean=[float(v) for v in image_mean],
        image_std=[float(v) for v in image_std],
        do_convert_rgb=True,
    )


def image_processor_for(config: MoProConfig) -> ConvNextImageProcessorPil:
    """The image processor saved beside the model that `config` was loaded from (`config.name_or_path`), or, for a
    model built in memory or a folder without one, `build_image_processor(config.image_size)` (ImageNet mean and
    std). Evaluation, training restarts and releases read the normalisation from here, as the pipeline does."""
    folder = config.name_or_path
    if folder and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        return ConvNextImageProcessorPil.from_pretrained(folder)
    return build_image_processor(config.image_size)


def create_backbone(config: MoProConfig) -> nn.Module:
    """The timm backbone, returning pooled features (`num_classes=0`). Never downloads: weights come from
    `from_pretrained`, or from timm by the caller if they want an ImageNet start.

    `config.backbone_zero_init_last` goes to timm as `zero_init_last` when the backbone's constructor takes it
    (ResNets, RegNets, CSPNets, ...). A constructor without it rejects the keyword before building anything, and is
    then called without it: those backbones have no last-BN-of-a-block choice to make.
    """
    kwargs = {"pretrained": False, "num_classes": 0, **config.backbone_kwargs}
    try:
        return timm.create_model(config.backbone, zero_init_last=config.backbone_zero_init_last, **kwargs)
    except TypeError as error:
        if "zero_init_last" not in str(error):
            raise
    return timm.create_model(config.backbone, **kwargs)


class MoProProjectionHead(nn.Module):
    """Linear -> ReLU -> Linear -> L2 normalisation (official `fc1`, `fc2`, `F.normalize`).

    Runs in the dtype of its own weights (float32 for a model trained with autocast), never in autocast's: the
    embeddings feed the instance and prototype similarities, which the official fp32 run computes in full precision.
    """

    def __init__(self, in_features: int, hidden_size: int, embedding_size: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.fc2 = nn.Linear(hidden_size, embedding_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.to(self.fc1.weight.dtype)  # differentiable: gradients reach a bf16 backbone
            return F.normalize(self.fc2(F.relu(self.fc1(features))), dim=1)


class MoProMomentumEncoder(nn.Module):
    """The key encoder: same modules as the query side (backbone, projection, classifier), updated only by EMA."""

    def __init__(self, config: MoProConfig):
        super().__init__()
        self.backbone = create_backbone(config)
        num_features = self.backbone.num_features
        self.projection = MoProProjectionHead(num_features, config.projection_hidden_size, config.embedding_size)
        # Unused by the loss, but EMA'd as in the official code so converted checkpoints keep every tensor.
        self.classifier = nn.Linear(num_features, config.num_labels)
        self.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, bn_groups: int = 1) -> torch.Tensor:
        """Keys (N, D) of `pixel_values` (N, 3, H, W).

        With `bn_groups` > 1 in training mode, the batch is cut into `bn_groups` consecutive groups (sizes differ by
        at most one) and BatchNorm normalises each group with that group's statistics alone: exactly as if every
        group went through its own copy of the encoder, like the per-GPU key batches of the official 8-GPU run.
        """
        if bn_groups == 1 or not self.training:
            return self.projection(self.backbone(pixel_values))
        return self.projection(_forward_in_groups(self.backbone, pixel_values.tensor_split(bn_groups)))


@torch.no_grad()
def _forward_in_groups(module: nn.Module, groups: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`module` on each group separately, concatenated; its BatchNorm running statistics take *one* step per call.

    One forward per group is exact whatever the layer (timm's fused BatchNormAct too), works for any batch size and
    keeps channels_last inputs as they are; MoCo's single-GPU SplitBatchNorm does the same in one pass, but needs a
    batch divisible by the groups and its own BatchNorm class. Run naively, the loop would move the running
    statistics once per group (and count `bn_groups` batches per step); here every group starts from the same
    statistics and the result is their mean over groups, `(1 - momentum) * old + momentum * mean_g(batch stat_g)`:
    the update SplitBatchNorm makes, one step per training step as the official run counts them.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    norms = [m for m in norms if m.running_mean is not None]
    stats = [t for m in norms for t in (m.running_mean, m.running_var)]
    counters = [m.num_batches_tracked for m in norms]
    start_stats, start_counters = [t.clone() for t in stats], [t.clone() for t in counters]
    sums = [torch.zeros_like(t) for t in stats]
    outputs = []
    for group in groups:
        if stats:
            torch._foreach_copy_(stats, start_stats)
            torch._foreach_copy_(counters, start_counters)  # ends at start + 1, as after one batch
        outputs.append(module(group))
        if stats:
            torch._foreach_add_(sums, stats)
    if stats:
        torch._foreach_div_(sums, len(groups))
        torch._foreach_copy_(stats, sums)
    return torch.cat(outputs)


class MoProPreTrainedModel(PreTrainedModel):
    config_class = MoProConfig
    base_model_prefix = "mopro"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # Trainer would otherwise assume forward(**kwargs) already scales the loss for gradient accumulation.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this only for modules that own tensors directly, and only for tensors a checkpoint did
        # not fill (the `init.*` functions skip loaded ones). So heads are initialised at their `nn.Linear`
        # leaves: a wrapper such as the projection head or the classification model is never visited.
        # The query backbone is done before this runs (`initialize_weights`), with timm's own initialisation.
        if isinstance(module, nn.Linear):
            _init_linear(module)  # classifier and projection layers (the momentum copies are overwritten below)
        elif isinstance(module, MoProModel):
            init.zeros_(module.prototypes)  # official: prototypes start at zero and fill during the first epoch
        elif isinstance(module, MoProForPreTraining):
            init.normal_(module.queue)
            init.copy_(module.queue, F.normalize(module.queue, dim=0))
            init.zeros_(module.queue_ptr)
            init.zeros_(module.phase)
            # -1: no label / sample known for the slot. A checkpoint saved before these buffers existed loads with
            # them so, and its queued keys stay out of the `queue_vote` rule until the queue has turned over.
            init.constant_(module.queue_labels, -1)
            init.constant_(module.queue_sample_ids, -1)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialisation of whatever a checkpoint lacked, after giving every query-side timm
        backbone tensor that holds no value yet (missing from the checkpoint, or built on the meta device) the
        value of a freshly built backbone: timm's own initialisation, BatchNorm statistics reset,
        `backbone_zero_init_last` honoured. transformers' generic init would give convolutions N(0, 0.02) instead,
        and it never visits timm's container modules."""
        for module in self.modules():
            if isinstance(module, (MoProModel, MoProBackbone)):
                _init_backbone_like_timm(module.backbone, module.config)
        super().initialize_weights()

    def _keep_constructor_init(self, module: nn.Module) -> None:
        """A module built with real tensors already holds its constructor's initialisation: timm's for a backbone,
        PyTorch's default for a Linear head (what `_init_weights` would draw again). Flag it, so that transformers'
        init keeps it and draws no random numbers for it. Built on the meta device it holds nothing yet, and
        `initialize_weights` fills it."""
        if not any(t.is_meta for t in module.state_dict().values()):
            _mark_initialised(module)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save weights (safetensors), config with `auto_map` for every MoPro class, and the modeling code when the
        classes are registered for auto-class export. As for any transformers model, the image processor is saved
        by whoever built it (`build_image_processor(...).save_pretrained(dir)`; `run_mopro.py`, the converter and
        `evaluation.release` do), so that `pipeline(model=dir)` works."""
        if self._auto_class is not None:
            # transformers writes only the saved class into auto_map; the pipeline and AutoModel need the others.
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoConfig": "configuration_mopro.MoProConfig",
                "AutoModel": "modeling_mopro.MoProModel",
                "AutoModelForImageClassification": "modeling_mopro.MoProForImageClassification",
                "AutoModelForPreTraining": "modeling_mopro.MoProForPreTraining",
                "AutoBackbone": "modeling_mopro.MoProBackbone",
            }
        super().save_pretrained(save_directory, *args, **kwargs)


def _mark_initialised(module: nn.Module) -> None:
    """Flag every tensor of `module` as holding its final initial value, so that transformers' init skips it."""
    for tensor in module.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True


@torch.no_grad()
def _init_backbone_like_timm(backbone: nn.Module, config: MoProConfig) -> None:
    """Copy a freshly built backbone's values into the tensors of `backbone` that transformers has not flagged
    as initialised (loaded or built with real values), then flag them all."""
    missing = {n: t for n, t in backbone.state_dict(keep_vars=True).items() if not getattr(t, "_is_hf_initialized", 0)}
    if missing:
        fresh = create_backbone(config).state_dict()
        for name, tensor in missing.items():
            tensor.copy_(fresh[name])
    _mark_initialised(backbone)


def _init_linear(linear: nn.Linear) -> None:
    """PyTorch's default Linear initialisation (what the official heads used)."""
    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    if linear.bias is not None:
        bound = 1 / math.sqrt(linear.weight.shape[1])
        init.uniform_(linear.bias, -bound, bound)


class MoProModel(MoProPreTrainedModel):
    """Backbone -> pooled features -> projection -> L2-normalised embedding, plus the class prototypes."""

    def __init__(self, config: MoProConfig):
        super().__init__(config)
        self.backbone = create_backbone(config)
        self.num_features = self.backbone.num_features
        self.projection = MoProProjectionHead(self.num_features, config.projection_hidden_size, config.embedding_size)
        self.register_buffer("prototypes", torch.zeros(config.num_labels, config.embedding_size))  # (K, D)
        self._keep_constructor_init(self.backbone)
        self._keep_constructor_init(self.projection)
        self.post_init()

    def encode(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(last feature map, pooled features (N, F), per-stage feature maps or None) of the backbone.
        timm's `forward_head(forward_features(x))` is its `forward(x)`; `forward_intermediates` gives the stages."""
        if output_hidden_states:
            last_hidden_state, hidden_states = self.backbone.forward_intermediates(pixel_values)
            hidden_states = tuple(hidden_states)
        else:
            last_hidden_state, hidden_states = self.backbone.forward_features(pixel_values), None
        return last_hidden_state, self.backbone.forward_head(last_hidden_state), hidden_states

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoProModelOutput | tuple[torch.Tensor, ...]:
        """
        Args:
            pixel_values: (N, 3, H, W) images normalised by the model's image processor.
            output_hidden_states: also return the backbone's per-stage feature maps (`config.output_hidden_states`
                by default).
            return_dict: a `MoProModelOutput` (default, `config.return_dict`) or a tuple of its non-None fields.
        """
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        last_hidden_state, pooled, hidden_states = self.encode(pixel_values, output_hidden_states)  # pooled: (N, F)
        embeddings = self.projection(pooled)  # (N, D)
        output = MoProModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            embeddings=embeddings,
            prototype_similarities=embeddings @ self.prototypes.T,  # (N, K)
            hidden_states=hidden_states,
        )
        return output if return_dict else output.to_tuple()


class MoProForImageClassification(MoProPreTrainedModel):
    """The release model: the query encoder with its classifier (and the prototypes, inside `mopro`).

    Fine-tune it like any transformers image classifier: `from_pretrained(dir, num_labels=N,
    ignore_mismatched_sizes=True)` gives a new classifier (and new prototypes) with PyTorch's default Linear
    initialisation, and `config.problem_type` chooses the loss.
    """

    # A pre-training checkpoint loads as its release model (the evaluation protocols do this): the momentum encoder
    # and the queue are training state, expected to be left out.
    _keys_to_ignore_on_load_unexpected = [r"momentum_encoder\.", r"^queue", r"^phase$"]

    def __init__(self, config: MoProConfig):
        super().__init__(config)
        self.mopro = MoProModel(config)
        self.classifier = nn.Linear(self.mopro.num_features, config.num_labels)
        self._keep_constructor_init(self.classifier)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoProImageClassifierOutput | tuple[torch.Tensor, ...]:
        """
        Args:
            pixel_values: (N, 3, H, W) images normalised by the model's image processor.
            labels: (N,) class indices for single-label classification, (N, K) floats for multi-label
                classification or regression. The loss is transformers' image-classification loss: it follows
                `config.problem_type`, inferred from `num_labels` and the label dtype when unset (as ResNet's).
            output_hidden_states: also return the backbone's per-stage feature maps.
            return_dict: a `MoProImageClassifierOutput` (default, `config.return_dict`) or a tuple.
        """
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        _, pooled, hidden_states = self.mopro.encode(pixel_values, output_hidden_states)  # pooled: (N, F)
        logits = self.classifier(pooled)  # (N, K)
        loss = None
        if labels is not None:
            if self.config.num_labels > 1 and labels.dtype in (torch.long, torch.int):  # class indices
                _check_labels(labels, self.config.num_labels)
            loss = self.loss_function(labels, logits, self.config)
        output = MoProImageClassifierOutput(
            loss=loss, logits=logits, embeddings=self.mopro.projection(pooled), hidden_states=hidden_states
        )
        return output if return_dict else output.to_tuple()


class MoProBackbone(BackboneMixin, MoProPreTrainedModel):
    """Multi-scale feature maps of a MoPro backbone, for detection and segmentation heads: a transformers backbone
    (`BackboneMixin`, as `TimmBackbone` and `ResNetBackbone`), so that heads built from a `backbone_config`
    (`UperNetForSemanticSegmentation`, DPT, ...) accept a `MoProConfig` and call it through
    `forward_with_filtered_kwargs`.

    It loads from any MoPro folder (release, base or training model): its weights are the query backbone,
    `mopro.backbone.*`; the heads, prototypes, momentum encoder and queue of the folder are left out.
    Stages are the backbone's timm `feature_info` entries (a ResNet: `act1`, `layer1` ... `layer4`); choose them with
    `out_indices` (positions, negative from the end) or `out_features` (names), e.g.
    `MoProBackbone.from_pretrained(dir, out_indices=[1, 2, 3, 4])` or, from a config,
    `AutoBackbone.from_config(MoProConfig.from_pretrained(dir), out_indices=[1, 2, 3, 4])` (random weights).
    (`AutoBackbone.from_pretrained` on a local folder fails in transformers 5.24-5.25, for every model: it asks the
    Hub whether the path is a repo.) The default is the last stage, as in transformers. The two are linked, as in
    transformers' backbone configs: giving or setting one re-derives the other, and both are kept in
    `config.out_indices` / `config.out_features`, so a saved backbone reloads with its choice, or with another one
    given to `from_pretrained`.
    Feature maps come from timm's `forward_intermediates`, which keeps the weight layout of the plain backbone (a
    `features_only` timm model renames modules for some architectures).
    """

    base_model_prefix = "mopro"
    has_attentions = False  # a convolutional body: `forward_with_filtered_kwargs` drops `output_attentions`
    # A MoPro folder holds more than the backbone; these are expected to be left out.
    _keys_to_ignore_on_load_unexpected = [
        r"projection\.",
        r"prototypes",
        r"classifier\.",
        r"momentum_encoder\.",
        r"queue",
        r"queue_ptr",
        r"phase",
    ]

    def __init__(
        self, config: MoProConfig, out_indices: list[int] | None = None, out_features: list[str] | None = None
    ):
        if out_indices is not None or out_features is not None:  # given here: they replace the config's pair
            config.out_indices, config.out_features = out_indices, out_features
        backbone = create_backbone(config)
        # BackboneMixin's timm path: `backbone_type` TIMM, stage names from timm's `feature_info`
        # (`_init_timm_backbone` below), keyword filtering by this forward's signature.
        super().__init__(config, timm_backbone=backbone)
        self.mopro = nn.Module()  # keeps the `mopro.backbone.*` keys of every MoPro folder
        self.mopro.backbone = backbone
        self._keep_constructor_init(self.mopro.backbone)
        self.post_init()

    def _init_timm_backbone(self, backbone: nn.Module) -> None:
        # The mixin's own version needs a `BackboneConfigMixin` config; a `MoProConfig` is the whole model's config
        # (shared with the classifier), so the stage choice is resolved and written back here.
        info = backbone.feature_info
        self.stage_names = [stage["module"] for stage in info]
        self.num_features = [stage["num_chs"] for stage in info]
        self._set_outputs(getattr(self.config, "out_indices", None), getattr(self.config, "out_features", None))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`; an `out_indices` or `out_features` given here replaces the saved pair
        (the other one is re-derived), as `ResNetBackbone.from_pretrained(dir, out_indices=...)` does."""
        if kwargs.get("out_indices") is not None or kwargs.get("out_features") is not None:
            kwargs.setdefault("out_indices", None)
            kwargs.setdefault("out_features", None)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _set_outputs(self, out_indices, out_features) -> None:
        """Validates the stage choice (one of the two, or both naming the same stages; the last stage by default)
        and stores both, positive and in stage order, in the config."""
        names = self.stage_names
        if out_features is not None:
            unknown = [name for name in out_features if name not in names]
            if unknown:
                raise ValueError(f"`out_features` {unknown} are not stages of {self.config.backbone}: {names}.")
            indices = [names.index(name) for name in out_features]
            if out_indices is not None and [i % len(names) for i in out_indices] != indices:
                raise ValueError(
                    f"`out_indices` {out_indices} and `out_features` {out_features} name different stages."
                )
        else:
            indices = list(out_indices) if out_indices is not None else [-1]
            if any(not -len(names) <= i < len(names) for i in indices):
                raise ValueError(f"`out_indices` {indices} must index the {len(names)} stages {names}.")
            indices = [i % len(names) for i in indices]
        if indices != sorted(set(indices)):
            raise ValueError(f"`out_indices` must be increasing and without repeats, got {indices}.")
        self.config.out_indices, self.config.out_features = indices, [names[i] for i in indices]

    @property
    def backbone(self) -> nn.Module:
        return self.mopro.backbone

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @out_indices.setter
    def out_indices(self, out_indices: list[int]) -> None:
        self._set_outputs(out_indices, None)  # linked: out_features follows

    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @out_features.setter
    def out_features(self, out_features: list[str]) -> None:
        self._set_outputs(None, out_features)  # linked: out_indices follows

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        """
        Returns:
            `BackboneOutput` with `feature_maps`, one (N, C_i, H / r_i, W / r_i) map per selected stage, and with
            `output_hidden_states=True` every stage's map in `hidden_states`.
        """
        if output_attentions:
            raise ValueError("MoProBackbone is convolutional: it has no attentions to output")
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        indices = None if output_hidden_states else self.out_indices
        stages = self.backbone.forward_intermediates(pixel_values, indices=indices, intermediates_only=True)
        if output_hidden_states:
            hidden_states = tuple(stages)
            feature_maps = tuple(hidden_states[i] for i in self.out_indices)
        else:
            hidden_states, feature_maps = None, tuple(stages)
        output = BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)
        return output if return_dict else output.to_tuple()


@functools.lru_cache(maxsize=16)
def pixel_statistics_on(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean` and `std` as (3, 1, 1) float32 tensors on `device`, made once per (device, mean, std): a host-to-device
    copy at every step would wait for the device. Callers must not modify them in place."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device) for v in (mean, std))


class MoProForPreTraining(MoProPreTrainedModel):
    """The MoPro training model: query encoder + classifier, momentum encoder, MoCo queue and momentum prototypes.

    One training step (as official `model.py` + `train.py`):
        q  = projection(backbone(weak view)),   logits = classifier(...)
        k  = momentum_encoder(strong view)       (no gradient; shuffle-BN across processes, BatchNorm groups in one)
        L_ins: [q.k, q.queue] / T against column 0, over all samples; then k is enqueued
        noise correction (phase NOISE_CORRECTION): corrected labels and a keep mask from classifier + prototypes
            (`noise_correction_rule="queue_vote"`, not official: + the given labels of the nearest queued keys)
        prototypes <- EMA of the (kept, gathered) q by (corrected) label, then L2-normalised
        L = CE(kept) + w_inst L_ins + w_proto L_pro(kept)      (L_pro from phase PROTOTYPES on)

    The phase is model state (`set_phase`), saved with checkpoints; the Trainer sets it from the epoch.
    Call `update_momentum_encoder()` after every optimizer step (the Trainer's callback does): it is equivalent to
    the official update at the start of the next forward, and stays right under gradient accumulation.
    State (queue, prototypes) changes only in training mode.

    Precision: under a caller's bf16/fp16 autocast (the Trainer's `bf16=True`) only the two backbones run in reduced
    precision. Everything after pooling (classifier, projections, instance and prototype logits, soft labels,
    prototype update, losses) runs in float32, as in the official fp32 run: the keep test compares a soft score with
    1/K (0.001 at 1,000 classes), and bf16 logits move such scores by percents. Parameters and buffers follow
    `.to(dtype)` like any module's, but training a model cast to 16 bits is refused: a 0.999 EMA step is below
    bf16's resolution, so the prototypes and the momentum encoder would stop moving.
    """

    def __init__(self, config: MoProConfig):
        super().__init__(config)
        self.mopro = MoProModel(config)
        self.classifier = nn.Linear(self.mopro.num_features, config.num_labels)
        self._keep_constructor_init(self.classifier)
        self.momentum_encoder = MoProMomentumEncoder(config)
        self.register_buffer("queue", torch.zeros(config.embedding_size, config.queue_size))  # (D, Q)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # Given label and dataset index of each queued key, written with the keys under `noise_correction_rule=
        # "queue_vote"` (its neighbour vote; the index keeps a sample's own earlier keys out of its vote).
        self.register_buffer("queue_labels", torch.full((config.queue_size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("queue_sample_ids", torch.full((config.queue_size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("phase", torch.tensor(int(MoProPhase.WARMUP), dtype=torch.long))
        # Strength of the correction in phase NOISE_CORRECTION (1: the official rule). Set by the Trainer from its
        # correction schedule at every step, like the phase, and saved with the schedule, so not a buffer.
        self.correction_strength = 1.0
        # The label-range check reads the labels' min and max back to the host: one synchronisation per step on a
        # GPU. `MoProTrainer` turns it off when its collator already checked every label against `num_labels`.
        self.validate_labels = True
        # (mean, std) when key batches arrive as uint8 (`set_key_pixel_normalization`); None: they arrive normalised.
        self.key_pixel_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.post_init()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        # A momentum tensor (parameter or buffer) with no value yet (just built, or missing from a checkpoint)
        # starts as a copy of its query tensor; a loaded one is kept. Those whose query tensor is final are copied
        # first, so that the generic init does not draw random values for them only to overwrite them; the others
        # once the query side is initialised.
        self._copy_query_into_momentum(final_query_only=True)
        super().initialize_weights()
        self._copy_query_into_momentum(final_query_only=False)

    def _copy_query_into_momentum(self, final_query_only: bool) -> None:
        for q, k in zip(self._query_state(), self._momentum_state(), strict=True):
            if getattr(k, "_is_hf_initialized", False):
                continue
            if final_query_only and not getattr(q, "_is_hf_initialized", False):
                continue
            k.copy_(q)
            k._is_hf_initialized = True

    # ----------------------------------------------------------------------------------------------- state
    def _query_modules(self) -> list[nn.Module]:
        return [self.mopro.backbone, self.mopro.projection, self.classifier]

    def _momentum_modules(self) -> list[nn.Module]:
        k = self.momentum_encoder
        return [k.backbone, k.projection, k.classifier]

    def _query_state(self) -> list[torch.Tensor]:
        return [t for m in self._query_modules() for t in m.state_dict(keep_vars=True).values()]

    def _momentum_state(self) -> list[torch.Tensor]:
        return [t for m in self._momentum_modules() for t in m.state_dict(keep_vars=True).values()]

    @property
    def current_phase(self) -> MoProPhase:
        return MoProPhase(int(self.phase))

    def set_phase(self, phase: MoProPhase | int) -> None:
        """Switch the training phase (WARMUP -> PROTOTYPES -> NOISE_CORRECTION)."""
        self.phase.fill_(int(MoProPhase(phase)))

    def set_correction_strength(self, strength: float) -> None:
        """Strength in (0, 1] of the noise correction (`correction_thresholds`); 1 is the official rule."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"correction strength must be in (0, 1], got {strength}")
        self.correction_strength = float(strength)

    def set_key_pixel_normalization(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        """Accept uint8 key batches (`pixel_values_key`), normalised with `mean`/`std` (over [0, 1] pixels, as
        torchvision's `ToDtype(scale=True)` + `Normalize`) *after* shuffle-BN's gather: every process then receives a
        quarter of float32's bytes, and the keys are the same as from a batch normalised before (elementwise ops
        commute with a gather). `None, None` goes back to normalised key batches only."""
        if mean is None and std is None:
            self.key_pixel_normalization = None
            return
        if mean is None or std is None or len(mean) != 3 or len(std) != 3 or any(v <= 0 for v in std):
            raise ValueError(f"key pixel normalisation needs 3 means and 3 positive stds, got {mean!r}, {std!r}.")
        self.key_pixel_normalization = (tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def _normalize_key_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32, as `training.data.transforms.normalize_pixels` (same ops, same bits)."""
        if self.key_pixel_normalization is None:
            raise ValueError(
                "pixel_values_key is uint8 but the model has no key normalisation: call "
                "`set_key_pixel_normalization(mean, std)` or pass normalised float keys."
            )
        mean, std = pixel_statistics_on(pixels.device, *self.key_pixel_normalization)
        return pixels.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)

    def _check_training_precision(self) -> None:
        """Training needs float32 state (see the class docstring); autocast is the way to train in bf16/fp16."""
        dtypes = {self.classifier.weight.dtype, self.mopro.prototypes.dtype, self.queue.dtype}
        half = dtypes & {torch.float16, torch.bfloat16}
        if half:
            raise ValueError(
                f"MoProForPreTraining cannot train in {half.pop()}: its 0.999 EMAs (prototypes, momentum encoder) "
                "are below 16-bit resolution. Keep the model in float32 and use autocast (Trainer `bf16=True`)."
            )

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float | None = None) -> None:
        """EMA of the query *parameters* into the momentum encoder: k <- m k + (1 - m) q (official `moco_m`).
        BatchNorm buffers are not averaged: the momentum encoder's own forward passes keep them."""
        m = self.config.encoder_momentum if momentum is None else momentum
        q = [p for mod in self._query_modules() for p in mod.parameters()]
        k = [p for mod in self._momentum_modules() for p in mod.parameters()]
        torch._foreach_mul_(k, m)
        torch._foreach_add_(k, q, alpha=1 - m)

    @torch.no_grad()
    def _momentum_keys(self, pixel_values_key: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """k (N, D, float32) for the strong view, never normalised with the statistics of the batch the query saw.

        Several processes: MoCo's shuffle-BN, each process normalises a random slice of the global batch. One process
        (where that shuffle is the identity): a random permutation of the batch is normalised in
        `config.momentum_encoder_bn_groups` virtual groups, then un-permuted. The permutation comes from torch's
        global RNG, which Trainer checkpoints save, so a resumed run draws the same one.

        A uint8 batch (`set_key_pixel_normalization`) is normalised after the shuffle's gather. The batch's memory
        format (channels_last with `--channels_last`) is kept through the shuffle. `sizes`: this step's
        `gather_sizes`, read once per step.
        """
        groups = self.config.momentum_encoder_bn_groups
        channels_last = pixel_values_key.dim() == 4 and not pixel_values_key.is_contiguous()
        channels_last = channels_last and pixel_values_key.is_contiguous(memory_format=torch.channels_last)

        def encoder_input(pixels: torch.Tensor) -> torch.Tensor:
            if pixels.dtype == torch.uint8:
                pixels = self._normalize_key_pixels(pixels)
            return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels

        if is_distributed() or groups == 1 or not self.training:  # eval: BatchNorm uses running statistics
            shuffled, inverse, sizes = batch_shuffle(pixel_values_key, sizes)
            k = self.momentum_encoder(encoder_input(shuffled))
            return batch_unshuffle(k, inverse, sizes)  # (N, D)
        pixel_values_key = encoder_input(pixel_values_key)
        n = pixel_values_key.shape[0]
        # A batch that lost undecodable images may be short: fewer groups then, never fewer than 2 keys in one
        # (BatchNorm needs 2). A per-device batch too small for the groups is refused up front by MoProTrainer.
        groups = min(groups, n // 2)
        if groups <= 1:
            return self.momentum_encoder(pixel_values_key)
        perm = torch.randperm(n, device=pixel_values_key.device)
        k = self.momentum_encoder(pixel_values_key[perm], bn_groups=groups)
        return k[torch.argsort(perm)]  # (N, D)

    @torch.no_grad()
    def _enqueue(
        self, k_all: torch.Tensor, labels_all: torch.Tensor | None = None, sample_ids_all: torch.Tensor | None = None
    ) -> None:
        """Write the global batch of keys at the pointer, wrapping around (no need for Q % batch == 0), and with
        `labels_all` (N,) their given labels and `sample_ids_all` (N,) their dataset indices (-1 when not given)
        into the same slots.

        The pointer stays on the device: the write positions are computed there, never read back to the host."""
        queue_size = self.queue.shape[1]
        n = k_all.shape[0]
        keep = slice(-queue_size, None)  # a global batch larger than the queue keeps its newest keys
        k_all = k_all[keep]
        offsets = n - k_all.shape[0] + torch.arange(k_all.shape[0], device=k_all.device)
        idx = (self.queue_ptr + offsets) % queue_size
        self.queue[:, idx] = k_all.T.to(self.queue.dtype)
        if labels_all is not None:
            self.queue_labels[idx] = labels_all[keep]
            self.queue_sample_ids[idx] = -1 if sample_ids_all is None else sample_ids_all[keep]
        self.queue_ptr.add_(n).remainder_(queue_size)

    @torch.no_grad()
    def _update_prototypes(
        self, q: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, sizes: list[int] | None = None
    ) -> None:
        """Prototype EMA over the *global* batch of kept samples, so every process holds the same prototypes.
        The left-out samples are masked, not indexed away (no host synchronisation)."""
        q_all, labels_all = concat_all_gather(q, sizes), concat_all_gather(labels, sizes)
        keep_all = concat_all_gather(keep, sizes)
        new = update_prototypes(
            self.mopro.prototypes, q_all, labels_all, self.config.prototype_momentum, mask=keep_all
        )
        self.mopro.prototypes.copy_(new)

    # --------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_values_key: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoProForPreTrainingOutput:
        """
        Args:
            pixel_values: (N, 3, H, W) weak (query) view.
            pixel_values_key: (N, 3, H, W) strong (key) view. Without it there is no instance loss.
            labels: (N,) given web labels. Without them: logits and embeddings only.
            sample_ids: (N,) dataset index of each sample (the collator's `sample_ids`). Used only by
                `noise_correction_rule="queue_vote"`, to keep a sample's own earlier keys out of its neighbour vote.
        """
        config = self.config
        if labels is not None:
            if self.validate_labels:
                _check_labels(labels, config.num_labels)
            if self.training:
                self._check_training_precision()
        # Every process's batch size, read once for all of this step's gathers (the step's one host sync; none with
        # one process).
        sizes = gather_sizes(labels.shape[0], labels.device) if labels is not None and is_distributed() else None
        # Keys first: nothing else depends on the order, and a key batch too small for the BatchNorm groups fails
        # before any state moves. Both backbones run in the caller's autocast dtype; the keys come back in float32.
        k = None
        if labels is not None and pixel_values_key is not None:
            k = self._momentum_keys(pixel_values_key, sizes)  # (N, D)
        pooled = self.mopro.backbone(pixel_values)  # (N, F)

        # From here on float32 whatever the caller's autocast (see the class docstring); `.to` keeps the gradient.
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            pooled = pooled.to(self.classifier.weight.dtype)
            logits = self.classifier(pooled)  # (N, K)
            q = self.mopro.projection(pooled)  # (N, D)
            # Snapshots: autograd needs the queue and prototypes as they were, and both are updated in place below.
            prototypes = self.mopro.prototypes.clone()  # (K, D)
            proto_logits = prototype_logits(q, prototypes, config.temperature)  # (N, K)
            if labels is None:
                output = MoProForPreTrainingOutput(logits=logits, embeddings=q, prototype_logits=proto_logits)
                return output if return_dict is not False else output.to_tuple()
            # The phase decides on the device (`torch.where`), never read back to the host: the correction is
            # always computed (two softmaxes over (N, K)) and used from phase NOISE_CORRECTION on; the prototype
            # loss is always computed and counted from phase PROTOTYPES on. Same values as branching on the phase.
            correcting = self.phase >= int(MoProPhase.NOISE_CORRECTION)  # 0-d bool, on the device
            threshold, ood_threshold = correction_thresholds(
                self.correction_strength, config.pseudo_label_threshold, config.num_labels
            )
            queue_vote = config.noise_correction_rule == "queue_vote"
            vote = None
            if queue_vote:  # not official: the given labels of the nearest queued keys vote too (config docstring)
                vote = queue_label_vote(
                    q.detach(), self.queue, self.queue_labels, config.num_labels, config.queue_vote_k,
                    config.temperature, sample_ids, self.queue_sample_ids,
                )  # fmt: skip  # (N, K); the queue as it was before this step's keys
            corrected, corrected_keep = correct_noisy_labels(
                logits.detach(), proto_logits.detach(), labels, config.alpha, threshold, ood_threshold,
                neighbour_vote=vote, vote_weight=config.queue_vote_weight,
            )  # fmt: skip
            if config.ood_rule == "prototype_distance":
                corrected_keep &= ~far_from_prototypes(q.detach(), prototypes, config.ood_similarity_threshold)
            targets = torch.where(correcting, corrected, labels)
            keep = torch.where(correcting, corrected_keep, True)

            loss_instance = inst_logits = None
            if k is not None:
                inst_logits = instance_logits(q, k, self.queue.clone(), config.temperature)  # (N, 1 + Q)
                loss_instance = instance_contrastive_loss(inst_logits)
                if self.training:  # after the logits and the vote: a key is never its own negative nor neighbour
                    labels_all = ids_all = None
                    if queue_vote:  # the label queue is written only where it is read: no extra gather otherwise
                        labels_all = concat_all_gather(labels, sizes)
                        ids_all = None if sample_ids is None else concat_all_gather(sample_ids, sizes)
                    self._enqueue(concat_all_gather(k, sizes), labels_all, ids_all)
            if self.training:
                self._update_prototypes(q.detach(), targets, keep, sizes)

            loss_cls = masked_cross_entropy(logits, targets, keep)
            loss = loss_cls
            if loss_instance is not None:
                loss = loss + config.instance_loss_weight * loss_instance
            # 0 before phase PROTOTYPES (its gradient too): adding 0 leaves the loss and every gradient as they were.
            with_prototypes = self.phase >= int(MoProPhase.PROTOTYPES)
            loss_prototype = masked_cross_entropy(proto_logits, targets, keep)
            loss_prototype = torch.where(with_prototypes, loss_prototype, torch.zeros_like(loss_prototype))
            loss = loss + config.prototype_loss_weight * loss_prototype

            output = MoProForPreTrainingOutput(
                loss=loss,
                loss_cls=loss_cls.detach(),
                loss_instance=None if loss_instance is None else loss_instance.detach(),
                loss_prototype=loss_prototype.detach(),
                logits=logits,
                embeddings=q,
                instance_logits=inst_logits,
                prototype_logits=proto_logits,
                corrected_labels=targets,
                keep_mask=keep,
                relabel_mask=targets != labels,
            )
        return output if return_dict is not False else output.to_tuple()

    # --------------------------------------------------------------------------------------------- release
    def to_release_model(self) -> MoProForImageClassification:
        """The release model (backbone, projection, prototypes, classifier) without momentum encoder and queue."""
        release = MoProForImageClassification(self.config)
        keys = release.state_dict().keys()
        release.load_state_dict({k: v for k, v in self.state_dict().items() if k in keys}, strict=True)
        return release.to(self.device)

    def save_release_model(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """`save_pretrained` of the release model alone: what goes to the Hub."""
        self.to_release_model().save_pretrained(save_directory, **kwargs)


def _check_labels(labels: torch.Tensor, num_labels: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(
            f"labels must be in [0, {num_labels}), got values in [{int(labels.min())}, {int(labels.max())}]."
        )


__all__ = [
    "MoProBackbone",
    "MoProForImageClassification",
    "MoProForPreTraining",
    "MoProForPreTrainingOutput",
    "MoProImageClassifierOutput",
    "MoProModel",
    "MoProModelOutput",
    "MoProPhase",
    "MoProPreTrainedModel",
    "build_image_processor",
    "image_processor_for",
]
