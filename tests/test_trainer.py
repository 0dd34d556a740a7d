"""MoProTrainer: phase schedule, logging, momentum update under gradient accumulation, exact resume, and a real
2-process `accelerate launch` run on CPU (gloo)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from transformers import set_seed

from modeling_mopro import MoProForPreTraining, MoProPhase
from modeling_mopro.sample_dynamics import SampleDynamics
from tests.fixtures_eval import IMAGE_SIZE, NUM_LABELS
from tests.trainer_fixtures import run_distributed_train, tiny_config, tiny_image_dataset, tiny_trainer
from training.correction_schedule import phase_for_epoch
from training.data.collator import MoProCollator
from training.data.transforms import MoProViewTransforms
from training.optim import step_lr_scheduler

REPO = Path(__file__).resolve().parent.parent


def test_phase_for_epoch_follows_official_schedule():
    # official: is_proto = epoch > 0, is_clean = epoch >= start_clean_epoch (11), epochs 0-indexed
    assert phase_for_epoch(0.0, 1, 11) == MoProPhase.WARMUP
    assert phase_for_epoch(0.99, 1, 11) == MoProPhase.WARMUP
    assert phase_for_epoch(1.0, 1, 11) == MoProPhase.PROTOTYPES
    assert phase_for_epoch(10.99, 1, 11) == MoProPhase.PROTOTYPES
    assert phase_for_epoch(11 - 1e-12, 1, 11) == MoProPhase.NOISE_CORRECTION  # float step accumulation
    assert phase_for_epoch(11.0, 1, 11) == MoProPhase.NOISE_CORRECTION
    assert phase_for_epoch(89.9, 1, 11) == MoProPhase.NOISE_CORRECTION


def test_step_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=1.0)
    scheduler = step_lr_scheduler(optimizer, [40, 80], steps_per_epoch=1, gamma=0.1)
    factors = []
    for _ in range(1001):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    f = factors.__getitem__
    assert [f(0), f(39), f(40), f(79), f(80), f(1000)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_training_walks_through_the_phases_and_logs_components(tmp_path):
    # 48 samples / batch 6 = 8 steps per epoch; proto from epoch 1 (step 8), correction from epoch 2 (step 16).
    set_seed(0)
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(48), max_steps=20)
    phases = []
    model = trainer.model
    original_forward = model.forward

    def spy(*args, **kwargs):
        phases.append(model.current_phase)
        return original_forward(*args, **kwargs)

    model.forward = spy
    trainer.train()
    assert phases[:8] == [MoProPhase.WARMUP] * 8
    assert phases[8:16] == [MoProPhase.PROTOTYPES] * 8
    assert phases[16:] == [MoProPhase.NOISE_CORRECTION] * 4
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 20
    for entry in logs:
        for key in (
            "loss_cls",
            "loss_instance",
            "loss_prototype",
            "fraction_kept",
            "fraction_relabeled",
            "fraction_ood",
            "skipped_images",
            "phase",
        ):
            assert key in entry, key
        assert 0.0 <= entry["fraction_kept"] <= 1.0
        assert entry["fraction_ood"] == pytest.approx(1.0 - entry["fraction_kept"])
    assert all(entry["loss_prototype"] == 0.0 for entry in logs[:8])
    assert all(entry["loss_prototype"] > 0.0 for entry in logs[8:])
    assert all(entry["fraction_kept"] == 1.0 and entry["fraction_relabeled"] == 0.0 for entry in logs[:16])
    # the total is the weighted sum of its components (weights 1) averaged over the logging window
    for entry in logs:
        expected = entry["loss_cls"] + entry["loss_instance"] + entry["loss_prototype"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_momentum_update_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    set_seed(0)
    model = MoProForPreTraining(tiny_config())
    calls = []
    original = model.update_momentum_encoder
    model.update_momentum_encoder = lambda *a, **k: (calls.append(1), original(*a, **k))
    trainer = tiny_trainer(
        str(tmp_path), tiny_image_dataset(48), model=model, max_steps=3, gradient_accumulation_steps=2
    )
    trainer.train()
    assert len(calls) == 3
    # the momentum encoder moved (EMA) but is not the query encoder
    q = dict(model.mopro.backbone.named_parameters())
    k = dict(model.momentum_encoder.backbone.named_parameters())
    assert any(not torch.equal(q[n], k[n]) for n in q)


def test_bad_images_are_skipped_and_counted(tmp_path):
    dataset = tiny_image_dataset(48)
    images = list(dataset["image"])
    for i in (3, 17, 30):
        images[i] = b"not an image"
    dataset = dataset.remove_columns("image").add_column("image", images)
    set_seed(0)
    trainer = tiny_trainer(str(tmp_path), dataset, max_steps=8)
    trainer.train()
    assert trainer.skipped_images == 3
    assert trainer.state.log_history[-2]["skipped_images"] == 3


def test_uint8_batches_normalised_by_the_trainer_train_like_float_batches(tmp_path):
    """`MoProTrainer.prepare_views` normalises uint8 views with the collator's mean and std: the same
    training as float batches normalised in the collator (here with a non-ImageNet mean and std, to catch a
    trainer that would use the wrong ones)."""
    dataset = tiny_image_dataset(48)
    mean, std = (0.3, 0.5, 0.6), (0.2, 0.3, 0.25)
    transforms = MoProViewTransforms(IMAGE_SIZE, mean=mean, std=std)
    states = {}
    for uint8 in (False, True):
        set_seed(0)
        model = MoProForPreTraining(tiny_config())
        collator = MoProCollator(transforms, num_labels=NUM_LABELS, seed=0, uint8_training_views=uint8)
        trainer = tiny_trainer(str(tmp_path / str(uint8)), dataset, model=model, collator=collator, max_steps=4)
        trainer.train()
        states[uint8] = _state(trainer.model)
    for name, tensor in states[False].items():
        torch.testing.assert_close(states[True][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # and the batch the model sees is the collator's float batch
    batch = MoProCollator(transforms, num_labels=NUM_LABELS, seed=0, uint8_training_views=True)(
        [dataset[i] for i in range(4)]
    )
    prepared = trainer.prepare_views(dict(batch))
    float_batch = MoProCollator(transforms, num_labels=NUM_LABELS, seed=0)([dataset[i] for i in range(4)])
    for name in ("pixel_values", "pixel_values_key"):
        assert prepared[name].dtype == torch.float32
        assert torch.equal(prepared[name], float_batch[name])


def _state(model: MoProForPreTraining) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_equivalent_to_a_straight_run(tmp_path):
    """Train 8 steps straight vs 4 steps, stop, resume from checkpoint-4 to 8: same weights, momentum copy,
    queue, pointer, prototypes and phase (the phase changes at step 8 = epoch 1)."""
    dataset = tiny_image_dataset(48)
    set_seed(0)
    straight = tiny_trainer(str(tmp_path / "straight"), dataset, max_steps=10)
    straight.train()
    reference = _state(straight.model)

    set_seed(0)
    first = tiny_trainer(str(tmp_path / "resumed"), dataset, max_steps=10, save_strategy="steps", save_steps=4)
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").exists()

    set_seed(123)  # a different seed must not matter: RNG state is restored from the checkpoint
    resumed = tiny_trainer(str(tmp_path / "resumed2"), dataset, max_steps=10)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    state = _state(resumed.model)
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert int(state["phase"]) == int(MoProPhase.PROTOTYPES)
    assert not torch.equal(reference["mopro.prototypes"], torch.zeros_like(reference["mopro.prototypes"]))


@pytest.mark.parametrize("start_epoch", [5, 0], ids=["warmup", "noise_correction"])
def test_a_batch_of_only_bad_images_gives_a_zero_loss(tmp_path, start_epoch):
    """Every image of every batch undecodable: the batches are empty, the loss is a finite 0 (not NaN), and
    the weights, queue and prototypes stay finite."""
    dataset = tiny_image_dataset(12).map(lambda row: {"image": b"not an image"})
    trainer = tiny_trainer(
        str(tmp_path),
        dataset,
        max_steps=2,
        prototype_start_epoch=start_epoch,
        noise_correction_start_epoch=start_epoch,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in logs] == [0.0, 0.0]
    assert all(entry["loss_instance"] == 0.0 and entry["loss_prototype"] == 0.0 for entry in logs)
    assert trainer.skipped_images == 12
    assert trainer.model.current_phase == (MoProPhase.WARMUP if start_epoch else MoProPhase.NOISE_CORRECTION)
    assert all(tensor.float().isfinite().all() for tensor in trainer.model.state_dict().values())


@pytest.mark.slow
def test_two_process_accelerate_run_keeps_state_identical(tmp_path):
    """`accelerate launch` with 2 gloo processes: every sample seen exactly once per epoch across ranks; a step
    where one rank's batch is empty neither hangs nor gives NaN; both ranks end with identical queue, prototypes
    and weights; and the noise report, computed in shares, holds every training sample exactly once."""
    result = run_distributed_train(tmp_path, port=29517)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    num_samples, epochs = ranks[0]["num_samples"], ranks[0]["epochs"]
    for epoch in range(epochs):
        seen = ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]
        assert sorted(seen) == list(range(num_samples)), f"epoch {epoch}"
        assert not set(ranks[0]["seen"][epoch]) & set(ranks[1]["seen"][epoch])
    states = [torch.load(tmp_path / f"rank{r}_state.pt", weights_only=True) for r in (0, 1)]
    # BatchNorm running statistics are per process in DDP (as officially); everything else must be identical.
    per_process = ("running_mean", "running_var", "num_batches_tracked")
    compared = [name for name in states[0] if not name.endswith(per_process)]
    assert {"queue", "queue_ptr", "mopro.prototypes", "phase", "classifier.weight"} <= set(compared)
    for name in compared:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(states[0]["mopro.prototypes"], torch.zeros_like(states[0]["mopro.prototypes"]))
    assert int(states[0]["phase"]) == int(MoProPhase.NOISE_CORRECTION)
    keys_enqueued = ranks[0]["steps"] * 12 + sum(ranks[0]["empty_step_batches"])
    assert int(states[0]["queue_ptr"]) == keys_enqueued % 20
    assert ranks[1]["empty_step_loss"] == 0.0 and math.isfinite(ranks[0]["empty_step_loss"])

    report = datasets.load_from_disk(str(tmp_path / "noise_report")).to_dict()
    assert report["sample_id"] == list(range(num_samples))  # every sample once, in dataset order
    assert sorted(report["id"]) == sorted(str(i) for i in range(num_samples))
    assert ranks[0]["noise_report_summary"] == ranks[1]["noise_report_summary"]
    assert ranks[0]["noise_report_summary"]["noise_num_samples"] == num_samples
    # The per-sample record, summed over both ranks: every sample seen once per epoch until correction begins (epoch
    # 2 of 3), with its label; the report read it.
    record = SampleDynamics.load(tmp_path)
    assert epochs == 3 and record.visits.tolist() == [2.0] * num_samples
    assert record.labels.tolist() == tiny_image_dataset(num_samples)["label"]
    summary = json.loads((tmp_path / "noise_report" / "noise_report_summary.json").read_text())
    assert summary["label_evidence"] == "neighbour vote + training dynamics"


def test_evaluation_sees_every_sample_despite_drop_last(tmp_path):
    # 50 test samples, eval batch 16: drop_last would score 48 of them.
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(48), per_device_eval_batch_size=16)
    seen = []
    collate = trainer.eval_data_collator

    def counting(examples):
        batch = collate(examples)
        seen.append(len(batch["labels"]))
        return batch

    trainer.eval_data_collator = counting
    metrics = trainer.evaluate(tiny_image_dataset(50, seed=1))
    assert sum(seen) == 50 and "eval_loss" in metrics
    assert trainer.args.dataloader_drop_last  # training batches still drop the remainder


def test_a_per_device_batch_too_small_for_the_key_bn_groups_is_refused_up_front(tmp_path):
    model = MoProForPreTraining(tiny_config(momentum_encoder_bn_groups=4))  # 4 groups need 8 keys; the batch is 6
    with pytest.raises(ValueError, match=r"momentum_encoder_bn_groups 3"):
        tiny_trainer(str(tmp_path), tiny_image_dataset(12), model=model)


def _checkpoint(tmp_path, dataset, **overrides) -> Path:
    set_seed(0)
    trainer = tiny_trainer(
        str(tmp_path / "run"), dataset, max_steps=8, save_strategy="steps", save_steps=4, **overrides
    )
    trainer.train()
    return tmp_path / "run" / "checkpoint-4"


def test_a_checkpoint_with_non_finite_weights_or_no_optimizer_state_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from training.trainer import check_checkpoint

    dataset = tiny_image_dataset(48)
    checkpoint = _checkpoint(tmp_path, dataset)
    check_checkpoint(checkpoint)  # a good one passes
    weights = load_file(checkpoint / "model.safetensors")
    weights["classifier.weight"][0, 0] = float("nan")
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    resumed = tiny_trainer(str(tmp_path / "resumed"), dataset, max_steps=8)
    with pytest.raises(ValueError, match=r"model.safetensors holds non-finite values in 'classifier.weight'"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 0  # refused before a step ran

    checkpoint = _checkpoint(tmp_path / "again", dataset)
    (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-4 lacks optimizer.pt"):
        tiny_trainer(str(tmp_path / "resumed2"), dataset, max_steps=8).train(resume_from_checkpoint=str(checkpoint))


def test_the_skipped_image_count_survives_a_resume(tmp_path):
    """Undecodable images counted before a checkpoint are still counted after resuming from it, including those
    of steps after the last log (logging every 3 steps, a checkpoint at step 4)."""
    dataset = tiny_image_dataset(48)
    images = list(dataset["image"])
    for i in range(0, 48, 5):
        images[i] = b"not an image"
    dataset = dataset.remove_columns("image").add_column("image", images)
    set_seed(0)
    straight = tiny_trainer(str(tmp_path / "straight"), dataset, max_steps=8, logging_steps=3)
    straight.train()
    checkpoint = _checkpoint(tmp_path, dataset, logging_steps=3)
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["SkippedImagesState"]["attributes"]["skipped_images"] > 0

    resumed = tiny_trainer(str(tmp_path / "resumed"), dataset, max_steps=8, logging_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert straight.skipped_images == 10  # one epoch: every sample once, ids 0, 5, ..., 45 undecodable
    assert resumed.skipped_images == straight.skipped_images

    def logged(trainer):
        return [(e["step"], e["skipped_images"]) for e in trainer.state.log_history if "skipped_images" in e]

    assert logged(resumed) == logged(straight)


def test_the_private_trainer_methods_overridden_still_exist():
    """The one list of private Trainer methods overridden (`PRIVATE_TRAINER_HOOKS`): a transformers upgrade that
    renames one, or changes its parameters, would silently bypass the override."""
    import inspect

    from transformers import Trainer

    from evaluation.finetune import StepDecayTrainer
    from training.trainer import PRIVATE_TRAINER_HOOKS, MoProTrainer

    overridden = {
        name
        for cls in (MoProTrainer, StepDecayTrainer)
        for name in vars(cls)
        if name.startswith("_") and not name.startswith("__")
    }
    assert overridden - {"_pixel_normalization", "_views_on_device", "_record", "_end_finished_epochs",
                         "_apply_compile_request", "_record_effective_precision", "_configure_speed_options",
                         "_sample_dynamics_for", "_resumed_sample_dynamics"} == set(
        PRIVATE_TRAINER_HOOKS
    )  # fmt: skip
    for name in PRIVATE_TRAINER_HOOKS:
        ours = getattr(MoProTrainer, name, None) or getattr(StepDecayTrainer, name)
        assert hasattr(Trainer, name), f"transformers.Trainer has no {name} any more"
        theirs = inspect.signature(getattr(Trainer, name)).parameters
        assert list(inspect.signature(ours).parameters) == list(theirs), name
