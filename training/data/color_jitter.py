"""A faster `ColorJitter` for uint8 image tensors, with the same random draws and (to a level) the same results.

torchvision-v2's uint8 colour jitter converts to float and back for each of its four operations and runs a full
rgb -> hsv -> rgb round trip for the hue; on a 224-px crop that costs more than the official PIL strong view
(`BENCHMARKS.md`: 2.09 ms per crop, hue alone 1.66 ms). This one converts once and shifts the hue in closed form.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision use
_HUE_CHANNEL_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)  # hsv -> rgb: k = (n + 6h) mod 6 for R, G, B


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float -> (1, H, W) luma, computed as torchvision does."""
    red, green, blue = image.unbind(0)
    return red.mul(_GRAY_WEIGHTS[0]).add_(green, alpha=_GRAY_WEIGHTS[1]).add_(blue, alpha=_GRAY_WEIGHTS[2])[None]


def rotate_hue(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """HSV hue shift of a float (3, H, W) image, equal to `torchvision.transforms.v2.functional.adjust_hue` on [0, 1].

    Works on any scale (0-1 or 0-255): the result scales with the input. `hue_factor` may be a tensor that broadcasts
    against (H, W) (one shift per row band: `training/data/gpu_augment.py` runs a batch as one tall image), on any device.

    Value V (max) and chroma C (max - min) are kept, so the shifted pixel is, per channel n in (5, 3, 1) for R, G, B,
    `V - C * clamp(min(k, 4 - k), 0, 1)` with `k = (n + 6 h') mod 6`: about 20 tensor ops instead of torchvision's
    rgb -> hsv -> rgb round trip with its six-sector masks.
    """
    red, green, blue = image.unbind(0)
    minimum, value = torch.aminmax(image, dim=0)
    chroma = value - minimum
    # 6 * hue: sector start (0, 2, 4 where R, G, B is the largest; ties as torchvision) + offset inside the sector.
    # Grey pixels (C = 0) get some finite hue; C = 0 keeps them grey whatever it is.
    hue6 = torch.where(
        red == value,
        green - blue,
        torch.where(green == value, (blue - red).add_(chroma, alpha=2.0), (red - green).add_(chroma, alpha=4.0)),
    )
    hue6.mul_(chroma.clamp_min(1e-12).reciprocal_()).add_(6.0 * hue_factor)
    k = (hue6[None] + _HUE_CHANNEL_OFFSETS.to(hue6.device)).remainder_(6.0)
    torch.minimum(k, 4.0 - k, out=k).clamp_(0.0, 1.0)
    return torch.addcmul(value, chroma, k, value=-1.0)


class FastColorJitter(v2.ColorJitter):
    """`v2.ColorJitter` with the same random parameters (same RNG draws) and, on uint8 images, the same results.

    torchvision's uint8 kernels convert to float and back (truncating) for every one of the four operations, and its
    hue kernel is a full rgb -> hsv -> rgb conversion. Here the image is converted to float once and stays on the
    0-255 scale; `floor_` after each operation reproduces torchvision's truncation to uint8, so the output equals
    `v2.ColorJitter`'s except for float rounding at truncation boundaries (a level now and then). Other inputs (PIL
    images, float tensors) go to the parent class.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or inpt.dtype != torch.uint8 or inpt.ndim != 3 or inpt.shape[0] != 3:
            return super().transform(inpt, params)
        image = inpt.float()
        for fn_id in params["fn_idx"].tolist():
            if fn_id == 0 and params["brightness_factor"] is not None:
                image.mul_(params["brightness_factor"]).clamp_(0.0, 255.0).floor_()
            elif fn_id == 1 and params["contrast_factor"] is not None:
                factor = params["contrast_factor"]
                mean_luma = _grayscale(image).floor_().mean(dim=(-3, -2, -1), keepdim=True)
                image.mul_(factor).add_(mean_luma, alpha=1.0 - factor).clamp_(0.0, 255.0).floor_()
            elif fn_id == 2 and params["saturation_factor"] is not None:
                factor = params["saturation_factor"]
                luma = _grayscale(image).floor_()  # before the image is scaled in place
                image.mul_(factor).add_(luma, alpha=1.0 - factor).clamp_(0.0, 255.0).floor_()
            elif fn_id == 3 and params["hue_factor"] is not None:
                # rotate_hue is scale-free; torchvision's float -> uint8 step multiplies by 255.999 and truncates
                image = rotate_hue(image, params["hue_factor"]).mul_((256.0 - 1e-3) / 255.0).floor_()
        return image.to(torch.uint8)
