"""The noise scores on constructed embeddings whose answer is known: which labels are wrong, which samples are OOD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.noise_scores import DECISIONS, nearest_neighbours, noise_scores, two_mode_posterior
from modeling_mopro import neighbour_label_vote

NUM_CLASSES = 4
DIM = 16


def constructed_case(per_class: int = 50, num_wrong: int = 6, num_ood: int = 60, seed: int = 0):
    """Four tight class clusters, `num_wrong` samples per class carrying another class's label, and an OOD cluster
    away from them whose labels are uniform over the classes. Returns (embeddings, given labels, true labels)."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(NUM_CLASSES, DIM, generator=generator), dim=1)
    ood_centre = F.normalize(torch.randn(DIM, generator=generator), dim=0)
    embeddings, true, given = [], [], []
    for c in range(NUM_CLASSES):
        embeddings.append(prototypes[c] + 0.05 * torch.randn(per_class, DIM, generator=generator))
        true += [c] * per_class
        labels = [c] * per_class
        for i in range(num_wrong):  # a wrong label, spread over the other classes
            labels[i] = (c + 1 + i % (NUM_CLASSES - 1)) % NUM_CLASSES
        given += labels
    embeddings.append(ood_centre + 0.05 * torch.randn(num_ood, DIM, generator=generator))
    true += [-1] * num_ood
    given += [i % NUM_CLASSES for i in range(num_ood)]  # uniform labels: every class equally
    return F.normalize(torch.cat(embeddings), dim=1), torch.tensor(given), np.asarray(true)


def test_scores_find_the_wrong_labels_and_the_ood_cluster():
    embeddings, given, true = constructed_case()
    out = noise_scores(embeddings, given, NUM_CLASSES, temperature=0.1, num_neighbours=20)
    is_ood = true < 0
    wrong = ~is_ood & (given.numpy() != true)
    clean = ~is_ood & ~wrong
    # Rankings: every wrong label scores below every right one; every OOD sample above every in-distribution one.
    assert out["label_quality"][wrong].max() < out["label_quality"][clean].min()
    assert out["ood_score"][is_ood].min() > out["ood_score"][~is_ood].max()
    # The neighbour vote of an OOD sample is near uniform: its normalised entropy is close to 1.
    assert out["ood_score"][is_ood].min() > 0.8
    # Fitted decisions: exactly the OOD cluster, every wrong label relabelled to its true class, the rest clean.
    decision = np.asarray(DECISIONS)[out["decision"]]
    assert (decision[is_ood] == "ood").all() and (decision[~is_ood] != "ood").all()
    assert (decision[wrong] == "relabelled").all() and (decision[clean] == "clean").all()
    np.testing.assert_array_equal(out["suggested_label"][wrong], true[wrong])
    np.testing.assert_allclose(out["class_evidence"].sum(1), 1, atol=1e-5)


def test_a_clean_dataset_is_left_alone():
    """One mode in each score: BIC keeps a single Gaussian and nothing is flagged (a forced two-way split would
    call a share of a clean dataset wrong)."""
    embeddings, given, true = constructed_case(num_wrong=0, num_ood=0)
    out = noise_scores(embeddings, given, NUM_CLASSES, temperature=0.1, num_neighbours=20)
    assert (out["decision"] == DECISIONS.index("clean")).all()
    assert out["ood_probability"].max() == 0 and out["label_issue_probability"].max() == 0


def test_two_mode_posterior():
    rng = np.random.default_rng(0)
    one_mode = rng.normal(0, 1, 500)
    assert two_mode_posterior(one_mode).max() == 0
    two_modes = np.concatenate([rng.normal(0, 0.1, 400), rng.normal(1, 0.1, 100)])
    posterior = two_mode_posterior(two_modes)
    assert (posterior[400:] > 0.5).all() and (posterior[:400] < 0.5).all()  # the high mode is the flagged one
    assert two_mode_posterior(np.ones(10)).max() == 0 and len(two_mode_posterior(np.arange(3.0))) == 3


def test_nearest_neighbours_leave_the_sample_out_and_match_brute_force():
    embeddings = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    similarities, indices = nearest_neighbours(embeddings, k=5, chunk_size=7)  # several chunks
    brute = embeddings @ embeddings.T
    brute.fill_diagonal_(-math.inf)
    top = brute.topk(5, dim=1)
    torch.testing.assert_close(similarities, top.values)
    assert torch.equal(indices, top.indices) and not (indices == torch.arange(50)[:, None]).any()
    # A bounded reference set: neighbours come from the seeded subset only, still never the sample itself.
    similarities, indices = nearest_neighbours(embeddings, k=3, max_reference=20, seed=3)
    assert len(set(indices.flatten().tolist())) <= 20 and not (indices == torch.arange(50)[:, None]).any()
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbours(embeddings[:1], k=3)


def test_neighbour_vote_weights_by_similarity():
    similarities = torch.tensor([[0.9, 0.1]])
    indices = torch.tensor([[0, 1]])
    labels = torch.tensor([2, 0])
    vote = neighbour_label_vote(similarities, labels[indices], num_classes=3, temperature=0.1)
    expected = torch.softmax(torch.tensor([9.0, 1.0]), 0)
    torch.testing.assert_close(vote, torch.tensor([[expected[1], 0.0, expected[0]]]))
