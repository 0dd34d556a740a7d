"""Benchmark: one MoPro training step against a plain cross-entropy step of the same backbone.

[0] MoPro, Li et al., ICLR 2021, arXiv:2009.07995. A MoPro step (`MoProForPreTraining`, phase NOISE_CORRECTION)
runs the query backbone forward and backward like a CE step, plus a no-grad forward of the momentum encoder on the
strong view, the projection head, the instance and prototype losses, noise correction, the queue and prototype
updates and, after the optimizer step, `update_momentum_encoder()`. The key forward alone costs about a third of a
forward+backward, so ~1.33x a CE step is the floor; the target is <= 1.40x.

Compared, in one process, on the same batch, resolution and optimizer (SGD, momentum 0.9, weight decay 1e-4):
* CE: the timm backbone with a 1000-class linear head (`timm.create_model(backbone, num_classes=1000)`);
* MoPro: our step;
* official-style: our step with the two updates written as salesforce/MoPro `model.py` writes them, a Python loop
  over the samples for the prototypes and a loop over the parameters for the momentum encoder.
Steps alternate in rotating order over several repetitions after a warm-up; the table gives medians of img/s and of
the per-repetition ratio to CE. A second table splits the MoPro step into its parts.

    python bench/bench_step_time.py            # ResNet-50 @112 and ResNet-18 @224, batch 32, CPU, 7 repetitions
    python bench/bench_step_time.py --quick    # 1 step per repetition, 3 repetitions (< 3 minutes on 2 cores)
    python bench/bench_step_time.py --tuned_malloc   # glibc keeps freed memory: no page faults per activation
    python bench/bench_step_time.py --device cuda --channels_last --bf16 --configs resnet50@224x128

Writes `bench/results/step_time.json` (git-ignored). `gpu_benchmark.py` reuses the model and step builders.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
from environment import machine_info, write_result  # noqa: E402

from modeling_mopro import MoProConfig, MoProForPreTraining, MoProPhase  # noqa: E402
from modeling_mopro.distributed import concat_all_gather  # noqa: E402

TARGET_RATIO = 1.40
KEY_FORWARD = "key forward only"
DEFAULT_CONFIGS = ("resnet50@112x32", "resnet18@224x32")
# glibc returns large freed blocks to the OS, so every big activation is page-faulted in again on the next use;
# on CPU that made the key forward inside a step ~25% dearer than alone. These keep freed memory in the heap.
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
    "MALLOC_TOP_PAD_": str(512 * 2**20),
}


# ---------------------------------------------------------------------------------------------------- models
class OfficialStyleMoPro(MoProForPreTraining):
    """Our model with the two state updates written as the official `model.py` writes them.

    Overrides the private `_update_prototypes` hook of `MoProForPreTraining` (benchmark only).
    """

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float | None = None) -> None:
        """One EMA per parameter tensor, assigning a new tensor to `.data` (official `_momentum_update_key_encoder`)."""
        m = self.config.encoder_momentum if momentum is None else momentum
        query = [p for module in self._query_modules() for p in module.parameters()]
        key = [p for module in self._momentum_modules() for p in module.parameters()]
        for param_q, param_k in zip(query, key, strict=True):
            param_k.data = param_k.data * m + param_q.data * (1.0 - m)

    @torch.no_grad()
    def _update_prototypes(
        self, q: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, sizes: list[int] | None = None
    ) -> None:
        """One EMA step per gathered kept sample, in batch order, then one normalisation (official forward)."""
        q_all, labels_all = concat_all_gather(q, sizes), concat_all_gather(labels, sizes)
        keep_all = concat_all_gather(keep, sizes)
        prototypes, m = self.mopro.prototypes, self.config.prototype_momentum
        for feature, label in zip(q_all[keep_all], labels_all[keep_all], strict=True):
            prototypes[label] = prototypes[label] * m + (1 - m) * feature
        prototypes.copy_(F.normalize(prototypes, p=2, dim=1))


@dataclass
class StepConfig:
    """One benchmark configuration, written `backbone@image_size x batch_size` on the command line."""

    backbone: str
    image_size: int
    batch_size: int

    @classmethod
    def parse(cls, text: str) -> StepConfig:
        backbone, _, rest = text.partition("@")
        size, _, batch = rest.partition("x")
        return cls(backbone, int(size), int(batch))

    def __str__(self) -> str:
        return f"{self.backbone}@{self.image_size} x{self.batch_size}"


def build_mopro(
    backbone: str,
    image_size: int,
    num_labels: int = 1000,
    embedding_size: int = 128,
    queue_size: int = 8192,
    official_style: bool = False,
    backbone_kwargs: dict | None = None,
    momentum_encoder_bn_groups: int | None = None,
) -> MoProForPreTraining:
    """A MoPro training model in phase NOISE_CORRECTION with unit-norm random prototypes (as after warm-up).
    `momentum_encoder_bn_groups=None` keeps the config default (8 virtual BatchNorm groups in one process)."""
    groups = {} if momentum_encoder_bn_groups is None else {"momentum_encoder_bn_groups": momentum_encoder_bn_groups}
    config = MoProConfig(
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
        num_labels=num_labels,
        embedding_size=embedding_size,
        queue_size=queue_size,
        image_size=image_size,
        **groups,
    )
    model = (OfficialStyleMoPro if official_style else MoProForPreTraining)(config)
    model.set_phase(MoProPhase.NOISE_CORRECTION)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.mopro.prototypes.copy_(F.normalize(torch.randn(num_labels, embedding_size, generator=generator), dim=1))
    return model.train()


def build_ce(backbone: str, num_labels: int = 1000, backbone_kwargs: dict | None = None) -> nn.Module:
    """The baseline: the same timm backbone with a linear classifier, trained with cross-entropy."""
    return timm.create_model(backbone, pretrained=False, num_classes=num_labels, **(backbone_kwargs or {})).train()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The official optimizer (lr scaled down: random data, we only time the update)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=1e-4)


def make_batch(
    batch_size: int, image_size: int, num_labels: int, device: torch.device, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    """Normalised-looking random weak and strong views and labels."""
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = [torch.randn(batch_size, 3, image_size, image_size, generator=generator) for _ in range(2)]
    return {
        "pixel_values": views[0].to(device, memory_format=memory_format),
        "pixel_values_key": views[1].to(device, memory_format=memory_format),
        "labels": torch.randint(0, num_labels, (batch_size,), generator=generator).to(device),
    }


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def make_mopro_step(
    model: MoProForPreTraining, batch: dict[str, torch.Tensor], bf16: bool = False
) -> Callable[[], None]:
    """forward (weak + strong views, labels) -> backward -> SGD step -> momentum-encoder EMA."""
    optimizer = sgd(model)
    device = batch["pixel_values"].device

    def step() -> None:
        with autocast_context(device, bf16):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_momentum_encoder()

    return step


def make_ce_step(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool = False) -> Callable[[], None]:
    """forward (weak view) -> cross-entropy -> backward -> SGD step."""
    optimizer = sgd(model)
    pixel_values, labels = batch["pixel_values"], batch["labels"]

    def step() -> None:
        with autocast_context(pixel_values.device, bf16):
            loss = F.cross_entropy(model(pixel_values), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> float:
    """Wall seconds of `repeat` calls, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(
    steps: dict[str, Callable[[], Any]], device: torch.device, repetitions: int, calls_per_repetition: int
) -> dict[str, list[float]]:
    """Seconds per call of every step, in rotating order in each repetition (so drift hits all alike)."""
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(time_call(steps[name], device, calls_per_repetition) / calls_per_repetition)
    return seconds


