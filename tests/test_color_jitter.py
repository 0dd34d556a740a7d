"""`FastColorJitter` draws the same random parameters as `v2.ColorJitter` and gives the same uint8 results up to
an occasional one-level rounding difference."""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from training.data.color_jitter import FastColorJitter, rotate_hue


def _images(n: int = 12, size: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear")
    noisy = (smooth * 200 + torch.rand(n, 3, size, size, generator=g) * 55).to(torch.uint8)
    noisy[0, :, :8, :8] = 128  # grey pixels: hue undefined, must stay grey
    return list(noisy)


def test_fast_color_jitter_matches_torchvision():
    reference, fast = v2.ColorJitter(0.4, 0.4, 0.4, 0.4), FastColorJitter(0.4, 0.4, 0.4, 0.4)
    total = differing = 0
    for i, image in enumerate(_images()):
        torch.manual_seed(i)
        expected = reference(image)
        torch.manual_seed(i)
        got = fast(image)
        assert got.dtype == torch.uint8 and got.shape == image.shape
        diff = (got.int() - expected.int()).abs()
        assert int(diff.max()) <= 1, f"image {i}: max diff {int(diff.max())}"
        total, differing = total + diff.numel(), differing + int((diff > 0).sum())
    assert differing / total < 1e-3


def test_rotate_hue_equals_adjust_hue():
    for image in _images(4):
        as_float = image.float() / 255
        for hue in (-0.4, -0.1, 0.0, 0.25, 0.5):
            torch.testing.assert_close(rotate_hue(as_float, hue), TF.adjust_hue(as_float, hue), atol=2e-4, rtol=0)


def test_other_inputs_fall_back_to_torchvision():
    image = TF.to_pil_image(_images(1)[0])
    torch.manual_seed(3)
    expected = v2.ColorJitter(0.4, 0.4, 0.4, 0.4)(image)
    torch.manual_seed(3)
    assert list(FastColorJitter(0.4, 0.4, 0.4, 0.4)(image).getdata()) == list(expected.getdata())
