"""Issue 20: readers accept only regular files and count what they pass over, one image-geometry guard for every
decode, one image semantics, and arguments that cannot mean what was asked are refused with a line naming them.
The property-based tests generate folder layouts, file kinds, image geometries and flag combinations and check the
invariant: an error naming the input, or a counted skip, and no file changed that the user did not name."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from training.data.image_datasets import ImageLabelDataset, image_dataset
from training.data.image_folder import PASSED_OVER_REASONS, read_image_folder
from training.data.transforms import BadImageError, MoProViewTransforms, decode_image, decode_image_tensor

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def png(width: int = 12, height: int = 10, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.stat().st_size >= 0 and _regular(p)
    }


def _regular(path: Path) -> bool:
    import stat

    return stat.S_ISREG(os.lstat(path).st_mode)


class _Timeout(Exception):
    pass


def with_alarm(seconds: int, function, *args):
    """Run `function` with a SIGALRM guard, so that a hang (open() of a pipe) fails the test instead of blocking."""

    def ring(signum, frame):
        raise _Timeout(f"{function.__name__} blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        return function(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ the reader
def test_named_pipe_links_and_unknown_extensions_are_passed_over_and_counted(tmp_path, caplog):
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        (root / name / "0.png").write_bytes(png(seed=len(name)))
    os.mkfifo(root / "cat" / "x.png")  # a pipe named like an image: opening it blocks until a writer comes
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # dangling
    (root / "dog" / "loop").symlink_to(root / "dog")  # a link back into the class folder
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "1.png").write_bytes(png(seed=9))
    (root / "dog" / "more").symlink_to(tmp_path / "more")  # a linked sub-folder: followed
    with caplog.at_level("WARNING", logger="training.data.image_folder"):
        listing = read_image_folder(root)
    paths, labels, classes = listing
    assert classes == ["cat", "dog"] and labels == [0, 1, 1]
    assert [os.path.relpath(p, root) for p in paths] == ["cat/0.png", "dog/0.png", "dog/more/1.png"]
    assert listing.passed_over == {"extension": 1, "not a regular file": 1, "link": 2}
    assert "passed over 4 file(s)" in caplog.text and "x.png" in caplog.text
    # evaluation reads the same listing and keeps the counts for its results
    assert image_dataset("imagefolder", root, None).passed_over == listing.passed_over


def test_a_pipe_given_as_an_image_is_a_bad_image_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    for decode in (decode_image, decode_image_tensor):
        with pytest.raises(BadImageError, match="x.png.*not a regular file"):
            with_alarm(10, decode, str(tmp_path / "x.png"))


def test_a_dataset_root_with_split_folders_is_not_read_as_classes(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "0.png").write_bytes(png())
    with pytest.raises(ValueError, match=r"holds split folders \(train, val\), not class folders: pass the split"):
        read_image_folder(tmp_path)


# ------------------------------------------------------------------------------------------- image geometry
@pytest.mark.parametrize("decode", [decode_image, decode_image_tensor])
def test_a_100000_by_1_png_is_refused_before_it_is_resized(decode, tmp_path):
    path = tmp_path / "line.png"
    path.write_bytes(png(100_000, 1))
    assert path.stat().st_size < 400_000  # a small file ...
    with pytest.raises(BadImageError, match=r"line.png.*too large in one dimension: 100000 x 1"):
        decode(str(path))  # ... that the test view would have resized to 25.6M x 256 pixels (~26 GB at 224 px)
    dataset = ImageLabelDataset([str(path)], [0], ["line.png"], MoProViewTransforms(32).test)
    assert set(dataset[0]) == {"index"}  # a skip, logged and counted by the collators


MAX_PIXELS = 200_000  # generated images stay small in memory; the guard's ratio rule is what is exercised


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 4000), height=st.integers(1, 4000))
def test_every_geometry_is_decoded_to_a_bounded_view_or_refused_as_too_large(width, height):
    if width * height > MAX_PIXELS:
        height = max(1, MAX_PIXELS // width)
    data = png(width, height)
    try:
        image = decode_image(data)
    except BadImageError as error:
        assert "too large" in error.reason and max(width, height) > 50 * min(width, height)
        return
    assert image.size == (width, height) and max(width, height) <= 50 * min(width, height)
    assert MoProViewTransforms(32).test(image).shape == (3, 32, 32)


# --------------------------------------------------------------------------------- generated folder layouts
KINDS = ("png", "jpeg_garbage", "txt", "fifo", "dangling_link", "file_link", "dir_link", "nested_png")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=st.lists(st.lists(st.sampled_from(KINDS), min_size=0, max_size=5), min_size=1, max_size=4),
)
def test_generated_layouts_give_an_error_naming_the_input_or_a_full_count(layout, tmp_path_factory):
    root = tmp_path_factory.mktemp("layout") / "data"
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(png(seed=3))
    expected_paths, expected = [], dict.fromkeys(PASSED_OVER_REASONS, 0)
    for c, entries in enumerate(layout):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i, kind in enumerate(entries):
            path = folder / f"{i}.png"
            if kind == "png":
                path.write_bytes(png(seed=i))
                expected_paths.append(path)
            elif kind == "jpeg_garbage":  # read by the listing, refused at decode time
                path = path.with_suffix(".jpg")
                path.write_bytes(b"not a jpeg")
                expected_paths.append(path)
            elif kind == "txt":
                path.with_suffix(".txt").write_text("x")
                expected["extension"] += 1
            elif kind == "fifo":
                os.mkfifo(path)
                expected["not a regular file"] += 1
            elif kind == "dangling_link":
                path.symlink_to(root / "missing.png")
                expected["link"] += 1
            elif kind == "file_link":
                path.symlink_to(outside / "o.png")
                expected_paths.append(path)
            elif kind == "dir_link":  # followed once per class: a second link to the same folder is counted
                (folder / f"linked{i}").symlink_to(outside)
                if not any(kind == "dir_link" for kind in entries[:i]):
                    expected_paths.append(folder / f"linked{i}" / "o.png")
                else:
                    expected["link"] += 1
            elif kind == "nested_png":
                (folder / f"sub{i}").mkdir()
                (folder / f"sub{i}" / "n.png").write_bytes(png(seed=i))
                expected_paths.append(folder / f"sub{i}" / "n.png")
    before = snapshot(root.parent)
    try:
        listing = with_alarm(20, read_image_folder, root)
    except ValueError as error:  # only for a class folder left without any image: it is named
        assert "hold no image files" in str(error) and "class" in str(error)
        assert any(not any(str(p).startswith(f"{root}/class{c}/") for p in expected_paths) for c in range(len(layout)))
    else:
        paths, labels, classes = listing
        assert sorted(paths) == sorted(map(str, expected_paths)) and listing.passed_over == expected
        assert len(labels) == len(paths) and classes == [f"class{c}" for c in range(len(layout))]
    assert snapshot(root.parent) == before  # nothing the reader looked at was changed


# ------------------------------------------------------------------------------------------ image semantics
def test_exif_orientation_and_transparency_read_as_the_transformers_pipeline_reads_them(tmp_path):
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 50, 3)).astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    reference = np.asarray(load_image(str(tmp_path / "rotated.jpg")))
    assert reference.shape == (50, 30, 3)
    assert np.array_equal(np.asarray(decode_image(str(tmp_path / "rotated.jpg"))), reference)
    assert np.array_equal(decode_image_tensor(str(tmp_path / "rotated.jpg")).permute(1, 2, 0).numpy(), reference)
    palette = Image.fromarray(rng.integers(0, 4, (20, 20)).astype(np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    palette.save(tmp_path / "palette.png", transparency=3)
    reference = convert_to_rgb(load_image(str(tmp_path / "palette.png")), return_numpy=True)
    ours = np.asarray(decode_image(str(tmp_path / "palette.png")))
    assert np.array_equal(ours, reference) and (ours == 255).all(axis=2).any()  # transparent pixels are white


# ---------------------------------------------------------------------------------------------- arguments
def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("- a\n- b\n", r"holds a YAML list, not a mapping"),
        ("a: [1,\n", r"is not valid YAML"),
        ("eval_strategy: no\n", r"`eval_strategy: False` was read as a YAML boolean.*quote the value"),
    ],
)
def test_a_yaml_that_cannot_be_read_as_flags_is_one_line(tmp_path, yaml_text, expected):
    (tmp_path / "run.yaml").write_text(yaml_text)
    line = one_error_line(run_cli(str(REPO / "training" / "run_mopro.py"), "run.yaml", cwd=tmp_path))
    assert line.startswith("error: run.yaml") and __import__("re").search(expected, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_the_webvision_recipe_without_its_data_is_refused_not_run_on_the_demo(tmp_path):
    yaml_file = REPO / "training" / "configs" / "webvision_v1_r50.yaml"
    line = one_error_line(run_cli(str(REPO / "training" / "run_mopro.py"), str(yaml_file), "--use_cpu", "true",
                                  cwd=tmp_path))  # fmt: skip
    assert "gives no data source" in line and "--webvision_dir" in line
    assert list(tmp_path.iterdir()) == []


FLOAT_FLAGS = ("--learning_rate", "--weight_decay", "--alpha", "--temperature", "--lr_gamma")


@settings(max_examples=30, deadline=None)
@given(
    flag=st.sampled_from(FLOAT_FLAGS),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.1, 0.5]),
    max_steps=st.sampled_from([-1, 0, 1, 7]),
    epochs=st.sampled_from([0.0, 1.0, 2.5, float("nan")]),
)
def test_generated_flag_combinations_are_refused_naming_the_flag_or_train_at_least_one_step(
    flag, value, max_steps, epochs
):
    from training.run_mopro import parse_args

    argv = [f"{flag}={value}", f"--max_steps={max_steps}", f"--num_train_epochs={epochs}", "--use_cpu", "true"]
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ValueError as error:
        message = str(error)
        bad_float = not math.isfinite(value) or math.isnan(epochs)
        named = flag[2:] in message or "num_train_epochs" in message or "max_steps" in message
        assert named and (bad_float or max_steps == 0 or (max_steps < 0 and not epochs > 0)), message
        return
    assert math.isfinite(value) and not math.isnan(epochs)
    assert training_args.max_steps > 0 or training_args.num_train_epochs > 0


def test_fewer_than_two_classes_is_refused(tmp_path):
    from training.run_mopro import main

    (tmp_path / "data" / "only").mkdir(parents=True)
    for i in range(8):
        (tmp_path / "data" / "only" / f"{i}.png").write_bytes(png(seed=i))
    with pytest.raises(ValueError, match=r"the training data has 1 class \(only\): a classifier needs at least 2"):
        main(["--train_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- evaluation commands
@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from tests.fixtures_eval import save_tiny_model, write_image_folder

    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_model(root / "model")
    data = write_image_folder(root / "images", 3, ["a", "b", "c", "d"])
    return model, data


def test_classification_without_dataset_is_refused_not_filed_as_webvision(model_and_data, tmp_path):
    model, data = model_and_data
    line = one_error_line(run_cli("-m", "evaluation.classification", "--model_name_or_path", str(model), "--data_dir",
                                  str(data), "--output_dir", str(tmp_path / "o"), "--num_workers", "0", cwd=tmp_path))  # fmt: skip
    assert "--dataset is required" in line and not (tmp_path / "o").exists()


def test_knn_k_larger_than_the_data_is_refused(model_and_data):
    from evaluation import knn

    model, data = model_and_data
    with pytest.raises(ValueError, match=r"--k 200 is more than the 12 training samples"):
        knn.main(["--model_name_or_path", str(model), "--train_data_dir", str(data), "--data_dir", str(data),
                  "--dataset", "imagenet", "--num_workers", "0"])  # fmt: skip


def test_lowshot_shots_larger_than_a_class_are_refused():
    from evaluation.lowshot_svm import check_shots

    labels = np.array([0] * 8 + [1] * 5 + [2] * 9)
    check_shots(labels, [1, 5])
    with pytest.raises(ValueError, match=r"--shots 8: class b has only 5 training sample"):
        check_shots(labels, [1, 8], ["a", "b", "c"])


@pytest.mark.parametrize("break_model", ["truncated_weights", "num_labels", "device"])
def test_a_broken_model_folder_or_device_is_one_line(model_and_data, tmp_path, break_model):
    import shutil

    model, data = model_and_data
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    extra = []
    if break_model == "truncated_weights":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif break_model == "num_labels":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "num_labels": 7}))
    else:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a machine with a GPU has the device")
        extra = ["--device", "cuda"]
    line = one_error_line(run_cli("-m", "evaluation.classification", "--model_name_or_path", str(broken), "--data_dir",
                                  str(data), "--dataset", "x", "--num_workers", "0", *extra, cwd=tmp_path))  # fmt: skip
    assert line.startswith("error: ") and {"truncated_weights": "weights cannot be read",
                                           "num_labels": "num_labels 7 but id2label names 4",
                                           "device": "no cuda device"}[break_model] in line  # fmt: skip


def test_the_noise_report_never_writes_into_a_model_folder(model_and_data):
    from evaluation import noise_report

    model, data = model_and_data
    before = snapshot(model)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(FileExistsError, match="is a model folder"):
            noise_report.main(["--model_name_or_path", str(model), "--data_dir", str(data), "--output_dir",
                               str(model), "--num_workers", "0", *extra])  # fmt: skip
    assert snapshot(model) == before
