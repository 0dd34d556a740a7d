"""Decoding, the MoPro views, the collator, WebDataset shards and `build_datasets` (tiny, CPU)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from datasets import Image as ImageFeature
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from torchvision import transforms as v1
from torchvision.transforms import v2

import training.data.collator as collator_module
from training.data.collator import MoProCollator
from training.data.make_shards import (
    ShardRecord,
    load_shards,
    read_id2label,
    records_from_dataset,
    shard_order,
    write_shards,
)
from training.data.make_shards import main as make_shards_main
from training.data.sources import DataArguments, _prepare, build_datasets
from training.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    MoProViewTransforms,
    decode_image,
    decode_image_tensor,
    normalize_pixels,
)

SIZE = 32


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    """A noisy (hence large enough to truncate meaningfully) JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def truncated_jpeg_bytes() -> bytes:
    data = jpeg_bytes(seed=7, size=(64, 64))
    return data[: int(len(data) * 0.6)]


@pytest.fixture(scope="module")
def views() -> MoProViewTransforms:
    return MoProViewTransforms(SIZE)


# --- decode_image -------------------------------------------------------------------------------------------


def test_decode_image_accepts_every_source_form(tmp_path):
    data = jpeg_bytes()
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    reference = np.asarray(decode_image(data))
    for source in (
        data,
        bytearray(data),
        str(path),
        path,
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
    ):
        image = decode_image(source)
        assert image.mode == "RGB" and image.size == (48, 40)
        np.testing.assert_array_equal(np.asarray(image), reference)
    grayscale = decode_image(Image.new("L", (5, 6), 100))
    assert grayscale.mode == "RGB" and grayscale.getpixel((0, 0)) == (100, 100, 100)


def test_truncated_jpeg_decodes_without_changing_pil_default():
    data = truncated_jpeg_bytes()
    with pytest.raises(OSError):  # PIL alone refuses it...
        Image.open(io.BytesIO(data)).load()
    image = decode_image(data)  # ...the official code's setting accepts it
    assert image.size == (64, 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # switched on only during our decode


@pytest.mark.parametrize("source", [b"not an image", "/nonexistent/dir/x.jpg", {"bytes": None, "path": None}])
@pytest.mark.parametrize("decode", [decode_image, decode_image_tensor])
def test_undecodable_images_raise_bad_image_error(source, decode):
    with pytest.raises(BadImageError):
        decode(source)


def png_bytes(mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def grey_jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes())).convert("L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [jpeg_bytes(), grey_jpeg_bytes(), truncated_jpeg_bytes(), png_bytes(), png_bytes("L"), png_bytes("RGBA")],
    ids=["jpeg", "grey-jpeg", "truncated-jpeg", "png", "grey-png", "rgba-png"],
)
def test_decode_image_tensor_gives_the_pil_pixels(data, tmp_path):
    # decode_jpeg (libjpeg-turbo) must give PIL's pixels exactly, so a JPEG decodes alike in training and in the
    # image processor; truncated JPEGs and other formats go through PIL.
    reference = torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)
    path = tmp_path / "image"
    path.write_bytes(data)
    for source in (data, str(path), {"bytes": None, "path": str(path)}, decode_image(data)):
        pixels = decode_image_tensor(source)
        assert pixels.dtype == torch.uint8 and pixels.shape == reference.shape
        assert torch.equal(pixels, reference)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_image_tensor_error_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)  # a JPEG marker, then garbage
    with pytest.raises(BadImageError, match="broken.jpg"):
        decode_image_tensor(str(path))


def test_unsupported_source_type_is_a_type_error():
    with pytest.raises(TypeError):
        decode_image(12)


# --- views --------------------------------------------------------------------------------------------------


def test_view_pipelines_follow_the_official_order(views):
    augment = [v2.RandomResizedCrop, v2.RandomGrayscale, v2.ColorJitter, v2.RandomHorizontalFlip]

    def kinds(compose):  # isinstance: the strong view uses FastColorJitter, a v2.ColorJitter with the same draws
        return [next((kind for kind in augment if isinstance(t, kind)), type(t)) for t in compose.transforms]

    assert [k for k in kinds(views.strong) if k in augment] == augment
    assert [k for k in kinds(views.weak) if k in augment] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    crop = next(t for t in views.weak.transforms if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (0.2, 1.0)
    jitter = next(t for t in views.strong.transforms if isinstance(t, v2.ColorJitter))
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.4, 0.4)
    assert views.test.transforms[0].size == [int(SIZE / (224 / 256))] and MoProViewTransforms().test.transforms[0].size == [256]


