"""The per-sample training record (`modeling_mopro.sample_dynamics`): what it sums, how the trainer keeps it through a
checkpoint, and how the noise report uses it only on the data it was recorded on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import set_seed

from evaluation.noise_report import NoiseReportOptions, label_evidence, write_noise_report
from modeling_mopro.sample_dynamics import SAMPLE_DYNAMICS_FILE, SampleDynamics
from tests.fixtures_eval import NUM_LABELS
from tests.trainer_fixtures import tiny_image_dataset, tiny_trainer
from training.trainer import sample_dynamics_size


def test_the_record_is_the_mean_softmax_over_the_steps_that_saw_each_sample(tmp_path):
    record = SampleDynamics(num_samples=5, num_classes=3)
    logits = [torch.randn(3, 3) for _ in range(3)]
    ids = [torch.tensor([0, 2, 4]), torch.tensor([2, 1, 0]), torch.tensor([0, 3, 2])]
    labels = torch.tensor([1, 0, 2, 1, 0])
    for step_ids, step_logits in zip(ids, logits, strict=True):
        record.update(step_ids, step_logits, labels[step_ids])
    expected = {i: [] for i in range(5)}
    for step_ids, step_logits in zip(ids, logits, strict=True):
        for row, sample in enumerate(step_ids.tolist()):
            expected[sample].append(step_logits[row].softmax(0))
    mean, visits = record.mean_probabilities(np.arange(5))
    assert visits.tolist() == [3, 1, 3, 1, 1]
    for sample, probabilities in expected.items():
        torch.testing.assert_close(torch.from_numpy(mean[sample]), torch.stack(probabilities).mean(0))
    assert torch.equal(record.labels, labels)

    record.save(tmp_path)
    loaded = SampleDynamics.load(tmp_path / SAMPLE_DYNAMICS_FILE)
    assert torch.equal(loaded.probability_sum, record.probability_sum) and torch.equal(loaded.labels, labels)
    # Continued in another process of a resumed run: its own sums start at zero, the labels are known.
    other = SampleDynamics.load(tmp_path, main=False)
    assert not other.probability_sum.any() and not other.visits.any() and torch.equal(other.labels, labels)


def test_a_sample_never_seen_has_no_mean():
    record = SampleDynamics(num_samples=3, num_classes=2)
    record.update(torch.tensor([0]), torch.zeros(1, 2), torch.tensor([1]))
    mean, visits = record.mean_probabilities(np.array([0, 1]))
    assert visits.tolist() == [1, 0] and np.allclose(mean[0], 0.5) and np.isnan(mean[1]).all()


def test_what_the_trainer_records_and_when_it_does_not():
    dataset = tiny_image_dataset(12)
    assert sample_dynamics_size(dataset, 10) == (12, "")
    assert sample_dynamics_size(dataset.select([3, 7]), 10)[0] == 12  # ids stay the dataset's
    assert sample_dynamics_size(dataset, 10, "off")[0] == 0
    size, reason = sample_dynamics_size(dataset.remove_columns("sample_id"), 10)
    assert size == 0 and "sample_id" in reason
    size, reason = sample_dynamics_size(dataset.to_iterable_dataset(), 10)
    assert size == 0 and "stream" in reason
    size, reason = sample_dynamics_size(dataset, 2**25)  # 12 x 2^25 entries: above the automatic limit
    assert size == 0 and "--record_sample_dynamics on" in reason
    assert sample_dynamics_size(dataset, 2**25, "on")[0] == 12
    negative = dataset.map(lambda row: {"sample_id": row["sample_id"] - 1})
    assert sample_dynamics_size(negative, 10)[0] == 0


def test_a_resumed_run_records_what_a_straight_run_does(tmp_path):
    """8 steps of 6 over 24 samples (2 epochs) straight, and 4 + 4 through checkpoint-4: the same record, saved into
    the checkpoint and continued from it, every sample seen twice with its label."""
    dataset = tiny_image_dataset(24)
    set_seed(0)
    straight = tiny_trainer(str(tmp_path / "straight"), dataset, max_steps=8)
    straight.train()
    straight.save_sample_dynamics(tmp_path / "straight")
    reference = SampleDynamics.load(tmp_path / "straight")
    assert reference.visits.tolist() == [2.0] * 24
    assert reference.labels.tolist() == dataset["label"]

    set_seed(0)
    first = tiny_trainer(str(tmp_path / "first"), dataset, max_steps=8, save_strategy="steps", save_steps=4)
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-4"
    assert SampleDynamics.load(checkpoint).visits.sum() == 24  # one epoch in the checkpoint
    resumed = tiny_trainer(str(tmp_path / "resumed"), dataset, max_steps=8)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.save_sample_dynamics(tmp_path / "resumed")
    record = SampleDynamics.load(tmp_path / "resumed")
    assert torch.equal(record.visits, reference.visits) and torch.equal(record.labels, reference.labels)
    torch.testing.assert_close(record.probability_sum, reference.probability_sum, rtol=1e-5, atol=1e-6)


def test_the_record_stops_when_noise_correction_begins(tmp_path):
    """From then on the classifier learns the model's own corrections: 2 epochs, correction from epoch 1, one visit."""
    trainer = tiny_trainer(
        str(tmp_path), tiny_image_dataset(24), max_steps=8, prototype_start_epoch=1, noise_correction_start_epoch=1
    )
    trainer.train()
    assert trainer.sample_dynamics.visits.tolist() == [1.0] * 24


