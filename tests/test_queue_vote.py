"""The `queue_vote` correction rule (not official): the neighbour vote of the given labels over the MoCo queue's keys.

Pure parts on constructed embeddings whose answer is known (the neighbours outvote a wrong given label; unfilled
slots and a sample's own keys do not vote), then the model: the label queue is written with the keys (wrap-around
included), the option changes nothing before correction starts, and the label queue survives save / load (a
checkpoint without it loads with every slot unknown).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from modeling_mopro import (
    MoProConfig,
    MoProForPreTraining,
    MoProPhase,
    correct_noisy_labels,
    neighbour_label_vote,
    queue_label_vote,
)
from tests._tiny import MoProModelTester, reference_enqueue

tester = MoProModelTester()
NUM_CLASSES = 3
DIM = 8


def brute_force_vote(embedding, keys, key_labels, k, temperature, num_classes):
    """One sample's vote, one neighbour at a time: the k most similar keys, weights exp(s / T) over their sum."""
    similarities = [float(embedding @ key) for key in keys]
    order = sorted(range(len(keys)), key=lambda i: -similarities[i])[:k]
    weights = [torch.tensor(similarities[i] / temperature, dtype=torch.float64).exp() for i in order]
    vote = torch.zeros(num_classes, dtype=torch.float64)
    for i, w in zip(order, weights, strict=True):
        vote[key_labels[i]] += w / sum(weights)
    return vote.float()


