"""MoProForPreTraining: gradients and momentum EMA, state invariants, and one full step against an independent
re-implementation of the official step (salesforce/MoPro `model.py` forward + `train.py` loss)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling_mopro import MoProForImageClassification, MoProForPreTraining, MoProModel, MoProPhase
from tests._tiny import (
    MoProModelTester,
    changed_entries,
    query_momentum_pairs,
    reference_correct_labels,
    reference_enqueue,
    reference_soft_label,
    reference_update_prototypes,
    state_snapshot,
)

PHASES = [MoProPhase.WARMUP, MoProPhase.PROTOTYPES, MoProPhase.NOISE_CORRECTION]
tester = MoProModelTester()


# ----------------------------------------------------------------------------- independent re-implementation
def official_embed(backbone: nn.Module, projection: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`encoder(img)` of the official code: pooled features -> fc1 -> ReLU -> fc2 -> L2 normalisation."""
    return F.normalize(projection.fc2(F.relu(projection.fc1(backbone(pixel_values)))), dim=1)


def official_step(model: MoProForPreTraining, pixel_values, pixel_values_key, labels, phase: MoProPhase) -> dict:
    """The official training step computed from `model`'s sub-modules (a copy), never through its `forward`.

    `is_proto = phase >= PROTOTYPES`, `is_clean = phase >= NOISE_CORRECTION`. The momentum EMA that the official
    forward runs first is left out: here it runs after the optimizer step (`update_momentum_encoder`).
    """
    config = model.config
    temperature = config.temperature
    pooled = model.mopro.backbone(pixel_values)
    class_logits = model.classifier(pooled)
    q = F.normalize(model.mopro.projection.fc2(F.relu(model.mopro.projection.fc1(pooled))), dim=1)
    with torch.no_grad():
        k = official_embed(model.momentum_encoder.backbone, model.momentum_encoder.projection, pixel_values_key)

    old_queue = model.queue.clone()
    instance_logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ old_queue], dim=1) / temperature
    new_queue, new_pointer = reference_enqueue(old_queue, int(model.queue_ptr), k)  # after the logits

    old_prototypes = model.mopro.prototypes.clone()
    prototype_logits = q @ old_prototypes.T / temperature
    if phase >= MoProPhase.NOISE_CORRECTION:
        targets, keep, ambiguous = reference_correct_labels(
            class_logits.detach(), prototype_logits.detach(), labels, config.alpha, config.pseudo_label_threshold
        )
        assert not ambiguous.any(), "test data must keep every decision away from the boundaries"
        new_prototypes = reference_update_prototypes(
            old_prototypes, q.detach()[keep], targets[keep], config.prototype_momentum
        )
    else:  # before cleaning: every sample, with its given label
        targets, keep = labels.clone(), torch.ones_like(labels, dtype=torch.bool)
        new_prototypes = reference_update_prototypes(old_prototypes, q.detach(), labels, config.prototype_momentum)

    loss_cls = F.cross_entropy(class_logits[keep], targets[keep])
    loss_instance = F.cross_entropy(instance_logits, torch.zeros(len(labels), dtype=torch.long))  # all samples
    loss = loss_cls + config.instance_loss_weight * loss_instance
    loss_prototype = torch.zeros(())
    if phase >= MoProPhase.PROTOTYPES:
        loss_prototype = F.cross_entropy(prototype_logits[keep], targets[keep])
        loss = loss + config.prototype_loss_weight * loss_prototype
    return dict(
        loss=loss,
        loss_cls=loss_cls,
        loss_instance=loss_instance,
        loss_prototype=loss_prototype,
        logits=class_logits,
        embeddings=q,
        keys=k,
        instance_logits=instance_logits,
        prototype_logits=prototype_logits,
        corrected_labels=targets,
        keep_mask=keep,
        queue=new_queue,
        queue_ptr=new_pointer,
        prototypes=new_prototypes,
        old_prototypes=old_prototypes,
    )


def soft_labels(model: MoProForPreTraining, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, K) official soft labels of the current model, from a throw-away copy (train-mode BN, as in the step)."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        pooled = probe.mopro.backbone(pixel_values)
        class_logits = probe.classifier(pooled)
        q = official_embed(probe.mopro.backbone, probe.mopro.projection, pixel_values)
        prototype_logits = q @ probe.mopro.prototypes.T / probe.config.temperature
    rows = zip(class_logits.tolist(), prototype_logits.tolist(), strict=True)
    return torch.tensor([reference_soft_label(c, p, probe.config.alpha) for c, p in rows], dtype=torch.float64)


