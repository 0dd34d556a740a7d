"""The GPU data path (`--gpu_augment true`): JPEG decoding and the two training views made on the device.

The CPU path (`training/data/transforms.py`, `training/data/collator.py`) decodes and augments in the DataLoader workers at
roughly 480 images/s per core (BENCHMARKS.md): 8 GPUs at 2,000+ images/s each would need 30+ cores of it. Here the
workers only read the encoded bytes; on the device, torchvision's nvJPEG `decode_jpeg` decodes the batch in one call
and the views are cut and coloured for the whole batch at once.

The views follow the CPU path's distributions, not its random draws (tests/test_gpu_augment.py checks the
statistics on CPU tensors, and that the same parameters give the same pixels to one level):
* weak (query): `RandomResizedCrop(image_size, scale=crop_scale, ratio=(3/4, 4/3))` (torchvision's sampler: ten
  tries, then the central crop), bilinear with antialiasing, then a horizontal flip with probability 1/2;
* strong (key): another crop, grayscale with probability 0.2, colour jitter (brightness, contrast, saturation 0.4,
  hue 0.4, the four in a random order per image, as `v2.ColorJitter`), flip.
Both stay uint8 (the CPU path's rounding), and are normalised where the CPU path's batches are (`MoProTrainer`).

Images that are not JPEG (PNG, GIF, ...) are decoded by the workers as before and join the batch as tensors; a JPEG
the device decoder refuses is retried on the CPU (PIL is more tolerant of truncated files, as the official code),
and skipped only if that fails too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from .collator import MoProCollator
from .color_jitter import _GRAY_WEIGHTS, rotate_hue
from .transforms import BadImageError, _check_jpeg_size, decode_image_tensor, read_encoded_image

logger = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # RandomResizedCrop's default aspect-ratio range
_CROP_TRIES = 10  # torchvision's RandomResizedCrop.make_params


class EncodedImages:
    """A batch's images as the workers read them: JPEG bytes (decoded on the device) or uint8 (3, H, W) tensors.

    Deliberately not a tensor and without a `.to` method: Accelerate's device placement passes it through, so the
    bytes reach `decode_jpeg` on the host side, which nvJPEG needs.
    """

    def __init__(self, items: Sequence[bytes | torch.Tensor], names: Sequence[str]):
        self.items, self.names = list(items), list(names)

    def __len__(self) -> int:
        return len(self.items)


class GpuAugmentCollator(MoProCollator):
    """A training collator for the GPU data path: checks labels as `MoProCollator` does, reads each image's bytes
    (no decoding for JPEGs) and emits `encoded_images` (`EncodedImages`) instead of pixel batches. Unreadable files
    and images PIL refuses to open are skipped and counted as in the CPU path."""

    def __init__(self, transforms, **kwargs):
        kwargs.setdefault("train", True)
        if not kwargs["train"]:
            raise ValueError("GpuAugmentCollator makes training batches only; evaluation uses MoProCollator.")
        super().__init__(transforms, **kwargs)
        # The device views take the CPU views' size and crop range (`MoProViewTransforms`'s RandomResizedCrop).
        crop = next(t for t in transforms.weak_augment.transforms if isinstance(t, v2.RandomResizedCrop))
        self.view_augment = GpuViewAugment(transforms.image_size, tuple(crop.scale))

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        items, names, labels, kept = [], [], [], []
        num_skipped = 0
        for example in examples:
            label = self._checked_label(example)
            name = self._sample_name(example)
            source = example[self.image_column]
            try:
                if _is_pil(source):
                    item = decode_image_tensor(source)
                else:
                    data, description = read_encoded_image(source)
                    # PIL's decompression-bomb rule, as the CPU path; nvJPEG ignores EXIF orientation, so a JPEG
                    # stored rotated is decoded here, upright as everywhere else (`transforms.IMAGE_SEMANTICS`).
                    if bytes(data[:3]) == _JPEG_MAGIC and _check_jpeg_size(data, description) == 1:
                        item = bytes(data)
                    else:  # PNG, GIF, ..., rotated JPEGs: decoded here, as the CPU path does
                        item = decode_image_tensor(source)
            except BadImageError as error:
                num_skipped += 1
                logger.warning("Skipping sample %s: %s", name, error.reason)
                continue
            items.append(item)
            names.append(name)
            labels.append(label)
            kept.append(example)
        # labels first: Accelerate's `find_batch_size` reads a batch's first value, which must be a tensor
        batch: dict[str, Any] = {
            "labels": torch.tensor(labels, dtype=torch.long),
            "encoded_images": EncodedImages(items, names),
        }
        if bool(kept) and all(self.sample_id_column in example for example in kept):
            batch["sample_ids"] = torch.tensor([int(ex[self.sample_id_column]) for ex in kept], dtype=torch.long)
        batch["num_skipped_images"] = torch.tensor(num_skipped, dtype=torch.long)
        return batch


def _is_pil(source: Any) -> bool:
    from PIL import Image

    return isinstance(source, Image.Image)


def decode_on_device(encoded: EncodedImages, device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
    """Decode a batch: JPEG bytes with one batched `decode_jpeg(..., device=device)` (nvJPEG on CUDA), tensors moved.

    Returns the uint8 (3, H, W) images on `device` and the indices (into `encoded`) of those that decoded; a JPEG
    that neither the device decoder nor PIL can read is left out (and logged), as the CPU path skips it.
    """
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpeg_index = [i for i, item in enumerate(encoded.items) if isinstance(item, bytes)]
    for i, item in enumerate(encoded.items):
        if not isinstance(item, bytes):
            images[i] = item.to(device, non_blocking=True)
    if jpeg_index:
        data = [torch.frombuffer(bytearray(encoded.items[i]), dtype=torch.uint8) for i in jpeg_index]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batched call: decode one at a time
            decoded = []
            for tensor in data:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(jpeg_index, decoded, strict=True):
            if image is None:
                try:  # PIL decodes truncated JPEGs the device decoder refuses
                    image = decode_image_tensor(encoded.items[i]).to(device)
                except BadImageError as error:
                    logger.warning("Skipping sample %s: %s", encoded.names[i], error.reason)
                    continue
            images[i] = image
    kept = [i for i, image in enumerate(images) if image is not None]
    return [images[i] for i in kept], kept


# ------------------------------------------------------------------------------------------- random parameters
def sample_crop_boxes(
    sizes: Sequence[tuple[int, int]], scale: tuple[float, float], generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, 4) long boxes (top, left, height, width), one per (height, width) in `sizes`, drawn as torchvision's
    `RandomResizedCrop.make_params` draws them (area fraction uniform in `scale`, log aspect ratio uniform in
    log(3/4)..log(4/3), the first of ten tries that fits, else the central crop of the ratio range), all at once."""
    n = len(sizes)
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.long)
    hw = torch.tensor(sizes, dtype=torch.float64)  # (N, 2)
    height, width = hw[:, :1], hw[:, 1:]
    area = height * width
    target = area * torch.empty(n, _CROP_TRIES, dtype=torch.float64).uniform_(*scale, generator=generator)
    ratio = torch.exp(torch.empty(n, _CROP_TRIES, dtype=torch.float64).uniform_(*_LOG_RATIO, generator=generator))
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (N, tries)
    first = torch.where(fits.any(1), fits.float().argmax(1), 0)  # the first try that fits
    w, h = w.gather(1, first[:, None]).squeeze(1), h.gather(1, first[:, None]).squeeze(1)
    found = fits.any(1)
    # Fallback (torchvision): the whole image, or its central crop of the nearest ratio in the range.
    height, width = height.squeeze(1), width.squeeze(1)
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > 4 / 3, torch.round(height * (4 / 3)), width)
    fallback_h = torch.where(in_ratio < 3 / 4, torch.round(width / (3 / 4)), height)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1).long()