def paired_ratios(seconds: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over repetitions of each step's time divided by the baseline's time in the same repetition."""
    return {
        name: statistics.median(t / b for t, b in zip(times, seconds[baseline], strict=True))
        for name, times in seconds.items()
    }


def make_key_forward(
    model: MoProForPreTraining, batch: dict[str, torch.Tensor], bf16: bool = False
) -> Callable[[], None]:
    """The momentum encoder's forward on the strong view alone: what MoPro cannot avoid on top of a CE step."""
    device = batch["pixel_values_key"].device

    def key_forward() -> None:
        with torch.no_grad(), autocast_context(device, bf16):
            model._momentum_keys(batch["pixel_values_key"])

    return key_forward


def step_breakdown(
    model: MoProForPreTraining,
    official: OfficialStyleMoPro,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    repetitions: int,
) -> dict[str, float]:
    """Median ms of the small parts of a MoPro step, ours and official-style (the key forward is timed with the steps)."""
    num_samples, embedding_size = batch["labels"].shape[0], model.config.embedding_size
    embeddings = F.normalize(torch.randn(num_samples, embedding_size, device=device), dim=1)
    keep = torch.ones_like(batch["labels"], dtype=torch.bool)
    saved = model.mopro.prototypes.clone()
    parts = {
        "momentum EMA, ours (_foreach)": model.update_momentum_encoder,
        "momentum EMA, official loop": official.update_momentum_encoder,
        "prototype update, ours (vectorised)": lambda: model._update_prototypes(embeddings, batch["labels"], keep),
        "prototype update, official loop": lambda: official._update_prototypes(embeddings, batch["labels"], keep),
    }
    seconds = alternate(parts, device, repetitions, calls_per_repetition=1)
    with torch.no_grad():
        model.mopro.prototypes.copy_(saved)
    return {name: statistics.median(times) * 1e3 for name, times in seconds.items()}


# ------------------------------------------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="backbone@size x batch, e.g. resnet50@112x32"
    )
    parser.add_argument("--num_labels", type=int, default=1000)
    parser.add_argument("--embedding_size", type=int, default=128)
    parser.add_argument("--queue_size", type=int, default=8192)
    parser.add_argument(
        "--momentum_encoder_bn_groups", type=int, default=None, help="BatchNorm groups of the key forward (default 8)"
    )
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--steps_per_repetition", type=int, default=2)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 warm-up step, 3 repetitions of 1 step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels_last", action="store_true", help="channels_last models and inputs")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    # One thread by default: on a shared 2-core machine two OpenMP threads that wait for busy cores made a step
    # 2-3x slower and erratic; the ratios are what this benchmark is about.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--skip_official", action="store_true", help="leave out the official-style step")
    parser.add_argument(
        "--tuned_malloc", action="store_true", help="re-run under glibc settings that keep freed memory (CPU)"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "step_time.json")
    return parser.parse_args()