def clustered_queue(seed: int = 0, per_class: int = 10):
    """(queue (D, Q), labels (Q,), class centres (K, D)): tight clusters, one per class, the first key of each
    class labelled as the next class."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(NUM_CLASSES, DIM, generator=generator), dim=1)
    true = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    keys = F.normalize(centres[true] + 0.1 * torch.randn(len(true), DIM, generator=generator), dim=1)
    labels = true.clone()
    labels[::per_class] = (true[::per_class] + 1) % NUM_CLASSES
    return keys.T.contiguous(), labels, centres


def test_neighbours_outvote_a_wrong_given_label():
    """A class-0 image labelled 1, which the classifier and prototypes confirm: the official rule keeps label 1, the
    vote of its neighbours (9 of 10 labelled 0) relabels it to 0; a correctly labelled class-1 image stays 1."""
    queue, queue_labels, centres = clustered_queue()
    q = F.normalize(torch.stack([centres[0], centres[1]]) + 0.01, dim=1)  # (2, D)
    given = torch.tensor([1, 1])
    class_logits = torch.tensor([[0.0, 1.5, 0.0], [0.0, 1.5, 0.0]])  # confirms the given label, below threshold
    proto_logits = class_logits.clone()
    vote = queue_label_vote(q, queue, queue_labels, NUM_CLASSES, k=10, temperature=0.1)
    expected = torch.stack(
        [brute_force_vote(q[i], queue.T, queue_labels.tolist(), 10, 0.1, NUM_CLASSES) for i in range(2)]
    )
    torch.testing.assert_close(vote, expected)
    assert vote[0].argmax() == 0 and vote[0, 0] > 0.85

    official, official_keep = correct_noisy_labels(class_logits, proto_logits, given, 0.5, 0.8)
    voted, voted_keep = correct_noisy_labels(
        class_logits, proto_logits, given, 0.5, 0.8, neighbour_vote=vote, vote_weight=0.9
    )
    assert official.tolist() == [1, 1] and official_keep.all()
    assert voted.tolist() == [0, 1] and voted_keep.all()


def test_only_filled_slots_vote():
    """A queue not yet full: the unfilled slots (label -1) hold keys nearer than any filled one, and still do not
    vote; the vote equals the vote of the filled slots alone. An empty queue gives no vote, and the correction is
    then the official one."""
    queue, queue_labels, centres = clustered_queue(seed=1)
    q = F.normalize(centres[:1] + 0.01, dim=1)
    filled = torch.arange(queue.shape[1]) % 3 != 0
    queue = queue.clone()
    queue[:, ~filled] = q.T  # the nearest possible keys, in unfilled slots
    labels = torch.where(filled, queue_labels, -1)
    vote = queue_label_vote(q, queue, labels, NUM_CLASSES, k=8, temperature=0.1)
    only_filled = queue_label_vote(q, queue[:, filled], queue_labels[filled], NUM_CLASSES, k=8, temperature=0.1)
    torch.testing.assert_close(vote, only_filled)
    # Fewer filled slots than k: those few vote, with weights over them alone.
    few = torch.full_like(labels, -1)
    few[filled.nonzero()[:2, 0]] = queue_labels[filled][:2]
    vote = queue_label_vote(q, queue, few, NUM_CLASSES, k=8, temperature=0.1)
    assert vote.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(vote, queue_label_vote(q, queue[:, few >= 0], few[few >= 0], NUM_CLASSES, 8, 0.1))

    empty = queue_label_vote(q, queue, torch.full_like(labels, -1), NUM_CLASSES, k=8, temperature=0.1)
    assert torch.equal(empty, torch.zeros(1, NUM_CLASSES))
    logits, given = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([1])
    official = correct_noisy_labels(logits, logits, given, 0.5, 0.8)
    with_empty_vote = correct_noisy_labels(logits, logits, given, 0.5, 0.8, neighbour_vote=empty, vote_weight=1.0)
    assert all(torch.equal(a, b) for a, b in zip(official, with_empty_vote, strict=True))


def test_own_keys_do_not_vote():
    """A sample's own earlier keys (same sample id) are the nearest and carry its given label; they are left out."""
    queue, queue_labels, centres = clustered_queue(seed=2)
    q = F.normalize(centres[:1] + 0.01, dim=1)
    queue, queue_labels = queue.clone(), queue_labels.clone()
    own = torch.tensor([0, 1, 2])
    queue[:, own] = q.T
    queue_labels[own] = 2  # its (wrong) given label, three times
    ids = torch.arange(queue.shape[1]) + 100
    ids[own] = 7
    with_own = queue_label_vote(q, queue, queue_labels, NUM_CLASSES, k=6, temperature=0.1)
    without = queue_label_vote(q, queue, queue_labels, NUM_CLASSES, 6, 0.1, torch.tensor([7]), ids)
    others = torch.ones(queue.shape[1], dtype=torch.bool)
    others[own] = False
    torch.testing.assert_close(
        without, queue_label_vote(q, queue[:, others], queue_labels[others], NUM_CLASSES, 6, 0.1)
    )
    assert with_own.argmax() == 2 and without.argmax() == 0
    # Unknown ids (-1, e.g. keys from a checkpoint without them) are never taken for the sample's own.
    unknown = queue_label_vote(
        q, queue, queue_labels, NUM_CLASSES, 6, 0.1, torch.tensor([-1]), torch.full_like(ids, -1)
    )
    torch.testing.assert_close(unknown, with_own)


def test_majority_vote_and_rows_without_neighbours():
    similarities = torch.tensor([[0.9, 0.1, float("-inf")], [float("-inf")] * 3])
    labels = torch.tensor([[2, 0, -1], [-1, -1, -1]])
    torch.testing.assert_close(
        neighbour_label_vote(similarities, labels, 3, None), torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
    )
    weights = torch.softmax(torch.tensor([9.0, 1.0]), 0)
    torch.testing.assert_close(
        neighbour_label_vote(similarities, labels, 3, 0.1), torch.tensor([[weights[1], 0.0, weights[0]], [0.0] * 3])
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("noise_correction_rule", "vote"), ("queue_vote_k", 0), ("queue_vote_k", 2.5), ("queue_vote_weight", 0.0),
     ("queue_vote_weight", 1.5), ("queue_vote_k", 21)],  # 21 > queue_size 20 under the rule
)  # fmt: skip
def test_config_rejects_bad_vote_fields(field, value):
    with pytest.raises(ValueError, match=field):
        tester.get_config(**{"noise_correction_rule": "queue_vote", "queue_vote_k": 8, field: value})


def test_config_defaults_are_official():
    config = MoProConfig()
    assert (config.noise_correction_rule, config.queue_vote_k, config.queue_vote_weight) == ("official", 50, 0.5)
    # The official rule never reads k: a tiny queue below the default k is fine.
    assert tester.get_config().queue_size < config.queue_vote_k


