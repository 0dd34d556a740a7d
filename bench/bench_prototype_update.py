"""Benchmark: the vectorised prototype update against the official per-sample loop.

[0] MoPro, Li et al., ICLR 2021, arXiv:2009.07995. The official code (salesforce/MoPro `model.py`) updates the
prototypes with a Python loop over the gathered global batch, `p[y] = m * p[y] + (1 - m) * z`, then normalises
every row once. `modeling_mopro.update_prototypes` computes the same result in closed form.

Default size: one WebVision-V1 step, 2048 samples (global batch 256 x 8 GPUs), 1000 classes, 128 dimensions, CPU,
float32. The two are timed in alternating order (A/B, then B/A) so that drift on a shared machine hits both.

    python bench/bench_prototype_update.py            # 50 repetitions
    python bench/bench_prototype_update.py --quick    # 5 repetitions

Writes `bench/results/prototype_update.json` (git-ignored).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from environment import write_result

from modeling_mopro import update_prototypes

TARGET_SPEEDUP = 50.0


def official_loop(
    prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, momentum: float
) -> torch.Tensor:
    """The official update: one EMA step per sample, in batch order, then one L2 normalisation of all rows."""
    prototypes = prototypes.clone()
    for feature, label in zip(features, labels, strict=True):
        prototypes[label] = prototypes[label] * momentum + (1 - momentum) * feature
    return F.normalize(prototypes, p=2, dim=1)


def timed(fn: Callable[[], torch.Tensor]) -> float:
    """Wall time of one call, in milliseconds."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2048, help="gathered samples per step (N)")
    parser.add_argument("--classes", type=int, default=1000, help="number of prototypes (K)")
    parser.add_argument("--dim", type=int, default=128, help="embedding size (D)")
    parser.add_argument("--momentum", type=float, default=0.999, help="prototype momentum (official proto_m)")
    parser.add_argument("--repetitions", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="5 repetitions")
    # One thread by default: the loop is dispatch-bound and single-threaded anyway, and on a shared machine
    # intra-op threads that wait for busy cores made the vectorised timing erratic.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "prototype_update.json"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    repetitions = 5 if args.quick else args.repetitions
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    # Unit-norm embeddings and prototypes, as in training; labels uniform over the classes.
    prototypes = F.normalize(torch.randn(args.classes, args.dim, generator=generator), dim=1)
    features = F.normalize(torch.randn(args.samples, args.dim, generator=generator), dim=1)
    labels = torch.randint(0, args.classes, (args.samples,), generator=generator)

    def run_loop() -> torch.Tensor:
        return official_loop(prototypes, features, labels, args.momentum)

    def run_vectorised() -> torch.Tensor:
        return update_prototypes(prototypes, features, labels, args.momentum)

    # Agreement first (this also warms both paths up).
    max_abs_diff = float((run_vectorised() - run_loop()).abs().max())
    print(f"max |vectorised - official loop| = {max_abs_diff:.3e}")
    if max_abs_diff > 1e-5:
        raise SystemExit(f"the two updates disagree by {max_abs_diff:.3e} (> 1e-5)")

    loop_ms, vectorised_ms = [], []
    for rep in range(repetitions):
        pair = [(loop_ms, run_loop), (vectorised_ms, run_vectorised)]
        for times, fn in pair if rep % 2 == 0 else pair[::-1]:
            times.append(timed(fn))

    # Supplementary: the vectorised update called back to back. Right after the loop its inputs are no longer in
    # cache, which is also the case in training (it follows a forward pass); this row shows the warm-cache cost.
    warm_ms = [timed(run_vectorised) for _ in range(repetitions)]

    loop_median, vectorised_median = statistics.median(loop_ms), statistics.median(vectorised_ms)
    warm_median = statistics.median(warm_ms)
    speedup = loop_median / vectorised_median
    print(f"\nN={args.samples} K={args.classes} D={args.dim} float32 CPU, threads={args.threads}, reps={repetitions}")
    print(f"{'method':<24}{'median ms':>12}{'min ms':>10}")
    print(f"{'official per-sample loop':<24}{loop_median:>12.3f}{min(loop_ms):>10.3f}")
    print(f"{'update_prototypes':<24}{vectorised_median:>12.3f}{min(vectorised_ms):>10.3f}")
    print(f"{'  (back to back, warm)':<24}{warm_median:>12.3f}{min(warm_ms):>10.3f}")
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    print(f"speed-up, alternating A/B (median / median): {speedup:.1f}x  (target >= {TARGET_SPEEDUP:.0f}x: {verdict})")
    print(f"speed-up, warm vectorised (median / median): {loop_median / warm_median:.1f}x")

    result = {
        "benchmark": "prototype_update",
        "shape": {"samples": args.samples, "classes": args.classes, "dim": args.dim, "dtype": "float32"},
        "momentum": args.momentum,
        "repetitions": repetitions,
        "max_abs_diff": max_abs_diff,
        "official_loop_ms": {"median": loop_median, "min": min(loop_ms), "all": loop_ms},
        "update_prototypes_ms": {"median": vectorised_median, "min": min(vectorised_ms), "all": vectorised_ms},
        "update_prototypes_warm_ms": {"median": warm_median, "min": min(warm_ms), "all": warm_ms},
        "speedup_median": speedup,
        "speedup_median_warm": loop_median / warm_median,
        "target_speedup": TARGET_SPEEDUP,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
