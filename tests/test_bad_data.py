"""Bad inputs to the data readers: each gives a clear error naming the thing, or a counted skip naming the file."""

from __future__ import annotations

import io
import json
import logging
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from training.data.collator import MoProCollator
from training.data.transforms import BadImageError, MoProViewTransforms, decode_image, decode_image_tensor


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
    with caplog.at_level(logging.WARNING, logger="training.data.transforms"):
        batch = collator(examples)
    assert int(batch["num_skipped_images"]) == 2 and batch["labels"].tolist() == [1]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "sample_id=7" in messages[0] and "sample_id=8" in messages[1] and "web/cat/001.jpg" in messages[1]
    assert not any("BytesIO" in message for message in messages), messages


# --- evaluation readers and the noise report --------------------------------------------------------------------
def test_noise_report_skips_undecodable_images_and_counts_them(tmp_path):
    from evaluation import noise_report
    from tests.fixtures_eval import noisy_hf_dataset, tiny_model

    dataset = noisy_hf_dataset(16).cast_column("image", datasets.Image(decode=False))
    images = list(dataset["image"])
    images[3] = {"bytes": b"garbage", "path": None}
    images[10] = {"bytes": b"\xff\xd8\xff truncated jpeg", "path": None}
    dataset = dataset.remove_columns("image").add_column("image", images).cast_column("image", datasets.Image())
    summary = noise_report.write_noise_report(
        tiny_model(), dataset, tmp_path, noise_report.NoiseReportOptions(batch_size=4, num_workers=0)
    )
    assert summary["num_skipped_images"] == 2
    assert summary["skipped_images"] == ["web/0003.png", "web/0010.png"]  # the dataset's ids (its path column)
    saved = json.loads((tmp_path / "noise_report_summary.json").read_text())
    assert saved["num_skipped_images"] == 2 and saved["num_samples"] == 14
    report = datasets.load_from_disk(str(tmp_path))
    assert "web/0003.png" not in report["id"] and len(report) == 14
    # The ground-truth columns stay aligned with their rows once the skipped rows are gone.
    assert report["sample_id"] == [i for i in range(16) if i not in (3, 10)]
    assert report["is_ood"] == [i % 8 == 7 for i in range(16) if i not in (3, 10)]


def test_extract_features_skips_bad_files_of_an_image_folder(tmp_path):
    from evaluation.features import extract_features
    from tests.fixtures_eval import tiny_model, write_image_folder
    from training.data.image_datasets import image_dataset

    root = write_image_folder(tmp_path / "data", per_class=3, class_names=["a", "b", "c", "d"])
    (root / "b" / "b_1.png").write_bytes(b"not a png")
    features = extract_features(tiny_model(), image_dataset("imagefolder", root, None), batch_size=4, num_workers=0, progress=False)
    assert features.skipped_ids == ["b/b_1.png"] and len(features) == 11 and "b/b_1.png" not in features.ids