def mopro_groups(args: argparse.Namespace) -> int:
    if args.momentum_encoder_bn_groups is not None:
        return args.momentum_encoder_bn_groups
    return MoProConfig.momentum_encoder_bn_groups


def run_config(config: StepConfig, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Builds the three models for one configuration, times their steps alternately, returns the figures."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    sizes = {"num_labels": args.num_labels, "embedding_size": args.embedding_size, "queue_size": args.queue_size}
    sizes["momentum_encoder_bn_groups"] = args.momentum_encoder_bn_groups
    torch.manual_seed(0)
    mopro = build_mopro(config.backbone, config.image_size, **sizes).to(device, memory_format=memory_format)
    official = build_mopro(config.backbone, config.image_size, official_style=True, **sizes)
    official.load_state_dict(mopro.state_dict())
    official = official.to(device, memory_format=memory_format)
    ce = build_ce(config.backbone, args.num_labels).to(device, memory_format=memory_format)
    batch = make_batch(config.batch_size, config.image_size, args.num_labels, device, args.channels_last)
    steps = {
        "CE": make_ce_step(ce, batch, args.bf16),
        "MoPro": make_mopro_step(mopro, batch, args.bf16),
    }
    if not args.skip_official:
        steps["MoPro official-style"] = make_mopro_step(official, batch, args.bf16)
    # What MoPro cannot avoid on top of CE is the key forward; timed in the same rotation as the steps, its
    # paired ratio to the CE step sets the floor (1.33 if a backward costs two forwards; on CPU often less).
    steps[KEY_FORWARD] = make_key_forward(mopro, batch, args.bf16)
    for step in steps.values():
        time_call(step, device, args.warmup_steps)  # allocator, cudnn/oneDNN kernel choice, lazy state
    seconds = alternate(steps, device, args.repetitions, args.steps_per_repetition)
    ratios = paired_ratios(seconds, "CE")
    key_seconds = seconds.pop(KEY_FORWARD)
    floor = ratios.pop(KEY_FORWARD) + 1.0
    breakdown = {"momentum-encoder forward (strong view)": statistics.median(key_seconds) * 1e3}
    breakdown.update(step_breakdown(mopro, official, batch, device, max(3, args.repetitions)))
    return {
        "config": str(config),
        "backbone": config.backbone,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "steps": {
            name: {
                "img_per_s_median": config.batch_size / statistics.median(times),
                "step_s_median": statistics.median(times),
                "ratio_to_ce_median": ratios[name],
                "seconds": times,
            }
            for name, times in seconds.items()
        },
        "breakdown_ms": breakdown,
        "floor_ratio": floor,
        "mopro_ratio_over_floor": ratios["MoPro"] / floor,
    }


def main() -> None:
    args = parse_args()
    if args.tuned_malloc and any(os.environ.get(key) != value for key, value in TUNED_MALLOC_ENV.items()):
        # glibc reads these once, at start-up: run this script again under them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC_ENV})
    if args.quick:
        args.repetitions, args.steps_per_repetition, args.warmup_steps = 3, 1, 1
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    load_before = os.getloadavg()
    results = [run_config(StepConfig.parse(text), args, device) for text in args.configs]
    load_after = os.getloadavg()

    precision = ("bf16 autocast" if args.bf16 else "fp32") + (", channels_last" if args.channels_last else "")
    precision += f", {mopro_groups(args)} key BatchNorm group(s)"
    print(
        f"\n{args.device}, {precision}, {torch.get_num_threads()} thread(s), {args.num_labels} classes, "
        f"embedding {args.embedding_size}, queue {args.queue_size}, {args.repetitions} reps x "
        f"{args.steps_per_repetition} steps, load avg {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    print(f"{'config':<20}{'step':<24}{'img/s':>10}{'s/step':>10}{'x CE':>8}")
    for result in results:
        for name, figures in result["steps"].items():
            print(
                f"{result['config']:<20}{name:<24}{figures['img_per_s_median']:>10.2f}"
                f"{figures['step_s_median']:>10.3f}{figures['ratio_to_ce_median']:>8.3f}"
            )
        ratio = result["steps"]["MoPro"]["ratio_to_ce_median"]
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        print(f"{'':<20}MoPro / CE = {ratio:.3f} (target <= {TARGET_RATIO:.2f}: {verdict})")
        print(
            f"{'':<20}floor 1 + key forward / CE step = {result['floor_ratio']:.3f}; "
            f"MoPro / floor = {result['mopro_ratio_over_floor']:.3f}"
        )
    print(f"\n{'where a MoPro step goes beyond CE (median ms)':<48}" + "".join(f"{r['config']:>20}" for r in results))
    for part in results[0]["breakdown_ms"]:
        print(f"{part:<48}" + "".join(f"{r['breakdown_ms'][part]:>20.2f}" for r in results))
    print(
        f"{'MoPro step - CE step':<48}"
        + "".join(
            f"{(r['steps']['MoPro']['step_s_median'] - r['steps']['CE']['step_s_median']) * 1e3:>20.1f}"
            for r in results
        )
    )

    output = {
        "benchmark": "step_time",
        "settings": {
            "device": args.device,
            "bf16": args.bf16,
            "channels_last": args.channels_last,
            "num_labels": args.num_labels,
            "embedding_size": args.embedding_size,
            "queue_size": args.queue_size,
            "momentum_encoder_bn_groups": mopro_groups(args),
            "repetitions": args.repetitions,
            "steps_per_repetition": args.steps_per_repetition,
            "warmup_steps": args.warmup_steps,
            "optimizer": "SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)",
            "phase": "NOISE_CORRECTION",
            "glibc_malloc_env": {key: os.environ.get(key) for key in TUNED_MALLOC_ENV},
        },
        "target_ratio": TARGET_RATIO,
        "results": results,
        "load_average": {"before": load_before, "after": load_after},
    }
    write_result(args.output, output, machine_info(device))


if __name__ == "__main__":
    main()
