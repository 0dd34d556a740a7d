"""The GPU data path's views (`training/data/gpu_augment.py`) against the CPU path's (`training/data/transforms.py`), on CPU
tensors: the same parameter distributions (crop boxes, flip and grayscale rates, jitter factors and orders), the same
pixels for the same parameters, and the same per-channel statistics of the views of one image."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2

from training.data.color_jitter import FastColorJitter
from training.data.gpu_augment import (
    EncodedImages,
    GpuViewAugment,
    color_jitter,
    decode_on_device,
    grayscale,
    resized_crops,
    sample_crop_boxes,
    sample_jitter_params,
)
from training.data.transforms import MoProViewTransforms

CPU = torch.device("cpu")


def _torchvision_boxes(height: int, width: int, n: int, scale=(0.2, 1.0)) -> torch.Tensor:
    crop = v2.RandomResizedCrop(32, scale=scale)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    torch.manual_seed(0)
    boxes = [crop.make_params([image]) for _ in range(n)]
    return torch.tensor([[b["top"], b["left"], b["height"], b["width"]] for b in boxes])


def _box_statistics(boxes: torch.Tensor, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.double().unbind(1)
    return {
        "area fraction": (h * w / (height * width)).numpy(),
        "log aspect": torch.log(w / h).numpy(),
        "top position": ((top + 0.5) / (height - h + 1)).numpy(),
        "left position": ((left + 0.5) / (width - w + 1)).numpy(),
    }


@pytest.mark.parametrize("height,width", [(200, 300), (64, 64), (40, 400)])  # (40, 400): mostly the fallback
def test_crop_boxes_follow_torchvision_distribution(height, width):
    n = 3000
    ours = sample_crop_boxes([(height, width)] * n, (0.2, 1.0), torch.Generator().manual_seed(1))
    theirs = _torchvision_boxes(height, width, n)
    assert (ours[:, 2] > 0).all() and (ours[:, 3] > 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    ours_stats, theirs_stats = _box_statistics(ours, height, width), _box_statistics(theirs, height, width)
    for name in ours_stats:
        result = stats.ks_2samp(ours_stats[name], theirs_stats[name])
        assert result.pvalue > 1e-3, f"{name}: KS {result.statistic:.3f}, p {result.pvalue:.2g}"

    # the central fallback crop (full height or width, centred) as often as torchvision takes it
    def fallback_rate(boxes):
        top, left, h, w = boxes.unbind(1)
        central = (top == (height - h) // 2) & (left == (width - w) // 2) & ((h == height) | (w == width))
        return float(central.double().mean())

    assert abs(fallback_rate(ours) - fallback_rate(theirs)) < 4 * math.sqrt(0.25 / n) + 0.01


def test_jitter_parameters_have_color_jitter_ranges_and_orders():
    n = 24_000
    ours = sample_jitter_params(n, generator=torch.Generator().manual_seed(2))
    jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.4)
    torch.manual_seed(0)
    theirs = [jitter.make_params([]) for _ in range(3000)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        low, high = (-0.4, 0.4) if name == "hue" else (0.6, 1.4)
        assert ours[name].min() >= low and ours[name].max() <= high
        reference = np.array([p[f"{name}_factor"] for p in theirs])
        assert stats.ks_2samp(ours[name].numpy(), reference).pvalue > 1e-3, name
    # every one of the 24 orders of the 4 operations about equally often, as torch.randperm(4) per image
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in ours["order"].tolist():
        counts[tuple(row)] += 1
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3


def _smooth_image(height: int = 48, width: int = 64) -> torch.Tensor:
    """A colourful, asymmetric uint8 image (gradients and a block), so crops, flips and colour ops all show."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([255 * x, 255 * y, 255 * (1 - x) * y])
    image[:, : height // 3, : width // 4] = torch.tensor([230.0, 40.0, 90.0]).view(3, 1, 1)
    return image.round().to(torch.uint8)


def test_same_crop_box_gives_the_cpu_pixels():
    image = _smooth_image()
    boxes = torch.tensor([[0, 0, 48, 64], [5, 7, 30, 20], [10, 3, 13, 41]])
    ours = resized_crops([image] * 3, boxes, 32)
    for view, (top, left, h, w) in zip(ours, boxes.tolist(), strict=True):
        reference = v2.functional.resized_crop(image, top, left, h, w, [32, 32], antialias=True)
        assert (view.int() - reference.int()).abs().max() <= 1


def test_same_jitter_parameters_give_fast_color_jitter_pixels():
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=generator)
    images[0] = _smooth_image(16, 16)
    params = sample_jitter_params(6, generator=generator)
    ours = color_jitter(images, params)
    jitter = FastColorJitter(0.4, 0.4, 0.4, 0.4)
    for i in range(6):
        reference = jitter.transform(
            images[i],
            {
                "fn_idx": params["order"][i],
                "brightness_factor": float(params["brightness"][i]),
                "contrast_factor": float(params["contrast"][i]),
                "saturation_factor": float(params["saturation"][i]),
                "hue_factor": float(params["hue"][i]),
            },
        )
        difference = (ours[i].int() - reference.int()).abs()
        assert difference.max() <= 1 and (difference > 0).float().mean() < 0.02, i
    gray = grayscale(images, torch.tensor([True, False] * 3))
    for i in range(6):
        expected = v2.functional.rgb_to_grayscale(images[i], num_output_channels=3) if i % 2 == 0 else images[i]
        assert torch.equal(gray[i], expected)