# --- image folders: one reader, one label rule, checked against the model ------------------------------------------
def test_empty_class_folder_is_an_error_naming_it_in_training_and_evaluation(tmp_path):
    from tests.fixtures_eval import write_image_folder
    from training.data.image_datasets import image_dataset
    from training.data.sources import build_datasets

    root = write_image_folder(tmp_path / "data", per_class=2, class_names=["a", "b", "c"])
    (root / "bb").mkdir()  # sorts between b and c: dropping it would not shift labels, keeping it would
    (root / "bb" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder.*bb.*no image"):
        build_datasets(train_dir=str(root))
    with pytest.raises(ValueError, match=r"class folder.*bb.*no image"):
        image_dataset("imagefolder", root, None)


def test_training_and_evaluation_read_an_image_folder_with_the_same_labels(tmp_path):
    from tests.fixtures_eval import write_image_folder
    from training.data.image_datasets import image_dataset
    from training.data.sources import build_datasets

    names = [str(i) for i in range(12)]  # numeric: "10" and "11" after "9", label == folder number
    root = write_image_folder(tmp_path / "data", per_class=1, class_names=names)
    train, _, id2label = build_datasets(train_dir=str(root))
    evaluation = image_dataset("imagefolder", root, None)
    assert id2label == dict(enumerate(names)) and evaluation.classes == names
    train_labels = {os.path.relpath(row["image"]["path"], root): row["label"] for row in train}
    assert train_labels == dict(zip(evaluation.ids, evaluation.labels.tolist(), strict=True))
    assert train_labels["10/10_0.png"] == 10
    # make_shards labels an image folder by the same rule
    from training.data.make_shards import main as make_shards_main
    from training.data.make_shards import read_id2label

    make_shards_main(["--image_folder", str(root), "--output_dir", str(tmp_path / "shards")])
    assert read_id2label(tmp_path / "shards") == id2label


def test_classification_refuses_data_whose_classes_are_not_the_models(tmp_path):
    from evaluation.classification import ClassificationOptions, evaluate_classification
    from tests.fixtures_eval import tiny_model, write_image_folder
    from training.data.image_datasets import image_dataset

    model = tiny_model()
    model.config.id2label = {0: "a", 1: "b", 2: "c", 3: "d"}
    model.config.label2id = {"a": 0, "b": 1, "c": 2, "d": 3}
    good = write_image_folder(tmp_path / "good", per_class=1, class_names=["a", "b", "c", "d"])
    options = ClassificationOptions(num_workers=0)
    assert evaluate_classification(model, image_dataset("imagefolder", good, None), options)["num_samples"] == 4
    renamed = write_image_folder(tmp_path / "renamed", per_class=1, class_names=["a", "b", "cat", "d"])
    with pytest.raises(ValueError, match=r"not the model's labels.*label 2: 'cat' in the data, 'c' in the model"):
        evaluate_classification(model, image_dataset("imagefolder", renamed, None), options)
    fewer = write_image_folder(tmp_path / "fewer", per_class=1, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="not the model's labels"):
        evaluate_classification(model, image_dataset("imagefolder", fewer, None), options)


def test_noise_report_refuses_data_whose_classes_are_not_the_models(tmp_path):
    from evaluation import noise_report
    from tests.fixtures_eval import tiny_model, write_image_folder
    from training.data.image_datasets import image_dataset

    model = tiny_model()
    model.config.id2label = {0: "a", 1: "b", 2: "c", 3: "d"}
    data = write_image_folder(tmp_path / "data", per_class=1, class_names=["d", "e", "f", "g"])
    with pytest.raises(ValueError, match="not the model's labels"):
        noise_report.build_noise_report(
            model, image_dataset("imagefolder", data, None), noise_report.NoiseReportOptions(num_workers=0)
        )


# --- shards -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "truncated_on_a_block"])
def test_damaged_shard_is_an_error_naming_it_before_training(tmp_path, damage):
    from tests.fixtures_eval import write_image_folder
    from training.data.make_shards import main as make_shards_main
    from training.data.sources import build_datasets

    folder = write_image_folder(tmp_path / "images", per_class=3, class_names=["a", "b"])
    out = tmp_path / "shards"
    make_shards_main(["--image_folder", str(folder), "--output_dir", str(out), "--samples_per_shard", "2"])
    assert len(build_datasets(shard_dir=str(out))[0]) == 6  # whole shards read
    shard = sorted((out / "train").glob("shard-*.tar"))[1]
    data = shard.read_bytes()
    shard.write_bytes(
        {
            "truncated": data[: len(data) // 2 + 7],
            "garbage": b"\x00garbage" * 300,
            "truncated_on_a_block": data[:1536],
        }[damage]
    )
    with pytest.raises(ValueError, match=rf"shard .*{shard.name} is (not a tar|truncated)"):
        build_datasets(shard_dir=str(out))


def test_webvision_val_list_is_read_by_the_training_reader(tmp_path):
    from training.data.image_datasets import webvision_val_dataset

    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "val_filelist.txt").write_text("val000001.jpg 0\nval000002.jpg 1500\n\nval000003.jpg 7\n")
    dataset = webvision_val_dataset(tmp_path)  # label 1500 is beyond WebVision 1.0's 1000 classes
    assert dataset.ids == ["val_images_256/val000001.jpg", "val_images_256/val000003.jpg"]
    assert dataset.labels.tolist() == [0, 7]
    (tmp_path / "info" / "val_filelist.txt").write_text("val000001.jpg 0\nval000002.jpg cat\n")
    with pytest.raises(ValueError, match=r"val_filelist.txt \(byte 16\).*expected '<image path> <non-negative"):
        webvision_val_dataset(tmp_path)


def test_trainer_collator_of_the_evaluation_scripts_drops_undecodable_images(tmp_path, caplog):
    from tests.fixtures_eval import write_image_folder
    from training.data.image_datasets import collate_without_index, image_dataset

    root = write_image_folder(tmp_path / "data", per_class=2, class_names=["a", "b"])
    (root / "a" / "a_1.png").write_bytes(b"broken")
    dataset = image_dataset("imagefolder", root, None)
    with caplog.at_level(logging.WARNING, logger="training.data.transforms"):
        batch = collate_without_index([dataset[i] for i in range(len(dataset))])
    assert batch["labels"].tolist() == [0, 1, 1] and batch["pixel_values"].shape[0] == 3
    assert any("a/a_1.png" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match="every image of a batch is undecodable"):
        collate_without_index([dataset[1]])
