"""The two MoPro rules as pure functions, against the official per-sample semantics (`tests/_tiny.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_mopro import correct_noisy_labels, far_from_prototypes, update_prototypes
from tests._tiny import reference_correct_labels, reference_update_prototypes

THRESHOLDS = (0.2, 0.5, 0.8, 0.95, 1.0)


def random_logits(num_samples: int, num_classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Classifier logits of mixed confidence and prototype logits shaped like real ones (cosine / T, T = 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(num_samples, 1, generator=generator) * 6  # from near-uniform to confident rows
    class_logits = torch.randn(num_samples, num_classes, generator=generator) * scale
    q = F.normalize(torch.randn(num_samples, 8, generator=generator), dim=1)
    prototypes = F.normalize(torch.randn(num_classes, 8, generator=generator), dim=1)
    prototype_logits = q @ prototypes.T / 0.1
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return class_logits, prototype_logits, labels


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("num_classes", [2, 4, 10, 100])
def test_correct_noisy_labels_matches_official_loop(num_classes, alpha):
    class_logits, prototype_logits, labels = random_logits(128, num_classes, seed=num_classes)
    relabelled = dropped = 0
    for threshold in THRESHOLDS:
        corrected, keep = correct_noisy_labels(class_logits, prototype_logits, labels, alpha, threshold)
        expected, expected_keep, ambiguous = reference_correct_labels(
            class_logits, prototype_logits, labels, alpha, threshold
        )
        assert corrected.dtype == torch.long and keep.dtype == torch.bool
        assert ambiguous.sum() <= 2, "too many samples on a decision boundary for the check to mean anything"
        decided = ~ambiguous
        torch.testing.assert_close(corrected[decided], expected[decided], rtol=0, atol=0)
        torch.testing.assert_close(keep[decided], expected_keep[decided], rtol=0, atol=0)
        relabelled += int((expected != labels).sum())
        dropped += int((~expected_keep).sum())
    # The data must exercise both outcomes, or agreement would prove little.
    assert relabelled > 0 and dropped > 0


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_threshold_one_never_relabels(alpha):
    # Saturated softmaxes put a score of exactly 1.0 on one class: 1.0 > 1.0 must still be False.
    class_logits, prototype_logits, labels = random_logits(256, 5, seed=1)
    corrected, keep = correct_noisy_labels(class_logits * 1e3, prototype_logits * 1e3, labels, alpha, 1.0)
    assert torch.equal(corrected, labels)
    _, expected_keep, ambiguous = reference_correct_labels(
        class_logits * 1e3, prototype_logits * 1e3, labels, alpha, 1.0
    )
    assert torch.equal(keep[~ambiguous], expected_keep[~ambiguous])
    assert (~keep).any(), "saturated scores on another class must make some given labels OOD"


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_extremes_use_a_single_source(alpha):
    class_logits, prototype_logits, labels = random_logits(128, 6, seed=2)
    noise = torch.randn(class_logits.shape, generator=torch.Generator().manual_seed(3)) * 5
    reference = correct_noisy_labels(class_logits, prototype_logits, labels, alpha, 0.6)
    if alpha == 1.0:  # classifier only: the prototype logits must not matter
        perturbed = correct_noisy_labels(class_logits, prototype_logits + noise, labels, alpha, 0.6)
    else:  # prototypes only
        perturbed = correct_noisy_labels(class_logits + noise, prototype_logits, labels, alpha, 0.6)
    assert torch.equal(reference[0], perturbed[0]) and torch.equal(reference[1], perturbed[1])
    expected, expected_keep, ambiguous = reference_correct_labels(class_logits, prototype_logits, labels, alpha, 0.6)
    assert torch.equal(reference[0][~ambiguous], expected[~ambiguous])
    assert torch.equal(reference[1][~ambiguous], expected_keep[~ambiguous])


def test_hand_computed_cases():
    # K = 4, alpha = 0.5; prototype logits are uniform, so the soft score is 0.5 * p_cls + 0.125.
    big = 20.0
    class_logits = torch.tensor(
        [
            [big, 0, 0, 0],  # given 1, soft(0) ~ 0.625: not > 0.8, soft(1) ~ 0.125 <= 1/4 -> OOD
            [big, 0, 0, 0],  # given 0: kept, not relabelled
            [0.0, 0, 0, 0],  # uniform: soft(given) = 1/4 exactly, not > 1/4 -> OOD
            [0, 0, big, 0],  # given 3 -> relabelled to 2 with threshold 0.6 (kept although soft(3) < 1/4)
        ]
    )
    prototype_logits = torch.zeros(4, 4)
    labels = torch.tensor([1, 0, 2, 3])
    corrected, keep = correct_noisy_labels(class_logits, prototype_logits, labels, 0.5, 0.8)
    assert corrected.tolist() == [1, 0, 2, 3] and keep.tolist() == [False, True, False, False]
    corrected, keep = correct_noisy_labels(class_logits, prototype_logits, labels, 0.5, 0.6)
    assert corrected.tolist() == [0, 0, 2, 2] and keep.tolist() == [True, True, False, True]


def test_far_from_prototypes_known_mask():
    eye = torch.eye(8)
    prototypes = eye[:4]  # classes 0..3 along the first four axes
    embeddings = torch.stack(
        [
            eye[0],  # on prototype 0: similarity 1
            F.normalize(eye[1] + eye[2], dim=0),  # 0.707 to prototypes 1 and 2
            F.normalize(eye[3] + 2 * eye[5], dim=0),  # 0.447 to prototype 3
            eye[6],  # orthogonal to all: 0
            -eye[0],  # opposite prototype 0, orthogonal to the rest: 0
        ]
    )
    assert far_from_prototypes(embeddings, prototypes, 0.5).tolist() == [False, False, True, True, True]
    assert far_from_prototypes(embeddings, prototypes, 0.0).tolist() == [False, False, False, False, False]
    assert far_from_prototypes(embeddings, prototypes, 0.9).tolist() == [False, True, True, True, True]


def _prototype_case(case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    num_classes, dim = 10, 16
    prototypes = F.normalize(torch.randn(num_classes, dim, generator=generator, dtype=torch.float64), dim=1)
    if case == "zero_init":
        prototypes.zero_()
    elif case == "partly_zero":
        prototypes[[1, 7, 8]] = 0
    num_samples = 0 if case == "empty" else 300
    # Skewed, repeated labels; classes 7..9 never appear.
    weights = torch.tensor([20.0, 1, 5, 1, 8, 2, 3, 0, 0, 0])
    labels = torch.multinomial(weights, 300, replacement=True, generator=generator)[:num_samples]
    embeddings = F.normalize(torch.randn(num_samples, dim, generator=generator, dtype=torch.float64), dim=1)
    return prototypes.to(dtype), embeddings.to(dtype), labels


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["random_init", "zero_init", "partly_zero", "empty"])
def test_update_prototypes_matches_official_loop(case, dtype, momentum):
    prototypes, embeddings, labels = _prototype_case(case, dtype)
    original = prototypes.clone()
    new = update_prototypes(prototypes, embeddings, labels, momentum)
    expected = reference_update_prototypes(prototypes, embeddings, labels, momentum)
    assert new.dtype == dtype and new.shape == prototypes.shape
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(new, expected, rtol=0, atol=atol)
    assert torch.equal(prototypes, original), "the input prototypes must not be modified"
    absent = torch.ones(prototypes.shape[0], dtype=torch.bool)
    absent[labels] = False
    zero_rows = original.abs().sum(dim=1) == 0
    # Classes never seen keep a zero row; every other row is unit-norm.
    assert torch.equal(new[absent & zero_rows], torch.zeros_like(new[absent & zero_rows]))
    norms = new[~(absent & zero_rows)].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)


def test_update_prototypes_follows_batch_order():
    # With m = 0.5 the later of two same-class samples weighs twice as much: order must matter.
    prototypes = torch.zeros(2, 2)
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    forward = update_prototypes(prototypes, embeddings, labels, 0.5)
    backward = update_prototypes(prototypes, embeddings.flip(0), labels, 0.5)
    torch.testing.assert_close(forward[0], F.normalize(torch.tensor([0.25, 0.5]), dim=0))
    torch.testing.assert_close(backward[0], F.normalize(torch.tensor([0.5, 0.25]), dim=0))
    assert torch.equal(forward[1], torch.zeros(2))
