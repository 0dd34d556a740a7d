"""MoProForPreTraining under reduced precision and with the single-process BatchNorm groups of the momentum encoder.

Precision: under bf16 autocast only the backbones run in bf16; logits, soft labels, prototypes and losses are fp32,
so the noise decisions on fixed features are those of the fp32 run.
BatchNorm groups (`momentum_encoder_bn_groups`): with one process the key batch is shuffled, normalised in groups
and un-shuffled; each key must equal what the momentum encoder gives its group alone.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import modeling_mopro.modeling_mopro as modeling
from evaluation.features import extract_features
from modeling_mopro import MoProForImageClassification, MoProForPreTraining, MoProPhase
from tests._tiny import MoProModelTester, changed_entries, reference_enqueue, state_snapshot

tester = MoProModelTester()
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def random_prototypes_and_queue(model: MoProForPreTraining, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.queue.copy_(F.normalize(torch.randn(model.queue.shape, generator=generator), dim=0))
        prototypes = model.mopro.prototypes
        prototypes.copy_(F.normalize(torch.randn(prototypes.shape, generator=generator), dim=1))


# -------------------------------------------------------------------------------------------------- precision
def test_bf16_autocast_runs_the_backbones_in_bf16_and_everything_after_in_fp32(monkeypatch):
    model = tester.create_pretraining_model()
    random_prototypes_and_queue(model, seed=1)
    model.set_phase(MoProPhase.NOISE_CORRECTION)
    pixel_values, pixel_values_key, labels = tester.prepare_inputs()

    backbone_dtypes = []
    for backbone in (model.mopro.backbone, model.momentum_encoder.backbone):
        backbone.register_forward_hook(lambda module, args, output: backbone_dtypes.append(output.dtype))
    soft_label_inputs = []

    def recording_correct_noisy_labels(class_logits, prototype_logits, *args, **kwargs):
        soft_label_inputs.extend([class_logits.dtype, prototype_logits.dtype])
        return correct_noisy_labels(class_logits, prototype_logits, *args, **kwargs)

    correct_noisy_labels = modeling.correct_noisy_labels
    monkeypatch.setattr(modeling, "correct_noisy_labels", recording_correct_noisy_labels)

    with torch.autocast(**BF16):
        out = model(pixel_values, pixel_values_key, labels)
    assert set(backbone_dtypes) == {torch.bfloat16} and len(backbone_dtypes) == 3  # query, then 2 key groups
    assert soft_label_inputs == [torch.float32, torch.float32]  # the soft-label scores come from fp32 logits
    for field in ("loss", "loss_cls", "loss_instance", "loss_prototype", "logits", "embeddings"):
        assert getattr(out, field).dtype == torch.float32, field
    for field in ("instance_logits", "prototype_logits"):
        assert getattr(out, field).dtype == torch.float32, field
    assert model.mopro.prototypes.dtype == model.queue.dtype == torch.float32

    out.loss.backward()  # gradients reach the bf16 backbone through the fp32 heads
    for name, param in model.mopro.backbone.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().max() > 0 for param in model.mopro.backbone.parameters())


class FixedFeatures(nn.Module):
    """A backbone stand-in whose output is its input: in autocast's dtype when autocast is on, as a real backbone's
    would be. Inputs that bf16 represents exactly give both runs the same feature values."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(features.device.type):
            return features.to(torch.get_autocast_dtype(features.device.type))
        return features


def test_noise_decisions_on_fixed_features_are_the_fp32_ones_under_bf16_autocast():
    # 1,000 classes: the keep test compares the given label's soft score with 1/K = 0.001.
    num_labels, num_samples = 1000, 64
    model = tester.create_pretraining_model(tester.get_config(num_labels=num_labels, prototype_momentum=0.9))
    model.mopro.backbone = FixedFeatures(model.mopro.num_features)
    random_prototypes_and_queue(model, seed=2)
    model.set_phase(MoProPhase.NOISE_CORRECTION)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.classifier.weight.mul_(20)  # logits spread over several units, as in a trained classifier
    features = torch.randn(num_samples, model.mopro.num_features, generator=generator).bfloat16().float()

    # Labels whose soft score is the closest to 1/K: the decisions most sensitive to the logits' precision.
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = probe(features, labels=torch.zeros(num_samples, dtype=torch.long))
        soft = model.config.alpha * out.logits.softmax(1) + (1 - model.config.alpha) * out.prototype_logits.softmax(1)
    labels = (soft - 1 / num_labels).abs().argmin(dim=1)

    fp32, bf16 = copy.deepcopy(model), copy.deepcopy(model)
    expected = fp32(features, labels=labels)
    with torch.autocast(**BF16):
        out = bf16(features, labels=labels)
    assert 0 < int(expected.keep_mask.sum()) < num_samples, "the test needs both kept and dropped samples"
    assert torch.equal(out.keep_mask, expected.keep_mask)
    assert torch.equal(out.corrected_labels, expected.corrected_labels)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.prototype_logits, expected.prototype_logits)
    assert bf16.mopro.prototypes.dtype == torch.float32
    assert torch.equal(bf16.mopro.prototypes, fp32.mopro.prototypes)


