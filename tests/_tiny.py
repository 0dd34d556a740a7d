"""Tiny MoPro configs and inputs, plus slow reference versions of the official rules, shared by the MoPro tests.

The `reference_*` functions restate salesforce/MoPro `model.py` one sample at a time, in plain Python, so that
the vectorised code in `modeling_mopro` is checked against the official semantics and not against itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from modeling_mopro import MoProConfig, MoProForPreTraining


def tiny_model_flags(queue_size: int, bn_groups: int | None = 2) -> list[str]:
    """`run_mopro.py` flags for a tiny model: ResNet-18 with one block per stage (8-64 channels), small heads."""
    flags = [
        "--backbone", "resnet18", "--backbone_kwargs", '{"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}',
        "--projection_hidden_size", "32", "--embedding_size", "16", "--queue_size", str(queue_size),
    ]  # fmt: skip
    return flags + (["--momentum_encoder_bn_groups", str(bn_groups)] if bn_groups is not None else [])


class MoProModelTester:
    """Builds a ~64k-parameter MoPro (ResNet with one block per stage, 32 px inputs) and random inputs for it.

    Args:
        batch_size: images per batch.
        num_labels: number of classes K.
        queue_size: MoCo queue length Q; 20 is deliberately not a multiple of the default batch of 6.
    """

    def __init__(self, batch_size: int = 6, num_labels: int = 4, queue_size: int = 20, image_size: int = 32):
        self.batch_size = batch_size
        self.num_labels = num_labels
        self.queue_size = queue_size
        self.image_size = image_size

    def get_config(self, **overrides) -> MoProConfig:
        values = dict(
            backbone="resnet18",
            backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [4, 8, 16, 32], "stem_width": 4},
            # Official init (every BN gamma 1). timm's zero-init of the last gamma of each block would give the convs
            # before it an exactly-zero gradient and hide a missing gradient behind a legitimate zero.
            backbone_zero_init_last=False,
            num_labels=self.num_labels,
            projection_hidden_size=16,
            embedding_size=8,
            queue_size=self.queue_size,
            image_size=self.image_size,
            # One process: the key batch is normalised in virtual groups; the default 8 needs 16 keys, batch 6 has
            # two groups of 3. The official-reference tests set 1, the reference having no groups.
            momentum_encoder_bn_groups=2,
        )
        values.update(overrides)
        return MoProConfig(**values)

    def prepare_inputs(
        self, seed: int = 0, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel_values (N, 3, H, W), pixel_values_key (N, 3, H, W), labels (N,)) from a fixed seed."""
        n = batch_size or self.batch_size
        generator = torch.Generator().manual_seed(seed)
        pixel_values = torch.randn(n, 3, self.image_size, self.image_size, generator=generator)
        # The key view is a perturbed copy, as a strong augmentation of the same image would be.
        pixel_values_key = pixel_values + 0.5 * torch.randn(pixel_values.shape, generator=generator)
        labels = torch.randint(0, self.num_labels, (n,), generator=generator)
        return pixel_values, pixel_values_key, labels

    def prepare_config_and_inputs(
        self, seed: int = 0, **overrides
    ) -> tuple[MoProConfig, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(config, pixel_values, pixel_values_key, labels), transformers' ModelTester style."""
        return (self.get_config(**overrides), *self.prepare_inputs(seed))

    def create_pretraining_model(self, config: MoProConfig | None = None, seed: int = 0) -> MoProForPreTraining:
        """A MoProForPreTraining in training mode, with weights fixed by `seed`."""
        torch.manual_seed(seed)
        return MoProForPreTraining(config or self.get_config()).train()


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Cloned copy of every parameter and buffer (BN running stats, queue, pointer, prototypes, phase)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed_entries(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Names whose tensors are not bit-identical to `before` (shape, dtype and every value)."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    return [name for name, tensor in before.items() if not torch.equal(tensor, after[name].detach())]


def query_momentum_pairs(model: MoProForPreTraining) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, query parameter, momentum parameter) for every momentum parameter, matched by name, not by order."""
    query = dict(model.named_parameters())
    momentum_prefix = {
        "momentum_encoder.backbone.": "mopro.backbone.",
        "momentum_encoder.projection.": "mopro.projection.",
    }
    momentum_prefix["momentum_encoder.classifier."] = "classifier."
    for name, parameter in model.momentum_encoder.named_parameters(prefix="momentum_encoder"):
        prefix = next(p for p in momentum_prefix if name.startswith(p))
        yield name, query[momentum_prefix[prefix] + name[len(prefix) :]], parameter


# ------------------------------------------------------------------------------------ official semantics, slowly
def reference_soft_label(class_logits: list[float], prototype_logits: list[float], alpha: float) -> list[float]:
    """`alpha * softmax(class) + (1 - alpha) * softmax(proto)` for one sample, in float64."""

    def softmax(row: list[float]) -> list[float]:
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        return [e / sum(exps) for e in exps]

    p, r = softmax(class_logits), softmax(prototype_logits)
    return [alpha * a + (1 - alpha) * b for a, b in zip(p, r, strict=True)]


def reference_correct_labels(
    class_logits: torch.Tensor,
    prototype_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    threshold: float,
    margin: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official noise correction one sample at a time (`model.py`, `is_clean` branch).

    The score of the *given* label is read before relabelling; a sample is relabelled to the soft-label argmax
    when the largest score exceeds `threshold`; it is kept when its given-label score exceeds 1/K or it was
    relabelled. Computed in float64, so `ambiguous` marks samples whose decision lies within `margin` of a
    boundary (float32 rounding in the model may legitimately decide those either way).

    Returns:
        corrected (N,) long, keep (N,) bool, ambiguous (N,) bool.
    """
    num_classes = class_logits.shape[1]
    corrected, keep, ambiguous = [], [], []
    for cls_row, proto_row, label in zip(
        class_logits.tolist(), prototype_logits.tolist(), labels.tolist(), strict=True
    ):
        soft = reference_soft_label(cls_row, proto_row, alpha)
        given_score = soft[label]
        ranked = sorted(range(num_classes), key=lambda c: soft[c], reverse=True)
        best = ranked[0]
        relabel = soft[best] > threshold
        corrected.append(best if relabel else label)
        keep.append(given_score > 1 / num_classes or relabel)
        # A float32 soft score never exceeds 1.0, so a threshold of 1.0 has no boundary to be near.
        near_threshold = threshold < 1.0 and abs(soft[best] - threshold) < margin
        near = abs(given_score - 1 / num_classes) < margin or near_threshold
        tie = num_classes > 1 and soft[ranked[0]] - soft[ranked[1]] < margin
        ambiguous.append(near or (relabel and tie))
    return torch.tensor(corrected, dtype=torch.long), torch.tensor(keep), torch.tensor(ambiguous)


def reference_update_prototypes(
    prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Official prototype update: one EMA step per sample in batch order, then one L2 normalisation of all rows."""
    prototypes = prototypes.clone()
    for feature, label in zip(features, labels, strict=True):
        prototypes[label] = prototypes[label] * momentum + (1 - momentum) * feature
    return F.normalize(prototypes, p=2, dim=1)


def reference_enqueue(queue: torch.Tensor, pointer: int, keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A ring buffer written one key at a time: key j goes to column (pointer + j) % Q, later keys win."""
    queue = queue.clone()
    queue_size = queue.shape[1]
    for j, key in enumerate(keys):
        queue[:, (pointer + j) % queue_size] = key
    return queue, (pointer + keys.shape[0]) % queue_size
