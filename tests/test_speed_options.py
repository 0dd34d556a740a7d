"""The speed options (README "Speed") train MoPro as the default path does, and the step has no host syncs.

Each option is run through `MoProTrainer` on the tiny model and data, in the noise-correction phase from the first
step, and compared with the default run step by step: the loss components, the noise decisions (kept and corrected
labels) and the final state. `--gpu_augment` draws other views, so it is checked in distribution
(tests/test_gpu_augment.py) and here only that it trains.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import set_seed

from bench.host_syncs import HostSyncCounter, count_host_syncs
from modeling_mopro import MoProForPreTraining, MoProPhase
from tests._tiny import MoProModelTester
from tests.trainer_fixtures import IMAGE_SIZE, NUM_LABELS, tiny_config, tiny_image_dataset, tiny_trainer
from training.data.collator import MoProCollator
from training.data.gpu_augment import GpuAugmentCollator
from training.data.transforms import MoProViewTransforms, normalize_pixels

tester = MoProModelTester()
MEAN, STD = (0.3, 0.5, 0.6), (0.2, 0.3, 0.25)  # not ImageNet's: a wrong normalisation would show


def _train(tmp_path, name: str, collator=None, **options):
    """4 steps with correction from step 0; returns (per-step outputs, final state, trainer)."""
    set_seed(0)
    model = MoProForPreTraining(tiny_config(pseudo_label_threshold=0.45))  # low: some samples get relabelled
    records = []

    def record(module, args, output):
        records.append(
            {
                "loss_cls": output.loss_cls.detach().clone(),
                "loss_instance": output.loss_instance.detach().clone(),
                "loss_prototype": output.loss_prototype.detach().clone(),
                "keep": output.keep_mask.clone(),
                "targets": output.corrected_labels.clone(),
                "relabel": output.relabel_mask.clone(),
            }
        )

    model.register_forward_hook(record)
    transforms = MoProViewTransforms(IMAGE_SIZE, mean=MEAN, std=STD)
    collator = collator or MoProCollator(transforms, num_labels=NUM_LABELS, seed=0, uint8_training_views=True)
    trainer = tiny_trainer(
        str(tmp_path / name), tiny_image_dataset(48), model=model, collator=collator, max_steps=4, learning_rate=0.01,
        prototype_start_epoch=0, noise_correction_start_epoch=0, **options,
    )  # fmt: skip
    trainer.train()
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return records, state, trainer


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("default"), "default")


@pytest.mark.parametrize(
    "options",
    [{"channels_last": True}, {"uint8_key_batches": True}, {"channels_last": True, "uint8_key_batches": True}],
    ids=["channels_last", "uint8_key_batches", "both"],
)
def test_each_speed_option_trains_with_the_default_losses_and_decisions(tmp_path, default_run, options):
    reference, reference_state, _ = default_run
    records, state, trainer = _train(tmp_path, "option", **options)
    model = trainer.model
    assert len(records) == len(reference) == 4
    # the run is in the correction phase and its decisions are not trivial: the comparison has something to compare
    assert model.current_phase == MoProPhase.NOISE_CORRECTION
    assert any((~r["keep"]).any() for r in reference), "no sample left out: a weak test"
    assert any(r["relabel"].any() for r in reference), "no sample relabelled: a weak test"
    for step, (got, want) in enumerate(zip(records, reference, strict=True)):
        for name in ("loss_cls", "loss_instance", "loss_prototype"):
            # channels_last runs other convolution kernels: float rounding, grown by 4 SGD steps (measured <= 4e-4)
            torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=1e-4, msg=f"step {step} {name}")
        assert torch.equal(got["keep"], want["keep"]), f"step {step}: other OOD decisions"
        assert torch.equal(got["targets"], want["targets"]), f"step {step}: other corrected labels"
    for name, tensor in reference_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=2e-3, atol=2e-3, msg=name)  # measured <= 8e-4
    if options.get("channels_last"):
        conv = model.momentum_encoder.backbone.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        batch = trainer.prepare_views(trainer.data_collator([tiny_image_dataset(6)[i] for i in range(6)]))
        assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    if options.get("uint8_key_batches"):
        batch = trainer.prepare_views(trainer.data_collator([tiny_image_dataset(6)[i] for i in range(6)]))
        assert batch["pixel_values_key"].dtype == torch.uint8  # left for the model, normalised after the gather
        assert batch["pixel_values"].dtype == torch.float32


def test_gpu_augment_path_trains_through_the_trainer_on_cpu(tmp_path, default_run):
    """The GPU data path runs end to end on the CPU device: bytes from the collator, views made in the trainer,
    bad images skipped and counted, and the run trains in the correction phase with finite losses."""
    import io

    import numpy as np
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(48):
        pixels = (rng.integers(0, 80, size=(40, 44, 3)) + 40 * (i % NUM_LABELS)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG" if i % 3 else "PNG")  # JPEGs and PNGs mixed
        images.append(b"\xff\xd8\xff not a jpeg" if i == 5 or i % 8 == 7 else buffer.getvalue())
        labels.append(i % NUM_LABELS)
    dataset = Dataset.from_dict({"image": images, "label": labels, "sample_id": list(range(48))})
    transforms = MoProViewTransforms(IMAGE_SIZE, mean=MEAN, std=STD)
    collator = GpuAugmentCollator(transforms, num_labels=NUM_LABELS, seed=0)
    batch = collator([dataset[i] for i in range(6)])
    # JPEGs travel as bytes, PNGs decoded by the worker; the bad "JPEG" is found only by the decoder on the device
    assert [isinstance(item, bytes) for item in batch["encoded_images"].items] == [
        False,
        True,
        True,
        False,
        True,
        True,
    ]
    assert int(batch["num_skipped_images"]) == 0 and batch["labels"].tolist() == [0, 1, 2, 3, 0, 1]

    set_seed(0)
    trainer = tiny_trainer(
        str(tmp_path / "gpu"), dataset, collator=collator, max_steps=3, gpu_augment=True,
        prototype_start_epoch=0, noise_correction_start_epoch=0,
    )  # fmt: skip
    prepared = trainer.prepare_views(collator([dataset[i] for i in range(6)]))
    assert prepared["labels"].tolist() == [0, 1, 2, 3, 0] and int(prepared["num_skipped_images"]) == 1
    assert prepared["pixel_values"].shape == prepared["pixel_values_key"].shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert prepared["pixel_values"].dtype == torch.float32
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.skipped_images >= 1


def test_cudnn_benchmark_follows_the_option():
    before = torch.backends.cudnn.benchmark
    try:
        for value in (False, True):
            tiny_trainer("unused", tiny_image_dataset(12), cudnn_benchmark=value)
            assert torch.backends.cudnn.benchmark is value
    finally:
        torch.backends.cudnn.benchmark = before


# ------------------------------------------------------------------------------------------------- host syncs
def _step(model, inputs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = model(*inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_momentum_encoder()

    return step


@pytest.mark.parametrize("phase", list(MoProPhase))
def test_a_training_step_has_no_host_sync(phase):
    """forward + backward + SGD + momentum update, in every phase: no call that would wait for a GPU. The model's
    own label check (2: the labels' min and max) is the only one, and MoProTrainer turns it off when its collator
    checked the labels."""
    model = tester.create_pretraining_model()
    model.set_phase(phase)
    inputs = tester.prepare_inputs()
    step = _step(model, inputs)
    step()  # the optimizer's state is made on the first step
    model.validate_labels = False
    assert count_host_syncs(step, torch.device("cpu")) == {"calls": 0, "by_name": {}}
    model.validate_labels = True
    counted = count_host_syncs(step, torch.device("cpu"))
    assert counted["calls"] == 2, counted


def test_the_sync_counter_sees_the_calls_that_wait_for_a_device():
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with HostSyncCounter() as counter:
        x.sum().item()
        bool(x.max() > 0)
        x[mask]
        torch.bincount(mask.long())
        x.nonzero()
        x[torch.tensor([0, 2])]  # integer indexing: no sync
        x * 2
    assert counter.calls == {"item": 1, "__bool__": 1, "__getitem__[bool mask]": 1, "bincount": 1, "nonzero": 1}


def test_trainer_turns_off_the_model_label_check_only_when_its_collator_checks(tmp_path):
    transforms = MoProViewTransforms(IMAGE_SIZE)
    checked = tiny_trainer(str(tmp_path / "a"), tiny_image_dataset(12))
    assert checked.model.validate_labels is False
    # every MoPro parameter is used at every step (`MoProTrainer._build_accelerator_args`)
    assert checked.accelerator.ddp_handler.find_unused_parameters is False
    unchecked = tiny_trainer(
        str(tmp_path / "b"), tiny_image_dataset(12), collator=MoProCollator(transforms, uint8_training_views=True)
    )
    assert unchecked.model.validate_labels is True


# ------------------------------------------------------------------------------------------------ uint8 keys
def _uint8_batch(seed: int, n: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, tester.image_size, tester.image_size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("bn_groups", [1, 2])
def test_uint8_keys_equal_float_keys_in_one_process(bn_groups):
    model = tester.create_pretraining_model(tester.get_config(momentum_encoder_bn_groups=bn_groups))
    model.set_key_pixel_normalization(MEAN, STD)
    pixels = _uint8_batch(0)
    float_pixels = normalize_pixels(pixels, MEAN, STD)
    assert torch.equal(model._normalize_key_pixels(pixels), float_pixels)  # the trainer's normalisation, bit for bit
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    keys_uint8 = model._momentum_keys(pixels)
    after_uint8 = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    torch.manual_seed(1)
    keys_float = model._momentum_keys(float_pixels)
    assert torch.equal(keys_uint8, keys_float)
    for name, tensor in model.state_dict().items():  # the BatchNorm statistics moved alike
        assert torch.equal(after_uint8[name], tensor), name


def test_uint8_keys_without_a_normalisation_are_refused():
    model = tester.create_pretraining_model()
    pixel_values, _, labels = tester.prepare_inputs()
    with pytest.raises(ValueError, match="set_key_pixel_normalization"):
        model(pixel_values, _uint8_batch(0, n=labels.shape[0]), labels)
    with pytest.raises(ValueError, match="3 means"):
        model.set_key_pixel_normalization((0.5, 0.5), (0.2, 0.2, 0.2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shuffle_bn_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same model on both ranks
        model = MoProForPreTraining(tester.get_config(momentum_encoder_bn_groups=1)).train()
        model.set_key_pixel_normalization(MEAN, STD)
        pixels = _uint8_batch(10 + rank, n=4 + rank)  # unequal batches: the sizes matter
        keys = {}
        for name, batch in (("uint8", pixels), ("float", normalize_pixels(pixels, MEAN, STD))):
            torch.manual_seed(5)  # the same shuffle permutation for both
            keys[name] = model._momentum_keys(batch)
        torch.save(keys, os.path.join(out, f"keys{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_uint8_keys_through_cross_process_shuffle_bn_equal_float_keys(tmp_path):
    """2 gloo processes, unequal batches: the uint8 batch gathered and normalised after the gather gives the very
    keys of the float batch normalised before it."""
    mp.spawn(_shuffle_bn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        keys = torch.load(tmp_path / f"keys{rank}.pt", weights_only=True)
        assert keys["uint8"].shape == (4 + rank, tester.get_config().embedding_size)
        assert torch.equal(keys["uint8"], keys["float"])


def test_auto_dataloader_workers_sizes_the_loader_to_the_cores(tmp_path):
    from training.trainer import auto_dataloader_workers, available_cores

    assert auto_dataloader_workers(16, 1) == (15, 4)  # one GPU on the benchmark machine
    assert auto_dataloader_workers(96, 8) == (11, 4)  # 8 GPUs sharing 96 cores
    assert auto_dataloader_workers(2, 4) == (1, 4)  # never fewer than one worker
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(12), auto_dataloader_workers=True)
    assert trainer.args.dataloader_num_workers == max(available_cores() - 1, 1)
    assert trainer.args.dataloader_prefetch_factor == 4


@pytest.mark.parametrize("options", [{}, {"uint8_key_batches": True, "channels_last": True}], ids=["default", "fast"])
def test_the_trainer_step_has_no_host_sync(tmp_path, options):
    """MoProTrainer.training_step (phase set on the device, the model's step, the statistics gathered on the device)
    and the normalisation of a prepared batch: no call that would wait for a GPU. The collator's work is left out:
    it runs in the DataLoader workers, on the host."""
    dataset = tiny_image_dataset(12)
    trainer = tiny_trainer(
        str(tmp_path), dataset, max_steps=1, prototype_start_epoch=0, noise_correction_start_epoch=0, **options
    )
    trainer.train()
    batch = trainer.data_collator([dataset[i] for i in range(6)])
    with HostSyncCounter() as counter:
        trainer.training_step(trainer.model, batch)  # the Trainer's device placement, then `compute_loss`
    assert counter.calls == {}
    assert trainer.accelerator.unwrap_model(trainer.model).current_phase == MoProPhase.NOISE_CORRECTION