def sample_jitter_params(
    n: int, strength: float = 0.4, generator: torch.Generator | None = None, device: torch.device | None = None
) -> dict:
    """Per-image colour-jitter parameters, as `v2.ColorJitter(strength, strength, strength, strength)` draws them:
    brightness, contrast and saturation factors uniform in [1 - s, 1 + s], hue uniform in [-s, s], and the order of
    the four operations a uniform permutation (`order[i]`: operation ids 0-3 in the order they run on image i).
    Drawn on `device` (with `generator`, which must live there): no host-to-device copy, which would wait for the
    GPU's queue to drain."""
    factors = torch.empty(n, 3, device=device).uniform_(1 - strength, 1 + strength, generator=generator)
    hue = torch.empty(n, device=device).uniform_(-strength, strength, generator=generator)
    order = torch.argsort(torch.rand(n, 4, generator=generator, device=device), dim=1)  # uniform over the 24 orders
    return {"brightness": factors[:, 0], "contrast": factors[:, 1], "saturation": factors[:, 2], "hue": hue,
            "order": order}  # fmt: skip


# ------------------------------------------------------------------------------------------------ pixel ops
def resized_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size): each image's box resized bilinearly with antialiasing, rounded as torchvision's
    uint8 `resized_crop`."""
    if len(images) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    out = []
    for image, (top, left, height, width) in zip(images, boxes.tolist(), strict=True):  # boxes live on the host
        crop = image[None, :, top : top + height, left : left + width].float()
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def _per_image(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    return values.to(device, torch.float32, non_blocking=True).view(-1, 1, 1, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float 0-255 -> (N, 1, H, W) luma truncated to integer levels, as the uint8 kernels do."""
    r, g, b = images.unbind(1)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).floor_()[:, None]


