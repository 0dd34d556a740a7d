"""Benchmark: the two-view training data pipeline per CPU core, ours against the official MoPro pipeline.

[0] MoPro, Li et al., ICLR 2021, arXiv:2009.07995. The official `DataLoader/dataloader.py` (salesforce/MoPro) opens
each file with PIL, converts it to RGB and applies two torchvision v1 `Compose` pipelines to the PIL image
(weak: RandomResizedCrop(224, 0.2-1), flip; strong: + RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4)),
each ending in ToTensor + Normalize; the DataLoader's `default_collate` stacks the batch. Ours is
`training.data.collator.MoProCollator` with `training.data.transforms.MoProViewTransforms(224)`, seeded per sample as
`training/run_mopro.py` builds it.

Data: WebVision-like JPEGs made on the fly (short side 256 as in the WebVision resized release, aspect ratios 3:4 to
16:9, smooth multi-scale noise, colour gradients and grain, quality 90: about 28 kB per file, like real ones).
One process, one torch thread (a per-core figure: the DataLoader scales it by its workers). Pipelines run in rotating
order over the same files in every repetition; the table gives medians of img/s and of the per-repetition speed-up.

What makes ours fast (all in `training/data/transforms.py`, `color_jitter.py`, `collator.py`):
* JPEGs decode straight into a uint8 tensor (`decode_image_tensor`: torchvision's `decode_jpeg`, PIL's pixels);
* one decode for both views, uint8 tensor kernels, and `FastColorJitter` (the same random draws as
  `v2.ColorJitter` in one float pass; torchvision's tensor hue kernel alone costs more than the rest of the view);
* per-sample seeding through `torch.default_generator` only (not every CUDA generator);
* uint8 batches: the workers leave the views uint8 (4x less to write into shared memory and copy), and
  `MoProTrainer` normalises each batch on the model's device. Rows: float32 batches normalised in the collator
  (its default), uint8 batches as `run_mopro.py` ships them (normalised on the accelerator), and the same plus
  the normalisation on this core (what a CPU-only run pays in its main process).
A second table times decoding alone, including PIL's reduced-size JPEG decoding (`Image.draft`), and measures how
much `draft` would change the views (it decodes at 1/2, 1/4, 1/8 scale, so it only fits images far larger than
the crops need).

    python bench/bench_data_pipeline.py            # 200 images, 9 repetitions
    python bench/bench_data_pipeline.py --quick    # 96 images, 3 repetitions (< 1 minute)

Writes `bench/results/data_pipeline.json` (git-ignored).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from environment import write_result  # noqa: E402

from training.data.collator import MoProCollator  # noqa: E402
from training.data.color_jitter import FastColorJitter, rotate_hue  # noqa: E402
from training.data.transforms import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    MoProViewTransforms,
    decode_image,
    decode_image_tensor,
)

TARGET_SPEEDUP = 2.0
ASPECT_RATIOS = (3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9)


# ------------------------------------------------------------------------------------------------------ data
def photo_like_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Random content with photo statistics: smooth structure at three scales, colour gradients, fine grain."""
    canvas = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 0.5), (16, 0.25), (64, 0.15)):
        grid = (max(2, height * cells // max(width, height)), max(2, width * cells // max(width, height)), 3)
        coarse = Image.fromarray((rng.random(grid) * 255).astype(np.uint8))
        canvas += amplitude * np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32) / 255
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    canvas += 0.3 * (cols / width)[..., None] * rng.random(3) + 0.3 * (rows / height)[..., None] * rng.random(3)
    canvas += rng.normal(0.0, 0.03, canvas.shape).astype(np.float32)  # sensor grain keeps JPEG sizes realistic
    canvas = (canvas - canvas.min()) / (canvas.max() - canvas.min() + 1e-6)
    return Image.fromarray((canvas * 255).astype(np.uint8))


def make_webvision_like_jpegs(folder: Path, count: int, short_side: int = 256, seed: int = 0) -> list[Path]:
    """Writes ``count`` JPEGs (quality 90) with the given short side and assorted aspect ratios."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        ratio = float(rng.choice(ASPECT_RATIOS))
        landscape = rng.random() < 0.7
        long_side = round(short_side * ratio)
        width, height = (long_side, short_side) if landscape else (short_side, long_side)
        path = folder / f"{index:05d}.jpg"
        photo_like_image(width, height, rng).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- official pipeline
def official_transforms(size: int = 224) -> tuple[v1.Compose, v1.Compose]:
    """The official weak and strong torchvision v1 pipelines (PIL input), as in its dataloader."""
    normalize = v1.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    weak = v1.Compose(
        [v1.RandomResizedCrop(size, scale=(0.2, 1.0)), v1.RandomHorizontalFlip(), v1.ToTensor(), normalize]
    )
    strong = v1.Compose(
        [
            v1.RandomResizedCrop(size, scale=(0.2, 1.0)),
            v1.RandomGrayscale(p=0.2),
            v1.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v1.RandomHorizontalFlip(),
            v1.ToTensor(),
            normalize,
        ]
    )
    return weak, strong


def make_official_collate(size: int = 224) -> Callable[[Sequence[Mapping[str, Any]]], Any]:
    """`__getitem__` of the official webvision_dataset for each example, then the DataLoader's default_collate."""
    weak, strong = official_transforms(size)

    def collate(examples: Sequence[Mapping[str, Any]]) -> Any:
        items = []
        for example in examples:
            image = Image.open(example["image"]).convert("RGB")
            items.append((weak(image), example["label"], strong(image)))
        return default_collate(items)

    return collate


def as_in_worker(
    collate: Callable[[Sequence[Mapping[str, Any]]], Any],
) -> Callable[[Sequence[Mapping[str, Any]]], Any]:
    """Adds what a DataLoader worker does with a batch: its tensors move into shared memory for the main process.

    (The official `default_collate` stacks straight into shared memory inside a worker; a stack followed by
    `share_memory_` costs the same here, and both are dominated by first-touch page faults of the new memory.)
    """

    def collate_and_share(examples: Sequence[Mapping[str, Any]]) -> Any:
        batch = collate(examples)
        for tensor in batch.values() if isinstance(batch, dict) else batch:
            if isinstance(tensor, torch.Tensor) and not tensor.is_shared():
                tensor.share_memory_()
        return batch

    return collate_and_share


def normalised_here(
    collate: Callable[[Sequence[Mapping[str, Any]]], Any], views: MoProViewTransforms
) -> Callable[[Sequence[Mapping[str, Any]]], Any]:
    """Adds what `MoProTrainer` does with a uint8 batch when the model runs on this CPU: normalise it."""

    def collate_and_normalise(examples: Sequence[Mapping[str, Any]]) -> Any:
        batch = collate(examples)
        return {
            name: views.normalize(value) if name.startswith("pixel_values") else value for name, value in batch.items()
        }

    return collate_and_normalise


def build_pipelines(size: int, seed: int, in_worker: bool) -> dict[str, Callable[[Sequence[Mapping[str, Any]]], Any]]:
    """Every pipeline of the comparison, by name; the first is the baseline."""
    views = MoProViewTransforms(size)
    worker = as_in_worker if in_worker else (lambda collate: collate)
    shipped = worker(MoProCollator(views, seed=seed, uint8_training_views=True))  # as training/run_mopro.py builds it
    return {
        "official (PIL + v1)": worker(make_official_collate(size)),
        "ours, float32 batches": worker(MoProCollator(views, seed=seed)),
        "ours, uint8 batches (shipped)": shipped,
        "ours, uint8 + normalised on CPU": normalised_here(shipped, views),
    }


# ------------------------------------------------------------------------------------------- investigations
def check_agreement(paths: Sequence[Path], size: int) -> dict[str, float]:
    """How far our kernels are from what they replace (in uint8 levels, 0-255)."""
    data = [path.read_bytes() for path in paths[:16]]
    decode_diff = max(
        int((decode_image_tensor(raw).int() - TF.pil_to_tensor(decode_image(raw)).int()).abs().max()) for raw in data
    )
    reference_jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.4)
    fast_jitter = FastColorJitter(0.4, 0.4, 0.4, 0.4)
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)
    pil_kernels = (v1.functional.adjust_brightness, v1.functional.adjust_contrast)
    pil_kernels += (v1.functional.adjust_saturation, v1.functional.adjust_hue)
    factor_names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    jitter_max, jitter_mean, hue_max = 0, [], 0.0
    to_pil_mean = {"fast": [], "v2": []}
    for index, raw in enumerate(data):
        pixels = crop(decode_image_tensor(raw))
        params = reference_jitter.make_params([pixels])
        fast_out = fast_jitter.transform(pixels, params).int()
        v2_out = reference_jitter.transform(pixels, params).int()
        difference = (fast_out - v2_out).abs()
        jitter_max = max(jitter_max, int(difference.max()))
        jitter_mean.append(float(difference.float().mean()))
        # The official kernels (PIL, uint8 with rounding) with the same parameters and order.
        pil_image = TF.to_pil_image(pixels)
        for fn_id in params["fn_idx"].tolist():
            pil_image = pil_kernels[fn_id](pil_image, params[factor_names[fn_id]])
        official = TF.pil_to_tensor(pil_image).int()
        to_pil_mean["fast"].append(float((fast_out - official).abs().float().mean()))
        to_pil_mean["v2"].append(float((v2_out - official).abs().float().mean()))
        as_float = pixels.float() / 255
        hue = -0.5 + index / len(data)
        hue_max = max(hue_max, float((rotate_hue(as_float, hue) - TF.adjust_hue(as_float, hue)).abs().max()) * 255)
    examples = [{"image": raw, "label": 0, "sample_id": index} for index, raw in enumerate(data)]
    views = MoProViewTransforms(size)
    floats = MoProCollator(views, seed=1)(examples)
    uint8 = MoProCollator(views, seed=1, uint8_training_views=True)(examples)
    same_batches = all(
        torch.equal(views.normalize(uint8[key]), floats[key]) for key in ("pixel_values", "pixel_values_key")
    )
    return {
        "uint8_batch_normalised_equals_float_batch": same_batches,
        "decode_jpeg_vs_pil_max_abs_diff": decode_diff,
        "fast_jitter_vs_v2_max_abs_diff": jitter_max,
        "fast_jitter_vs_v2_mean_abs_diff": statistics.mean(jitter_mean),
        "fast_jitter_vs_official_pil_mean_abs_diff": statistics.mean(to_pil_mean["fast"]),
        "v2_jitter_vs_official_pil_mean_abs_diff": statistics.mean(to_pil_mean["v2"]),
        "rotate_hue_vs_v2_adjust_hue_max_abs_diff": hue_max,
    }