def test_no_record_is_kept_when_asked_not_to(tmp_path):
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(12), max_steps=2, record_sample_dynamics="off")
    trainer.train()
    trainer.save_sample_dynamics(tmp_path)
    assert trainer.sample_dynamics is None and not (tmp_path / SAMPLE_DYNAMICS_FILE).exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 epochs on 24 samples, saved with its record."""
    folder = tmp_path_factory.mktemp("trained")
    set_seed(0)
    trainer = tiny_trainer(str(folder / "run"), tiny_image_dataset(24), max_steps=8)
    trainer.train()
    trainer.model.save_pretrained(folder / "model")
    trainer.save_sample_dynamics(folder / "model")
    return folder / "model"


def _options(**overrides) -> NoiseReportOptions:
    return NoiseReportOptions(batch_size=8, num_workers=0, device="cpu", flagged_images_per_class=0, **overrides)


def test_the_report_reads_the_record_beside_the_model(trained, tmp_path):
    import datasets

    def quality(folder):
        report = datasets.load_from_disk(str(folder))
        return np.asarray(report["label_quality"]), np.asarray(report["given_label"])

    summary = write_noise_report(str(trained), tiny_image_dataset(24), tmp_path / "report", _options())
    assert summary["label_evidence"] == "neighbour vote + training dynamics" and "label_evidence_note" not in summary
    assert (
        "the mean of the neighbours' vote below and the training run's record"
        in (tmp_path / "report" / "README.md").read_text()
    )
    summary = write_noise_report(
        str(trained), tiny_image_dataset(24), tmp_path / "record", _options(label_evidence="training")
    )
    assert summary["label_evidence"] == "training dynamics"
    summary = write_noise_report(
        str(trained), tiny_image_dataset(24), tmp_path / "vote", _options(label_evidence="neighbours")
    )
    assert summary["label_evidence"] == "neighbour vote" and "asked for" in summary["label_evidence_note"]
    # The combined quality is the mean of the two.
    mean, _ = SampleDynamics.load(trained).mean_probabilities(np.arange(24))
    record, given = quality(tmp_path / "record")
    np.testing.assert_allclose(record, mean[np.arange(24), given], rtol=1e-6)
    np.testing.assert_allclose(
        quality(tmp_path / "report")[0], (record + quality(tmp_path / "vote")[0]) / 2, rtol=1e-5
    )


def test_a_record_of_other_data_is_refused_and_said(trained, tmp_path):
    # More rows than the record holds: the neighbour vote decides, and the summary and card say why.
    summary = write_noise_report(str(trained), tiny_image_dataset(30), tmp_path / "report", _options())
    assert summary["label_evidence"] == "neighbour vote" and "other data" in summary["label_evidence_note"]
    assert "not the training run's record" in (tmp_path / "report" / "README.md").read_text()
    with pytest.raises(ValueError, match="label_evidence 'training'"):
        write_noise_report(
            str(trained), tiny_image_dataset(30), tmp_path / "strict", _options(label_evidence="training")
        )


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_labelling_that_differs_from_the_trained_one_is_refused(data):
    """Generated inputs: a record of 12 samples, and report rows whose keys or labels differ from it anywhere (another
    order, another labelling, a subset of it): used only where every row's recorded label is its given one."""
    labels = data.draw(st.lists(st.integers(0, NUM_LABELS - 1), min_size=12, max_size=12))
    record = SampleDynamics(12, NUM_LABELS)
    record.update(torch.arange(12), torch.randn(12, NUM_LABELS), torch.tensor(labels))
    keys = np.asarray(data.draw(st.lists(st.integers(0, 11), min_size=1, max_size=12, unique=True)))
    given_labels = np.asarray([labels[k] for k in keys])
    if data.draw(st.booleans()):
        row = data.draw(st.integers(0, len(keys) - 1))
        given_labels[row] = data.draw(st.integers(0, NUM_LABELS - 1))
    matches = all(labels[k] == g for k, g in zip(keys, given_labels, strict=True))

    class Model:  # what `label_evidence` reads of a model: its folder and class count
        name_or_path = ""
        config = type("Config", (), {"num_labels": NUM_LABELS})()

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        record.save(folder)
        evidence, reason = label_evidence(Model(), _options(sample_dynamics=f"{folder}/{SAMPLE_DYNAMICS_FILE}"), keys,
                                          given_labels)  # fmt: skip
    assert (evidence is not None) == matches and bool(reason) == (not matches)
    if matches:
        np.testing.assert_allclose(evidence, record.mean_probabilities(keys)[0])