def color_jitter(images: torch.Tensor, params: dict) -> torch.Tensor:
    """`FastColorJitter` (training/data/color_jitter.py) on a uint8 (N, 3, H, W) batch, each image with its own factors and
    order. Each of the four positions applies every operation to the whole batch, with the identity factor (exact on
    integer levels) for the images whose operation at that position is another one; the hue, whose rotation is not
    exact at 0, is selected per image instead."""
    device = images.device
    x = images.float()
    n, _, height, width = x.shape
    order = params["order"].to(device)
    brightness, contrast = _per_image(params["brightness"], device), _per_image(params["contrast"], device)
    saturation, hue = _per_image(params["saturation"], device), _per_image(params["hue"], device)
    one = torch.ones_like(brightness)
    for position in range(4):
        op = order[:, position].view(-1, 1, 1, 1)
        factor = torch.where(op == 0, brightness, one)
        x = x.mul_(factor).clamp_(0.0, 255.0).floor_()
        factor = torch.where(op == 1, contrast, one)
        mean_luma = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
        x = x.mul_(factor).add_(mean_luma * (1.0 - factor)).clamp_(0.0, 255.0).floor_()
        factor = torch.where(op == 2, saturation, one)
        luma = _luma(x)  # of the image before this operation scales it
        x = x.mul_(factor).add_(luma * (1.0 - factor)).clamp_(0.0, 255.0).floor_()
        # rotate_hue works on (3, H', W): the batch as one tall image, each row band with its image's hue shift.
        tall = x.transpose(0, 1).reshape(3, n * height, width)
        shift = hue.view(-1, 1, 1).expand(n, height, 1).reshape(n * height, 1)  # (N * H, 1)
        rotated = rotate_hue(tall, shift).mul_((256.0 - 1e-3) / 255.0).floor_()
        rotated = rotated.reshape(3, n, height, width).transpose(0, 1)
        x = torch.where(op == 3, rotated, x)
    return x.to(torch.uint8)


def grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """`v2.RandomGrayscale` on the images where `apply` (N,) is True: luma (truncated) in all three channels."""
    gray = _luma(images.float()).to(torch.uint8).expand_as(images)
    return torch.where(apply.to(images.device).view(-1, 1, 1, 1), gray, images)


def hflip(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    return torch.where(apply.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


class GpuViewAugment:
    """The weak and strong training views of a batch of decoded uint8 images, made on their device.

    Args:
        image_size: output side (the CPU transforms' `image_size`).
        crop_scale: area range of the random crops (`--crop_min_scale`, 1).
        generator: RNG of the crop boxes (drawn on the host, which slices the images) and, if it lives on the
            images' device, of the other parameters (drawn there: no host-to-device copies); torch's global RNGs by
            default, which the Trainer's checkpoints save.
    """

    def __init__(self, image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), generator=None):
        self.image_size, self.crop_scale, self.generator = image_size, tuple(crop_scale), generator

    def _crops(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        host = self.generator if self.generator is None or self.generator.device.type == "cpu" else None
        sizes = [tuple(image.shape[-2:]) for image in images]
        return resized_crops(images, sample_crop_boxes(sizes, self.crop_scale, host), self.image_size)

    def _device_generator(self, device: torch.device) -> torch.Generator | None:
        generator = self.generator
        return generator if generator is not None and generator.device.type == device.type else None

    def weak(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        views = self._crops(images)
        generator = self._device_generator(views.device)
        return hflip(views, torch.rand(len(images), generator=generator, device=views.device) < 0.5)

    def strong(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        n = len(images)
        views = self._crops(images)
        device, generator = views.device, self._device_generator(views.device)
        views = grayscale(views, torch.rand(n, generator=generator, device=device) < 0.2)
        views = color_jitter(views, sample_jitter_params(n, generator=generator, device=device))
        return hflip(views, torch.rand(n, generator=generator, device=device) < 0.5)

    def __call__(
        self, images: Sequence[torch.Tensor], key_view: bool = True, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weak, strong) uint8 (N, 3, S, S) batches; strong is None without `key_view` (the CE baseline). `device`
        places the empty batch of a batch whose images were all skipped."""
        if not images:
            empty = torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8, device=device)
            return empty, empty.clone() if key_view else None
        return self.weak(images), self.strong(images) if key_view else None


__all__ = [
    "EncodedImages", "GpuAugmentCollator", "GpuViewAugment", "color_jitter", "decode_on_device", "grayscale", "hflip",
    "resized_crops", "sample_crop_boxes", "sample_jitter_params",
]  # fmt: skip
