"""Which config a `run_mopro.py` command gets without a YAML file (issue 24): the own-data recipe for the user's
images (`--train_dir`, `--dataset_name`), the demo's for the no-argument command; an explicit YAML and the command
line win; the resolution and length rules on generated folders; and the sources as the run logs them and the plan
prints them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from training import plan as plan_module
from training.own_data import (
    MAX_TRAIN_EPOCHS,
    MIN_TRAIN_STEPS,
    OWN_DATA_CONFIG,
    choose_image_size,
    epochs_for,
    image_size_for,
    milestones_for,
)
from training.run_mopro import DEMO_CONFIG, main, parse_args


def write_images(root: Path, sizes: list[tuple[int, int]], classes=("cat", "dog")) -> Path:
    """`root/<class>/<k>.png`, one image per (width, height) in `sizes` for every class."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for k, (width, height) in enumerate(sizes):
            pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> Path:
    """CIFAR-size photos: 32 x 32."""
    return write_images(tmp_path_factory.mktemp("small") / "train", [(32, 32)] * 3)


@pytest.fixture(scope="module")
def large_images(tmp_path_factory) -> Path:
    """Photos: shorter sides 240-375 px (one small outlier, which the median ignores)."""
    return write_images(tmp_path_factory.mktemp("large") / "train", [(320, 240), (500, 375), (40, 30), (256, 256)])


def sources(model_args) -> dict[str, tuple[str, ...]]:
    return {source.name: source.fields for source in model_args.config_sources}


def own_data_yaml() -> dict:
    return yaml.safe_load(OWN_DATA_CONFIG.read_text())


# ------------------------------------------------------------------------------------------ the resolution rule
@pytest.mark.parametrize(
    ("shorter_sides", "expected"),
    [([32] * 5, 32), ([20, 28], 32), ([63], 32), ([64, 64, 70], 64), ([100], 96), ([224], 224), ([375, 500], 224),
     ([32, 32, 32, 500, 500], 32), ([32, 500, 500], 224)],
)  # fmt: skip
def test_image_size_rule(shorter_sides, expected):
    """The median shorter side, down to a multiple of 32, within 32-224."""
    assert image_size_for(shorter_sides) == expected


def test_rule_on_generated_folders(small_images, large_images):
    from training.data.sources import DataArguments

    small = choose_image_size(DataArguments(train_dir=str(small_images)))
    assert (small.image_size, small.median_shorter_side, small.num_images) == (32, 32, 6)
    large = choose_image_size(DataArguments(train_dir=str(large_images)))
    # shorter sides 240, 375, 30, 256 in each class: median 248 -> 224, the cap
    assert (large.image_size, large.median_shorter_side, large.num_images) == (224, 248, 8)
    assert f"--train_dir {large_images}" in large.describe()


def test_rule_passes_over_unreadable_files_and_falls_back_when_none_is_readable(tmp_path):
    folder = write_images(tmp_path / "mixed", [(64, 64), (64, 80)])
    (folder / "cat" / "broken.png").write_bytes(b"not an image")
    choice = choose_image_size(parse_args(["--train_dir", str(folder)])[1])
    assert (choice.image_size, choice.num_images) == (64, 4)
    for name in ("a", "b"):
        (tmp_path / "garbage" / name).mkdir(parents=True)
        (tmp_path / "garbage" / name / "0.jpg").write_bytes(b"garbage")
    model_args, _, _ = parse_args(["--train_dir", str(tmp_path / "garbage")])
    assert model_args.image_size == own_data_yaml()["image_size"] == 224  # the YAML's, and the log says why
    assert "resolution rule" not in sources(model_args)
    assert "no training image could be read" in model_args.config_sources[0].why


# ------------------------------------------------------------------------------------------ the length rule
LENGTH_FIELDS = ("num_train_epochs", "lr_milestones")