def draft_analysis(paths: Sequence[Path], size: int, scale: tuple[float, float], samples: int = 2000) -> dict:
    """What `Image.draft` (JPEG decoding at 1/2, 1/4, 1/8 scale) can do for RandomResizedCrop at `size`.

    A crop keeps all its detail after a 1/2-scale decode only if its box is at least 2 * size pixels on both sides
    (otherwise it is upsampled from fewer source pixels). Returns the share of crops drawn by RandomResizedCrop
    (scale range as given, ratios 3/4-4/3) on these images that meet that, what `draft` picks when asked for the
    size a crop needs, and the change in the views when decoding at 1/2 scale anyway (same crop box, scaled).
    """
    crop = v2.RandomResizedCrop(size, scale=scale, antialias=True)
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
    large_enough = 0
    for index in range(samples):
        width, height = sizes[index % len(sizes)]
        box = crop.make_params([torch.empty(3, height, width, dtype=torch.uint8)])
        large_enough += box["height"] >= 2 * size and box["width"] >= 2 * size
    # What draft does when asked for the output size (it never decodes below the requested size).
    keeps_full_size = []
    for path in paths[:24]:
        with Image.open(path) as image:
            original_size = image.size
            image.draft("RGB", (size, size))
            keeps_full_size.append(image.size == original_size)
    diffs = []
    # Change of the views with a forced 1/2-scale decode, for a few images and crops.
    for path in paths[:24]:
        full = decode_image_tensor(path.read_bytes())
        with Image.open(path) as image:
            image.draft("RGB", (image.size[0] // 2, image.size[1] // 2))
            half = TF.pil_to_tensor(image.convert("RGB"))
        for _ in range(4):
            box = crop.make_params([full])
            reference = TF.resized_crop(full, **box, size=[size, size], antialias=True)
            fy, fx = half.shape[1] / full.shape[1], half.shape[2] / full.shape[2]
            scaled = {
                "top": round(box["top"] * fy),
                "left": round(box["left"] * fx),
                "height": max(1, round(box["height"] * fy)),
                "width": max(1, round(box["width"] * fx)),
            }
            approximate = TF.resized_crop(half, **scaled, size=[size, size], antialias=True)
            diffs.append(float((approximate.float() - reference.float()).abs().mean()))
    return {
        "share_of_crops_allowing_half_scale_decode": large_enough / samples,
        "draft_for_output_size_keeps_full_resolution": all(keeps_full_size),
        "forced_half_scale_view_mean_abs_diff": statistics.median(diffs),
    }


def time_decoders(paths: Sequence[Path], repetitions: int) -> dict[str, float]:
    """Median ms per image of each decoder over all files (alternating order)."""
    data = [path.read_bytes() for path in paths]

    def pil_full(raw: bytes) -> Any:
        return Image.open(io.BytesIO(raw)).convert("RGB")

    def pil_draft(raw: bytes, reduction: int) -> Any:
        image = Image.open(io.BytesIO(raw))
        image.draft("RGB", (image.size[0] // reduction, image.size[1] // reduction))
        return image.convert("RGB")

    decoders: dict[str, Callable[[bytes], Any]] = {
        "PIL decode": pil_full,
        "PIL decode + pil_to_tensor": lambda raw: TF.pil_to_tensor(pil_full(raw)),
        "decode_jpeg (uint8 tensor)": lambda raw: decode_image_tensor(raw),
        "PIL draft 1/2 scale": lambda raw: pil_draft(raw, 2),
        "PIL draft 1/4 scale": lambda raw: pil_draft(raw, 4),
    }
    times: dict[str, list[float]] = {name: [] for name in decoders}
    names = list(decoders)
    for repetition in range(repetitions):
        for name in names[repetition % len(names) :] + names[: repetition % len(names)]:
            start = time.perf_counter()
            for raw in data:
                decoders[name](raw)
            times[name].append((time.perf_counter() - start) * 1e3 / len(data))
    return {name: statistics.median(values) for name, values in times.items()}


def time_strong_jitter(paths: Sequence[Path], size: int, repetitions: int) -> dict[str, float]:
    """Median ms per 224 crop of the colour jitter alone: v2 (uint8), fast (uint8), and the hue kernels."""
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)
    crops = [crop(decode_image_tensor(path.read_bytes())) for path in paths[:32]]
    floats = [pixels.float() / 255 for pixels in crops]
    reference, fast = v2.ColorJitter(0.4, 0.4, 0.4, 0.4), FastColorJitter(0.4, 0.4, 0.4, 0.4)
    kernels: dict[str, Callable[[int], Any]] = {
        "v2.ColorJitter (uint8)": lambda i: reference(crops[i]),
        "FastColorJitter (uint8)": lambda i: fast(crops[i]),
        "v2 adjust_hue (float)": lambda i: TF.adjust_hue(floats[i], 0.3),
        "rotate_hue (float)": lambda i: rotate_hue(floats[i], 0.3),
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for repetition in range(repetitions):
        for name in kernels if repetition % 2 == 0 else reversed(list(kernels)):
            start = time.perf_counter()
            for index in range(len(crops)):
                kernels[name](index)
            times[name].append((time.perf_counter() - start) * 1e3 / len(crops))
    return {name: statistics.median(values) for name, values in times.items()}


# ------------------------------------------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="generated JPEGs")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--repetitions", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="96 images, 3 repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="time the collate functions alone (default: also move each batch into shared memory, as a worker does)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "data_pipeline.json"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    num_images, repetitions = (96, 3) if args.quick else (args.images, args.repetitions)
    torch.set_num_threads(1)  # per-core figure; PIL and libjpeg are single-threaded anyway
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mopro-bench-jpegs-") as folder:
        paths = make_webvision_like_jpegs(Path(folder), num_images, seed=args.seed)
        file_kb = statistics.mean(path.stat().st_size for path in paths) / 1024
        examples = [
            {"image": str(path), "label": index % 1000, "sample_id": index} for index, path in enumerate(paths)
        ]
        batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
        pipelines = build_pipelines(args.image_size, args.seed, in_worker=not args.in_process)
        names = list(pipelines)
        for name in names:  # warm-up, and a check that every pipeline gives the same batch layout
            batch = pipelines[name](batches[0])
            query, key = (
                (batch[0], batch[2]) if isinstance(batch, list) else (batch["pixel_values"], batch["pixel_values_key"])
            )
            assert query.shape == key.shape == (len(batches[0]), 3, args.image_size, args.image_size), name
            uint8 = "uint8 batches" in name
            assert query.dtype == key.dtype == (torch.uint8 if uint8 else torch.float32), name

        seconds: dict[str, list[float]] = {name: [] for name in names}
        for repetition in range(repetitions):
            shift = repetition % len(names)  # rotate the order so that drift on a shared machine hits all alike
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                for batch_examples in batches:
                    pipelines[name](batch_examples)
                seconds[name].append(time.perf_counter() - start)

        agreement = check_agreement(paths, args.image_size)
        decoders = time_decoders(paths, repetitions)
        jitter = time_strong_jitter(paths, args.image_size, max(repetitions, 3))
        draft = draft_analysis(paths, args.image_size, (0.2, 1.0))
    load_after = os.getloadavg()

    baseline = names[0]
    rows = []
    for name in names:
        speedups = [b / s for b, s in zip(seconds[baseline], seconds[name], strict=True)]  # paired per repetition
        rows.append(
            {
                "pipeline": name,
                "img_per_s_median": num_images / statistics.median(seconds[name]),
                "img_per_s_max": num_images / min(seconds[name]),
                "speedup_vs_official_median": statistics.median(speedups),
                "seconds": seconds[name],
            }
        )
    print(
        f"\n{num_images} WebVision-like JPEGs (short side 256, mean {file_kb:.1f} kB), two views at {args.image_size}, "
        f"batch {args.batch_size}, 1 thread, {'in process' if args.in_process else 'batches moved to shared memory'}, "
        f"{repetitions} reps, load avg {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    print(f"{'pipeline':<36}{'img/s (median)':>16}{'img/s (best)':>14}{'x official':>12}")
    for row in rows:
        print(
            f"{row['pipeline']:<36}{row['img_per_s_median']:>16.1f}{row['img_per_s_max']:>14.1f}"
            f"{row['speedup_vs_official_median']:>12.2f}"
        )
    shipped = next(row for row in rows if "shipped" in row["pipeline"])["speedup_vs_official_median"]
    verdict = "met" if shipped >= TARGET_SPEEDUP else "NOT met"
    print(f"shipped pipeline vs official: {shipped:.2f}x (target >= {TARGET_SPEEDUP:.1f}x: {verdict})")

    print(f"\n{'decoder (ms per image, median)':<36}{'ms':>8}")
    for name, value in decoders.items():
        print(f"{name:<36}{value:>8.3f}")
    print(f"\n{'colour jitter on a 224 crop':<36}{'ms':>8}")
    for name, value in jitter.items():
        print(f"{name:<36}{value:>8.3f}")
    print("\nagreement (uint8 levels):", ", ".join(f"{k}={v:.3g}" for k, v in agreement.items()))
    print(
        f"draft: {draft['share_of_crops_allowing_half_scale_decode']:.1%} of RandomResizedCrop boxes are >= 2x{args.image_size}"
        f" px (needed for a lossless 1/2-scale decode); draft('RGB', ({args.image_size}, {args.image_size})) keeps "
        f"full resolution: {draft['draft_for_output_size_keeps_full_resolution']}; a forced 1/2-scale decode changes the views by "
        f"{draft['forced_half_scale_view_mean_abs_diff']:.2f} levels (mean |diff|)"
    )

    result = {
        "benchmark": "data_pipeline",
        "setup": {
            "images": num_images,
            "mean_file_kb": file_kb,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "repetitions": repetitions,
            "views_per_image": 2,
            "worker_shared_memory": not args.in_process,
            "torch_threads": 1,
        },
        "pipelines": rows,
        "target_speedup": TARGET_SPEEDUP,
        "decode_ms_per_image": decoders,
        "colour_jitter_ms_per_crop": jitter,
        "agreement_uint8_levels": agreement,
        "draft": draft,
        "load_average": {"before": load_before, "after": load_after},
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
