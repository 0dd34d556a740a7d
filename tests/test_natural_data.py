"""`bench/natural_data.py` on tiny fake snapshots it builds itself (no fetched data): the CIFAR-10N index -> file map,
the order check, and the consistency of every setting's folders with its ground-truth file."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import natural_data  # noqa: E402
from natural_data import CLASSES, CONFUSIONS, GitSnapshot, build, extract  # noqa: E402

FILES_PER_CLASS = 6  # fake CIFAR-10 training files per class (the official order is 60 indices)
TRAIN_PER_CLASS = 5  # 20% and 40% of 5 are whole images
OOD_WNIDS = natural_data.OOD_WNIDS[:3]  # 3 x 5 fake Tiny-ImageNet photos: ood20 needs round(0.25 * 50) = 12


def _colour(index: int) -> tuple[int, int, int]:
    """A flat colour that names an official index (JPEG keeps a flat colour within a few levels)."""
    return (4 * index, 255 - 4 * index, 128)


def _jpeg(colour, size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _commit(root: Path, files: dict[str, bytes]) -> tuple[str, str]:
    """A git repository holding `files`; returns (git dir, commit)."""
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fake"]):
        subprocess.run(["git", "-C", str(root), *args], check=True, env=env)
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    return str(root / ".git"), commit.stdout.strip()


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory):
    """Fake snapshots: CIFAR-10 files numbered by rank within class in the official order, CIFAR-10N labels
    (a pickled dict of numpy arrays, as the real `.pt`), Kaggle PNGs of the first 20 official images, Tiny-ImageNet
    validation photos of 3 OOD classes and 1 class that must not be used."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    clean = rng.permutation(np.repeat(np.arange(len(CLASSES)), FILES_PER_CLASS))
    worse = clean.copy()
    flip = rng.choice(len(clean), 24, replace=False)
    worse[flip] = (clean[flip] + 1 + rng.integers(0, 9, len(flip))) % len(CLASSES)

    rank = np.zeros(len(CLASSES), dtype=int)
    images = {}
    for index, label in enumerate(clean):
        images[f"train/{CLASSES[label]}/{rank[label]:04d}.jpg"] = _jpeg(_colour(index))
        rank[label] += 1
    for c, name in enumerate(CLASSES):
        for k in range(3):
            images[f"test/{name}/{k:04d}.jpg"] = _jpeg((20 * c, 10 * k, 200))
    buffer = io.BytesIO()
    torch.save({"clean_label": clean, "worse_label": worse, "aggre_label": clean.copy(),
                "random_label1": worse.copy()}, buffer)  # fmt: skip
    kaggle = {"image_data_format_1/trainLabels.csv":
              "\n".join(f"{i + 1}.png,{CLASSES[clean[i]]}" for i in range(20)).encode()}  # fmt: skip
    kaggle.update({f"image_data_format_1/train/{i + 1}.png": _png(_colour(i)) for i in range(20)})
    annotations, tiny = [], {}
    for w, wnid in enumerate((*OOD_WNIDS, "n02124075")):  # the last one (Egyptian cat) is not an OOD class
        for k in range(5):
            name = f"val_{w * 5 + k}.JPEG"
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
            tiny[f"tiny-imagenet-200/val/images/{name}"] = _jpeg((250, 10 * k, 40 * w), size=64)
        for k in range(4):  # training photos: the development pool's OOD photos
            tiny[f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{k}.JPEG"] = _jpeg((5, 10 * k, 40 * w), size=64)
    tiny["tiny-imagenet-200/val/val_annotations.txt"] = "\n".join(annotations).encode()
    return {
        "clean": clean, "worse": worse,
        "cifar10_images": _commit(root / "images", images),
        "cifar10n": _commit(root / "cifar10n", {natural_data.SOURCES["cifar10n"]["path"]: buffer.getvalue()}),
        "order_check": _commit(root / "kaggle", kaggle),
        "tiny_imagenet": _commit(root / "tiny", tiny),
    }  # fmt: skip


def _extract(sources, out: Path, **overrides):
    snap = {key: GitSnapshot(*sources[key]) for key in ("cifar10_images", "cifar10n", "tiny_imagenet", "order_check")}
    snap.update(overrides)
    return extract(snap["cifar10_images"], snap["cifar10n"], snap["tiny_imagenet"], snap["order_check"], out,
                   train_per_class=TRAIN_PER_CLASS, test_per_class=2, order_count=20,
                   candidates_per_class=FILES_PER_CLASS)  # fmt: skip


@pytest.fixture(scope="module")
def pool(fake_sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool") / "pool.npz"
    provenance = _extract(fake_sources, out)
    return out, provenance


def test_extract_maps_cifar10n_indices_to_their_images_and_records_the_check(pool, fake_sources):
    path, provenance = pool
    assert provenance["order_check"]["mapped_is_nearest"] == 20
    assert provenance["order_check"]["mapped_error_max"] < 3
    assert json.loads((path.parent / "PROVENANCE.json").read_text())["pool_digest"] == provenance["pool_digest"]
    with np.load(path) as stored:
        index, images = stored["train_index"], stored["train_images"]
        assert (np.bincount(stored["train_clean"], minlength=10) == TRAIN_PER_CLASS).all()
        assert (stored["train_clean"] == fake_sources["clean"][index]).all()
        assert (stored["train_worse"] == fake_sources["worse"][index]).all()
        assert sorted(set(stored["ood_wnid"])) == sorted(OOD_WNIDS)  # the non-OOD class is left out
        assert stored["ood_images"].shape == (15, 32, 32, 3)
    # every stored image is the file of its own official index (its colour names the index)
    expected = np.array([_colour(i) for i in index], dtype=float)
    assert np.abs(images.reshape(len(index), -1, 3).mean(axis=1) - expected).max() < 3


def test_the_development_pool_holds_none_of_the_benchmarks_images(pool, fake_sources, tmp_path):
    """`extract-dev`: the training images the benchmark's pool left, per class, with their own labels; the test and
    OOD arrays the benchmark's; `build` makes its settings like the benchmark's."""
    bench_path, _ = pool
    dev_path = tmp_path / "dev_pool.npz"
    snap = {key: GitSnapshot(*fake_sources[key]) for key in ("cifar10_images", "cifar10n")}
    provenance = natural_data.extract_dev(snap["cifar10_images"], snap["cifar10n"], bench_path, dev_path,
                                          train_per_class=FILES_PER_CLASS - TRAIN_PER_CLASS)  # fmt: skip
    assert provenance["shared_with_benchmark"] == 0
    assert json.loads(dev_path.with_suffix(".json").read_text())["pool_digest"] == provenance["pool_digest"]
    with np.load(bench_path) as bench, np.load(dev_path) as dev:
        index = dev["train_index"]
        assert not set(index) & set(bench["train_index"])
        assert (np.bincount(dev["train_clean"], minlength=10) == FILES_PER_CLASS - TRAIN_PER_CLASS).all()
        assert (dev["train_worse"] == fake_sources["worse"][index]).all()
        # each image is its own index's file: of all files' colours, its own is the nearest
        colours = np.array([_colour(i) for i in range(len(fake_sources["clean"]))], dtype=float)
        means = dev["train_images"].reshape(len(index), -1, 3).mean(axis=1)
        assert (np.abs(means[:, None] - colours[None]).sum(2).argmin(1) == index).all()
        for name in ("test_images", "test_label", "ood_images"):
            assert np.array_equal(dev[name], bench[name])
    meta = build(dev_path, "human", 10, tmp_path / "human_s10")
    assert meta["seed"] == 10 and meta["train_images"] == len(index)


def test_the_development_pool_can_hold_ood_photos_of_its_own(pool, fake_sources, tmp_path):
    """`extract-dev --tiny_imagenet`: no image shared with the benchmark's pool. The OOD photos are Tiny-ImageNet
    training photos of the OOD classes only, none of the benchmark's (validation) photos; the test images are
    CIFAR-10 test files the benchmark's test set does not hold; the training images are those of the pool without
    them; `build ood20` names the OOD photos as training photos in its ground truth."""
    bench_path, _ = pool
    snap = {key: GitSnapshot(*fake_sources[key]) for key in ("cifar10_images", "cifar10n", "tiny_imagenet")}
    plain, own = tmp_path / "plain.npz", tmp_path / "own.npz"
    per_class = FILES_PER_CLASS - TRAIN_PER_CLASS
    natural_data.extract_dev(snap["cifar10_images"], snap["cifar10n"], bench_path, plain, train_per_class=per_class)
    provenance = natural_data.extract_dev(snap["cifar10_images"], snap["cifar10n"], bench_path, own,
                                          train_per_class=per_class, tiny_imagenet=snap["tiny_imagenet"],
                                          ood_per_class=4, test_per_class=1)  # fmt: skip
    assert "tiny_imagenet" in provenance["sources"] and provenance["shared_test_images"] == 0
    with np.load(bench_path) as bench, np.load(plain) as first, np.load(own) as dev:
        for name in ("train_images", "train_index", "train_worse"):
            assert np.array_equal(dev[name], first[name])
        assert not set(dev["ood_source"]) & set(bench["ood_source"])
        assert not set(dev["test_source"]) & set(bench["test_source"])
        assert (np.bincount(dev["test_label"], minlength=10) == 1).all()
        # each test image is its file: the fixture paints test/<class c>/<k>.jpg (20 c, 10 k, 200)
        for image, source, label in zip(dev["test_images"], dev["test_source"], dev["test_label"], strict=True):
            k = int(Path(str(source)).stem)
            assert source.startswith(f"test/{CLASSES[label]}/")
            assert np.abs(image.reshape(-1, 3).mean(0) - (20 * label, 10 * k, 200)).max() < 4
        assert sorted(set(dev["ood_wnid"])) == sorted(OOD_WNIDS)  # not the Egyptian cat
        assert dev["ood_images"].shape == (4 * len(OOD_WNIDS), 32, 32, 3)
        # each photo is its own file: its blue channel names the class (40 * w), green its number (10 * k)
        for image, source, wnid in zip(dev["ood_images"], dev["ood_source"], dev["ood_wnid"], strict=True):
            w, k = OOD_WNIDS.index(wnid), int(Path(str(source)).stem.split("_")[1])
            assert np.abs(image.reshape(-1, 3).mean(0) - (5, 10 * k, 40 * w)).max() < 4
    # a tiny pool: 5 images, so ood20 takes round(0.25 * 10) = 2 OOD photos
    build(own, "ood20", 10, tmp_path / "ood20_s10")
    with open(tmp_path / "ood20_s10" / "ground_truth.csv", newline="") as handle:
        sources = [row["source"] for row in csv.DictReader(handle) if row["is_ood"] == "1"]
    assert sources and all(source.startswith("tiny-imagenet-train:") for source in sources)


def test_re_extracting_without_the_optional_checks_keeps_the_ones_recorded_for_the_same_pool(fake_sources, tmp_path):
    """The committed PROVENANCE.json holds checks made with optional flags; re-running extract without them (as the
    benchmark's rebuild does) kept the pool but dropped the record. Kept now when the pool is the same, not else."""
    first = _extract(fake_sources, tmp_path / "pool.npz")
    record = tmp_path / "PROVENANCE.json"
    stored = json.loads(record.read_text())
    stored["content_check_aggre_label"] = [{"indices": "0-9", "difference": 0.03}]  # as if --content_check had run
    record.write_text(json.dumps(stored, indent=2) + "\n")
    again = _extract(fake_sources, tmp_path / "pool.npz", order_check=None)
    assert again["pool_digest"] == first["pool_digest"]
    assert again["order_check"] == first["order_check"]  # not run now: kept
    assert again["content_check_aggre_label"] == stored["content_check_aggre_label"]
    assert json.loads(record.read_text()) == again
    stored["pool_digest"] = "another pool"  # a record of a different pool is not carried into this one
    record.write_text(json.dumps(stored))
    assert "content_check_aggre_label" not in _extract(fake_sources, tmp_path / "pool.npz", order_check=None)


def test_extract_refuses_files_numbered_in_another_order(fake_sources, tmp_path):
    """Swap two files of one class: the class sizes still match, the pixel check does not."""
    git_dir, commit = fake_sources["cifar10_images"]
    work = Path(git_dir).parent
    clone = tmp_path / "swapped"
    subprocess.run(["git", "clone", "-q", str(work), str(clone)], check=True)
    name = CLASSES[fake_sources["clean"][0]]
    first, second = clone / f"train/{name}/0000.jpg", clone / f"train/{name}/0001.jpg"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    env = {**os.environ, "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", "-C", str(clone), "commit", "-qam", "swap"], check=True, env=env)
    swapped = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    with pytest.raises(ValueError, match="order check"):
        _extract(fake_sources, tmp_path / "pool.npz",
                 cifar10_images=GitSnapshot(str(clone / ".git"), swapped.strip()))  # fmt: skip


def _read_truth(out: Path) -> list[dict]:
    with open(out / "ground_truth.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("setting", natural_data.SETTINGS)
def test_build_folders_agree_with_the_ground_truth_and_the_setting(pool, fake_sources, tmp_path, setting):
    path, _ = pool
    meta = build(path, setting, 1, tmp_path / setting)
    rows = _read_truth(tmp_path / setting)
    files = sorted(p.relative_to(tmp_path / setting / "train").as_posix()
                   for p in (tmp_path / setting / "train").rglob("*.png"))  # fmt: skip
    assert [row["path"] for row in rows] == files  # one row per training file, nothing else
    for row in rows:
        assert row["path"].split("/")[0] == CLASSES[int(row["given_label"])]  # the folder is the given label
        assert (row["is_ood"] == "1") == (row["true_label"] == "-1") == row["source"].startswith("tiny-imagenet")
    in_dist = [row for row in rows if row["is_ood"] == "0"]
    true = np.array([int(row["true_label"]) for row in in_dist])
    given = np.array([int(row["given_label"]) for row in in_dist])
    assert (np.bincount(true, minlength=10) == TRAIN_PER_CLASS).all()
    test_files = list((tmp_path / setting / "test").rglob("*.png"))
    assert len(test_files) == 2 * len(CLASSES) == meta["test_images"]

    ood = len(rows) - len(in_dist)
    if setting == "human":
        with np.load(path) as stored:
            by_index = dict(zip(stored["train_index"].tolist(), stored["train_worse"].tolist(), strict=True))
        assert all(int(r["given_label"]) == by_index[int(r["source"].split(":")[1])] for r in in_dist)
        assert ood == 0
    elif setting.startswith("asym"):
        rate = int(setting[4:]) / 100
        for source, target in CONFUSIONS.items():
            wrong = given[true == source] != source
            assert wrong.mean() == pytest.approx(rate)  # exactly the rate of each confusable class
            assert (given[true == source][wrong] == target).all()  # and only to its natural confusion
        others = [c for c in range(10) if c not in CONFUSIONS]
        assert (given[np.isin(true, others)] == true[np.isin(true, others)]).all()
        assert ood == 0
    else:
        assert (given == true).all()
        assert ood / len(rows) == pytest.approx(natural_data.OOD_FRACTION, abs=0.02)
    assert meta["ood_images"] == ood and meta["train_images"] == len(rows)
    assert meta["label_errors_all"] == pytest.approx(np.mean([r["true_label"] != r["given_label"] for r in rows]),
                                                     abs=1e-4)  # fmt: skip


def test_build_is_a_function_of_setting_and_seed(pool, tmp_path):
    path, _ = pool
    same = [_read_truth(tmp_path / name) for name in ("a", "b") if build(path, "asym40", 3, tmp_path / name)]
    other = build(path, "asym40", 4, tmp_path / "c") and _read_truth(tmp_path / "c")
    assert same[0] == same[1]
    # the rows are sorted by path, whose folder is the given label: compare which image went where
    assert {r["path"] for r in other} != {r["path"] for r in same[0]}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert natural_data.main(["build", "--setting", "human", "--out", str(tmp_path / "x"),
                              "--pool", str(tmp_path / "missing.npz")]) == 2  # fmt: skip
    assert natural_data.main(["extract", "--cifar10n", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)


def test_loaded_training_set_follows_the_image_folder_reader(pool, tmp_path):
    """Row i of the ground truth is image i of `training.data.image_folder` on the same folder (positional report ids)."""
    from training.data.image_folder import read_image_folder

    path, _ = pool
    build(path, "ood20", 0, tmp_path / "ood20")
    dataset, id2label = natural_data.load_training_set(tmp_path / "ood20")
    files, labels, class_names = read_image_folder(tmp_path / "ood20" / "train")
    assert class_names == list(id2label.values())
    assert [Path(f).relative_to(tmp_path / "ood20" / "train").as_posix() for f in files] == dataset["path"]
    assert labels == dataset["label"]
    assert sum(dataset["is_ood"]) == sum(t == -1 for t in dataset["true_label"]) > 0


def test_label_noise_benchmark_reads_a_built_setting_for_its_own_seed_only(pool, tmp_path):
    """`label_noise_benchmark.py --natural_dir`: the cleanlab comparison trains and scores on the built folder, and
    refuses a folder built for another seed (its noise draw would not be the run's)."""
    import argparse

    import label_noise_benchmark

    path, _ = pool
    build(path, "asym20", 2, tmp_path / "asym20_s2")
    args = argparse.Namespace(natural_dir=tmp_path / "asym20_s2", num_train=4000)
    dataset, id2label = label_noise_benchmark.noisy_data(2, args)
    assert list(id2label.values()) == list(CLASSES)
    assert dataset["path"] == [row["path"] for row in _read_truth(tmp_path / "asym20_s2")]
    assert {"image", "label", "sample_id", "true_label", "is_ood"} <= set(dataset.column_names)
    with pytest.raises(SystemExit, match="built for seed 2, not --seed 0"):
        label_noise_benchmark.noisy_data(0, args)


def test_natural_benchmark_plans_every_run_with_the_pinned_recipe(tmp_path, capsys):
    import natural_benchmark

    assert natural_benchmark.main(["plan", "--built_dir", str(tmp_path / "b"), "--results_dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # seeds x settings x (3 accuracy + 2 detection runs), 4 reports; then the own-data rows, after all of them; then
    # the queue_vote rows (demo recipe, every setting), then the own-data recipe with its small-image rule
    # then the noise report's MoPro run with the adaptive schedule, every setting; then the own-data recipe as a user
    # gets it since the length rule
    assert len(lines) == 3 * 4 * (3 + 2) + 4 + 3 * 2 * 2 + 3 * 4 + 3 * 2 * 2 + 3 * 4 + 3 * 2 * 2
    adaptive, own_length = lines[100:112], lines[112:]
    lines, own, vote, own_os16 = lines[:64], lines[64:76], lines[76:88], lines[88:100]
    assert all("label_noise_benchmark.py train --method mopro --correction_schedule adaptive" in line
               and f"_s{line.split('--seed ')[1].split()[0]} " in line for line in adaptive)  # fmt: skip
    assert sorted(line.split("--results_dir ")[1].removeprefix(str(tmp_path)) for line in adaptive) == sorted(
        f"/detection/{setting}" for _ in range(3) for setting in ("human", "asym20", "asym40", "ood20"))  # fmt: skip
    assert all("training/configs/demo.yaml" in line and "--num_train_epochs 30 --lr_milestones 15 25" in line
               and "--noise_correction_rule queue_vote" in line and line.endswith("mopro_queue_vote --overwrite_output_dir "
               "true --noise_correction_rule queue_vote --queue_vote_k 50 --queue_vote_weight 0.5 "
               "--pseudo_label_threshold 0.6") for line in vote)  # fmt: skip
    assert sorted(line.split("--output_dir ")[1].split()[0].removeprefix(str(tmp_path)) for line in vote) == sorted(
        f"/accuracy/{setting}_s{seed}/mopro_queue_vote" for seed in range(3)
        for setting in ("human", "asym20", "asym40", "ood20"))  # fmt: skip
    accuracy = [line for line in lines if "run_mopro.py" in line]
    assert len(accuracy) == 36
    assert all("training/configs/demo.yaml" in line and "--num_train_epochs 30 --lr_milestones 15 25" in line
               for line in accuracy)  # fmt: skip
    assert sum("--noise_correction_schedule fixed --noise_correction_start_epoch 4" in line for line in accuracy) == 12
    assert all(f"_s{line.split('--seed ')[1].split()[0]}/" in line for line in accuracy)  # data of the run's seed
    # the own-data recipe: no YAML and no recipe flag (its own image size), human and ood20, CE and MoPro: at the 40
    # epochs it had before the length rule, again with the small-image rule's dilated last stage, and as a user gets it
    forty = "--num_train_epochs 40 --lr_milestones 18 36"
    for rows, version, flag, epochs in ((own, "own", "", forty), (own_length, "own_length", "", ""),
                                        (own_os16, "own_os16", '--backbone_kwargs {"output_stride": 16}', forty)):
        assert all("run_mopro.py --train_dir" in line and ".yaml" not in line and (epochs in line)
                   and ("--num_train_epochs" in line) == bool(epochs)
                   and f"_s{line.split('--seed ')[1].split()[0]}/" in line for line in rows)  # fmt: skip
        assert all(("--backbone_kwargs" in line) == bool(flag) and flag in line for line in rows)
        outputs = sorted(line.split("--output_dir ")[1].split()[0].removeprefix(str(tmp_path)) for line in rows)
        assert outputs == sorted(f"/accuracy/{setting}_s{seed}/{version}_{method}" for seed in range(3)
                                 for setting in ("human", "ood20") for method in ("ce", "mopro_adaptive"))  # fmt: skip
        assert sum("--baseline ce" in line for line in rows) == 6


def test_natural_benchmark_run_skips_finished_jobs_and_counts_failures(tmp_path):
    import natural_benchmark
    from natural_benchmark import Job

    def job(name, code, marker):
        return Job(name, (sys.executable, "-c", code), tmp_path / marker)

    (tmp_path / "finished").write_text("")
    made = tmp_path / "made"
    jobs = [
        job("finished", "raise SystemExit(3)", "finished"),  # skipped: its marker exists
        job("ok", f"open({str(made)!r}, 'w').write('1')", "ok_marker"),
        job("broken", "raise SystemExit(3)", "broken_marker"),
        job("report_x", "print('report')", "report_marker"),  # reports always run, after training
    ]
    assert natural_benchmark.run(jobs, lanes=2, log_dir=tmp_path / "logs") == 1
    assert made.read_text() == "1"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["broken.log", "ok.log", "report_x.log"]
    assert (tmp_path / "logs" / "report_x.log").read_text().strip() == "report"


def test_natural_benchmark_only_keeps_the_jobs_whose_name_matches(tmp_path, capsys):
    import natural_benchmark

    where = ["--built_dir", str(tmp_path / "b"), "--results_dir", str(tmp_path)]
    assert natural_benchmark.main(["plan", *where, "--only", "accuracy_*_own_length_*"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 12 and all("/own_length_" in row for row in rows)  # human and ood20, 3 seeds, CE and MoPro
    assert natural_benchmark.main(["plan", *where, "--only", "report_*", "--only", "accuracy_ood20_s2_own_ce"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4 + 1
    assert natural_benchmark.main(["run", *where, "--only", "accuracy_nothing"]) == 2
    assert capsys.readouterr().err.strip() == "error: no job's name matches --only accuracy_nothing"


def test_natural_benchmark_run_without_data_is_a_one_line_error(tmp_path, capsys):
    import natural_benchmark

    code = natural_benchmark.main(["run", "--built_dir", str(tmp_path / "b"), "--results_dir", str(tmp_path),
                                   "--pool", str(tmp_path / "missing.npz")])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: ")


def test_label_noise_plot_draws_a_setting_without_ood_images(tmp_path):
    """On `human` and `asym*` no OOD image exists, so OOD AUROC is None for every method: the plot marks that panel
    instead of failing (it raised on an empty min() before)."""
    import label_noise_benchmark

    scores = {name: {0: {"label_error_f1": 0.5, "ood_auroc": None, "label_quality_auroc": 0.6}}
              for name in label_noise_benchmark.METHODS}  # fmt: skip
    label_noise_benchmark.plot(scores, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_human_label_signal_separates_a_right_map_from_a_mixed_up_one():
    """Images with a wrong human label lean towards that label's class: the right map shows it in every batch, a
    map mixed up within classes in one batch shows it in the other batch only."""
    rng = np.random.default_rng(0)
    clean = np.repeat(np.arange(10), 200)
    rng.shuffle(clean)
    human = clean.copy()
    wrong = rng.choice(len(clean), 400, replace=False)
    human[wrong] = (clean[wrong] + 1 + rng.integers(0, 9, len(wrong))) % 10
    centres = rng.normal(size=(10, 16))
    features = centres[clean] + 0.9 * rng.normal(size=(len(clean), 16))
    features[wrong] += 0.6 * centres[human[wrong]]  # the look of what people saw
    features /= np.linalg.norm(features, axis=1, keepdims=True)

    right = natural_data.human_label_signal(features, clean, human, batch=1000)
    assert [r["indices"] for r in right] == ["0-999", "1000-1999"]
    assert all(r["difference"] > 4 * r["standard_error"] for r in right)

    mixed = features.copy()  # batch 2: each image's file swapped with another of its class in that batch
    for c in range(10):
        members = 1000 + np.flatnonzero(clean[1000:] == c)
        mixed[members] = features[rng.permutation(members)]
    result = natural_data.human_label_signal(mixed, clean, human, batch=1000)
    assert result[0]["difference"] > 4 * result[0]["standard_error"]
    assert abs(result[1]["difference"]) < 3 * result[1]["standard_error"]


def test_small_image_dev_runs_compare_what_they_name(tmp_path):
    """Each development run gets the net its variant names, parsed as run_mopro parses it (while the small-image rule
    was the own-data default, a baseline run without an explicit `--backbone_kwargs {}` ran with stride 16)."""
    import small_image_dev

    from training.arguments import parse_args

    folder = tmp_path / "dev"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (folder / split / name).mkdir(parents=True)
            Image.new("L", (28, 28)).save(folder / split / name / "0.png")
    expected = {"stride32": ({}, 32), "stride16": ({"output_stride": 16}, 32), "upsample64": ({}, 64)}
    jobs = small_image_dev.jobs(folder, tmp_path / "out")
    assert len(jobs) == len(small_image_dev.RUNS) == 9
    for job, (variant, method, _) in zip(jobs, small_image_dev.RUNS, strict=True):
        model_args, _, training_args = parse_args(list(job.argv[2:]))
        assert (json.loads(model_args.backbone_kwargs), model_args.image_size) == expected[variant]
        assert training_args.num_train_epochs == 12 and (training_args.baseline == "ce") == (method == "ce")


def test_run_length_rows_pair_each_run_with_its_recipe_rows(tmp_path):
    """`bench/natural_run_length.py`: each `<setting>_s<seed>_own120_<method>` run is paired with the same setting,
    seed and method at 40 epochs and in the demo recipe; an unfinished run is refused, other folders are ignored."""
    import natural_run_length

    from bench.render_benchmarks import RENDERERS

    def run(name: str, accuracies: list[float], start: int = -1) -> None:
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        history = [{"epoch": e + 1, "eval_accuracy": a} for e, a in enumerate(accuracies)]
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        results = {"eval_accuracy": accuracies[-1], "epoch": 120, "train_runtime": 9.0,
                   "train_noise_correction_start_epoch": start}  # fmt: skip
        (folder / "all_results.json").write_text(json.dumps(results))

    run("human_s0_own120_ce", [0.40, 0.45, 0.43])
    run("human_s0_own120_mopro", [0.30, 0.44, 0.48], start=2)
    (tmp_path / "runs" / "notes").mkdir()
    natural = {"accuracy": {"human": {"0": {"own_ce": {"final": 0.40}, "ce": {"final": 0.35},
                                            "own_mopro_adaptive": {"final": 0.38}, "mopro_adaptive": {"final": 0.36}}}}}  # fmt: skip
    rows = natural_run_length.collect(tmp_path / "runs", natural)
    assert [(r["method"], r["final"], r["best"], r["best_epoch"], r["correction_start_epoch"]) for r in rows] == [
        ("ce", 0.43, 0.45, 2, None), ("mopro", 0.48, 0.48, 3, 2)]  # fmt: skip
    assert rows[1]["own_data_40"] == {"final": 0.38} and rows[1]["demo_recipe"] == {"final": 0.36}
    table = RENDERERS["natural_run_length"].render(
        {"epochs": 120, "runs": rows, "commit": "abc", "date": "2026-12-05", "command": "x"}
    )
    assert "| human | 0 | MoPro | 48.00 (48.00, 3) | 2 | +10.00 | +12.00 | +5.00 |" in table
    (tmp_path / "runs" / "human_s1_own120_ce").mkdir()  # started, not finished
    with pytest.raises(SystemExit, match="has not finished"):
        natural_run_length.collect(tmp_path / "runs", natural)


def test_length_rule_dev_runs_choose_the_fewest_steps_within_a_point_of_the_best(tmp_path):
    """`natural_run_length.py --dev`: per setting and seed with MoPro at 3 lengths or more, the fewest steps whose final
    accuracy is within 1 point of the best; a setting with fewer lengths chooses nothing; CE runs never choose."""
    import natural_run_length

    from bench.render_benchmarks import RENDERERS

    def run(name: str, final: float, steps: int) -> None:
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        state = {"global_step": steps, "log_history": [{"epoch": 1, "eval_accuracy": final}]}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        results = {"eval_accuracy": final, "epoch": 1, "train_noise_correction_start_epoch": -1}
        (folder / "all_results.json").write_text(json.dumps(results))

    for epochs, final in ((40, 0.40), (80, 0.455), (120, 0.46), (160, 0.452)):
        run(f"human_s10_e{epochs}_mopro", final, 23 * epochs)
    run("human_s10_e160_ce", 0.60, 23 * 160)  # a CE run above every MoPro one: not a candidate
    run("ood20_s10_e40_mopro", 0.40, 29 * 40)
    run("ood20_s10_e120_mopro", 0.50, 29 * 120)
    rows = natural_run_length.collect_dev(tmp_path / "runs")
    assert len(rows) == 7 and {r["steps"] for r in rows if r["setting"] == "ood20"} == {1160, 3480}
    assert natural_run_length.fewest_steps_reaching_the_best(rows) == {"human_s10": 23 * 80}
    table = RENDERERS["run_length_dev"].render({"runs": rows, "commit": "abc", "date": "2026-12-05", "command": "x",
                                                "tolerance": 0.01, "fewest_steps_reaching_the_best": {"human_s10": 1840}})
    assert "| human | 10 | MoPro | 80 | 1840 | 45.50 |" in table and "human_s10: 1840 steps" in table