def midpoint_below(values: torch.Tensor, count: int, min_gap: float = 1e-3) -> float:
    """A cut with exactly `count` values above it, half-way between neighbours at least `min_gap` apart."""
    ordered = values.sort(descending=True).values
    assert ordered[count - 1] - ordered[count] > min_gap, "pick another seed: no clear gap"
    return float(ordered[count - 1] + ordered[count]) / 2


def random_state(model: MoProForPreTraining, seed: int, queue_ptr: int) -> None:
    """Non-trivial queue, pointer and prototypes, and a momentum encoder that differs from the query encoder."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.queue.copy_(F.normalize(torch.randn(model.queue.shape, generator=generator), dim=0))
        model.queue_ptr.fill_(queue_ptr)
        prototypes = model.mopro.prototypes
        prototypes.copy_(F.normalize(torch.randn(prototypes.shape, generator=generator), dim=1))
        for _, _, momentum_param in query_momentum_pairs(model):
            momentum_param.add_(0.05 * torch.randn(momentum_param.shape, generator=generator))


def engineered_step_setup() -> tuple[MoProForPreTraining, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A model state and labels for which noise correction relabels 2 samples, keeps 2 and drops 2 as OOD.

    Soft labels do not depend on the given labels, so they are computed first; the threshold is put between the
    2nd and 3rd largest score, and each remaining sample gets its best class (kept) or its worst one (OOD).
    """
    config = tester.get_config(
        # The reference's momentum encoder sees the whole key batch, like one official GPU with its local batch;
        # the single-process BatchNorm groups are checked against their own reference in test_precision_and_bn_groups.py.
        momentum_encoder_bn_groups=1,
        alpha=0.4,
        temperature=0.2,
        prototype_momentum=0.7,  # a visible prototype move: q and k lead to clearly different prototypes
        instance_loss_weight=0.7,
        prototype_loss_weight=1.3,
    )
    model = tester.create_pretraining_model(config, seed=1)
    random_state(model, seed=2, queue_ptr=17)  # 17 + 6 > 20: the step's enqueue wraps around
    pixel_values, pixel_values_key, _ = tester.prepare_inputs(seed=3)
    soft = soft_labels(model, pixel_values)
    max_score, best = soft.max(dim=1)
    model.config.pseudo_label_threshold = midpoint_below(max_score, 2)
    worst = soft.argmin(dim=1)
    relabel = max_score > model.config.pseudo_label_threshold
    others = (~relabel).nonzero().flatten()
    labels = torch.where(relabel, worst, best)  # a relabelled sample starts from a wrong label
    labels[others[1::2]] = worst[others[1::2]]  # every other remaining sample is out of distribution
    return model, pixel_values, pixel_values_key, labels


def ema(k_old: torch.Tensor, q_new: torch.Tensor, m: float) -> torch.Tensor:
    """`m * k_old + (1 - m) * q_new` as torch evaluates an axpy (`add` with `alpha`, a fused multiply-add on CPU).

    Rounding the two products separately can differ from it by 1 ulp in float32; both are the same EMA, so the
    bit-exact comparison uses this form and `test_update_momentum_encoder_is_exact_ema` also bounds the error
    against the float64 EMA.
    """
    return torch.add(m * k_old, q_new, alpha=1 - m)


# ---------------------------------------------------------------------------------------------------- tests
def test_output_shapes():
    config, pixel_values, pixel_values_key, labels = tester.prepare_config_and_inputs()
    n, k, d, q = tester.batch_size, config.num_labels, config.embedding_size, config.queue_size
    model = MoProForPreTraining(config).train()
    out = model(pixel_values, pixel_values_key, labels)
    assert out.logits.shape == (n, k) and out.embeddings.shape == (n, d)
    assert out.instance_logits.shape == (n, 1 + q) and out.prototype_logits.shape == (n, k)
    assert out.loss.ndim == 0 and out.corrected_labels.shape == out.keep_mask.shape == (n,)
    base = MoProModel(config).eval()(pixel_values)
    assert base.embeddings.shape == (n, d) and base.prototype_similarities.shape == (n, k)
    classifier = MoProForImageClassification(config).eval()(pixel_values, labels=labels)
    assert classifier.logits.shape == (n, k) and classifier.loss.ndim == 0