def run_steps(model: MoProForPreTraining, steps: int, phase: MoProPhase, with_ids: bool = True) -> list[torch.Tensor]:
    model.set_phase(phase)
    torch.manual_seed(0)  # the key batch's BatchNorm groups draw a permutation: the same draws for every model
    losses = []
    for step in range(steps):
        pixel_values, pixel_values_key, labels = tester.prepare_inputs(seed=step)
        ids = torch.arange(tester.batch_size) + step * tester.batch_size if with_ids else None
        out = model(pixel_values, pixel_values_key, labels, sample_ids=ids)
        losses.append(torch.stack([out.loss, out.loss_cls, out.loss_instance, out.loss_prototype]).detach())
    return losses


def test_label_queue_written_with_the_keys_across_the_wrap():
    """Batches of 6 into a queue of 20: step 4 wraps. Each key's label and sample id land in the key's slot."""
    model = tester.create_pretraining_model(tester.get_config(noise_correction_rule="queue_vote", queue_vote_k=4))
    model.set_phase(MoProPhase.PROTOTYPES)
    queue, pointer = model.queue.clone(), int(model.queue_ptr)
    labels_ref, ids_ref = [-1] * tester.queue_size, [-1] * tester.queue_size
    for step in range(5):
        pixel_values, pixel_values_key, labels = tester.prepare_inputs(seed=step)
        ids = torch.arange(tester.batch_size) + 100 * step
        model(pixel_values, pixel_values_key, labels, sample_ids=ids)
        keys = model.queue[:, [(pointer + i) % tester.queue_size for i in range(tester.batch_size)]].T
        queue, new_pointer = reference_enqueue(queue, pointer, keys)
        for i in range(tester.batch_size):
            labels_ref[(pointer + i) % tester.queue_size] = int(labels[i])
            ids_ref[(pointer + i) % tester.queue_size] = int(ids[i])
        pointer = new_pointer
        assert torch.equal(model.queue, queue) and int(model.queue_ptr) == pointer
        assert model.queue_labels.tolist() == labels_ref and model.queue_sample_ids.tolist() == ids_ref
    assert 5 * tester.batch_size > tester.queue_size, "the test must wrap around"
    # Without sample ids the slots get -1 (no sample is then kept out of its own vote).
    model(*tester.prepare_inputs(seed=9))
    assert (model.queue_sample_ids[[(pointer + i) % tester.queue_size for i in range(6)]] == -1).all()


def test_official_rule_does_not_write_the_label_queue():
    model = tester.create_pretraining_model()
    run_steps(model, 2, MoProPhase.NOISE_CORRECTION)
    assert (model.queue_labels == -1).all() and (model.queue_sample_ids == -1).all()


def test_same_losses_as_official_before_correction():
    """Warm-up and prototype phases: the rule is not applied, so losses and every state tensor but the label queue
    are bit-identical to the official rule's. In the correction phase they part."""
    for phase in (MoProPhase.WARMUP, MoProPhase.PROTOTYPES):
        official = tester.create_pretraining_model(seed=3)
        voting = tester.create_pretraining_model(
            tester.get_config(noise_correction_rule="queue_vote", queue_vote_k=8), seed=3
        )
        for a, b in zip(run_steps(official, 4, phase), run_steps(voting, 4, phase), strict=True):
            assert torch.equal(a, b)
        state = voting.state_dict()
        for name, tensor in official.state_dict().items():
            if name not in ("queue_labels", "queue_sample_ids"):
                assert torch.equal(tensor, state[name]), name
    # Correction on a filled label queue: at full weight the vote decides, so the decisions (and losses) differ.
    official = tester.create_pretraining_model(seed=3)
    voting = tester.create_pretraining_model(
        tester.get_config(noise_correction_rule="queue_vote", queue_vote_k=8, queue_vote_weight=1.0), seed=3
    )
    run_steps(official, 4, MoProPhase.PROTOTYPES)
    run_steps(voting, 4, MoProPhase.PROTOTYPES)
    official.set_phase(MoProPhase.NOISE_CORRECTION)
    voting.set_phase(MoProPhase.NOISE_CORRECTION)
    inputs = tester.prepare_inputs(seed=11)
    out_official, out_voting = official(*inputs), voting(*inputs)
    assert not torch.equal(out_official.corrected_labels, out_voting.corrected_labels) or not torch.equal(
        out_official.keep_mask, out_voting.keep_mask
    )


