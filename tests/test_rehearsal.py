"""The reduced rehearsal (`bench/rehearsal.py --rows 1`): the shipped WebVision-V1 YAML, unchanged except for size
flags, through `accelerate launch` on 2 gloo CPU processes from a fake WebVision tree in the official layout. It
evaluates and saves every epoch, runs MoPro's three phases and writes a noise report with every training sample once.
About a minute and a half on 2 cores; the five rows are `python bench/rehearsal.py` (BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_shipped_v1_recipe_runs_on_two_processes_as_launched(tmp_path):
    result_file = tmp_path / "rehearsal.json"
    argv = [sys.executable, "bench/rehearsal.py", "--rows", "1", "--work_dir", str(tmp_path), "--result", str(result_file),
            "--time_cap", "600"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    record = json.loads(result_file.read_text())
    [row] = record["rows"]
    assert row["passed"], (row["failures"], done.stdout[-2000:], done.stderr[-2000:])
    assert done.returncode == 0
    assert "| 1 | 2 processes, map-style (--webvision_dir) | pass |" in done.stdout
    # the fake tree is the official layout: V2 lines beyond the first 1,000 classes are there, and left out
    assert record["train_images"] == 2000 and (tmp_path / "webvision" / "info" / "val_filelist.txt").is_file()
    google = (tmp_path / "webvision" / "info" / "train_filelist_google.txt").read_text().split("\n")
    assert any(line.endswith(" 1000") for line in google)