def test_flip_and_grayscale_rates():
    n = 2000
    image = _smooth_image(32, 32)
    augment = GpuViewAugment(32, crop_scale=(1.0, 1.0), generator=torch.Generator().manual_seed(4))
    weak = augment.weak([image] * n)  # the whole (square) image each time, flipped or not
    assert all(torch.equal(view, image) or torch.equal(view, image.flip(-1)) for view in weak[:50])
    flipped = (weak == image.flip(-1)).flatten(1).all(1).double().mean()
    assert abs(flipped - 0.5) < 4 * math.sqrt(0.25 / n)
    strong = augment.strong([image] * n)
    gray = (strong[:, 0] == strong[:, 1]).flatten(1).all(1) & (strong[:, 1] == strong[:, 2]).flatten(1).all(1)
    assert abs(gray.double().mean() - 0.2) < 4 * math.sqrt(0.16 / n)


def test_views_have_the_cpu_views_channel_statistics():
    """Per-channel mean and std of many views of one image: the GPU path's within sampling error of the CPU path's."""
    n = 600
    image = _smooth_image()
    cpu = MoProViewTransforms(32)
    torch.manual_seed(5)
    cpu_views = [cpu.train_views(image) for _ in range(n)]
    augment = GpuViewAugment(32, generator=torch.Generator().manual_seed(6))
    gpu_weak, gpu_strong = augment([image] * n)
    for name, ours, theirs in (
        ("weak", gpu_weak, torch.stack([v[0] for v in cpu_views])),
        ("strong", gpu_strong, torch.stack([v[1] for v in cpu_views])),
    ):
        ours_mean, theirs_mean = ours.double().mean(dim=(2, 3)), theirs.double().mean(dim=(2, 3))  # (n, 3)
        ours_std, theirs_std = ours.double().std(dim=(2, 3)), theirs.double().std(dim=(2, 3))
        for values_ours, values_theirs, what in ((ours_mean, theirs_mean, "mean"), (ours_std, theirs_std, "std")):
            for channel in range(3):
                a, b = values_ours[:, channel], values_theirs[:, channel]
                stderr = math.sqrt(a.var() / n + b.var() / n)
                assert abs(a.mean() - b.mean()) < 4 * stderr, f"{name} {what} channel {channel}"
                assert stats.ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3, f"{name} {what} channel {channel}"


def test_decode_on_device_matches_the_cpu_decoder_and_skips_what_no_decoder_reads():
    rng = np.random.default_rng(0)
    jpegs = []
    for size in ((20, 30), (33, 17)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    truncated = jpegs[0][: len(jpegs[0]) * 2 // 3]  # PIL still decodes it (LOAD_TRUNCATED_IMAGES), as the CPU path
    png = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)
    encoded = EncodedImages([jpegs[0], png, b"\xff\xd8\xff junk", jpegs[1], truncated], list("abcde"))
    images, kept = decode_on_device(encoded, CPU)
    assert kept == [0, 1, 3, 4]
    from training.data.transforms import decode_image_tensor

    assert torch.equal(images[0], decode_image_tensor(jpegs[0]))
    assert torch.equal(images[1], png)
    assert images[2].shape == (3, 33, 17)
    assert torch.equal(images[3], decode_image_tensor(truncated))


def test_gpu_collator_decodes_exif_rotated_jpegs_upright_on_the_host(tmp_path):
    # nvJPEG ignores EXIF orientation: a JPEG stored rotated must reach the device decoded and upright, as the CPU
    # path and the transformers pipeline read it; an upright JPEG stays encoded for the device decoder.
    from training.data.gpu_augment import GpuAugmentCollator
    from training.data.transforms import decode_image_tensor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 50, 3)).astype(np.uint8))
    image.save(tmp_path / "upright.jpg", quality=95)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    collator = GpuAugmentCollator(MoProViewTransforms(16), num_labels=2)
    batch = collator([{"image": str(tmp_path / name), "label": 0} for name in ("upright.jpg", "rotated.jpg")])
    upright, rotated = batch["encoded_images"].items
    assert isinstance(upright, bytes)
    assert rotated.shape == (3, 50, 30)
    assert torch.equal(rotated, decode_image_tensor(str(tmp_path / "rotated.jpg")))
