"""Bad inputs to the data readers: each gives a clear error naming the thing, or a counted skip naming the file."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from training.collator import MoProCollator
from training.transforms import BadImageError, MoProViewTransforms, decode_image, decode_image_tensor


def png16_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")  # mode "I;16": 16-bit greyscale PNG
    return buffer.getvalue()


def jpeg_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


# --- image decoding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decode", [decode_image, decode_image_tensor])
def test_16_bit_greyscale_png_is_scaled_to_8_bits(decode, tmp_path):
    # Known 16-bit samples: 0, 256, ..., 65280 and 65535; their 8-bit values are the top byte (value >> 8).
    values = np.array([[0, 256, 4096, 32768], [65280, 65535, 1000, 20000]], dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    path.write_bytes(png16_bytes(values))
    expected = (values >> 8).astype(np.uint8)
    for source in (path.read_bytes(), str(path), Image.open(path)):
        pixels = np.asarray(decode(source))
        pixels = pixels if decode is decode_image else pixels.transpose(1, 2, 0)  # (H, W, 3) either way
        for channel in range(3):  # greyscale -> equal RGB channels
            np.testing.assert_array_equal(pixels[..., channel], expected)


@pytest.mark.parametrize("decode", [decode_image, decode_image_tensor])
def test_jpeg_above_the_decompression_bomb_limit_is_refused_before_decoding(decode, monkeypatch, tmp_path):
    path = tmp_path / "bomb.jpg"
    path.write_bytes(jpeg_bytes((40, 30)))  # 1200 pixels
    # PIL's rule: warn above MAX_IMAGE_PIXELS, refuse above twice it. A 1200-pixel limit stands in for 89M.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(BadImageError, match="bomb.jpg.*DecompressionBomb"):
        decode(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # above 1x, below 2x: decoded (with PIL's warning)
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode(str(path)) is not None


def test_skip_log_names_the_sample_not_the_bytes_buffer(caplog):
    collator = MoProCollator(MoProViewTransforms(image_size=16))
    examples = [
        {"image": {"bytes": b"not an image", "path": None}, "label": 0, "sample_id": 7},
        {"image": {"bytes": b"garbage", "path": "web/cat/001.jpg"}, "label": 1, "sample_id": 8},
        {"image": jpeg_bytes(), "label": 1, "sample_id": 9},
    ]
    with caplog.at_level(logging.WARNING, logger="training.collator"):
        batch = collator(examples)
    assert int(batch["num_skipped_images"]) == 2 and batch["labels"].tolist() == [1]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "sample_id=7" in messages[0] and "sample_id=8" in messages[1] and "web/cat/001.jpg" in messages[1]
    assert not any("BytesIO" in message for message in messages), messages
