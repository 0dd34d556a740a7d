"""The correction schedules' decisions on constructed training signals, and the trainer that feeds them."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import set_seed

from modeling_mopro import MoProPhase, correct_noisy_labels, correction_thresholds
from tests.trainer_fixtures import tiny_image_dataset, tiny_trainer
from training.arguments import MoProTrainingArguments
from training.correction_schedule import (
    AdaptiveCorrectionSchedule,
    FixedCorrectionSchedule,
    chance_fit,
    fit_beyond_chance,
)


def feed(schedule, signals):
    """Feed (agreement, fit) per epoch, from epoch 0 on; return the strength at the start of each next epoch."""
    strengths = []
    for epoch, (agreement, fit) in enumerate(signals):
        schedule.end_epoch(epoch, agreement, fit)
        strengths.append(schedule.strength(epoch + 1))
    return strengths


# ------------------------------------------------------------------------------------------------- fixed
def test_fixed_schedule_is_the_official_step_and_ignores_signals():
    schedule = FixedCorrectionSchedule(11)
    assert schedule.strength(10.99) == 0.0
    assert schedule.strength(11 - 1e-12) == 1.0  # float step counts: 10.999999 is epoch 11
    assert schedule.strength(89.5) == 1.0
    feed(schedule, [(1.0, 0.5)] * 5)  # perfect signals do not bring it forward
    assert schedule.strength(5) == 0.0 and schedule.state_dict() == {}


# ---------------------------------------------------------------------------------------------- adaptive
def test_a_weak_model_is_never_trusted():
    """Classifier and prototypes still disagree (agreement below 0.6) while the fit keeps rising: no start."""
    schedule = AdaptiveCorrectionSchedule(earliest_epoch=2)
    signals = [(0.05 * e, 0.1 + 0.03 * e) for e in range(12)]  # agreement up to 0.55, fit +3 points an epoch
    assert feed(schedule, signals) == [0.0] * 12
    assert schedule.start_epoch is None


def test_agreement_alone_is_not_enough_while_the_model_is_still_learning():
    """Heads agree from epoch 3, but the fit to the given labels rises 5 points an epoch until epoch 6 and then
    by 0.5: the start is the epoch after the first plateau."""
    fits = [0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.505, 0.51]
    agreements = [0.1, 0.3, 0.5, 0.7, 0.75, 0.8, 0.8, 0.8, 0.8]
    schedule = AdaptiveCorrectionSchedule(earliest_epoch=2)
    strengths = feed(schedule, list(zip(agreements, fits, strict=True)))
    assert schedule.start_epoch == 8.0  # epoch 7 rose 0.005 < 0.01: correction from epoch 8
    assert strengths[:7] == [0.0] * 7 and strengths[7] > 0.0


def test_a_plateau_of_a_weak_model_is_not_enough():
    """The fit stalls early (epochs 2-5) while the heads disagree; the start waits for the agreement."""
    fits = [0.20, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30]
    agreements = [0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.7]
    schedule = AdaptiveCorrectionSchedule(earliest_epoch=2)
    feed(schedule, list(zip(agreements, fits, strict=True)))
    assert schedule.start_epoch == 6.0  # epoch 5 is the first with agreement >= 0.6 on a plateau


def test_a_falling_fit_counts_as_a_plateau_and_the_earliest_epoch_holds():
    schedule = AdaptiveCorrectionSchedule(earliest_epoch=4)
    feed(schedule, [(0.9, 0.5), (0.9, 0.45), (0.9, 0.4), (0.9, 0.4), (0.9, 0.4)])
    assert schedule.start_epoch == 4.0  # signals were good from epoch 1 on, but not before epoch 4


def test_a_collapsed_model_is_never_corrected():
    """As the run that showed it (32-px photos, 10 classes): the heads agree on 92% of the samples and the fit stays
    at 12%, a plateau, about what naming the largest class for every sample gives. Conditions (1) and (2) hold; the
    chance-corrected fit (kappa 0.005 at a chance fit of 12%) keeps the gate shut until the model learns."""
    schedule = AdaptiveCorrectionSchedule(earliest_epoch=2)
    for epoch in range(6):
        schedule.end_epoch(epoch, agreement=0.924, fit=0.124, chance_fit=0.12)
    assert schedule.start_epoch is None
    assert schedule.history[-1]["chance_fit"] == 0.12
    schedule.end_epoch(6, agreement=0.7, fit=0.40, chance_fit=0.11)  # learnt (kappa 0.33), but still rising
    schedule.end_epoch(7, agreement=0.7, fit=0.405, chance_fit=0.11)  # and now a plateau
    assert schedule.start_epoch == 8.0


@given(
    st.lists(st.integers(0, 50), min_size=2, max_size=12).filter(lambda counts: sum(counts) > 0),
    st.data(),
    st.floats(0.6, 1.0),
    st.integers(0, 40),
)
def test_a_model_predicting_one_class_never_opens_the_gate(label_counts, data, agreement, epochs):
    """Any label shares, any single class predicted for every sample, any agreement: the fit such a model has is its
    chance fit, so the gate stays shut for any positive `min_fit_beyond_chance`."""
    k = data.draw(st.integers(0, len(label_counts) - 1))
    predicted = [0] * len(label_counts)
    predicted[k] = sum(label_counts)
    fit = label_counts[k] / sum(label_counts)  # one class for all: right exactly where the label is k
    chance = chance_fit(predicted, label_counts)
    assert chance == pytest.approx(fit)
    assert fit_beyond_chance(fit, chance) == pytest.approx(0.0, abs=1e-12)
    schedule = AdaptiveCorrectionSchedule(earliest_epoch=1)
    for epoch in range(epochs):
        schedule.end_epoch(epoch, agreement, fit, chance)
    assert schedule.start_epoch is None


def test_chance_fit_and_kappa():
    assert chance_fit([5, 5], [5, 5]) == 0.5 and chance_fit([10, 0], [2, 8]) == 0.2
    assert chance_fit([0, 0], [1, 1]) is None and chance_fit([1, 1], [0, 0]) is None
    assert fit_beyond_chance(0.55, 0.1) == pytest.approx(0.5) and fit_beyond_chance(1.0, 1.0) == 0.0


def test_once_started_the_correction_never_stops_and_ramps_linearly():
    schedule = AdaptiveCorrectionSchedule(earliest_epoch=2, ramp_epochs=4)
    feed(schedule, [(0.8, 0.4), (0.8, 0.4)])
    assert schedule.start_epoch == 2.0
    feed_from = [(0.1, 0.9)] * 5  # signals collapse after the start: the decision stands
    for epoch, (agreement, fit) in enumerate(feed_from, start=2):
        schedule.end_epoch(epoch, agreement, fit)
    assert schedule.start_epoch == 2.0
    assert schedule.strength(1.99) == 0.0
    assert schedule.strength(2.0) == pytest.approx(1 / 5)
    assert schedule.strength(3.5) == pytest.approx(2.5 / 5)
    assert schedule.strength(6.0) == 1.0 and schedule.strength(50.0) == 1.0
    strengths = [schedule.strength(2 + 0.25 * i) for i in range(20)]
    assert strengths == sorted(strengths)  # never decreasing
    no_ramp = AdaptiveCorrectionSchedule(earliest_epoch=2, ramp_epochs=0, start_epoch=2.0)
    assert no_ramp.strength(2.0) == 1.0


def test_the_state_round_trip_decides_the_same():
    signals = [(0.3, 0.2), (0.7, 0.3), (0.7, 0.36), (0.7, 0.365), (0.7, 0.37)]
    whole = AdaptiveCorrectionSchedule(earliest_epoch=2)
    feed(whole, signals)
    first = AdaptiveCorrectionSchedule(earliest_epoch=2)
    feed(first, signals[:2])
    second = AdaptiveCorrectionSchedule(earliest_epoch=2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    for epoch, (agreement, fit) in enumerate(signals[2:], start=2):
        second.end_epoch(epoch, agreement, fit)
    assert second.start_epoch == whole.start_epoch == 4.0
    assert second.history == whole.history


@pytest.mark.parametrize(
    "field, value",
    [("min_agreement", 1.5), ("min_fit_beyond_chance", -0.1), ("plateau_tolerance", -0.1), ("ramp_epochs", -1.0),
     ("ramp_epochs", float("nan"))],
)
def test_bad_schedule_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        AdaptiveCorrectionSchedule(earliest_epoch=2, **{field: value})


def test_bad_schedule_flags_are_refused_by_the_arguments(tmp_path):
    with pytest.raises(ValueError, match="noise_correction_schedule"):
        MoProTrainingArguments(output_dir=str(tmp_path), noise_correction_schedule="sometimes")
    with pytest.raises(ValueError, match="`correction_min_agreement`"):
        MoProTrainingArguments(
            output_dir=str(tmp_path), noise_correction_schedule="adaptive", correction_min_agreement=2.0
        )
    with pytest.raises(ValueError, match="`correction_ramp_epochs`"):
        MoProTrainingArguments(output_dir=str(tmp_path), correction_ramp_epochs=float("nan"))


# -------------------------------------------------------------------------------------------- thresholds
def test_strength_one_is_exactly_the_official_rule_and_lower_strength_decides_less():
    assert correction_thresholds(1.0, 0.8, 10) == (0.8, 0.1)
    relabel, ood = zip(*(correction_thresholds(s, 0.8, 10) for s in (0.2, 0.4, 0.6, 0.8, 1.0)), strict=True)
    assert list(relabel) == sorted(relabel, reverse=True) and relabel[0] == pytest.approx(0.96)
    assert list(ood) == sorted(ood) and ood[0] == pytest.approx(0.02)

    # Three samples, K = 4: a confident other class, a given label at 0.05, a given label at 0.2.
    probabilities = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.05, 0.45, 0.45, 0.05], [0.2, 0.4, 0.2, 0.2]])
    logits = probabilities.log()
    labels = torch.tensor([1, 0, 0])
    full = correct_noisy_labels(logits, logits, labels, 0.5, *correction_thresholds(1.0, 0.8, 4))
    weak = correct_noisy_labels(logits, logits, labels, 0.5, *correction_thresholds(0.1, 0.8, 4))
    assert full[0].tolist() == [0, 0, 0] and full[1].tolist() == [True, False, False]  # relabel, OOD, OOD
    assert weak[0].tolist() == [1, 0, 0] and weak[1].tolist() == [True, True, True]  # nothing decided yet
    default = correct_noisy_labels(logits, logits, labels, 0.5, 0.8)
    assert all(torch.equal(a, b) for a, b in zip(default, full, strict=True))  # default OOD threshold: 1/K


# ----------------------------------------------------------------------------------------------- trainer
def _phases(trainer):
    phases, strengths = [], []
    model = trainer.model
    original_forward = model.forward

    def spy(*args, **kwargs):
        phases.append(model.current_phase)
        strengths.append(model.correction_strength)
        return original_forward(*args, **kwargs)

    model.forward = spy
    return phases, strengths


def test_the_trainer_feeds_each_epochs_mean_signals_and_follows_the_decision(tmp_path):
    """48 samples / batch 6 = 8 steps an epoch. With gates that any signal passes, the schedule is fed at the end
    of epochs 0 and 1 the means of the logged per-step signals, starts at epoch 2 (step 16) and ramps."""
    set_seed(0)
    trainer = tiny_trainer(
        str(tmp_path), tiny_image_dataset(48), max_steps=26, noise_correction_schedule="adaptive",
        correction_min_agreement=0.0, correction_plateau_tolerance=1.0, correction_ramp_epochs=1,
    )  # fmt: skip
    phases, strengths = _phases(trainer)
    trainer.train()
    assert phases[:8] == [MoProPhase.WARMUP] * 8
    assert phases[8:16] == [MoProPhase.PROTOTYPES] * 8
    assert phases[16:] == [MoProPhase.NOISE_CORRECTION] * 10
    assert strengths[16:24] == [pytest.approx(1 / 2 + i / 16) for i in range(8)]  # (epoch - 2 + 1) / (1 + 1)
    assert strengths[24:] == [1.0, 1.0]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("classifier_prototype_agreement", "fit_given_labels", "correction_strength"):
        assert all(key in entry for entry in logs), key
    history = trainer.correction_schedule.history
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for h in history:
        window = logs[8 * h["epoch"] : 8 * h["epoch"] + 8]  # equal batches: the epoch mean is the mean of steps
        assert h["agreement"] == pytest.approx(sum(e["classifier_prototype_agreement"] for e in window) / 8)
        assert h["fit"] == pytest.approx(sum(e["fit_given_labels"] for e in window) / 8)
    assert history[0]["agreement"] < 0.5  # no prototypes yet in epoch 0: they agree only by chance
    # the chance fit is the label shares averaged with the shares of the classifier's argmax as weights: within the
    # smallest and largest share of the given labels (an epoch is every sample once)
    labels = [row["label"] for row in tiny_image_dataset(48)]
    shares = [labels.count(k) / len(labels) for k in set(labels)]
    for h in history:
        assert min(shares) - 1e-9 <= h["chance_fit"] <= max(shares) + 1e-9


@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])
def test_only_the_adaptive_schedule_counts_classes(tmp_path, schedule):
    """The per-class counts ride along the step's statistics for the adaptive schedule only (the fixed one reads no
    signal): 4 steps into an 8-step epoch, the epoch's vector holds the 3 signal sums, plus 2 x K counts that add up
    to the 24 samples seen."""
    set_seed(0)
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(48), max_steps=4, noise_correction_schedule=schedule)
    trainer.train()
    signals = trainer._epoch_signals.tolist()
    num_classes = trainer.model.config.num_labels
    assert signals[0] == 24 and len(signals) == 3 + (2 * num_classes if schedule == "adaptive" else 0)
    if schedule == "adaptive":
        assert sum(signals[3 : 3 + num_classes]) == sum(signals[3 + num_classes :]) == 24


def test_an_untrusted_model_is_never_corrected(tmp_path):
    set_seed(0)
    trainer = tiny_trainer(
        str(tmp_path), tiny_image_dataset(48), max_steps=24, noise_correction_schedule="adaptive",
        correction_min_agreement=1.0, correction_plateau_tolerance=0.0,
    )  # fmt: skip
    trainer.correction_schedule.end_epoch = lambda *signals: None  # signals that never pass
    phases, _ = _phases(trainer)
    trainer.train()
    assert phases[8:] == [MoProPhase.PROTOTYPES] * 16
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(e["fraction_kept"] == 1.0 and e["fraction_relabeled"] == 0.0 for e in logs)
    assert all(e["correction_strength"] == 0.0 for e in logs)


def test_a_resumed_adaptive_run_decides_as_the_straight_run(tmp_path):
    """A checkpoint in the middle of epoch 1 (step 12) holds the schedule and the half-epoch's signal sums: the
    resumed run is fed the same epoch means, starts at the same step and ends with the same weights."""
    dataset = tiny_image_dataset(48)
    values = dict(
        max_steps=22, noise_correction_schedule="adaptive", correction_min_agreement=0.0,
        correction_plateau_tolerance=1.0,
    )  # fmt: skip
    set_seed(0)
    straight = tiny_trainer(str(tmp_path / "straight"), dataset, **values)
    straight.train()
    set_seed(0)
    first = tiny_trainer(str(tmp_path / "first"), dataset, save_strategy="steps", save_steps=12, **values)
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-12"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["CorrectionScheduleState"]["attributes"]["signals_epoch"] == 1
    set_seed(123)
    resumed = tiny_trainer(str(tmp_path / "resumed"), dataset, **values)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.correction_schedule.history == straight.correction_schedule.history
    assert resumed.correction_schedule.start_epoch == straight.correction_schedule.start_epoch == 2.0
    reference = straight.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_adaptive_resume_from_a_checkpoint_without_schedule_state_is_refused(tmp_path):
    dataset = tiny_image_dataset(48)
    set_seed(0)
    first = tiny_trainer(str(tmp_path / "first"), dataset, max_steps=10, save_strategy="steps", save_steps=4)
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-4"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["CorrectionScheduleState"]  # as written before the schedule existed
    state_file.write_text(json.dumps(state))
    resumed = tiny_trainer(str(tmp_path / "resumed"), dataset, max_steps=10, noise_correction_schedule="adaptive")
    with pytest.raises(ValueError, match="no correction-schedule state"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