@pytest.mark.parametrize("phase", PHASES)
def test_training_step_gradients_and_momentum_ema(phase):
    model = tester.create_pretraining_model()
    pixel_values, pixel_values_key, labels = tester.prepare_inputs()
    with torch.no_grad():  # fill the prototypes, so that the prototype loss has a gradient
        model(pixel_values, pixel_values_key, labels)
    model.set_phase(phase)
    if phase == MoProPhase.NOISE_CORRECTION:
        labels = soft_labels(model, pixel_values).argmax(dim=1)  # all kept: the classifier gets a CE gradient
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    momentum_names = {name for name, _, _ in query_momentum_pairs(model)}
    query_params = {n: p for n, p in model.named_parameters() if n not in momentum_names}
    assert {n.split(".")[0] for n in query_params} == {"mopro", "classifier"}
    assert any(n.startswith("mopro.backbone.") for n in query_params)
    assert any(n.startswith("mopro.projection.") for n in query_params)

    out = model(pixel_values, pixel_values_key, labels)
    assert out.keep_mask.all()
    out.loss.backward()
    before = state_snapshot(model)
    optimizer.step()

    for name, param in query_params.items():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert not torch.equal(param.detach(), before[name]), f"{name} did not change in the optimizer step"
    for name, _, momentum_param in query_momentum_pairs(model):
        assert not momentum_param.requires_grad and momentum_param.grad is None, name
        assert torch.equal(momentum_param.detach(), before[name]), f"{name} changed in the optimizer step"

    m = model.config.encoder_momentum
    model.update_momentum_encoder()
    for name, query_param, momentum_param in query_momentum_pairs(model):
        expected = ema(before[name], query_param.detach(), m)
        assert torch.equal(momentum_param.detach(), expected), f"{name} is not the EMA m*k_old + (1-m)*q_new"


@pytest.mark.parametrize(
    ("config_momentum", "argument", "expected_momentum"),
    [(0.999, None, 0.999), (0.9, None, 0.9), (0.999, 0.5, 0.5), (0.9, 0.0, 0.0)],
)
def test_update_momentum_encoder_is_exact_ema(config_momentum, argument, expected_momentum):
    model = tester.create_pretraining_model(tester.get_config(encoder_momentum=config_momentum))
    # The official code starts the momentum encoder as a copy of the query encoder.
    for name, query_param, momentum_param in query_momentum_pairs(model):
        assert torch.equal(query_param, momentum_param), name
    pixel_values, pixel_values_key, labels = tester.prepare_inputs()
    model(pixel_values, pixel_values_key, labels).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    before = state_snapshot(model)

    model.update_momentum_encoder(argument)
    m = expected_momentum
    for name, query_param, momentum_param in query_momentum_pairs(model):
        expected = ema(before[name], query_param.detach(), m)
        assert torch.equal(momentum_param.detach(), expected), name
        # And within float32 rounding of the EMA evaluated in float64 (the error bound of a 2-term sum).
        k_term, q_term = m * before[name].double(), (1 - m) * query_param.detach().double()
        bound = 2 * torch.finfo(torch.float32).eps * (k_term.abs() + q_term.abs())
        assert ((momentum_param.detach().double() - (k_term + q_term)).abs() <= bound).all(), name
        assert not torch.equal(momentum_param.detach(), before[name]), f"{name}: the EMA must move k towards q"
    # Only parameters are averaged (official `encoder_q.parameters()`): BN running statistics are not touched.
    assert [n for n in changed_entries(before, model) if n not in dict(model.named_parameters())] == []