@given(st.integers(1, 5_000_000), st.sampled_from([32, 64, 128, 256, 1024]), st.integers(1, 300))
def test_length_rule_trains_the_fewest_epochs_that_reach_the_step_budget(num_images, batch, recipe_epochs):
    """Never fewer epochs than the recipe's; beyond them, the fewest that make `MIN_TRAIN_STEPS` steps (one fewer
    would not), unless the cap stops it first."""
    epochs = epochs_for(num_images, batch, recipe_epochs)
    steps = max(num_images // batch, 1)
    assert epochs >= recipe_epochs
    if epochs > recipe_epochs:
        assert epochs <= MAX_TRAIN_EPOCHS
        assert epochs == MAX_TRAIN_EPOCHS or (epochs * steps >= MIN_TRAIN_STEPS > (epochs - 1) * steps)
    else:  # the recipe's epochs already reach the budget, or the cap is not above them
        assert recipe_epochs * steps >= MIN_TRAIN_STEPS or recipe_epochs >= MAX_TRAIN_EPOCHS


def test_length_rule_on_the_benchmark_sizes():
    """The recipe's 40 epochs for data that already makes the steps; more for a few thousand images; the
    learning-rate steps at the recipe's place (18 and 36 of 40)."""
    assert epochs_for(100_000, 128, 40) == 40
    assert epochs_for(3000, 128, 40) == -(-MIN_TRAIN_STEPS // 23) > 40  # 23 steps an epoch
    assert epochs_for(10, 128, 40) == MAX_TRAIN_EPOCHS  # one (partial) batch an epoch: the cap
    assert milestones_for(40) == (18, 36) and milestones_for(120) == (54, 108) and milestones_for(10) == (4.5, 9)


def sources_why(model_args) -> dict[str, str]:
    return {source.name: source.why for source in model_args.config_sources}


def test_length_rule_sizes_the_run_from_the_folder_and_the_command_line_wins(small_images, large_images):
    """6 images: one step an epoch at 128 a step, so the cap; the epochs or the learning-rate steps given on the
    command line stand aside the rule (the epochs given carry the recipe's steps with them), and so does a loaded
    model or `--max_steps`."""
    model_args, _, training_args = parse_args(["--train_dir", str(small_images)])
    assert training_args.num_train_epochs == MAX_TRAIN_EPOCHS
    assert training_args.lr_milestones == list(milestones_for(MAX_TRAIN_EPOCHS))
    found = sources(model_args)
    assert found["length rule"] == LENGTH_FIELDS and not set(LENGTH_FIELDS) & set(found["own_data.yaml"])
    assert f"6 images of --train_dir {small_images} at 128 a step: 1 steps an epoch" in sources_why(model_args)[
        "length rule"]  # fmt: skip

    model_args, _, training_args = parse_args(["--train_dir", str(large_images), "--max_train_samples", "3"])
    assert "3 images of --train_dir" in sources_why(model_args)["length rule"]  # 8 files, 3 of them trained on
    model_args, _, training_args = parse_args(["--train_dir", str(small_images), "--num_train_epochs", "10"])
    assert (training_args.num_train_epochs, training_args.lr_milestones) == (10, [4.5, 9])
    assert sources(model_args)["length rule"] == ("lr_milestones",)
    model_args, _, training_args = parse_args(["--train_dir", str(small_images), "--lr_milestones", "2", "3"])
    assert (training_args.num_train_epochs, training_args.lr_milestones) == (40, [2, 3])
    assert "length rule" not in sources(model_args)
    model_args, _, training_args = parse_args(["--train_dir", str(small_images), "--max_steps", "5"])
    assert training_args.num_train_epochs == 40 and "length rule" not in sources(model_args)
    # the demo's config and an explicit YAML other than the own-data one: no rule
    model_args, _, training_args = parse_args([str(DEMO_CONFIG), "--train_dir", str(small_images)])
    assert training_args.num_train_epochs == yaml.safe_load(DEMO_CONFIG.read_text())["num_train_epochs"]
    assert "length rule" not in sources(model_args)


@pytest.mark.parametrize(
    ("argv", "past"),
    [(["--num_train_epochs", "5"], "lr_milestones 10, 17 lie at or past the run's 5 epochs"),  # demo.yaml's 10, 17
     (["--num_train_epochs", "12"], "lr_milestones 17 lie at or past"), (["--num_train_epochs", "18"], ""),
     (["--num_train_epochs", "5", "--lr_milestones", "2", "4"], ""), (["--max_steps", "3"], "")],
)  # fmt: skip
def test_learning_rate_steps_past_the_run_are_named(argv, past):
    """Any recipe: its steps at or past the epochs given would leave the rate unchanged all run, silently."""
    from training.arguments import milestones_past_the_run

    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    assert demo["lr_milestones"] == [10, 17]  # what the expected messages assume
    warning = milestones_past_the_run(parse_args(argv)[2])
    assert (past in warning) if past else warning == ""


def test_both_rules_list_the_folder_once(small_images, monkeypatch):
    """The resolution and length rules read one listing of `--train_dir` (a folder of millions of files takes seconds
    to list, in every process of a launch)."""
    from training import own_data

    calls = []
    listed = own_data.read_image_folder

    def counting(root, *args, **kwargs):
        calls.append(root)
        return listed(root, *args, **kwargs)

    monkeypatch.setattr(own_data, "read_image_folder", counting)
    model_args, _, _ = parse_args(["--train_dir", str(small_images)])
    assert {"resolution rule", "length rule"} <= set(sources(model_args))
    assert calls == [str(small_images)]


def test_length_rule_stands_aside_for_streamed_data_and_says_so(tmp_path):
    root = tmp_path / "my_dataset"
    write_images(root / "train", [(64, 64)] * 3)
    model_args, _, training_args = parse_args(["--dataset_name", str(root), "--streaming", "true"])
    assert training_args.num_train_epochs == own_data_yaml()["num_train_epochs"]
    assert "length rule" not in sources(model_args)
    assert "size is unknown before it is read" in model_args.config_sources[0].why
    model_args, _, training_args = parse_args(["--dataset_name", str(root)])  # not streamed: 6 rows
    assert training_args.num_train_epochs == MAX_TRAIN_EPOCHS and "length rule" in sources(model_args)


# ------------------------------------------------------------------------------------------ which config
def test_the_readme_demo_command_keeps_the_demo_config():
    """`accelerate launch --cpu training/run_mopro.py` passes no argument: the demo, its config unchanged."""
    for argv in ([], ["--num_train_epochs", "2"]):
        model_args, data_args, training_args = parse_args(argv)
        assert Path(model_args.config_file).resolve() == DEMO_CONFIG
        demo = yaml.safe_load(DEMO_CONFIG.read_text())
        assert model_args.image_size == demo["image_size"] == 32
        assert json.loads(model_args.backbone_kwargs) == demo["backbone_kwargs"]  # the half-width ResNet-18
        assert data_args.crop_min_scale == 1.0 and data_args.train_dir is None and data_args.dataset_name is None
        names = [source.name for source in model_args.config_sources]
        assert names[0] == "demo.yaml" and "resolution rule" not in names
        assert "the offline demo" in model_args.config_sources[0].why


def test_train_dir_without_yaml_gets_the_own_data_recipe(small_images, large_images):
    for folder, size in ((small_images, 32), (large_images, 224)):
        model_args, data_args, training_args = parse_args(["--train_dir", str(folder)])
        assert Path(model_args.config_file).resolve() == OWN_DATA_CONFIG
        # real photos: the official two views, a full-width ResNet-18, the adaptive schedule, the images' size
        assert data_args.crop_min_scale == 0.2
        assert model_args.backbone == "resnet18" and model_args.backbone_kwargs is None
        assert training_args.noise_correction_schedule == "adaptive"
        assert model_args.image_size == size
        found = sources(model_args)
        assert list(found) == ["own_data.yaml", "resolution rule", "length rule", "command line", "built-in defaults"]
        assert found["resolution rule"] == ("image_size",) and "image_size" not in found["own_data.yaml"]
        assert set(found["own_data.yaml"]) == set(own_data_yaml()) - {"image_size", *LENGTH_FIELDS}
        assert found["command line"] == ("train_dir",)
        assert "--train_dir given" in model_args.config_sources[0].why


def test_dataset_name_without_yaml_gets_the_own_data_recipe(tmp_path):
    """A tiny local `datasets` folder (imagefolder layout with a train split), offline."""
    root = tmp_path / "my_dataset"
    write_images(root / "train", [(64, 80), (96, 64), (64, 64)])
    model_args, data_args, _ = parse_args(["--dataset_name", str(root)])
    assert Path(model_args.config_file).resolve() == OWN_DATA_CONFIG
    assert model_args.image_size == 64 and data_args.crop_min_scale == 0.2
    assert f"--dataset_name {root}" in model_args.config_sources[1].why


def test_an_explicit_yaml_wins(large_images):
    model_args, data_args, _ = parse_args([str(DEMO_CONFIG), "--train_dir", str(large_images)])
    assert Path(model_args.config_file).resolve() == DEMO_CONFIG
    assert model_args.image_size == 32 and data_args.crop_min_scale == 1.0  # the demo's, not the rule's 224
    assert [source.name for source in model_args.config_sources] == ["demo.yaml", "command line", "built-in defaults"]
    assert model_args.config_sources[0].why == "the YAML file given"
    # the own-data YAML named explicitly: the rule still sizes the images
    model_args, _, _ = parse_args([str(OWN_DATA_CONFIG), "--train_dir", str(large_images)])
    assert model_args.image_size == 224 and "resolution rule" in sources(model_args)


def test_command_line_flags_win_over_both(large_images, tmp_path):
    flags = ["--image_size", "64", "--backbone", "resnet34", "--num_train_epochs", "3", "--crop_min_scale", "0.5"]
    model_args, data_args, training_args = parse_args(["--train_dir", str(large_images), *flags])
    assert (model_args.image_size, model_args.backbone, training_args.num_train_epochs) == (64, "resnet34", 3)
    assert data_args.crop_min_scale == 0.5
    found = sources(model_args)
    assert "resolution rule" not in found  # --image_size given: no image is read for it
    assert {"image_size", "backbone", "num_train_epochs", "crop_min_scale"} <= set(found["command line"])
    assert not {"image_size", "backbone", "num_train_epochs", "crop_min_scale"} & set(found["own_data.yaml"])
    model_args, _, training_args = parse_args([str(DEMO_CONFIG), "--num_train_epochs", "3"])
    assert training_args.num_train_epochs == 3 and "num_train_epochs" not in sources(model_args)["demo.yaml"]


# ------------------------------------------------------------------------------------------ log and plan
def test_the_run_logs_one_line_per_source(tmp_path, caplog):
    """Logged at start, after the argument and folder checks (whose errors stay one line) and before the data is
    read: here the run stops at its first data check, a training set of one class."""
    folder = write_images(tmp_path / "train", [(32, 32)] * 3, classes=("only",))
    caplog.set_level(logging.INFO, logger="training")
    with pytest.raises(ValueError, match="the training data has 1 class"):
        main(["--train_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config: ")]
    assert [line.split(" (", 1)[0] for line in lines] == [
        "config: own_data.yaml", "config: resolution rule", "config: length rule", "config: command line",
        "config: built-in defaults"
    ]  # fmt: skip
    assert "median shorter side 32 px of 3 images" in lines[1] and lines[1].endswith(": image_size")
    assert "3 images of --train_dir" in lines[2] and lines[2].endswith(": num_train_epochs, lr_milestones")
    assert lines[3].endswith(": output_dir, train_dir, use_cpu")


def test_the_plan_prints_the_sources(small_images, capsys):
    result = plan_module.main(["--train_dir", str(small_images), "--num_processes", "1", "--json"])
    assert result["config"] == "training/configs/own_data.yaml"
    found = {source["name"]: source["fields"] for source in result["config_sources"]}
    assert found["resolution rule"] == ["image_size"] and found["command line"] == ["train_dir"]  # not the plan's
    assert found["length rule"] == list(LENGTH_FIELDS) and result["num_train_epochs"] == MAX_TRAIN_EPOCHS
    capsys.readouterr()
    plan_module.main(["--num_processes", "1"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "values from (a later source wins):"
    assert lines[1].startswith("  demo.yaml (no YAML file and no data source given: the offline demo): ")
    assert lines[2].startswith("  built-in defaults (") and "resolution rule" not in text
    assert "config                   training/configs/demo.yaml" in text


@pytest.mark.parametrize(
    "argv,config",
    [
        (["--webvision_dir", "/data/webvision"], "webvision_v1_r50.yaml"),
        (["--webvision_dir", "/data/webvision", "--webvision_version", "v2"], "webvision_v2_r50.yaml"),
        (["--webvision_dir=/data/webvision", "--webvision_version=v2"], "webvision_v2_r50.yaml"),
        (["--shard_dir", "/data/shards"], "own_data.yaml"),
    ],
)
def test_webvision_and_shards_without_yaml_never_get_the_demo_config(argv, config):
    """Every data source but the demo's own takes a recipe made for it: WebVision its official one (of the version
    given), shards the own-data recipe (224 px: shards are not sampled for the resolution rule), logged as such."""
    model_args, data_args, training_args = parse_args(argv)
    assert Path(model_args.config_file).name == config
    assert model_args.config_sources[0].name == config
    assert "no YAML file and --" in model_args.config_sources[0].why
    shipped = yaml.safe_load((DEMO_CONFIG.parent / config).read_text())
    assert model_args.image_size == shipped["image_size"] == 224 and model_args.backbone == shipped["backbone"]
