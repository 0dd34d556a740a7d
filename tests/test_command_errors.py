"""Every command ends a user error with one line on stderr and exit status 2 (`modeling_mopro.cli.run_command`), and
make_shards refuses bad input early: missing or empty input, a folder of earlier shards, a bad shard size."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from training.data.make_shards import main as make_shards_main

REPO_ROOT = Path(__file__).resolve().parent.parent
MISSING = "/nonexistent/mopro-model"


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, offline, single-threaded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MOPRO_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and exactly one `error:` line holding every fragment; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# One user error per command: a model or data path that does not exist.
COMMANDS = {
    "evaluation.classification": ["--model_name_or_path", MISSING, "--data_dir", MISSING],
    "evaluation.classifier_retrain": [
        *("--model_name_or_path", MISSING, "--output_dir", "/tmp/unused-crt"),
        *("--annotation", f"{MISSING}/pseudo_label.json", "--train_data_dir", MISSING),
    ],
    "evaluation.finetune": [
        *("--model_name_or_path", MISSING, "--output_dir", "/tmp/unused-finetune"),
        *("--train_data_dir", MISSING, "--data_dir", MISSING),
    ],
    "evaluation.knn": ["--model_name_or_path", MISSING, "--train_data_dir", MISSING, "--data_dir", MISSING],
    "evaluation.lowshot_svm": ["--model_name_or_path", MISSING, "--task", "voc07", "--data_dir", MISSING],
    "evaluation.noise_report": ["--model_name_or_path", MISSING, "--data_dir", MISSING],
    "evaluation.robustness": [
        *("--model_name_or_path", MISSING, "--data_dir", MISSING),
        *("--class_subset", f"{MISSING}/classes.txt"),
    ],
    "evaluation.release": ["--model_dir", MISSING, "--release_dir", "/tmp/unused-release"],
    "modeling_mopro.convert_original_checkpoint": [
        *("--checkpoint_path", f"{MISSING}/MoPro_V1_epoch90.tar", "--output_dir", "/tmp/unused-convert"),
    ],
    "training.data.make_shards": ["--image_folder", MISSING, "--output_dir", "/tmp/unused-shards"],
}


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_user_error_is_one_line_and_exit_status_2(module):
    assert_one_line_error(run_cli(module, *COMMANDS[module]), "nonexistent")


def test_release_command_names_the_fix(tmp_path):
    line = assert_one_line_error(
        run_cli("evaluation.release", "--model_dir", str(tmp_path), "--release_dir", str(tmp_path / "out")),
        str(tmp_path),
        "config.json",
    )
    assert "run_mopro" in line  # the fix: which folder to give


# --------------------------------------------------------------------------------------------------- make_shards
def _image_folder(root: Path, per_class: int = 3) -> Path:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_make_shards_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--image_folder .*missing is not a folder"):
        make_shards_main(["--image_folder", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_make_shards_empty_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-?folders"):
        make_shards_main(["--image_folder", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])
    # Class folders without a single image: an error, not an empty shard folder that trains 0 steps.
    for name in ("cat", "dog"):
        (tmp_path / "no_images" / name).mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"no_images/cat.*hold no image files"):
        make_shards_main(["--image_folder", str(tmp_path / "no_images"), "--output_dir", str(tmp_path / "out2")])


@pytest.mark.parametrize("size", ["0", "-5"])
def test_make_shards_bad_shard_size_is_refused_before_reading(tmp_path, size):
    folder = _image_folder(tmp_path / "train")
    with pytest.raises(ValueError, match=r"--samples_per_shard.*positive.*got -?\d"):
        make_shards_main(
            ["--image_folder", str(folder), "--output_dir", str(tmp_path / "out"), "--samples_per_shard", size]
        )
    assert not (tmp_path / "out").exists()  # nothing written, not even id2label.json


def test_make_shards_refuses_to_overwrite_shards(tmp_path):
    folder = _image_folder(tmp_path / "train")
    out = tmp_path / "out"
    first = make_shards_main(["--image_folder", str(folder), "--output_dir", str(out), "--samples_per_shard", "2"])
    assert len(first.shard_paths) == 3
    before = {path: path.read_bytes() for path in first.shard_paths}
    with pytest.raises(FileExistsError, match=r"already holds 3 shard file\(s\).*--overwrite"):
        make_shards_main(["--image_folder", str(folder), "--output_dir", str(out), "--samples_per_shard", "4"])
    assert {path: path.read_bytes() for path in first.shard_paths} == before  # untouched
    # Asked for: the old shards are replaced, none of them left beside the new ones.
    second = make_shards_main(
        ["--image_folder", str(folder), "--output_dir", str(out), "--samples_per_shard", "4", "--overwrite"]
    )
    assert sorted((out / "train").glob("shard-*")) == second.shard_paths and len(second.shard_paths) == 2


def test_knn_and_finetune_refuse_evaluation_data_with_other_classes_than_training():
    from training.data.image_datasets import check_same_classes

    class Data:
        def __init__(self, classes):
            self.classes = classes

    check_same_classes(Data(["apple", "bee"]), Data(["apple", "bee"]))
    check_same_classes(Data(["apple", "bee"]), object())  # no class names: nothing to compare
    with pytest.raises(ValueError, match=r"label 0: 'w' in training, 'apple' in evaluation"):
        check_same_classes(Data(["w", "x"]), Data(["apple", "bee"]))
    with pytest.raises(ValueError, match="3 classes for 2"):
        check_same_classes(Data(["apple", "bee"]), Data(["apple", "bee", "cat"]))


@pytest.mark.parametrize(
    ("module", "flag", "value"),
    [
        ("evaluation.knn", "--k", "0"),
        ("evaluation.lowshot_svm", "--shots", "0"),
        ("evaluation.finetune", "--label_fraction", "1.5"),
    ],
)
def test_count_and_fraction_flags_out_of_range_are_refused_by_the_parser(module, flag, value, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--model_name_or_path", MISSING, flag, value])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument " + flag in message and value in message, message


def test_the_error_line_is_one_write(monkeypatch):
    """The line goes out in one write, newline included, so that processes refusing at the same moment (a launch
    whose processes do not form a group) cannot interleave each other's lines; print() wrote text and newline apart."""
    from modeling_mopro.cli import run_command

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    def refuse(argv):
        raise ValueError("launched as 2 processes\n but   spread over lines")

    monkeypatch.setattr(sys, "stderr", Recorder())
    with pytest.raises(SystemExit) as exit_info:
        run_command(refuse, [])
    assert exit_info.value.code == 2
    assert writes == ["error: launched as 2 processes but spread over lines\n"]