def test_state_invariants_through_all_phases():
    """Several SGD steps per phase: prototypes are unit rows (zero for never-seen classes), queue columns are unit
    vectors and the pointer advances by the batch size modulo the queue size."""
    model = tester.create_pretraining_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    queue_size, seen, pointer = model.config.queue_size, set(), 0
    for step, phase in enumerate([p for p in PHASES for _ in range(3)]):
        model.set_phase(phase)
        pixel_values, pixel_values_key, labels = tester.prepare_inputs(seed=step)
        labels = labels % 3  # class 3 is never given; only a relabelling can reach it
        out = model(pixel_values, pixel_values_key, labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_momentum_encoder()

        seen |= set(out.corrected_labels[out.keep_mask].tolist())
        pointer = (pointer + tester.batch_size) % queue_size
        assert int(model.queue_ptr) == pointer
        norms = model.mopro.prototypes.norm(dim=1)
        for label in range(model.config.num_labels):
            expected_norm = 1.0 if label in seen else 0.0
            assert abs(float(norms[label]) - expected_norm) < 1e-5, (phase, label, float(norms[label]))
        column_norms = model.queue.norm(dim=0)
        torch.testing.assert_close(column_norms, torch.ones_like(column_norms), rtol=0, atol=1e-5)
    assert step + 1 > queue_size / tester.batch_size, "the pointer must have wrapped at least once"


@pytest.mark.parametrize("phase", PHASES)
def test_eval_forward_changes_no_state(phase):
    model = tester.create_pretraining_model()
    for seed in range(2):
        model(*tester.prepare_inputs(seed=seed))  # a non-trivial queue, pointer and prototypes
    model.set_phase(phase)
    pixel_values, pixel_values_key, labels = tester.prepare_inputs(seed=5)
    model.eval()
    before = state_snapshot(model)
    out = model(pixel_values, pixel_values_key, labels)
    assert out.loss is not None and out.instance_logits is not None
    model(pixel_values)
    model(pixel_values, labels=labels)
    assert changed_entries(before, model) == []

    # Training mode without labels: BN statistics may move, but no queue, pointer, prototype or phase change.
    model.train()
    model(pixel_values, pixel_values_key)
    state = ["queue", "queue_ptr", "mopro.prototypes", "phase"]
    assert [n for n in changed_entries(before, model) if n in state] == []


def test_release_model_eval_forward_changes_no_state():
    model = MoProForImageClassification(tester.get_config()).eval()
    pixel_values, _, labels = tester.prepare_inputs()
    before = state_snapshot(model)
    model(pixel_values, labels=labels)
    assert changed_entries(before, model) == []


@pytest.mark.parametrize("phase", PHASES)
def test_step_matches_official_reference(phase):
    model, pixel_values, pixel_values_key, labels = engineered_step_setup()
    model.set_phase(phase)
    reference_model = copy.deepcopy(model)
    out = model(pixel_values, pixel_values_key, labels)
    ref = official_step(reference_model, pixel_values, pixel_values_key, labels, phase)

    close = dict(rtol=0, atol=1e-5)
    for field in ("loss", "loss_cls", "loss_instance", "loss_prototype"):
        torch.testing.assert_close(getattr(out, field), ref[field].detach(), **close, msg=field)
    for field in ("logits", "embeddings", "instance_logits", "prototype_logits"):
        torch.testing.assert_close(getattr(out, field).detach(), ref[field].detach(), **close, msg=field)
    assert torch.equal(out.corrected_labels, ref["corrected_labels"])
    assert torch.equal(out.keep_mask, ref["keep_mask"])
    assert torch.equal(out.relabel_mask, ref["corrected_labels"] != labels)
    torch.testing.assert_close(model.mopro.prototypes, ref["prototypes"], **close)
    torch.testing.assert_close(model.queue, ref["queue"], **close)
    assert int(model.queue_ptr) == ref["queue_ptr"] == (17 + tester.batch_size) % tester.queue_size

    # Same gradients: the same terms, on the same samples, with queue and prototypes outside the graph.
    out.loss.backward()
    ref["loss"].backward()
    reference_params = dict(reference_model.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            # float32 summation-order noise scales with the gradient: atol relative to the tensor's largest entry
            # (with the official BN init, every gamma 1, the stem's gradients reach ~7).
            reference_grad = reference_params[name].grad
            atol = 1e-6 * max(1.0, float(reference_grad.abs().max()))
            torch.testing.assert_close(param.grad, reference_grad, rtol=1e-4, atol=atol, msg=name)

    # What the comparison above rules out, checked to be distinguishable here:
    keep, targets = ref["keep_mask"], ref["corrected_labels"]
    momentum = model.config.prototype_momentum
    with_keys = reference_update_prototypes(ref["old_prototypes"], ref["keys"][keep], targets[keep], momentum)
    assert (with_keys - model.mopro.prototypes).abs().max() > 1e-3, "prototypes must move with q, not k"
    logits_after_enqueue = torch.cat(
        [ref["instance_logits"][:, :1], ref["embeddings"] @ ref["queue"] / model.config.temperature], dim=1
    )
    assert (logits_after_enqueue - out.instance_logits).abs().max() > 1e-3, "the current keys are no negatives"
    if phase == MoProPhase.WARMUP:
        assert float(out.loss_prototype) == 0.0
        torch.testing.assert_close(
            out.loss, out.loss_cls + model.config.instance_loss_weight * out.loss_instance, **close
        )
    if phase < MoProPhase.NOISE_CORRECTION:
        assert torch.equal(out.corrected_labels, labels) and out.keep_mask.all()
    else:  # the engineered batch exercises every outcome of the correction
        assert (ref["corrected_labels"] != labels).sum() == 2 and (~keep).sum() == 2
        uncorrected = reference_update_prototypes(ref["old_prototypes"], ref["embeddings"].detach(), labels, momentum)
        assert (uncorrected - model.mopro.prototypes).abs().max() > 1e-3


@pytest.mark.parametrize(("batch_size", "steps"), [(6, 5), (26, 2)])
def test_queue_wraps_around(batch_size, steps):
    """Queue 20 with batch 6 (not a divisor) and with a batch of 26 (larger than the queue)."""
    # No BatchNorm groups: the reference keys below come from one pass of the momentum encoder over the batch.
    model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=1))
    random_state(model, seed=0, queue_ptr=7)
    momentum_encoder = copy.deepcopy(model.momentum_encoder)  # no EMA between steps: the same keys
    queue, pointer = model.queue.clone(), 7
    for step in range(steps):
        pixel_values, pixel_values_key, labels = tester.prepare_inputs(seed=step, batch_size=batch_size)
        model(pixel_values, pixel_values_key, labels)
        with torch.no_grad():
            keys = official_embed(momentum_encoder.backbone, momentum_encoder.projection, pixel_values_key)
        queue, pointer = reference_enqueue(queue, pointer, keys)
        assert int(model.queue_ptr) == pointer == (7 + (step + 1) * batch_size) % 20
        torch.testing.assert_close(model.queue, queue, rtol=0, atol=1e-6)


