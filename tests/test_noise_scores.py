"""The noise scores on constructed embeddings whose answer is known: which labels are wrong, which samples are OOD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluation.noise_report import fit_summary
from evaluation.noise_scores import (
    DECISIONS,
    FALLBACK_MAX_SHARE,
    FALLBACK_OOD_RULE,
    FALLBACK_OOD_SCORE,
    MAX_RELABEL_SHARE,
    check_ood_fit,
    confident_labels,
    fit_two_modes,
    fitted_decisions,
    nearest_neighbours,
    noise_scores,
    two_mode_posterior,
)
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
    """One mode in the OOD score: BIC keeps a single Gaussian (a forced two-way split would call a share of a clean
    dataset OOD); every sample's neighbours confirm its label, so each is confidently of its given class."""
    embeddings, given, true = constructed_case(num_wrong=0, num_ood=0)
    out = noise_scores(embeddings, given, NUM_CLASSES, temperature=0.1, num_neighbours=20)
    assert (out["decision"] == DECISIONS.index("clean")).all()
    assert out["ood_probability"].max() == 0 and (out["confident_label"] == given.numpy()).all()
    assert out.label_issue_share == 0 and not out.relabel_refused_reason


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


# --- the guard on the fitted OOD threshold ---------------------------------------------------------------------------
OOD = DECISIONS.index("ood")


def natural_photo_ood_scores(n: int, seed: int) -> np.ndarray:
    """OOD scores drawn from the two-component fit to a natural-photo run's scores (CIFAR-10 + Tiny-ImageNet, 2
    epochs): one mode skewed towards 1, which two Gaussians fit with Ashman's D > 2 and a high component of 75%."""
    rng = np.random.default_rng(seed)
    high = rng.random(n) < 0.75
    return np.clip(np.where(high, rng.normal(0.88, 0.057, n), rng.normal(0.693, 0.093, n)), 0, 1)


