"""GPU benchmark: MoPro training throughput and peak memory against cross-entropy, fp32 and bf16 (+ compile).

One command for one GPU (H200: well under 5 minutes):

    python bench/gpu_benchmark.py --compile

ResNet-50 at 224 px, batch 128, official sizes (1000 classes, embedding 128, queue 8192), SGD. Settings, each with
a CE step, our MoPro step (phase NOISE_CORRECTION, weak + strong views, EMA after the optimizer step) and the
official-style step (Python loops for the prototype and EMA updates, see `bench_step_time.py`):
* fp32 (PyTorch defaults: cuDNN convolutions may use TF32, matmuls do not);
* bf16 autocast + channels_last;
* with `--compile`: the same plus `torch.compile` of the backbones (CE and ours only; compile failures are
  reported, not raised).
Steps alternate in rotating order; img/s are medians over repetitions. Peak memory is
`torch.cuda.max_memory_allocated` over one model's steps, less what other models held. Host syncs per step are
counted with `torch.cuda.set_sync_debug_mode`. A time budget skips the settings that would not fit.

Check on CPU (tiny, seconds): `python bench/gpu_benchmark.py --quick --device cpu`.
Writes `bench/results/gpu_benchmark.json` (git-ignored).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the step builders live beside this file

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


@dataclass
class Setting:
    name: str
    bf16: bool
    channels_last: bool
    compile: bool


def peak_memory_gib(device: torch.device, resident_before: int) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - resident_before) / 2**30


def count_host_syncs(step, device: torch.device) -> int | None:
    """Synchronising CUDA calls in one step (`.item()`, `int(tensor)`, boolean indexing, ...)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