def test_feature_extraction_under_amp_computes_the_heads_in_fp32():
    """`extract_features(amp=True)` (the noise report's path): on fixed features, the fp32 logits and embeddings."""
    model = MoProForImageClassification(tester.get_config(num_labels=1000))
    model.mopro.backbone = FixedFeatures(model.mopro.num_features)
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(10, model.mopro.num_features, generator=generator).bfloat16().float()
    dataset = [(row, 0) for row in features]
    kinds = ("embeddings", "logits")
    amp = extract_features(model, dataset, kinds, batch_size=5, num_workers=0, device="cpu", amp=True, progress=False)
    fp32 = extract_features(model, dataset, kinds, batch_size=5, num_workers=0, device="cpu", progress=False)
    assert (amp.logits == fp32.logits).all() and (amp.embeddings == fp32.embeddings).all()


def test_training_a_model_cast_to_16_bits_is_refused():
    model = tester.create_pretraining_model().to(torch.bfloat16)
    pixel_values, pixel_values_key, labels = tester.prepare_inputs()
    pixel_values, pixel_values_key = pixel_values.bfloat16(), pixel_values_key.bfloat16()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="autocast"):
        model(pixel_values, pixel_values_key, labels)
    assert changed_entries(before, model) == []
    model.eval()  # inference in bf16 is the user's choice, and works
    assert model(pixel_values, pixel_values_key, labels).logits.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- BatchNorm groups
def grouped_reference(model: MoProForPreTraining, pixel_values_key: torch.Tensor, groups: int, seed: int):
    """Keys from the momentum encoder run on each group of the shuffled batch alone (a fresh copy per group, as one
    GPU each), un-shuffled; and each copy's BatchNorm buffers afterwards. The permutation is the first draw of
    torch's global RNG after `manual_seed(seed)`."""
    torch.manual_seed(seed)
    perm = torch.randperm(pixel_values_key.shape[0])
    keys, buffers = [], []
    for group in pixel_values_key[perm].tensor_split(groups):
        encoder = copy.deepcopy(model.momentum_encoder)
        with torch.no_grad():
            keys.append(encoder.projection(encoder.backbone(group)))
        buffers.append({k: v for k, v in encoder.state_dict().items() if "running" in k or "num_batches" in k})
    return torch.cat(keys)[torch.argsort(perm)], perm, buffers


@pytest.mark.parametrize(("batch_size", "groups"), [(6, 2), (8, 4), (26, 4)])  # 26 = 7 + 7 + 6 + 6
def test_grouped_keys_equal_each_group_through_its_own_encoder(batch_size, groups):
    model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=groups))
    pixel_values, pixel_values_key, labels = tester.prepare_inputs(seed=1, batch_size=batch_size)
    expected, _, _ = grouped_reference(model, pixel_values_key, groups, seed=7)
    with torch.no_grad():
        whole_batch = model.momentum_encoder(pixel_values_key)

    torch.manual_seed(7)
    keys = model._momentum_keys(pixel_values_key)
    torch.testing.assert_close(keys, expected, rtol=0, atol=1e-6)
    assert (keys - whole_batch).abs().max() > 1e-3, "the groups must change the keys"

    # The same through the public forward: the keys it enqueues.
    model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=groups))
    expected_queue, _ = reference_enqueue(model.queue, int(model.queue_ptr), expected)
    torch.manual_seed(7)
    model(pixel_values, pixel_values_key, labels)
    torch.testing.assert_close(model.queue, expected_queue, rtol=0, atol=1e-6)