def test_prototype_distance_rule_drops_far_samples():
    # alpha = 1 and threshold = 1: the official rule keeps every sample whose label is the classifier's argmax,
    # so any sample dropped here is dropped by the distance rule alone.
    config = tester.get_config(ood_rule="prototype_distance", alpha=1.0, pseudo_label_threshold=1.0)
    model = tester.create_pretraining_model(config)
    random_state(model, seed=4, queue_ptr=0)
    model.set_phase(MoProPhase.NOISE_CORRECTION)
    pixel_values, pixel_values_key, _ = tester.prepare_inputs(seed=6)
    labels = soft_labels(model, pixel_values).argmax(dim=1)
    probe = copy.deepcopy(model)
    with torch.no_grad():
        q = official_embed(probe.mopro.backbone, probe.mopro.projection, pixel_values)
    prototypes = model.mopro.prototypes.clone()
    best_similarity = (q @ prototypes.T).max(dim=1).values
    model.config.ood_similarity_threshold = midpoint_below(best_similarity, 3)
    expected_keep = best_similarity > model.config.ood_similarity_threshold  # 3 near, 3 far

    out = model(pixel_values, pixel_values_key, labels)
    assert torch.equal(out.keep_mask, expected_keep)
    assert torch.equal(out.corrected_labels, labels)
    expected_prototypes = reference_update_prototypes(
        prototypes, q[expected_keep], labels[expected_keep], config.prototype_momentum
    )
    torch.testing.assert_close(model.mopro.prototypes, expected_prototypes, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out.loss_cls, F.cross_entropy(out.logits[expected_keep], labels[expected_keep]), rtol=0, atol=1e-5
    )

    official = copy.deepcopy(probe)
    official.config.ood_rule = "official"
    assert official(pixel_values, pixel_values_key, labels).keep_mask.all()


@pytest.mark.parametrize("bad_label", [-1, 4, 100])
def test_labels_out_of_range_raise(bad_label):
    model = tester.create_pretraining_model()
    model.set_phase(MoProPhase.NOISE_CORRECTION)
    pixel_values, pixel_values_key, labels = tester.prepare_inputs()
    labels[2] = bad_label
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="labels"):
        model(pixel_values, pixel_values_key, labels)
    state = ["queue", "queue_ptr", "mopro.prototypes"]
    assert [n for n in changed_entries(before, model) if n in state] == []
    with pytest.raises(ValueError, match="labels"):
        MoProForImageClassification(model.config).eval()(pixel_values, labels=labels)
