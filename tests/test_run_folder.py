"""Issue 20, "nothing lost": a run owns its output folder for the whole run (a second run into it is refused), a
checkpoint appears whole or not at all (a full disk or a kill during the save leaves the earlier run and checkpoint
intact), and `--resume_from_checkpoint last` falls back to the newest complete checkpoint. Tiny runs of a few steps."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli_errors import MODEL, RUN, image_folder
from training.run_folder import LOCK_FILE, OutputFolderInUseError, claim_output_dir, release_output_dir
from training.run_mopro import main

REPO = Path(__file__).resolve().parent.parent
SAVE_EVERY_2 = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--noise_report", "false"]


def train_argv(data: Path, out: Path, *flags: str) -> list[str]:
    return [*MODEL, *RUN, "--train_dir", str(data), "--output_dir", str(out), *flags]


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def run_script(code: str, timeout: float = 600) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, limit: float = 600) -> None:
    """Wait until `path` exists (the other process reached its point), failing if that process ended first."""
    deadline = time.monotonic() + limit  # a guard against a hang, not a timed assertion
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the other run ended (rc {process.returncode}) first:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data") / "train")


def test_a_folder_claimed_by_another_process_is_refused_with_its_pid(tmp_path):
    holder = run_script(
        f"from training.run_folder import claim_output_dir; import sys; claim_output_dir({str(tmp_path)!r}); "
        "print('held', flush=True); sys.stdin.read()"
    )
    holder.stdin = None
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputFolderInUseError, match=rf"in use by another run \(pid {holder.pid}\)"):
        claim_output_dir(tmp_path)
    holder.kill()  # the kernel drops the lock of a killed process: the folder is free again
    holder.wait()
    claim_output_dir(tmp_path)
    release_output_dir(tmp_path)


# Run A pauses inside its first training step (its folder claimed, nothing saved yet) until the test lets it go on.
PAUSING_RUN = """
import sys, time
from pathlib import Path
from training.trainer import MoProTrainer
from training.run_mopro import main
paused, go = Path(sys.argv[1]), Path(sys.argv[2])
step = MoProTrainer.training_step
def pausing_step(self, *args, **kwargs):
    if self.state.global_step == 0 and not go.exists():
        paused.touch()
        while not go.exists():
            time.sleep(0.1)
    return step(self, *args, **kwargs)
MoProTrainer.training_step = pausing_step
main(sys.argv[3:])
"""


def test_two_runs_into_the_same_empty_folder_one_is_refused_the_other_intact(data, tmp_path):
    out = tmp_path / "run"
    paused, go = tmp_path / "paused", tmp_path / "go"
    flags = ["--save_strategy", "steps", "--save_steps", "1", "--noise_report", "false"]
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSING_RUN, str(paused), str(go), *train_argv(data, out, *flags)], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(paused, first)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "run_args.json"]  # claimed, no step saved yet
    with pytest.raises(ValueError, match=r"already holds a run \(run_args.json\)"):
        main(train_argv(data, out, "--baseline", "ce", *flags))
    # Even asked to replace the folder, the second run is refused while the first one holds it.
    with pytest.raises(OutputFolderInUseError, match=rf"--output_dir .*run is in use by another run \(pid {first.pid}\)"):
        main(train_argv(data, out, "--baseline", "ce", "--overwrite_output_dir", "true", *flags))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "run_args.json"]
    go.touch()
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    # The first run's outputs are its own: its 2 steps, its MoPro model, both of its checkpoints.
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((out / "run_args.json").read_text())["training_args"]["baseline"] == "mopro"
    assert "train_noise_correction_start_epoch" in json.loads((out / "all_results.json").read_text())  # MoPro's
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(out.glob(".partial-*"))


def test_a_full_disk_during_a_checkpoint_save_leaves_the_earlier_checkpoint_and_resume_falls_back(
    data, tmp_path, monkeypatch
):
    from training.trainer import MoProTrainer

    out = tmp_path / "run"
    seen = {}
    save = MoProTrainer._save_optimizer_and_scheduler

    def disk_fills_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            seen["checkpoint-2"] = digests(out / "checkpoint-2")
            seen["written"] = sorted(os.listdir(output_dir))  # the weights of step 4 are already on disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, output_dir)

    monkeypatch.setattr(MoProTrainer, "_save_optimizer_and_scheduler", disk_fills_at_step_4)
    with pytest.raises(OSError, match="No space left on device"):
        main(train_argv(data, out, *SAVE_EVERY_2))
    assert "model.safetensors" in seen["written"]  # the save failed half-way
    assert digests(out / "checkpoint-2") == seen["checkpoint-2"]  # the earlier checkpoint is intact
    assert not (out / "checkpoint-4").exists() and not list(out.glob(".partial-*"))  # no partial checkpoint
    monkeypatch.undo()
    main(train_argv(data, out, *SAVE_EVERY_2, "--resume_from_checkpoint", "last"))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "checkpoint-4" / "optimizer.pt").is_file()


KILLED_RUN = """
import os, signal, sys
from training.trainer import MoProTrainer
from training.run_mopro import main
save = MoProTrainer._save_optimizer_and_scheduler
def killed_at_step_4(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # as a power cut or the OOM killer would, mid-save
    return save(self, output_dir)
MoProTrainer._save_optimizer_and_scheduler = killed_at_step_4
main(sys.argv[1:])
"""


def test_a_kill_during_a_checkpoint_save_leaves_the_earlier_checkpoint_and_resume_falls_back(data, tmp_path, caplog):
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *train_argv(data, out, *SAVE_EVERY_2)], cwd=REPO, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert (out / ".partial-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()  # cut short there
    assert not (out / "checkpoint-4").exists()
    before = digests(out / "checkpoint-2")
    # An incomplete checkpoint-N under the real name (copied in part, or written by an older version) is passed
    # over as well, and named.
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "model.safetensors").write_bytes((out / "checkpoint-2" / "model.safetensors").read_bytes()[:100])
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json"):
        (out / "checkpoint-6" / name).write_bytes((out / "checkpoint-2" / name).read_bytes())
    main(train_argv(data, out, *SAVE_EVERY_2, "--resume_from_checkpoint", "last"))
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "passing over an incomplete checkpoint: checkpoint" in warned and "checkpoint-6" in warned
    assert digests(out / "checkpoint-2") == before
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "checkpoint-4" / "optimizer.pt").is_file() and not list(out.glob(".partial-*"))


def test_a_resume_with_other_classes_seed_or_data_is_refused_or_recorded(data, tmp_path):
    out = tmp_path / "run"
    flags = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--noise_report", "false"]
    main(train_argv(data, out, *flags))
    resume = ["--resume_from_checkpoint", str(out / "checkpoint-2"), "--max_steps", "3"]
    other = image_folder(tmp_path / "other", classes=("bird", "fish"))
    with pytest.raises(ValueError, match=r"belongs to another model: classes \['cat', 'dog'\] in the checkpoint, "
                                         r"\['bird', 'fish'\] in the data"):  # fmt: skip
        main(train_argv(other, out, *flags, *resume))
    with pytest.raises(ValueError, match=r"differs from the one that wrote it \(seed: 0 -> 7\).*--allow_changed_resume"):
        main(train_argv(data, out, *flags, *resume, "--seed", "7"))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2  # refused before any step
    main(train_argv(data, out, *flags, *resume, "--seed", "7", "--allow_changed_resume", "true"))
    run_args = json.loads((out / "run_args.json").read_text())
    assert run_args["resumes"] == [{"from": str(out / "checkpoint-2"), "changes": ["seed: 0 -> 7"]}]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