def test_one_group_is_the_plain_momentum_forward():
    model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=1))
    _, pixel_values_key, _ = tester.prepare_inputs()
    with torch.no_grad():
        expected = copy.deepcopy(model.momentum_encoder)(pixel_values_key)
    rng = torch.get_rng_state()
    keys = model._momentum_keys(pixel_values_key)
    assert torch.equal(keys, expected)
    assert torch.equal(torch.get_rng_state(), rng), "no permutation is drawn without groups"

    grouped = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=3)).eval()
    with torch.no_grad():  # eval: BatchNorm uses running statistics, so groups would change nothing
        expected = copy.deepcopy(grouped.momentum_encoder)(pixel_values_key)
    assert torch.equal(grouped._momentum_keys(pixel_values_key), expected)
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_key_depends_only_on_the_samples_of_its_group():
    groups, batch_size = 3, 12
    model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=groups))
    _, pixel_values_key, _ = tester.prepare_inputs(seed=2, batch_size=batch_size)
    torch.manual_seed(5)
    perm = torch.randperm(batch_size)
    members = perm.tensor_split(groups)  # original indices of each group's samples
    torch.manual_seed(5)
    keys = model._momentum_keys(pixel_values_key)

    changed = pixel_values_key.clone()
    others = torch.cat(members[1:])
    changed[others] = torch.randn(changed[others].shape, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(5)
    keys_changed = model._momentum_keys(changed)
    torch.testing.assert_close(keys_changed[members[0]], keys[members[0]], rtol=0, atol=1e-6)
    assert (keys_changed[others] - keys[others]).abs().max() > 1e-3

    # One sample of the group changed: the other keys of its group move (they share its statistics).
    changed = pixel_values_key.clone()
    changed[members[0][0]] += 1.0
    torch.manual_seed(5)
    keys_changed = model._momentum_keys(changed)
    assert (keys_changed[members[0][1:]] - keys[members[0][1:]]).abs().max() > 1e-3
    torch.testing.assert_close(keys_changed[others], keys[others], rtol=0, atol=1e-6)


def test_grouped_running_statistics_take_one_step_towards_the_mean_of_the_groups():
    groups = 3
    model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=groups))
    _, pixel_values_key, _ = tester.prepare_inputs(seed=3, batch_size=9)
    before = {k: v.clone() for k, v in model.momentum_encoder.state_dict().items()}
    _, _, buffers = grouped_reference(model, pixel_values_key, groups, seed=11)
    torch.manual_seed(11)
    model._momentum_keys(pixel_values_key)
    after = model.momentum_encoder.state_dict()
    names = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert names
    for name in names:
        expected = torch.stack([b[name] for b in buffers]).mean(0)
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(after[name], before[name]), name
    for name in (k for k in after if k.endswith("num_batches_tracked")):
        assert int(after[name]) == int(before[name]) + 1, name  # one batch per step, not one per group


def test_a_short_key_batch_uses_fewer_groups_of_at_least_two_keys():
    # A batch that lost undecodable images trains on: 7 keys with 4 groups asked for run as 3 groups (2, 2, 3).
    model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=4))
    _, pixel_values_key, _ = tester.prepare_inputs(seed=5, batch_size=7)
    expected, _, _ = grouped_reference(model, pixel_values_key, groups=3, seed=13)
    torch.manual_seed(13)
    torch.testing.assert_close(model._momentum_keys(pixel_values_key), expected, rtol=0, atol=1e-6)
    # 3 keys cannot make 2 groups of 2: the plain forward over the whole (short) batch, no permutation drawn.
    _, three_keys, _ = tester.prepare_inputs(seed=6, batch_size=3)
    plain = copy.deepcopy(model.momentum_encoder)(three_keys)
    torch.testing.assert_close(model._momentum_keys(three_keys), plain, rtol=0, atol=1e-6)


def _two_process_keys(rank: int, world_size: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        keys = []
        for groups in (1, 3):
            model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=groups))
            _, pixel_values_key, _ = tester.prepare_inputs(seed=rank)
            torch.manual_seed(4)
            keys.append(model._momentum_keys(pixel_values_key))
        results[rank] = torch.equal(keys[0], keys[1])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_groups_are_ignored_with_several_processes():
    """Two gloo processes: MoCo's cross-process shuffle-BN runs, the same keys whatever the groups."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    # spawn, not fork: a child forked after earlier tests started the OpenMP thread pool can deadlock in it (seen
    # in the full suite with default threads).
    mp.start_processes(_two_process_keys, args=(2, port, results), nprocs=2, join=True, start_method="spawn")
    assert dict(results) == {0: True, 1: True}