@settings(max_examples=30, deadline=None)
@given(
    size=st.sampled_from([16, 32, 100, 224, 383, 384, 448]),
    shape=st.tuples(st.integers(8, 520), st.integers(8, 520)),
    resample=st.sampled_from(["BILINEAR", "BICUBIC", "NEAREST", "LANCZOS"]),
    crop_pct=st.floats(0.5, 1.0),
    seed=st.integers(0, 2**16),
)
def test_the_one_test_view_is_what_the_pipeline_computes_with_the_saved_processor(
    size, shape, resample, crop_pct, seed
):
    """Evaluation, training's validation and the noise report see an image as `pipeline()` does with the processor
    saved beside the model, whatever its size (the ConvNeXt processor warps at 384 px and over), filter and crop."""
    from transformers.image_utils import PILImageResampling

    from modeling_mopro import build_image_processor
    from training.data.transforms import evaluation_view

    processor = build_image_processor(size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    processor.resample, processor.crop_pct = PILImageResampling[resample], crop_pct
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(evaluation_view(processor)(image), expected, rtol=0, atol=1e-4)
    views = MoProViewTransforms(size, processor.image_mean, processor.image_std, processor=processor)
    torch.testing.assert_close(views.test(image), expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=f"for {size + 1} px"):
        MoProViewTransforms(size + 1, processor=processor)


def test_train_views_shapes_and_randomness(views):
    image = decode_image(jpeg_bytes(size=(64, 48)))
    torch.manual_seed(0)
    weak, strong = views.train_views(image)
    weak_again, _ = views.train_views(image)
    for view in (weak, strong):
        assert view.shape == (3, SIZE, SIZE) and view.dtype == torch.uint8 and type(view) is torch.Tensor
    assert not torch.equal(weak, strong)
    assert not torch.equal(weak, weak_again)


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_uint8_views_normalised_as_a_batch_equal_the_per_image_views(kind):
    views = MoProViewTransforms(SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    pixels = decode_image_tensor(jpeg_bytes(size=(64, 48)))
    per_image, uint8 = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        per_image.append(getattr(views, kind)(pixels))
        torch.manual_seed(seed)
        uint8.append(getattr(views, f"{kind}_augment")(pixels))
    batch = torch.stack(uint8)
    assert batch.dtype == torch.uint8
    normalised = views.normalize(batch)
    assert normalised.dtype == torch.float32
    assert torch.equal(normalised, torch.stack(per_image))  # the same kernels: bit-identical
    manual = (batch.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(
        3, 1, 1
    )
    torch.testing.assert_close(normalize_pixels(batch, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), manual)


def test_test_view_is_deterministic_and_matches_official_pil_pipeline(views):
    image = decode_image(jpeg_bytes(size=(64, 48)))
    official = v1.Compose(
        [
            v1.Resize(int(SIZE / (224 / 256))),
            v1.CenterCrop(SIZE),
            v1.ToTensor(),
            v1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    first, second = views.test(image), views.test(image)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, official(image), atol=1e-6, rtol=0)


# --- collator -----------------------------------------------------------------------------------------------


def examples(tmp_path: Path, count: int = 4) -> list[dict]:
    """Raw examples in the different undecoded forms, plus ground-truth columns that must not leak."""
    rows = []
    for index in range(count):
        data = jpeg_bytes(seed=index)
        if index % 3 == 0:
            image = data
        elif index % 3 == 1:
            (tmp_path / f"{index}.jpg").write_bytes(data)
            image = str(tmp_path / f"{index}.jpg")
        else:
            image = {"bytes": data, "path": f"{index}.jpg"}
        rows.append({"image": image, "label": index % 3, "sample_id": 100 + index, "true_label": 0, "is_ood": True})
    return rows


def test_collator_train_batch(tmp_path, views):
    batch = MoProCollator(views, num_labels=3)(examples(tmp_path))
    assert set(batch) == {"pixel_values", "pixel_values_key", "labels", "sample_ids", "num_skipped_images"}
    assert batch["pixel_values"].shape == batch["pixel_values_key"].shape == (4, 3, SIZE, SIZE)
    assert batch["labels"].dtype == batch["sample_ids"].dtype == torch.long
    assert batch["labels"].tolist() == [0, 1, 2, 0] and batch["sample_ids"].tolist() == [100, 101, 102, 103]
    assert batch["num_skipped_images"].ndim == 0 and batch["num_skipped_images"].item() == 0


def test_collator_eval_batch_is_deterministic(tmp_path, views):
    rows = [{key: row[key] for key in ("image", "label")} for row in examples(tmp_path)]
    collate = MoProCollator(views, train=False)
    first, second = collate(rows), collate(rows)
    assert set(first) == {"pixel_values", "labels", "num_skipped_images"}
    assert torch.equal(first["pixel_values"], second["pixel_values"])


def test_collator_decodes_each_image_once(tmp_path, views, monkeypatch):
    calls = []

    def counting_decode(source):
        calls.append(source)
        return decode_image(source)

    def counting_decode_tensor(source):
        calls.append(source)
        return decode_image_tensor(source)

    monkeypatch.setattr(collator_module, "decode_image", counting_decode)
    monkeypatch.setattr(collator_module, "decode_image_tensor", counting_decode_tensor)
    MoProCollator(views)(examples(tmp_path, count=5))
    assert len(calls) == 5
    MoProCollator(views, train=False)(examples(tmp_path, count=3))
    assert len(calls) == 8


def test_collator_uint8_training_views_are_the_float_batch_before_normalisation(tmp_path, views):
    rows = examples(tmp_path)
    floats = MoProCollator(views, num_labels=3, seed=0)(rows)
    uint8 = MoProCollator(views, num_labels=3, seed=0, uint8_training_views=True)(rows)
    for name in ("pixel_values", "pixel_values_key"):
        assert floats[name].dtype == torch.float32 and uint8[name].dtype == torch.uint8
        assert torch.equal(views.normalize(uint8[name]), floats[name])
    assert torch.equal(floats["labels"], uint8["labels"])
    # The eval view is unaffected: float, from PIL, as the saved image processor computes it.
    test_batch = MoProCollator(views, train=False, uint8_training_views=True)(rows)
    assert test_batch["pixel_values"].dtype == torch.float32
    # An all-bad batch keeps the dtype of a good one.
    empty = MoProCollator(views, uint8_training_views=True)([{"image": b"junk", "label": 0, "sample_id": 5}])
    assert empty["pixel_values"].dtype == torch.uint8 and empty["pixel_values"].shape == (0, 3, SIZE, SIZE)


def test_collator_extra_columns_are_opt_in(tmp_path, views):
    batch = MoProCollator(views, train=False, extra_columns=("is_ood",))(examples(tmp_path, count=2))
    assert batch["is_ood"].tolist() == [True, True] and "true_label" not in batch


def test_collator_skips_and_counts_bad_images(tmp_path, views, caplog):
    missing = str(tmp_path / "missing.jpg")
    rows = [
        {"image": jpeg_bytes(1), "label": 1, "sample_id": 0},
        {"image": truncated_jpeg_bytes(), "label": 2, "sample_id": 1},  # decodes: not skipped
        {"image": b"\x00garbage", "label": 0, "sample_id": 2},
        {"image": missing, "label": 0, "sample_id": 3},
    ]
    with caplog.at_level(logging.WARNING, logger="training.data.transforms"):
        batch = MoProCollator(views, num_labels=3)(rows)
    assert batch["num_skipped_images"].item() == 2
    assert batch["sample_ids"].tolist() == [0, 1] and batch["labels"].tolist() == [1, 2]
    assert batch["pixel_values"].shape[0] == batch["pixel_values_key"].shape[0] == 2
    assert missing in caplog.text and "sample_id=2" in caplog.text


def test_collator_all_bad_gives_an_empty_batch(views):
    batch = MoProCollator(views)([{"image": b"junk", "label": 0, "sample_id": 5}] * 3)
    assert batch["pixel_values"].shape == batch["pixel_values_key"].shape == (0, 3, SIZE, SIZE)
    assert batch["labels"].shape == batch["sample_ids"].shape == (0,)
    assert batch["num_skipped_images"].item() == 3


@pytest.mark.parametrize(("label", "num_labels"), [(3, 3), (-1, None), (None, 3), (1.5, 3)])
def test_collator_rejects_out_of_range_labels(label, num_labels, views):
    rows = [
        {"image": jpeg_bytes(), "label": 0, "sample_id": 1},
        {"image": jpeg_bytes(), "label": label, "sample_id": 42},
    ]
    with pytest.raises(ValueError, match="sample_id=42"):
        MoProCollator(views, num_labels=num_labels)(rows)


def test_skip_counts_travel_from_dataloader_workers(tmp_path, views):
    rows = [{"image": jpeg_bytes(i), "label": 0, "sample_id": i} for i in range(6)]
    rows[4]["image"] = str(tmp_path / "gone.jpg")
    loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=MoProCollator(views), num_workers=2)
    batches = list(loader)
    assert sum(batch["num_skipped_images"].item() for batch in batches) == 1
    assert sorted(torch.cat([batch["sample_ids"] for batch in batches]).tolist()) == [0, 1, 2, 3, 5]


# --- shards -------------------------------------------------------------------------------------------------


def test_shards_round_trip(tmp_path):
    (tmp_path / "on_disk.jpg").write_bytes(jpeg_bytes(3))
    records = [ShardRecord(jpeg_bytes(i), label=i % 4, sample_id=10 + i) for i in range(6)]
    records.append(
        ShardRecord(str(tmp_path / "on_disk.jpg"), label=3, sample_id=16, path=str(tmp_path / "on_disk.jpg"))
    )
    records.append(ShardRecord(Image.new("L", (9, 9), 50), label=2, sample_id=17))  # re-encoded to JPEG
    records.append(ShardRecord(str(tmp_path / "missing.jpg"), label=1, sample_id=18))  # skipped
    summary = write_shards(iter(records), tmp_path / "shards", samples_per_shard=3)
    assert [path.name for path in summary.shard_paths] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert (summary.num_samples, summary.num_skipped) == (8, 1)
    assert not list((tmp_path / "shards").glob("*.partial"))

    stream = load_shards(tmp_path / "shards")
    assert isinstance(stream, IterableDataset) and stream.n_shards == 3
    rows = list(stream)
    assert sorted(row["sample_id"] for row in rows) == list(range(10, 18))  # every sample exactly once
    by_id = {row["sample_id"]: row for row in rows}
    for record in records[:8]:
        assert by_id[record.sample_id]["label"] == record.label
    assert by_id[10]["image"]["bytes"] == records[0].image  # JPEG bytes pass through untouched
    assert by_id[16]["image"]["path"] == str(tmp_path / "on_disk.jpg")  # original path kept for tracing
    assert decode_image(by_id[17]["image"]).size == (9, 9)

    # What Accelerate does with dispatch_batches=False: whole shards per rank, disjoint and complete.
    per_rank = [[row["sample_id"] for row in stream.shard(num_shards=2, index=rank)] for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(per_rank[0]) + len(per_rank[1]) == 8

    in_memory = load_shards(summary.shard_paths, streaming=False, cache_dir=str(tmp_path / "cache"))
    assert sorted(in_memory["sample_id"]) == list(range(10, 18))
    assert isinstance(in_memory.features["image"], ImageFeature) and not in_memory.features["image"].decode


def test_shards_from_a_datasets_dataset(tmp_path):
    images = [{"bytes": jpeg_bytes(i), "path": None} for i in range(3)] + [Image.new("RGB", (8, 8))]
    dataset = Dataset.from_dict({"img": images, "fine": [3, 1, 0, 2]}, features=None).cast_column(
        "img", ImageFeature()
    )
    summary = write_shards(
        records_from_dataset(dataset, "img", "fine"), tmp_path, samples_per_shard=2, image_format="png"
    )
    assert summary.num_samples == 4 and [path.name for path in summary.shard_paths] == [
        "shard-00000.tar",
        "shard-00001.tar",
    ]
    rows = sorted(load_shards(tmp_path), key=lambda row: row["sample_id"])
    assert [row["label"] for row in rows] == [3, 1, 0, 2]
    assert all(row["image"]["bytes"].startswith(b"\x89PNG") for row in rows)  # lossless re-encoding


def image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3) -> Path:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            (root / name / f"{index}.jpg").write_bytes(jpeg_bytes(10 * label + index))
    return root


def test_make_shards_cli_and_build_datasets_from_shards(tmp_path, views):
    out = tmp_path / "shards"
    image_folder(tmp_path / "train")
    image_folder(tmp_path / "val", classes=("cat", "eel"), per_class=1)  # a class missing: labels must still match
    make_shards_main(["--image_folder", str(tmp_path / "train"), "--output_dir", str(out), "--samples_per_shard", "4"])
    make_shards_main(["--image_folder", str(tmp_path / "val"), "--split", "validation", "--output_dir", str(out)])
    assert read_id2label(out) == {0: "cat", 1: "dog", 2: "eel"}
    assert json.loads((out / "id2label.json").read_text()) == {"0": "cat", "1": "dog", "2": "eel"}
    assert len(list((out / "train").glob("shard-*.tar"))) == 3

    train, evaluation, id2label = build_datasets(shard_dir=str(out), streaming=True, shuffle_buffer_size=4)
    assert id2label == {0: "cat", 1: "dog", 2: "eel"}
    rows = list(train)
    assert sorted(row["sample_id"] for row in rows) == list(range(9))
    assert {Path(row["image"]["path"]).parent.name for row in rows if row["label"] == 1} == {"dog"}
    batch = MoProCollator(views, train=False, num_labels=3)(list(evaluation))
    assert batch["labels"].tolist() == [0, 2]


def written_order(shard_dir: Path) -> list[dict]:
    """The samples in the order the shards hold them (shard files sorted, no shuffling)."""
    return list(load_shards(shard_dir))


def test_make_shards_writes_a_seeded_permutation_of_the_whole_split(tmp_path):
    image_folder(tmp_path / "train", classes=("a", "b", "c", "d"), per_class=6)  # 24 images, sorted by class
    for name, seed in (("seed0", []), ("seed0_again", ["--shuffle_seed", "0"]), ("seed1", ["--shuffle_seed", "1"])):
        make_shards_main(
            ["--image_folder", str(tmp_path / "train"), "--output_dir", str(tmp_path / name), "--samples_per_shard",
             "8", *seed]
        )  # fmt: skip
    orders = {name: written_order(tmp_path / name / "train") for name in ("seed0", "seed0_again", "seed1")}
    ids = [row["sample_id"] for row in orders["seed0"]]
    labels = [row["label"] for row in orders["seed0"]]
    assert sorted(ids) == list(range(24)) and ids != list(range(24))  # a permutation, not the source order
    assert ids == [row["sample_id"] for row in orders["seed0_again"]]  # reproducible: the default seed is 0
    assert ids != [row["sample_id"] for row in orders["seed1"]]
    assert labels != sorted(labels)
    # every shard of 8 holds several classes (class-sorted shards of 8 would hold at most 2 of the 6-image classes)
    assert all(len(set(labels[start : start + 8])) >= 3 for start in range(0, 24, 8))
    for row in orders["seed0"]:  # ids and labels still belong together: ids number the sorted folder
        assert row["label"] == row["sample_id"] // 6
        assert Path(row["image"]["path"]).parent.name == "abcd"[row["label"]]


def test_records_keep_their_ids_in_shard_order(tmp_path):
    dataset = Dataset.from_dict({"image": [jpeg_bytes(i) for i in range(10)], "label": [i // 5 for i in range(10)]})
    shuffled = list(records_from_dataset(dataset, shuffle_seed=3))
    assert [record.sample_id for record in shuffled] == shard_order(10, 3).tolist()
    assert all(record.image == dataset[record.sample_id]["image"] for record in shuffled)
    assert [record.sample_id for record in records_from_dataset(dataset)] == list(range(10))
    with pytest.raises(ValueError, match="map-style"):
        list(records_from_dataset(dataset.to_iterable_dataset(), shuffle_seed=0))


def test_the_streaming_reader_reshuffles_every_epoch_through_the_trainer_dataloader(tmp_path):
    """Shards are read in a new order each epoch: the Trainer calls `set_epoch` on its dataloader (accelerate's
    `DataLoaderShard`), which forwards it to the `datasets` stream (shard order and buffer seeds)."""
    from tests.trainer_fixtures import tiny_trainer

    image_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=8)
    make_shards_main(["--image_folder", str(tmp_path / "train"), "--output_dir", str(tmp_path / "shards"),
                      "--samples_per_shard", "3"])  # fmt: skip
    train, _, _ = build_datasets(shard_dir=str(tmp_path / "shards"), streaming=True, shuffle_buffer_size=4)
    assert train.n_shards == 8

    def ids_only(rows):
        return {"sample_ids": torch.tensor([row["sample_id"] for row in rows])}

    trainer = tiny_trainer(
        str(tmp_path / "run"),
        train,
        collator=ids_only,
        max_steps=4,
        dataloader_drop_last=False,
        accelerator_config={"dispatch_batches": False},  # as run_mopro.py streams
    )
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)  # as `Trainer._inner_training_loop` does at the start of every epoch
        epochs.append(torch.cat([batch["sample_ids"] for batch in loader]).tolist())
    assert all(sorted(ids) == list(range(24)) for ids in epochs)  # every sample once per epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # the shuffle buffer mixes across shards as well (the shards alone, read in order, give the written order)
    assert epochs[0] != [row["sample_id"] for row in written_order(tmp_path / "shards" / "train")]


# --- build_datasets -----------------------------------------------------------------------------------------


def test_build_datasets_from_image_folders(tmp_path):
    image_folder(tmp_path / "train")
    image_folder(tmp_path / "val", per_class=1)
    train, evaluation, id2label = build_datasets(
        train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val")
    )
    assert id2label == {0: "cat", 1: "dog", 2: "eel"}
    assert len(train) == 9 and len(evaluation) == 3
    assert sorted(train["sample_id"]) == list(range(9))
    assert not train.features["image"].decode  # decoding is the collator's job
    assert isinstance(train[0]["image"], dict)


def test_build_datasets_renames_to_the_requested_columns(tmp_path):
    image_folder(tmp_path / "train")
    train, _, _ = build_datasets(
        train_dir=str(tmp_path / "train"), image_column_name="img", label_column_name="fine_label", max_train_samples=4
    )
    assert {"img", "fine_label", "sample_id"} <= set(train.column_names) and len(train) == 4


def test_build_datasets_rejects_ambiguous_or_id_less_sources(tmp_path):
    image_folder(tmp_path / "train")
    with pytest.raises(ValueError, match="one data source"):
        build_datasets(train_dir=str(tmp_path / "train"), webvision_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sample_id"):  # streamed ids would restart in every shard
        stream = Dataset.from_dict({"image": ["x.jpg"], "label": [0]}).to_iterable_dataset()
        _prepare(stream, DataArguments(), None, is_train=True, seed=0)
    # A streamed image folder is numbered before it is streamed.
    streamed, _, _ = build_datasets(train_dir=str(tmp_path / "train"), streaming=True, num_streaming_shards=2)
    assert sorted(row["sample_id"] for row in streamed) == list(range(9))
    with pytest.raises(TypeError):
        build_datasets(no_such_option=1)


def test_build_datasets_reads_foreign_argument_objects(tmp_path):
    class ScriptArguments:  # e.g. a training script's own dataclass, with fields unknown here
        train_dir = str(image_folder(tmp_path / "train"))
        noise_report = True

    train, evaluation, _ = build_datasets(ScriptArguments(), seed=3)
    assert len(train) == 9 and evaluation is None


def test_build_datasets_demo_streaming(views):
    args = DataArguments(num_train=200, num_test=50, streaming=True, num_streaming_shards=4, shuffle_buffer_size=32)
    train, evaluation, id2label = build_datasets(args, max_eval_samples=20)
    assert isinstance(train, IterableDataset) and train.n_shards == 4 and len(id2label) == 10
    rows = list(train)
    assert sorted(row["sample_id"] for row in rows) == list(range(250))  # 200 + 25% OOD
    assert len(list(evaluation)) == 20
    batch = MoProCollator(views, num_labels=10)(rows[:8])
    assert set(batch) == {"pixel_values", "pixel_values_key", "labels", "sample_ids", "num_skipped_images"}
