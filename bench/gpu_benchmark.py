"""GPU benchmark: MoPro's training step against cross-entropy's, model-only and end to end from JPEG files.

One command on one GPU (estimated at 7-8 minutes on an H200, compile included; not yet run on a GPU):

    python bench/gpu_benchmark.py

Model-only rows, ResNet-50 at 224 px, 1000 classes, embedding 128, queue 8192, SGD, phase NOISE_CORRECTION:
* configurations: "per-rank", one rank of the 8-GPU recipe (32 images per device, the key batch's BatchNorm over the
  rank's batch, one group: on one GPU the cross-rank gathers are identities, see BENCHMARKS.md), and "one-GPU", the
  recipe's global batch of 256 on one device with the key encoder's BatchNorm in 8 virtual groups;
* settings: fp32 (PyTorch defaults), bf16 autocast + channels_last, and the same + `torch.compile` of the encoders'
  backbone features as `MoProTrainer` compiles them (per-rank only; the MoPro losses and updates stay eager);
* per row: img/s of CE, of MoPro and of the key forward alone (timed in rotation in the same run), MoPro's ratio to
  CE and to its floor (CE + key forward), peak memory (`torch.cuda.max_memory_allocated` over that model's steps, less
  what was resident before) and host syncs/step (the calls that wait for the device, counted by
  `bench/host_syncs.py`; on CUDA the driver's count from `set_sync_debug_mode` beside it).
End-to-end rows (per-rank, bf16 + channels_last): WebVision-like JPEG files made on the fly (short side 256), read by
a DataLoader and trained on, (a) decoded and augmented by CPU workers (`MoProCollator`, as `run_mopro.py` ships it),
(b) the GPU data path (`--gpu_augment`: bytes from the workers, nvJPEG decode and both views on the device); each with
a "data only" row (the pipeline without the model) and the ratio of the end-to-end img/s to the model-only one.

A time budget skips the settings that would not fit; a failing setting (compile, out of memory) is reported, not
raised. Writes `bench/results/gpu_benchmark.json` (git-ignored; copy a run worth keeping to bench/results-committed/).

Check on CPU (the test suite runs it; tiny model, 32 px, < 1 minute): `python bench/gpu_benchmark.py --device cpu --quick`
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the step builders live beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_data_pipeline import make_webvision_like_jpegs  # noqa: E402
from bench_step_time import (  # noqa: E402
    KEY_FORWARD,
    alternate,
    build_ce,
    build_mopro,
    make_batch,
    make_ce_step,
    make_key_forward,
    make_mopro_step,
    paired_ratios,
    synchronize,
    time_call,
)
from environment import machine_info, write_result  # noqa: E402
from host_syncs import count_host_syncs  # noqa: E402

from training.data.collator import MoProCollator  # noqa: E402
from training.data.gpu_augment import GpuAugmentCollator, decode_on_device  # noqa: E402
from training.data.transforms import MoProViewTransforms, normalize_pixels  # noqa: E402
from training.trainer import compile_backbones  # noqa: E402


@dataclass(frozen=True)
class Configuration:
    name: str
    batch_size: int
    bn_groups: int


@dataclass(frozen=True)
class Setting:
    name: str
    bf16: bool
    channels_last: bool
    compile: bool


FP32 = Setting("fp32", bf16=False, channels_last=False, compile=False)
BF16_CL = Setting("bf16 + channels_last", bf16=True, channels_last=True, compile=False)
COMPILED = Setting("bf16 + channels_last + compile", bf16=True, channels_last=True, compile=True)


def peak_memory_gib(device: torch.device, resident_before: int) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - resident_before) / 2**30


def _start_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_labels": args.num_labels, "embedding_size": args.embedding_size, "queue_size": args.queue_size}


def _build(name: str, args: argparse.Namespace, bn_groups: int, device: torch.device, setting: Setting) -> nn.Module:
    torch.manual_seed(0)
    if name == "CE":
        model = build_ce(args.backbone, args.num_labels, args.backbone_kwargs)
    else:
        model = build_mopro(
            args.backbone, args.image_size, backbone_kwargs=args.backbone_kwargs,
            momentum_encoder_bn_groups=bn_groups, **_sizes(args),
        )  # fmt: skip
        model.validate_labels = False  # as MoProTrainer sets it: the collator checked the labels
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if setting.compile:
        # What MoProTrainer compiles (`compile_backbones`): both encoders' `forward_features`; the heads, MoPro
        # losses and state updates stay eager. CE gets the same scope: its features compiled, its classifier eager.
        if name == "CE":
            model.forward_features = torch.compile(model.forward_features, backend=args.compile_backend)
        elif not compile_backbones(model, args.compile_backend):
            raise ValueError("no backbone to compile")
    return model


def run_models(config: Configuration, setting: Setting, args, device: torch.device) -> dict[str, Any]:
    """CE, MoPro and the key forward of one configuration and setting, timed in rotation."""
    batch = make_batch(config.batch_size, args.image_size, args.num_labels, device, setting.channels_last)
    steps: dict[str, Callable[[], None]] = {}
    figures: dict[str, dict[str, Any]] = {}
    for name in ("CE", "MoPro"):
        model = _build(name, args, config.bn_groups, device, setting)
        step = (make_ce_step if name == "CE" else make_mopro_step)(model, batch, setting.bf16)
        resident = _start_memory(device)
        warmup_seconds = time_call(step, device, args.warmup_steps)
        syncs = count_host_syncs(step, device)
        figures[name] = {
            "warmup_s": warmup_seconds,
            "peak_memory_gib": peak_memory_gib(device, resident),
            "host_syncs_per_step": syncs["calls"],
            "host_syncs_by_name": syncs["by_name"],
            "cuda_syncs_per_step": syncs.get("cuda"),
        }
        steps[name] = step
        if name == "MoPro":
            steps[KEY_FORWARD] = make_key_forward(model, batch, setting.bf16)
            time_call(steps[KEY_FORWARD], device, 1)
    seconds = alternate(steps, device, args.repetitions, args.steps_per_repetition)
    ratios = paired_ratios(seconds, "CE")
    floor = 1.0 + ratios[KEY_FORWARD]
    for name in ("CE", "MoPro"):
        median = statistics.median(seconds[name])
        figures[name].update(
            {
                "img_per_s": config.batch_size / median,
                "step_ms": median * 1e3,
                "ratio_to_ce": ratios[name],
                "ratio_to_floor": ratios[name] / floor,
                "seconds": seconds[name],
            }
        )
    key_median = statistics.median(seconds[KEY_FORWARD])
    return {
        "configuration": config.name,
        "batch_size": config.batch_size,
        "bn_groups": config.bn_groups,
        "setting": setting.name,
        "models": figures,
        "key_forward_ms": key_median * 1e3,
        "floor_ratio": floor,
    }


# ------------------------------------------------------------------------------------------------ end to end
def _loader(paths: list[Path], collator, batch_size: int, workers: int, prefetch: int, pin: bool):
    examples = [{"image": str(path), "label": i % 1000, "sample_id": i} for i, path in enumerate(paths)]
    kwargs = {"prefetch_factor": prefetch, "persistent_workers": True} if workers else {}
    return torch.utils.data.DataLoader(
        examples, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers, collate_fn=collator,
        pin_memory=pin, **kwargs,
    )  # fmt: skip


def _batches(loader):
    while True:
        yield from loader


def _batch_maker(source, collator, transforms, device: torch.device, setting: Setting, num_labels: int):
    """A function returning the next model batch on `device`: views from the workers (uint8), or, for the GPU data
    path, decoded and augmented on the device; normalised and laid out as the trainer does."""
    gpu_path = isinstance(collator, GpuAugmentCollator)
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    mean, std = (
        torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device) for v in (transforms.mean, transforms.std)
    )

    def next_batch() -> dict[str, torch.Tensor]:
        raw = next(source)
        labels = (raw["labels"] % num_labels).to(device, non_blocking=True)
        if gpu_path:
            images, kept = decode_on_device(raw["encoded_images"], device)
            weak, strong = collator.view_augment(images, device=device)
            labels = labels[: len(kept)]  # generated files all decode: kept is every index
        else:
            weak = raw["pixel_values"].to(device, non_blocking=True)
            strong = raw["pixel_values_key"].to(device, non_blocking=True)
        return {
            "pixel_values": normalize_pixels(weak, mean, std).contiguous(memory_format=memory_format),
            "pixel_values_key": normalize_pixels(strong, mean, std).contiguous(memory_format=memory_format),
            "labels": labels,
        }

    return next_batch


def run_end_to_end(args, device: torch.device, paths: list[Path], model_only_img_per_s: float | None) -> list[dict]:
    """Per-rank MoPro steps (bf16 + channels_last) fed from JPEG files, by CPU workers and by the GPU data path."""
    config, setting = Configuration("per-rank", args.per_rank_batch, 1), BF16_CL
    transforms = MoProViewTransforms(args.image_size)
    model = _build("MoPro", args, config.bn_groups, device, setting)
    batch = make_batch(config.batch_size, args.image_size, args.num_labels, device, setting.channels_last)
    step = make_mopro_step(model, batch, setting.bf16)  # reads `batch` at every call: refilled below
    rows = []
    paths_kinds = {
        "end-to-end, CPU workers": MoProCollator(transforms, train=True, seed=0, uint8_training_views=True),
        "end-to-end, GPU decode + augment": GpuAugmentCollator(transforms, seed=0),
    }
    for name, collator in paths_kinds.items():
        loader = _loader(paths, collator, config.batch_size, args.workers, args.prefetch, device.type == "cuda")
        next_batch = _batch_maker(_batches(loader), collator, transforms, device, setting, args.num_labels)

        def train_step(next_batch=next_batch) -> None:
            batch.update(next_batch())
            step()

        try:
            time_call(train_step, device, args.e2e_warmup_steps)  # workers started, cuDNN tuned
            data_seconds = time_call(next_batch, device, args.e2e_steps) / args.e2e_steps
            seconds = time_call(train_step, device, args.e2e_steps) / args.e2e_steps
            img_per_s = config.batch_size / seconds
            rows.append(
                {
                    "path": name,
                    "img_per_s": img_per_s,
                    "data_only_img_per_s": config.batch_size / data_seconds,
                    "ratio_to_model_only": None if not model_only_img_per_s else img_per_s / model_only_img_per_s,
                    "workers": args.workers,
                    "prefetch_factor": args.prefetch,
                }
            )
        except Exception as error:  # e.g. no nvJPEG: report, keep the other row
            rows.append({"path": name, "error": f"{type(error).__name__}: {error}"})
            traceback.print_exc()
        finally:
            del loader, next_batch
    return rows


# ------------------------------------------------------------------------------------------------------ table
def format_table(result: dict[str, Any]) -> str:
    header = (
        f"{'configuration':<24}{'setting':<34}{'step':<12}{'img/s':>9}{'ms/step':>9}{'x CE':>7}{'x floor':>8}"
        f"{'peak GiB':>9}{'host syncs/step':>16}"
    )
    lines = [header]
    for row in result["rows"]:
        label = f"{row['configuration']} (b{row['batch_size']}, {row['bn_groups']} BN gr.)"
        if "models" not in row:
            lines.append(f"{label:<24}{row['setting']:<34}{row.get('error') or row.get('skipped')}")
            continue
        for name, figure in row["models"].items():
            peak = figure["peak_memory_gib"]
            syncs = str(figure["host_syncs_per_step"])
            if figure["cuda_syncs_per_step"] is not None:
                syncs += f" (cuda {figure['cuda_syncs_per_step']})"
            floor = f"{figure['ratio_to_floor']:.3f}" if name == "MoPro" else ""
            lines.append(
                f"{label:<24}{row['setting']:<34}{name:<12}{figure['img_per_s']:>9.1f}{figure['step_ms']:>9.1f}"
                f"{figure['ratio_to_ce']:>7.3f}{floor:>8}{'-' if peak is None else f'{peak:.2f}':>9}{syncs:>16}"
            )
        lines.append(
            f"{label:<24}{row['setting']:<34}{'key fwd':<12}{row['batch_size'] / row['key_forward_ms'] * 1e3:>9.1f}"
            f"{row['key_forward_ms']:>9.1f}   floor = 1 + key fwd / CE = {row['floor_ratio']:.3f}"
        )
    for row in result["end_to_end"]:
        if "error" in row:
            lines.append(f"{'per-rank':<24}{row['path']:<34}{row['error']}")
            continue
        ratio = "" if row["ratio_to_model_only"] is None else f", {row['ratio_to_model_only']:.2f}x model-only"
        lines.append(
            f"{'per-rank':<24}{row['path']:<34}{'MoPro':<12}{row['img_per_s']:>9.1f}   "
            f"data only {row['data_only_img_per_s']:.1f} img/s ({row['workers']} workers, prefetch "
            f"{row['prefetch_factor']}){ratio}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--backbone_kwargs", type=json.loads, default=None, help="JSON, passed to timm")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--per_rank_batch", type=int, default=32, help="the 8-GPU recipe's per-device batch")
    parser.add_argument("--one_gpu_batch", type=int, default=256, help="the recipe's global batch on one device")
    parser.add_argument("--num_labels", type=int, default=1000)
    parser.add_argument("--embedding_size", type=int, default=128)
    parser.add_argument("--queue_size", type=int, default=8192)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--steps_per_repetition", type=int, default=10)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--no_compile", action="store_true", help="leave out the compile row")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--images", type=int, default=1024, help="JPEG files for the end-to-end rows")
    parser.add_argument("--jpeg_short_side", type=int, default=256, help="as WebVision's resized release")
    parser.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 1, 1), help="DataLoader workers")
    parser.add_argument("--prefetch", type=int, default=4, help="batches prefetched per worker")
    parser.add_argument("--e2e_steps", type=int, default=30)
    parser.add_argument("--e2e_warmup_steps", type=int, default=5)
    # about 2.5 min for the four eager rows, 3-4 for the compile row, 1 for the end-to-end rows: under 10 min
    parser.add_argument("--time_budget_s", type=float, default=360.0, help="start no setting after this many s")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a logic check of every row (use with --device cpu): a ~50k-parameter ResNet at 32 px, batches 8 "
        "and 16, 10 classes, queue 64, compile with the 'eager' backend, 48 JPEGs (short side 64), 1 worker",
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_benchmark.json"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.image_size = "resnet18", 32
        args.backbone_kwargs = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
        args.per_rank_batch, args.one_gpu_batch = 8, 16
        args.num_labels, args.queue_size, args.embedding_size = 10, 64, 16
        args.repetitions, args.steps_per_repetition, args.warmup_steps = 2, 1, 1
        args.compile_backend, args.images, args.jpeg_short_side, args.workers, args.prefetch = "eager", 48, 64, 1, 2
        args.e2e_steps, args.e2e_warmup_steps = 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as MoProTrainer's default (--cudnn_benchmark true)
    else:
        torch.set_num_threads(1)  # a logic check on a shared CPU; its figures mean little
    plan = [
        (Configuration("per-rank", args.per_rank_batch, 1), FP32),
        (Configuration("per-rank", args.per_rank_batch, 1), BF16_CL),
        (Configuration("one-GPU", args.one_gpu_batch, 8), FP32),
        (Configuration("one-GPU", args.one_gpu_batch, 8), BF16_CL),
    ]
    if not args.no_compile:
        plan.append((Configuration("per-rank", args.per_rank_batch, 1), COMPILED))

    start = time.perf_counter()
    rows = []
    for config, setting in plan:
        elapsed = time.perf_counter() - start
        base = {"configuration": config.name, "batch_size": config.batch_size, "bn_groups": config.bn_groups,
                "setting": setting.name}  # fmt: skip
        if elapsed > args.time_budget_s:
            rows.append({**base, "skipped": f"time budget spent ({elapsed:.0f} s)"})
            continue
        try:
            rows.append(run_models(config, setting, args, device))
        except Exception as error:  # a failing setting (compile, OOM) must not cost the others
            rows.append({**base, "error": f"{type(error).__name__}: {error}"})
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    model_only = next(
        (r["models"]["MoPro"]["img_per_s"] for r in rows
         if "models" in r and r["configuration"] == "per-rank" and r["setting"] == BF16_CL.name),
        None,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        made = time.perf_counter()
        paths = make_webvision_like_jpegs(Path(folder), args.images, short_side=args.jpeg_short_side)
        jpeg_seconds = time.perf_counter() - made
        end_to_end = run_end_to_end(args, device, paths, model_only)
    total_seconds = time.perf_counter() - start

    result = {
        "benchmark": "gpu_benchmark",
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "rows": rows,
        "end_to_end": end_to_end,
        "jpeg_generation_s": jpeg_seconds,
        "total_seconds": total_seconds,
    }
    print(
        f"\n{args.device}: {args.backbone} @{args.image_size}, {args.num_labels} classes, queue {args.queue_size}, "
        f"{args.repetitions} reps x {args.steps_per_repetition} steps, {total_seconds:.0f} s"
    )
    print(format_table(result))
    environment = machine_info(device)
    if device.type == "cuda":
        environment.update(
            {
                "cudnn_version": torch.backends.cudnn.version(),
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            }
        )
    write_result(args.output, result, environment)
    return result


if __name__ == "__main__":
    main()
