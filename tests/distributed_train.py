"""Run by tests/test_trainer.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo).

Optional second argument: the model's `noise_correction_rule` (default "official"). Each rank records which sample ids its batches held per epoch. After training, one more training step in which
rank 1's batch holds only undecodable images (0 rows through every gather), then the noise report as
`training/run_mopro.py` ends (every rank scores its share; the per-sample record saved first, as there). Each rank saves its final model state."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import set_seed

from modeling_mopro import MoProForPreTraining
from tests.trainer_fixtures import IMAGE_SIZE, NUM_LABELS, tiny_config, tiny_image_dataset, tiny_trainer
from training.arguments import DataArguments
from training.data.collator import MoProCollator
from training.data.transforms import MoProViewTransforms
from training.run_mopro import noise_report

NUM_SAMPLES, BATCH, EPOCHS = 48, 6, 3  # 48 / (6 x 2 ranks) = 4 steps per epoch


class RecordingCollator(MoProCollator):
    """Records the sample ids of every batch this rank collates (workers = 0, so in this process)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def __call__(self, examples):
        batch = super().__call__(examples)
        self.seen.extend(batch["sample_ids"].tolist())
        return batch


def main(output_dir: str, noise_correction_rule: str = "official") -> None:
    set_seed(0)
    collator = RecordingCollator(MoProViewTransforms(IMAGE_SIZE), train=True, num_labels=NUM_LABELS, seed=0)
    dataset = tiny_image_dataset(NUM_SAMPLES)
    model = MoProForPreTraining(tiny_config(noise_correction_rule=noise_correction_rule, queue_vote_k=8))
    trainer = tiny_trainer(
        output_dir,
        dataset,
        model=model,
        collator=collator,
        max_steps=-1,
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        prototype_start_epoch=1,
        noise_correction_start_epoch=2,
        # DDP would otherwise copy rank 0's buffers (queue, prototypes) to every rank at each forward, hiding a
        # broken gather: without it, identical state proves the gathers.
        ddp_broadcast_buffers=False,
        ddp_timeout=300,  # a collective that hangs (e.g. on an empty rank) fails in minutes, not the default 30
    )
    trainer.train()
    trainer.save_sample_dynamics(output_dir)  # every rank: summed over them, written by rank 0
    rank, world = trainer.args.process_index, trainer.args.world_size
    steps_per_epoch = NUM_SAMPLES // (BATCH * world)
    seen = [collator.seen[e * steps_per_epoch * BATCH : (e + 1) * steps_per_epoch * BATCH] for e in range(EPOCHS)]

    # One more training step (forward with shuffle-BN and the gathers, DDP backward), rank 1's batch empty.
    rows = [dataset[i] for i in range(BATCH)]
    if rank == 1:
        rows = [{**row, "image": b"not an image"} for row in rows]
    empty_step_loss = trainer.training_step(trainer.model, collator(rows)).item()

    model = trainer.accelerator.unwrap_model(trainer.model)
    summary = noise_report(model, dataset, DataArguments(), trainer.args)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(output_dir) / f"rank{rank}_state.pt")
    record = {
        "world_size": world,
        "num_samples": NUM_SAMPLES,
        "epochs": EPOCHS,
        "seen": seen,
        "steps": trainer.state.global_step,
        "empty_step_batches": [BATCH, 0],
        "empty_step_loss": empty_step_loss,
        "noise_report_summary": summary,
    }
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