def evidence_of(label_quality: np.ndarray, labels: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """(N, K) evidence giving each sample's given label `label_quality` and the next class the rest."""
    evidence = np.zeros((len(labels), num_classes))
    evidence[np.arange(len(labels)), labels] = label_quality
    evidence[np.arange(len(labels)), (labels + 1) % num_classes] += 1 - np.asarray(label_quality)
    return evidence


def decide(ood_score: np.ndarray, label_quality: np.ndarray | None = None, seed: int = 0):
    """`fitted_decisions` where every sample is given class 0 and the rest of its vote goes to class 1, which no
    sample is given (no threshold: nothing is relabelled): only OOD decisions differ."""
    n = len(ood_score)
    label_quality = np.full(n, 0.1) if label_quality is None else label_quality  # neighbours confirm no label
    labels = np.zeros(n, dtype=np.int64)
    return fitted_decisions(evidence_of(label_quality, labels), ood_score, labels, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_skewed_mode_falls_back_instead_of_flagging_the_bulk(seed):
    ood_score = natural_photo_ood_scores(2000, seed)
    fit = fit_two_modes(ood_score)
    # What the fitted rule alone did: BIC and Ashman's D accept the split and it calls most of the data OOD.
    assert fit.used and fit.separation > 2 and fit.flagged_share > 0.7
    out = decide(ood_score)
    ood = out["decision"] == OOD
    assert out.ood_fallback_reason.startswith("the OOD scores have no dip between the fitted modes")
    assert ood.mean() <= FALLBACK_MAX_SHARE and ood.any()  # the fallback flags a few, by its own cut
    assert (ood_score[ood] >= FALLBACK_OOD_SCORE).all() and (out["ood_probability"] == 0).all()
    summary = fit_summary(out)
    assert summary["ood_fallback"] is True and summary["ood_fallback_rule"] == FALLBACK_OOD_RULE
    assert summary["warning"].startswith("the fitted OOD threshold was not used: the OOD scores have no dip")
    assert FALLBACK_OOD_RULE in summary["warning"] and summary["ood_fit_share"] == pytest.approx(fit.flagged_share)
    assert "warning" not in fit_summary(out, decision_rule="training")  # the training rule decided, not the fit


def test_overlapping_modes_and_one_blob_flag_no_bulk():
    rng = np.random.default_rng(0)
    blob = np.clip(rng.normal(0.8, 0.08, 1500), 0, 1)
    overlapping = np.clip(np.r_[rng.normal(0.6, 0.1, 1000), rng.normal(0.75, 0.1, 1000)], 0, 1)
    for scores in (blob, overlapping):
        out = decide(scores)
        assert out.ood_fallback_reason and (out["decision"] == OOD).mean() <= FALLBACK_MAX_SHARE


def test_separated_modes_still_decide_by_the_fit():
    """The Fashion-MNIST shape: a broad in-distribution mode and a narrow OOD mode near 1 (20%)."""
    rng = np.random.default_rng(0)
    is_ood = rng.random(2000) < 0.2
    ood_score = np.clip(np.where(is_ood, rng.normal(0.95, 0.02, 2000), rng.normal(0.55, 0.15, 2000)), 0, 1)
    label_quality = np.where(is_ood, 0.1, 0.6)  # an OOD image's given label gets ~1/K of its neighbours' vote
    out = decide(ood_score, label_quality)
    ood = out["decision"] == OOD
    assert out.ood_fallback_reason == "" and out.ood_fit.dip < 0.5
    np.testing.assert_array_equal(ood, out.ood_fit.posterior > 0.5)  # the fit decides
    assert (ood & is_ood).sum() >= 0.95 * is_ood.sum() and (ood & ~is_ood).sum() <= 0.02 * (~is_ood).sum()
    assert fit_summary(out) == {**fit_summary(out), "ood_fallback": False} and "warning" not in fit_summary(out)


def test_an_implausible_ood_share_falls_back():
    """Separated modes, but (a) the OOD mode is the majority, or (b) the neighbours confirm the flagged samples'
    labels (an OOD image has no right label): the split is not an OOD split."""
    rng = np.random.default_rng(0)
    majority = np.clip(
        np.where(rng.random(2000) < 0.7, rng.normal(0.95, 0.02, 2000), rng.normal(0.5, 0.1, 2000)), 0, 1
    )
    assert "OOD must be a minority" in decide(majority).ood_fallback_reason
    minority = np.clip(
        np.where(rng.random(2000) < 0.2, rng.normal(0.95, 0.02, 2000), rng.normal(0.5, 0.1, 2000)), 0, 1
    )
    confirmed = np.full(2000, 0.9)  # every sample's neighbours give its label 90% of their vote
    reason = decide(minority, confirmed).ood_fallback_reason
    assert reason.startswith("100% of the samples the fit would call OOD have neighbours that give their label")
    assert (decide(minority, confirmed)["decision"] == OOD).mean() <= FALLBACK_MAX_SHARE


def test_confident_learning_relabels_most_of_the_data_never():
    """Class 1's own samples give it 0.9 of their vote; of the samples given class 0, 80% get 0.9 for class 1 (at its
    threshold) and 0.1 for their own label (below class 0's threshold): they confidently belong to class 1, which
    would relabel 70% of the samples, above `MAX_RELABEL_SHARE`: nothing is relabelled and the summary says why. With
    30% of them outvoted, exactly those samples are relabelled."""
    rng = np.random.default_rng(0)
    n0, n1 = 2000, 300
    labels = np.r_[np.zeros(n0, dtype=np.int64), np.ones(n1, dtype=np.int64)]
    ood_score = np.clip(rng.normal(0.3, 0.05, n0 + n1), 0, 1)  # one mode: no OOD
    for share, refused in ((0.8, True), (0.3, False)):
        outvoted = np.r_[np.arange(n0) < share * n0, np.zeros(n1, dtype=bool)]  # 1,600 or 600 of 2,300
        out = fitted_decisions(evidence_of(np.where(outvoted, 0.1, 0.9), labels), ood_score, labels)
        np.testing.assert_array_equal(out["confident_label"] == 1, outvoted | (labels == 1))
        assert out.label_issue_share == pytest.approx(outvoted.mean())
        relabelled = out["decision"] == DECISIONS.index("relabelled")
        if refused:
            assert not relabelled.any() and (out["suggested_label"] == labels).all()  # pseudo_label.json keeps them
            assert out.relabel_refused_reason.startswith("confident learning on the neighbour vote would relabel 70%")
            summary = fit_summary(out)
            assert summary["relabel_refused"] is True and "read `label_quality` as a ranking" in summary["warning"]
            assert summary["label_issue_share"] == pytest.approx(outvoted.mean())
        else:
            assert out.relabel_refused_reason == "" and fit_summary(out)["relabel_refused"] is False
            np.testing.assert_array_equal(relabelled, outvoted)
            assert (out["suggested_label"][outvoted] == 1).all()


def test_confident_labels_thresholds():
    # Thresholds: class 0's samples give it 0.6 and 0.8 (0.7), class 1's 0.5 and 0.2 (0.35), class 2's one 0.5;
    # class 3 is given to no sample (inf); the last sample is not considered (called OOD) and sets nothing.
    evidence = np.array([
        [0.6, 0.4, 0.0, 0.0], [0.8, 0.2, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.7, 0.2, 0.1, 0.0], [0.1, 0.4, 0.5, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ])  # fmt: skip
    labels = np.array([0, 0, 1, 1, 2, 0])
    considered = np.array([True] * 5 + [False])
    confident, thresholds = confident_labels(evidence, labels, considered)
    np.testing.assert_allclose(thresholds[:3], [0.7, 0.35, 0.5])
    assert thresholds[3] == np.inf
    # 0: its label misses 0.7, class 1 reaches 0.35 (a label issue); 1: its own class; 2: class 1 (0.5 < 0.7 for
    # class 0); 3: class 0 (0.7 reaches 0.7; a label issue); 4: classes 1 and 2 both reach, 2 is higher; 5: none.
    np.testing.assert_array_equal(confident, [1, 0, 1, 0, 2, -1])


@st.composite
def votes(draw):
    """Random class evidence (rows on the simplex, some with zeros) and given labels, K in 2..6."""
    n, k = draw(st.integers(2, 300)), draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    evidence = rng.dirichlet(np.full(k, draw(st.floats(0.05, 5.0))), n)
    evidence[rng.random((n, k)) < draw(st.floats(0.0, 0.5))] = 0.0
    evidence = np.where(evidence.sum(1, keepdims=True) > 0, evidence, 1.0 / k)
    return evidence / evidence.sum(1, keepdims=True), rng.integers(0, k, n), rng.random(n) < 0.9


@settings(max_examples=80, deadline=None)
@given(votes())
def test_property_a_confident_class_reaches_its_threshold_and_beats_the_given_label(case):
    evidence, labels, considered = case
    confident, thresholds = confident_labels(evidence, labels, considered)
    chunked, chunk_thresholds = confident_labels(evidence, labels, considered, chunk_size=7)  # rows 7 at a time
    np.testing.assert_array_equal(chunked, confident)
    np.testing.assert_array_equal(chunk_thresholds, thresholds)
    rows = np.flatnonzero(confident >= 0)
    assert considered[rows].all() and not (confident[~considered] >= 0).any()
    chosen = evidence[rows, confident[rows]]
    assert (chosen >= thresholds[confident[rows]] - 1e-6).all() and (chosen > 0).all()
    # Among the classes at or above their threshold the confident one has the highest evidence; a given label that
    # reaches its own threshold is therefore only replaced by a class with at least as much evidence.
    reached = (evidence >= thresholds - 1e-6) & (evidence > 0)
    assert (chosen >= np.where(reached, evidence, -1)[rows].max(1)).all()
    # Relabelling the classes relabels the answer (no class is favoured by its index), up to ties.
    permutation = np.random.default_rng(0).permutation(evidence.shape[1])
    permuted, _ = confident_labels(evidence[:, np.argsort(permutation)], permutation[labels], considered)
    ties = np.sort(np.where(reached, evidence, -1), 1)[:, -1] == np.sort(np.where(reached, evidence, -1), 1)[:, -2]
    same = ~ties & (confident >= 0)
    np.testing.assert_array_equal(permuted[same], permutation[confident[same]])
    # Every sample given a class with full evidence for it is confidently of it.
    full = considered & (evidence[np.arange(len(labels)), labels] == 1.0)
    assert (confident[full] == labels[full]).all()


@st.composite
def score_mixtures(draw):
    """OOD scores from a random mixture of 1-3 clipped Gaussians, and random label qualities."""
    n = draw(st.integers(20, 600))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    components = draw(st.integers(1, 3))
    means = [draw(st.floats(0.0, 1.0)) for _ in range(components)]
    sds = [draw(st.floats(0.005, 0.3)) for _ in range(components)]
    weights = rng.dirichlet(np.ones(components))
    which = rng.choice(components, size=n, p=weights)
    ood_score = np.clip(rng.normal(np.take(means, which), np.take(sds, which)), 0, 1)
    label_quality = rng.uniform(0, draw(st.floats(0.05, 1.0)), n)
    return ood_score, label_quality


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(score_mixtures())
def test_property_the_fallback_never_flags_more_than_its_bound(scores):
    ood_score, label_quality = scores
    out = decide(ood_score, label_quality)
    ood = out["decision"] == OOD
    # Never relabels most of the data (here half the samples are given class 1, whose threshold is then finite).
    labels = np.arange(len(ood)) % 2
    out_relabel = fitted_decisions(evidence_of(label_quality, labels), ood_score, labels)
    assert (out_relabel["decision"] == DECISIONS.index("relabelled")).mean() <= MAX_RELABEL_SHARE
    if out.ood_fallback_reason:  # the check failed: the stated bound holds, and only near-uniform votes are flagged
        assert ood.sum() <= FALLBACK_MAX_SHARE * len(ood) and (ood_score[ood] >= FALLBACK_OOD_SCORE).all()
        assert check_ood_fit(out.ood_fit, label_quality) == out.ood_fallback_reason
    else:  # the fit decided: a minority, a dip between its modes, mostly samples whose neighbours outvote the label
        assert ood.mean() <= 0.5 and out.ood_fit.dip <= 0.5 and ood.mean() <= 2 * (label_quality < 0.5).mean()


def test_the_development_comparison_rebuilds_the_replaced_rule_and_scores_it():
    """`bench/noise_rule_dev.py`: on the constructed case the rebuilt two-mode rule finds what the report finds (two
    modes are there), and `score` counts an OOD image (true label -1) as a wrong label."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.noise_rule_dev import decide, score

    embeddings, given, true = constructed_case()
    decided = decide(embeddings, given.numpy(), NUM_CLASSES, 0.1)
    for rule in ("two_mode_fit", "confident_learning"):
        result = score(decided[rule]["decision"], decided[rule]["suggested"], given.numpy(), true)
        assert result["f1"] == 1.0 and result["relabel_accuracy"] == 1.0, rule
        assert result["flagged"] == result["truly_wrong"] == pytest.approx((24 + 60) / 260)
    # Nothing flagged: recall and F1 are 0, and no relabel accuracy exists.
    nothing = score(
        np.zeros(4, dtype=np.int64), np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3]), np.array([0, 1, 0, -1])
    )
    assert nothing == {"truly_wrong": 0.5, "flagged": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                       "relabel_accuracy": None}  # fmt: skip