def run_setting(setting: Setting, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Builds each model in turn (measuring its warm-up and peak memory alone), then alternates their steps."""
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    sizes = {"num_labels": args.num_labels, "embedding_size": args.embedding_size, "queue_size": args.queue_size}
    batch = make_batch(args.batch_size, args.image_size, args.num_labels, device, setting.channels_last)
    builders = {
        "CE": lambda: build_ce(args.backbone, args.num_labels, args.backbone_kwargs),
        "MoPro": lambda: build_mopro(args.backbone, args.image_size, backbone_kwargs=args.backbone_kwargs, **sizes),
    }
    if not args.skip_official and not setting.compile:  # same backbone: compiling it a third time adds nothing
        builders["MoPro official-style"] = lambda: build_mopro(
            args.backbone, args.image_size, official_style=True, backbone_kwargs=args.backbone_kwargs, **sizes
        )
    steps, figures = {}, {}
    for name, build in builders.items():
        torch.manual_seed(0)
        model: nn.Module = build().to(device, memory_format=memory_format)
        if setting.compile:
            # The backbones carry the compute; the MoPro losses and updates stay eager (they sync on purpose).
            modules = [model] if name == "CE" else [model.mopro.backbone, model.momentum_encoder.backbone]
            for module in modules:
                module.compile()
        make_step = make_ce_step if name == "CE" else make_mopro_step
        step = make_step(model, batch, setting.bf16)
        if device.type == "cuda":
            synchronize(device)
            resident_before = torch.cuda.memory_allocated(device) - sum(
                p.numel() * p.element_size() for p in list(model.parameters()) + list(model.buffers())
            )
            torch.cuda.reset_peak_memory_stats(device)
        else:
            resident_before = 0
        warmup_seconds = time_call(step, device, args.warmup_steps)
        figures[name] = {
            "warmup_s": warmup_seconds,
            "peak_memory_gib": peak_memory_gib(device, resident_before),
            "host_syncs_per_step": count_host_syncs(step, device),
        }
        steps[name] = step
        if name == "MoPro":
            # the floor: 1 + key forward / CE step, timed in the same rotation
            steps[KEY_FORWARD] = make_key_forward(model, batch, setting.bf16)
            time_call(steps[KEY_FORWARD], device, 1)
    seconds = alternate(steps, device, args.repetitions, args.steps_per_repetition)
    ratios = paired_ratios(seconds, "CE")
    seconds.pop(KEY_FORWARD)
    floor = ratios.pop(KEY_FORWARD) + 1.0
    for name, times in seconds.items():
        figures[name].update(
            {
                "img_per_s_median": args.batch_size / statistics.median(times),
                "step_ms_median": statistics.median(times) * 1e3,
                "ratio_to_ce_median": ratios[name],
                "seconds": times,
            }
        )
    return {"setting": setting.name, "models": figures, "floor_ratio": floor}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--backbone_kwargs", type=json.loads, default=None, help="JSON, passed to timm")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=128, help="per GPU")
    parser.add_argument("--num_labels", type=int, default=1000)
    parser.add_argument("--embedding_size", type=int, default=128)
    parser.add_argument("--queue_size", type=int, default=8192)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--steps_per_repetition", type=int, default=10)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add a bf16 + channels_last + torch.compile setting")
    parser.add_argument("--skip_official", action="store_true", help="leave out the official-style step")
    # fp32 and bf16 take about a minute and a half; compiling the backbones takes a few minutes more
    parser.add_argument("--time_budget_s", type=float, default=180.0, help="start no setting after this many s")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a logic check: resnet18 at 64 px, batch 8, 2 repetitions of 1 step (use with --device cpu)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_benchmark.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.image_size, args.batch_size = "resnet18", 64, 8
        args.repetitions, args.steps_per_repetition, args.warmup_steps = 2, 1, 1
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)  # a logic check on a shared CPU; its figures mean little
    settings = [Setting("fp32", bf16=False, channels_last=False, compile=False)]
    settings.append(Setting("bf16 + channels_last", bf16=True, channels_last=True, compile=False))
    if args.compile:
        settings.append(Setting("bf16 + channels_last + compile", bf16=True, channels_last=True, compile=True))

    start = time.perf_counter()
    results = []
    for setting in settings:
        elapsed = time.perf_counter() - start
        if elapsed > args.time_budget_s:
            results.append({"setting": setting.name, "skipped": f"time budget spent ({elapsed:.0f} s)"})
            continue
        try:
            results.append(run_setting(setting, args, device))
        except Exception as error:  # a failing setting (compile, OOM) must not cost the others
            results.append({"setting": setting.name, "error": f"{type(error).__name__}: {error}"})
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total_seconds = time.perf_counter() - start

    print(
        f"\n{args.device}: {args.backbone} @{args.image_size}, batch {args.batch_size}, {args.num_labels} classes, "
        f"queue {args.queue_size}, {args.repetitions} reps x {args.steps_per_repetition} steps, {total_seconds:.0f} s"
    )
    print(
        f"{'setting':<32}{'step':<22}{'img/s':>10}{'ms/step':>10}{'x CE':>8}{'peak GiB':>10}{'syncs':>7}{'warm-up s':>11}"
    )
    for result in results:
        if "models" not in result:
            print(f"{result['setting']:<32}{result.get('error') or result.get('skipped')}")
            continue
        print(f"{result['setting']:<32}{'(floor: 1 + key forward / CE)':<42}{result['floor_ratio']:>8.3f}")
        for name, figure in result["models"].items():
            peak = figure["peak_memory_gib"]
            syncs = figure["host_syncs_per_step"]
            print(
                f"{result['setting']:<32}{name:<22}{figure['img_per_s_median']:>10.1f}{figure['step_ms_median']:>10.1f}"
                f"{figure['ratio_to_ce_median']:>8.3f}{'-' if peak is None else f'{peak:.2f}':>10}"
                f"{'-' if syncs is None else syncs:>7}{figure['warmup_s']:>11.1f}"
            )

    environment = machine_info(device)
    if device.type == "cuda":
        environment.update(
            {
                "cudnn_version": torch.backends.cudnn.version(),
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            }
        )
    output = {
        "benchmark": "gpu_benchmark",
        "settings": {
            "device": args.device,
            "backbone": args.backbone,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "num_labels": args.num_labels,
            "embedding_size": args.embedding_size,
            "queue_size": args.queue_size,
            "repetitions": args.repetitions,
            "steps_per_repetition": args.steps_per_repetition,
            "warmup_steps": args.warmup_steps,
            "quick": args.quick,
        },
        "results": results,
        "total_seconds": total_seconds,
    }
    write_result(args.output, output, environment)


if __name__ == "__main__":
    main()