def test_save_load_round_trip(tmp_path):
    model = tester.create_pretraining_model(tester.get_config(noise_correction_rule="queue_vote", queue_vote_k=8))
    run_steps(model, 4, MoProPhase.PROTOTYPES)
    model.save_pretrained(tmp_path / "model")
    loaded = MoProForPreTraining.from_pretrained(tmp_path / "model")
    assert loaded.config.noise_correction_rule == "queue_vote" and loaded.config.queue_vote_k == 8
    for name in ("queue", "queue_ptr", "queue_labels", "queue_sample_ids"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    assert (loaded.queue_labels >= 0).all()
    # A checkpoint written before the label queue existed loads with every slot unknown (-1), keys kept.
    weights = load_file(tmp_path / "model" / "model.safetensors")
    del weights["queue_labels"], weights["queue_sample_ids"]
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    old = MoProForPreTraining.from_pretrained(tmp_path / "model")
    assert (old.queue_labels == -1).all() and (old.queue_sample_ids == -1).all()
    assert torch.equal(old.queue, model.queue)


def test_trainer_walks_the_phases_and_passes_sample_ids(tmp_path):
    """Through `MoProTrainer` (48 samples, batch 6: prototypes from step 8, correction from step 16): the phases
    advance as under the official rule, and the collator's sample ids reach the label queue."""
    from transformers import set_seed

    from tests.trainer_fixtures import tiny_config, tiny_image_dataset, tiny_trainer

    set_seed(0)
    dataset = tiny_image_dataset(48)
    model = MoProForPreTraining(tiny_config(noise_correction_rule="queue_vote", queue_vote_k=8))
    trainer = tiny_trainer(str(tmp_path), dataset, model=model, max_steps=20)
    phases, original_forward = [], model.forward

    def spy(*args, **kwargs):
        phases.append((model.current_phase, kwargs.get("sample_ids")))
        return original_forward(*args, **kwargs)

    model.forward = spy
    trainer.train()
    assert [p for p, _ in phases] == [MoProPhase.WARMUP] * 8 + [MoProPhase.PROTOTYPES] * 8 + [
        MoProPhase.NOISE_CORRECTION
    ] * 4
    assert all(ids is not None for _, ids in phases)
    # The last 20 keys (steps 17-20, 24 keys into a queue of 20): their labels and sample ids, in slot order.
    last = torch.cat([ids for _, ids in phases[-4:]])[-20:]
    labels = torch.tensor(dataset["label"])[last]
    pointer = int(model.queue_ptr)
    order = [(pointer + i) % 20 for i in range(20)]
    assert model.queue_sample_ids[order].tolist() == last.tolist()
    assert model.queue_labels[order].tolist() == labels.tolist()


def test_two_processes_write_the_same_label_queue(tmp_path):
    """`accelerate launch` with 2 gloo processes under `queue_vote`: the labels and sample ids are gathered like the
    keys, so both ranks hold the same label queue, and every slot holds its key's sample id and that sample's label."""
    from tests.trainer_fixtures import run_distributed_train, tiny_image_dataset

    result = run_distributed_train(tmp_path, "queue_vote", port=29521)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    states = [torch.load(tmp_path / f"rank{r}_state.pt", weights_only=True) for r in (0, 1)]
    for name in ("queue", "queue_ptr", "queue_labels", "queue_sample_ids", "mopro.prototypes"):
        assert torch.equal(states[0][name], states[1][name]), name
    ids, labels = states[0]["queue_sample_ids"], states[0]["queue_labels"]
    assert (ids >= 0).all(), "48 samples x 3 epochs fill a queue of 20"
    assert labels.tolist() == [tiny_image_dataset(48)["label"][i] for i in ids.tolist()]