def test_rows_the_record_does_not_hold_keep_the_vote_and_are_counted():
    """A batch remainder dropped in every recorded epoch: those rows get the vote alone, the rest the mean."""
    record = SampleDynamics(6, NUM_LABELS)
    record.update(torch.arange(4), torch.randn(4, NUM_LABELS), torch.zeros(4, dtype=torch.long))

    class Model:
        name_or_path = ""
        config = type("Config", (), {"num_labels": NUM_LABELS})()

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        record.save(folder)
        options = _options(sample_dynamics=f"{folder}/{SAMPLE_DYNAMICS_FILE}")
        evidence, note = label_evidence(Model(), options, np.arange(6), np.zeros(6, dtype=np.int64))
    assert note.startswith("2 of the 6 rows are not in the record") and np.isnan(evidence[4:]).all()
    from evaluation.noise_scores import noise_scores

    embeddings = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    vote = noise_scores(embeddings, np.zeros(6, dtype=np.int64), NUM_LABELS, num_neighbours=3)["class_evidence"]
    mixed = noise_scores(embeddings, np.zeros(6, dtype=np.int64), NUM_LABELS, num_neighbours=3,
                         training_evidence=evidence)["class_evidence"]  # fmt: skip
    np.testing.assert_allclose(mixed[4:], vote[4:])
    np.testing.assert_allclose(mixed[:4], (vote[:4] + evidence[:4]) / 2, rtol=1e-6)


def test_a_record_named_but_missing_or_damaged_is_a_one_line_error(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        write_noise_report(str(trained), tiny_image_dataset(24), tmp_path / "a",
                           _options(sample_dynamics=str(tmp_path / "missing.safetensors")))  # fmt: skip
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable per-sample training record"):
        write_noise_report(
            str(trained), tiny_image_dataset(24), tmp_path / "b", _options(sample_dynamics=str(damaged))
        )
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="missing"):
        write_noise_report(str(trained), tiny_image_dataset(24), tmp_path / "c", _options(sample_dynamics=str(other)))
