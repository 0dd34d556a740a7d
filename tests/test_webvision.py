"""WebVision native layout: file lists, V1/V2 class ranges, map-style vs streamed shards, sharding to tars."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from datasets import Dataset, IterableDataset
from PIL import Image

from training.data.collator import MoProCollator
from training.data.make_shards import load_shards, records_from_dataset, write_shards
from training.data.sources import build_datasets, load_source
from training.data.transforms import MoProViewTransforms
from training.data.webvision import load_webvision, read_webvision_class_names, read_webvision_filelist

GOOGLE = [
    ("google/q0001/a.jpg", 0),
    ("google/q1001/b.jpg", 1000),  # V2 only
    ("google/q0002/c.jpg", 2),
    ("google/q4999/d.jpg", 4999),  # V2 only
    ("google/q5000/e.jpg", 5000),  # out of both
]
FLICKR = [("flickr/q0003/f.jpg", 3), ("flickr/q2000/g.jpg", 2000), ("flickr/q0999/h.jpg", 999)]
VAL = [("val000001.jpg", 1), ("val000002.jpg", 1500), ("val000003.jpg", 7)]


def write_filelist(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name} {label}\n" for name, label in rows))


def small_jpeg(color: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), (color, 255 - color, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def webvision_root(tmp_path) -> Path:
    write_filelist(tmp_path / "info" / "train_filelist_google.txt", GOOGLE)
    write_filelist(tmp_path / "info" / "train_filelist_flickr.txt", FLICKR)
    write_filelist(tmp_path / "info" / "val_filelist.txt", VAL)
    for index, (name, _) in enumerate(GOOGLE + FLICKR):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(small_jpeg(20 * index))
    (tmp_path / "val_images_256").mkdir()
    for index, (name, _) in enumerate(VAL):
        (tmp_path / "val_images_256" / name).write_bytes(small_jpeg(30 * index))
    return tmp_path


def test_filelist_label_range_v1_vs_v2(webvision_root):
    google = webvision_root / "info" / "train_filelist_google.txt"
    assert read_webvision_filelist(google, 1000) == [("google/q0001/a.jpg", 0), ("google/q0002/c.jpg", 2)]
    assert [label for _, label in read_webvision_filelist(google, 5000)] == [0, 1000, 2, 4999]


def test_filelist_parsing_edge_cases(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("dir with space/x.jpg 4\n\n  y.jpg   1  \n")
    assert read_webvision_filelist(path, 10) == [("dir with space/x.jpg", 4), ("y.jpg", 1)]
    path.write_text("x.jpg 1\nbroken-line\n")
    with pytest.raises(ValueError, match="list.txt"):
        read_webvision_filelist(path, 10)
    path.write_text("x.jpg -1\n")
    with pytest.raises(ValueError):
        read_webvision_filelist(path, 10)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_webvision_filelist(tmp_path / "nope.txt", 10)


def test_load_webvision_map_style(webvision_root):
    train = load_webvision(webvision_root, "v1", "train")
    assert isinstance(train, Dataset)
    assert train["label"] == [0, 2, 3, 999]  # Google first, then Flickr, as the official loader
    assert train["sample_id"] == [0, 1, 2, 3]
    assert train["image"][0] == str(webvision_root / "google/q0001/a.jpg")
    v2 = load_webvision(webvision_root, "v2", "train")
    assert v2["label"] == [0, 1000, 2, 4999, 3, 2000, 999]
    val = load_webvision(webvision_root, "v1", "validation")
    assert val["label"] == [1, 7] and val["image"][0] == str(webvision_root / "val_images_256" / "val000001.jpg")
    assert load_webvision(webvision_root, "v2", "validation")["label"] == [1, 1500, 7]


def test_load_webvision_errors(webvision_root):
    with pytest.raises(ValueError, match="v3"):
        load_webvision(webvision_root, "v3")
    with pytest.raises(ValueError, match="split"):
        load_webvision(webvision_root, "v1", "test")
    (webvision_root / "info" / "train_filelist_flickr.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_filelist_flickr.txt"):
        load_webvision(webvision_root, "v1", "train", streaming=True)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 100])
def test_streaming_matches_map_style(tmp_path, num_shards):
    # Larger lists with interleaved V2-only labels, so that shards start mid-file and span both lists.
    google = [(f"g/{i}.jpg", (i * 37) % 1300) for i in range(41)]
    flickr = [(f"f/{i}.jpg", (i * 53) % 1300) for i in range(23)]
    write_filelist(tmp_path / "info" / "train_filelist_google.txt", google)
    write_filelist(tmp_path / "info" / "train_filelist_flickr.txt", flickr)
    expected = load_webvision(tmp_path, "v1", "train").to_list()
    stream = load_webvision(tmp_path, "v1", "train", streaming=True, num_shards=num_shards)
    assert isinstance(stream, IterableDataset)
    assert stream.n_shards == min(num_shards, len(expected))
    assert list(stream) == expected
    if stream.n_shards >= 2:  # Accelerate's per-rank split: disjoint, complete
        ranks = [list(stream.shard(num_shards=2, index=rank)) for rank in range(2)]
        assert sorted(row["sample_id"] for row in ranks[0] + ranks[1]) == list(range(len(expected)))


def test_streamed_shards_deal_the_class_sorted_lists_in_a_seeded_random_order(tmp_path):
    google = [(f"g/{i}.jpg", i // 10) for i in range(60)]  # sorted by class, as the real lists
    flickr = [(f"f/{i}.jpg", 1000 + i // 10) for i in range(20)] + [(f"f/x{i}.jpg", 6 + i // 10) for i in range(20)]
    write_filelist(tmp_path / "info" / "train_filelist_google.txt", google)
    write_filelist(tmp_path / "info" / "train_filelist_flickr.txt", flickr)
    expected = load_webvision(tmp_path, "v1", "train").to_list()  # 80 kept lines, 8 classes of 10
    stream = load_webvision(tmp_path, "v1", "train", streaming=True, num_shards=4, shuffle_seed=0)
    rows = list(stream)
    assert sorted(rows, key=lambda row: row["sample_id"]) == expected  # same samples, same ids and paths
    assert rows != expected
    assert rows == list(load_webvision(tmp_path, "v1", "train", streaming=True, num_shards=4, shuffle_seed=0))
    # every shard of 20 spans many classes (in file order, a shard holds 2 classes)
    for rank in range(4):
        assert len({row["label"] for row in stream.shard(num_shards=4, index=rank)}) >= 5


def test_class_names(webvision_root):
    assert read_webvision_class_names(webvision_root, 3) == {0: "class_0", 1: "class_1", 2: "class_2"}
    (webvision_root / "info" / "synsets.txt").write_text("n01 tench\nn02 goldfish\nn03 shark\n")
    assert read_webvision_class_names(webvision_root, 2) == {0: "n01 tench", 1: "n02 goldfish"}


def test_webvision_to_shards_and_training_batch(webvision_root, tmp_path):
    summary = write_shards(
        records_from_dataset(load_source("webvision", webvision_root, "train", webvision_version="v2")[0]), tmp_path / "out", samples_per_shard=3
    )
    assert summary.num_samples == 7 and len(summary.shard_paths) == 3
    rows = sorted(load_shards(tmp_path / "out"), key=lambda row: row["sample_id"])
    assert [row["label"] for row in rows] == [0, 1000, 2, 4999, 3, 2000, 999]
    assert rows[1]["image"]["bytes"] == (webvision_root / "google/q1001/b.jpg").read_bytes()

    (webvision_root / "flickr/q0003/f.jpg").unlink()  # a missing web image is skipped, not fatal
    train, evaluation, id2label = build_datasets(webvision_dir=str(webvision_root), webvision_version="v2")
    assert len(id2label) == 5000 and len(train) == 7 and len(evaluation) == 3
    batch = MoProCollator(MoProViewTransforms(32), num_labels=len(id2label))([train[i] for i in range(len(train))])
    assert batch["num_skipped_images"].item() == 1 and batch["sample_ids"].tolist() == [0, 1, 2, 3, 5, 6]


def test_lines_beyond_the_first_classes_are_left_out_with_a_warning_naming_the_list(tmp_path, caplog):
    from training.data.webvision import read_webvision_filelist

    filelist = tmp_path / "train_filelist_google.txt"
    filelist.write_text("google/q0/a.jpg 0\ngoogle/q1/b.jpg 1\ngoogle/q5/c.jpg 5\n")
    with caplog.at_level("WARNING", logger="training.data.webvision"):
        kept = read_webvision_filelist(filelist, num_classes=2)
    assert kept == [("google/q0/a.jpg", 0), ("google/q1/b.jpg", 1)]
    assert "train_filelist_google.txt: 1 line(s) with a label >= 2 left out" in caplog.text
