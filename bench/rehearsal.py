"""Rehearse the paper run as its user launches it, at toy size: the shipped WebVision-V1 YAML through
`accelerate launch` on CPU (gloo), on 2 processes and on 2 "machines" on localhost.

    python bench/rehearsal.py                          # all five rows; table on stdout, JSON in bench/results/
    python bench/rehearsal.py --rows 1 --classes 100   # a reduced form (tests/test_rehearsal.py runs one)

A fake WebVision tree in the official layout is built first: info/ file lists with Google and Flickr lines (and
WebVision 2.0 lines beyond the first 1,000 classes, which V1 leaves out), val_images_256/ and its list, and a couple
of tiny JPEGs per class. `training/configs/webvision_v1_r50.yaml` then runs unchanged except for size flags
(`SIZE_FLAGS`: a tiny ResNet at 32 px, 3 epochs with the correction from epoch 2 so that warm-up, prototype and
correction phases all occur, a log line per step so each phase is seen; streamed rows add the epoch length).

Rows (each a pass only if every run in it finishes within its time cap, evaluates every epoch, saves, and writes a
noise report holding every training sample exactly once; a run past its cap is killed and the row names the
training step it was at):
  1. 2 processes, map-style from --webvision_dir: evaluation and a checkpoint every epoch.
  2. 2 processes streamed: from `make_shards` shards of unequal sizes, and from --webvision_dir --streaming true.
  3. two machines on localhost (--num_machines 2, one process each): one shared output folder trains; a folder per
     node is refused on both machines with a one-line error saying it must be shared (also with
     --save_on_each_node true, whose second-node checkpoints lacked the model weights).
  4. kill -9 of one rank mid-epoch, then --resume_from_checkpoint last on all ranks: the final checkpoint's weights
     (model, momentum encoder, queue, prototypes) equal those of an uninterrupted run bit for bit.
  5. --bf16 true, --torch_compile true, and an accelerate config asking for bf16: each trains MoPro (instance loss,
     all three phases, correction on), and the plan, run_args.json and the model card say what ran.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = "training/configs/webvision_v1_r50.yaml"
V1_CLASSES = 1000
EPOCHS = 3
# Only sizes change: the model (a ~60k-parameter ResNet at 32 px), the run's length (3 epochs, correction from
# epoch 2 instead of 11, so all three phases run), and a log line per step. Batch (256), queue (8192), optimizer,
# learning rate, milestones, workers, evaluation and saving are the YAML's own.
SIZE_FLAGS = [
    "--backbone", "resnet18",
    "--backbone_kwargs", '{"layers": [1, 1, 1, 1], "channels": [4, 8, 16, 32], "stem_width": 4}',
    "--image_size", "32",
    "--projection_hidden_size", "32",
    "--embedding_size", "16",
    "--num_train_epochs", str(EPOCHS),
    "--noise_correction_start_epoch", "2",
    "--logging_steps", "1",
]  # fmt: skip
GLOBAL_BATCH = 256  # the YAML's


# ---------------------------------------------------------------------------------------------------- the data
def _jpeg(rng: np.random.Generator, label: int) -> bytes:
    """A 40x40 JPEG whose mean colour depends on the label (so the classes are learnable at all)."""
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
    pixels = np.clip(base + rng.integers(-30, 30, size=(40, 40, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def build_webvision_tree(root: Path, classes: int = V1_CLASSES, v2_extra_classes: int = 5, seed: int = 0) -> dict:
    """The official layout: info/train_filelist_{google,flickr}.txt ("google/q0001/x.jpg 0"), info/val_filelist.txt
    ("val000001.jpg 0", images under val_images_256/). One Google and one Flickr image per class in the first
    `classes` classes, plus `v2_extra_classes` classes beyond the 1,000 (WebVision 2.0 lines: V1 leaves them out).
    Returns the counts V1 reads."""
    rng = np.random.default_rng(seed)
    if (root / "info" / "val_filelist.txt").is_file():
        return json.loads((root / "counts.json").read_text())
    (root / "info").mkdir(parents=True, exist_ok=True)
    lists = {"google": [], "flickr": []}
    labels = list(range(classes)) + list(range(V1_CLASSES, V1_CLASSES + v2_extra_classes))
    for source in lists:
        for label in labels:
            rel = f"{source}/q{label + 1:04d}/{source}_{label:04d}_0.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(_jpeg(rng, label))
            lists[source].append(f"{rel} {label}")
    for source, lines in lists.items():
        (root / "info" / f"train_filelist_{source}.txt").write_text("\n".join(lines) + "\n")
    (root / "val_images_256").mkdir(exist_ok=True)
    val_lines = []
    for i, label in enumerate(range(classes)):
        name = f"val{i + 1:06d}.jpg"
        (root / "val_images_256" / name).write_bytes(_jpeg(rng, label))
        val_lines.append(f"{name} {label}")
    (root / "info" / "val_filelist.txt").write_text("\n".join(val_lines) + "\n")
    counts = {"train": 2 * classes, "validation": classes, "v2_lines_left_out": 2 * v2_extra_classes}
    (root / "counts.json").write_text(json.dumps(counts))
    return counts


# ---------------------------------------------------------------------------------------------------- launching
_PROGRESS = re.compile(r"(\d+)/(\d+) \[")


@dataclass
class Launch:
    """A launched command whose output is collected (and whose training progress is followed) as it runs."""

    argv: list[str]
    log: Path
    env: dict = field(default_factory=dict)
    total: int = 0  # the training progress bar's length: other bars (evaluation, noise report) are not steps
    step: int = 0
    first_step: int | None = None  # the first step the bar showed after its opening 0 (a resumed run: past 1)

    def start(self) -> Launch:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        self._file = open(self.log, "w")  # noqa: SIM115 (closed in wait)
        self._file.write(" ".join(self.argv) + "\n")
        self._file.flush()
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        buffer = b""
        while chunk := self.proc.stdout.read1(4096):
            self._file.write(chunk.decode("utf-8", "replace"))
            self._file.flush()
            buffer = (buffer + chunk)[-4096:]
            for match in _PROGRESS.finditer(buffer.decode("utf-8", "replace")):
                if int(match.group(2)) == self.total:
                    self.step = max(self.step, int(match.group(1)))
                    if self.first_step is None and int(match.group(1)) > 0:
                        self.first_step = int(match.group(1))

    def wait(self, deadline: float) -> str | None:
        """None when it exited 0; else why not (exit status, or the step it hung at when past `deadline`)."""
        while self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._reader.join(5)
            self._file.close()
            return f"hung: killed at the time cap, at training step {self.step}/{self.total} (log {self.log})"
        self._reader.join(5)
        self._file.close()
        if self.proc.returncode:
            return f"exit {self.proc.returncode}: {_last_error(self.log)} (log {self.log})"
        return None

    def rank_pid(self, rank: int) -> int | None:
        """The pid of the training process of global rank `rank` among this launch's descendants."""
        for pid in _descendants(self.proc.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"run_mopro.py" in cmdline and f"RANK={rank}".encode() in environ:
                return pid
        return None


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    found = [int(c) for c in children]
    return found + [d for c in found for d in _descendants(c)]


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["no output"])[-1][-300:]


_PORT = [29700]


def _port() -> str:
    _PORT[0] += 1
    return str(_PORT[0])


def accelerate(run_args: list[str], *, machines: int = 1, machine_rank: int = 0, port: str | None = None,
               config_file: str | None = None) -> list[str]:  # fmt: skip
    """`accelerate launch` of run_mopro.py with the shipped YAML: 2 gloo CPU processes on one machine (the stack
    notes: `--cpu --num_processes 2` runs one), or one process on each of `machines` localhost machines."""
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        argv += ["--config_file", config_file]
    argv += ["--multi_gpu", "--num_processes", "2", "--num_cpu_threads_per_process", "1"]
    argv += ["--main_process_port", port or _port()]
    if machines > 1:
        argv += ["--num_machines", str(machines), "--machine_rank", str(machine_rank)]
        argv += ["--main_process_ip", "127.0.0.1"]
    return [*argv, "training/run_mopro.py", CONFIG, *SIZE_FLAGS, "--use_cpu", "true", *run_args]


# ---------------------------------------------------------------------------------------------------- checks
def check_run(output_dir: Path, num_train: int, *, noise_report: bool = True, final_model: bool = True) -> list[str]:
    """What every run must show: an evaluation per epoch, checkpoints, the saved model, MoPro's losses in every
    phase, and a noise report with each training sample once. Returns the failures."""
    failures = []
    state_file = output_dir / "trainer_state.json"
    if not state_file.is_file():
        return [f"{output_dir}: no trainer_state.json"]
    history = json.loads(state_file.read_text())["log_history"]
    evals = sorted({round(e["epoch"]) for e in history if "eval_accuracy" in e})
    if evals[:EPOCHS] != list(range(1, EPOCHS + 1)):
        failures.append(f"evaluated at epochs {evals}, not after each of the {EPOCHS}")
    steps = [e for e in history if "loss" in e and "phase" in e]
    phases = sorted({e["phase"] for e in steps})
    if phases != [0, 1, 2]:
        failures.append(f"phases {phases} (warm-up 0, prototypes 1, correction 2 expected)")
    if not steps or not all(e.get("loss_instance", 0) > 0 for e in steps):
        failures.append("an instance loss missing (MoPro not trained)")
    if not any(e.get("correction_strength", 0) > 0 for e in steps):
        failures.append("noise correction never on")
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        failures.append("no checkpoint saved")
    else:
        from training.trainer import check_checkpoint

        try:
            check_checkpoint(checkpoints[-1])
        except ValueError as error:
            failures.append(str(error))
    if final_model and not (output_dir / "model.safetensors").is_file():
        failures.append("no final model.safetensors")
    if noise_report:
        failures += _check_noise_report(output_dir / "noise_report", num_train)
    return failures


def _check_noise_report(folder: Path, num_train: int) -> list[str]:
    if not (folder / "dataset_info.json").is_file():
        return [f"no noise report in {folder}"]
    import datasets

    ids = datasets.load_from_disk(str(folder))["sample_id"]
    if sorted(ids) != list(range(num_train)):
        repeated = len(ids) - len(set(ids))
        return [
            f"noise report: {len(ids)} rows, {len(set(ids))} distinct of {num_train} samples ({repeated} repeated)"
        ]
    return []


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    row: int
    name: str
    passed: bool = False
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Rehearsal:
    def __init__(self, work: Path, classes: int, cap: float):
        self.work, self.cap = work, cap
        self.data = work / "webvision"
        self.counts = build_webvision_tree(self.data, classes)
        self.num_train = self.counts["train"]
        self.steps_per_epoch = self.num_train // GLOBAL_BATCH
        self.total_steps = EPOCHS * self.steps_per_epoch
        self.straight_run: Path | None = None  # row 1's output, the uninterrupted run of row 4

    def run(
        self, name: str, run_args: list[str], *, fresh: bool = True, log: str | None = None, **launch
    ) -> tuple[Path, str | None]:
        """Launch a run into WORK_DIR/name (emptied first unless `fresh` is false); its data is the fake tree
        unless `run_args` name --shard_dir."""
        out = self.work / name
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        data = [] if "--shard_dir" in run_args else ["--webvision_dir", str(self.data)]
        argv = accelerate([*data, "--output_dir", str(out), *run_args], **launch)
        self.last_launch = Launch(argv, self.work / "logs" / f"{log or name}.log", total=self.total_steps)
        return out, self.last_launch.start().wait(time.time() + self.cap)

    def streamed_flags(self) -> list[str]:
        # A stream has no length: the epoch is --samples_per_epoch, the run --max_steps (the YAML's 90 epochs unused)
        return ["--samples_per_epoch", str(self.num_train), "--max_steps", str(self.total_steps)]

    def row1(self, row: Row) -> None:
        out, error = self.run("row1-map", [])
        row.failures += [error] if error else check_run(out, self.num_train)
        self.straight_run = out if not error else None

    def row2(self, row: Row) -> None:
        shards = self.work / "shards"
        if not (shards / "validation").is_dir():
            for split, per_shard in (("train", max(self.num_train // 7, 1)), ("validation", 150)):
                # unequal shards: the last one of each split is shorter
                argv = [sys.executable, "-m", "training.data.make_shards", "--webvision_dir", str(self.data),
                        "--split", split, "--output_dir", str(shards), "--samples_per_shard", str(per_shard)]  # fmt: skip
                error = Launch(argv, self.work / "logs" / f"make_shards-{split}.log").start().wait(time.time() + 600)
                if error:
                    row.failures.append(f"make_shards {split}: {error}")
                    return
        import tarfile

        with_sizes = []
        for split in ("train", "validation"):
            sizes = []
            for path in sorted((shards / split).glob("*.tar")):
                with tarfile.open(path) as tar:
                    sizes.append(len(tar.getnames()) // 3)  # .jpg, .cls, .json per sample
            with_sizes.append(f"{split} shards of {sizes} samples")
        row.notes.append(", ".join(with_sizes))
        for name, flags in (
            ("row2-shards", ["--shard_dir", str(shards), "--streaming", "true"]),
            ("row2-webvision-streaming", ["--streaming", "true"]),
        ):
            flags = [*flags, *self.streamed_flags()]
            out, error = self.run(name, flags)
            row.failures += [f"{name}: {error}"] if error else [f"{name}: {f}" for f in check_run(out, self.num_train)]

    def row3(self, row: Row) -> None:
        # (a) one output folder both "machines" share
        row.failures += [f"shared: {f}" for f in self.two_machines("row3-shared", per_node=False, extra=[])]
        # (b) a folder per node: refused on every rank with one line, before any data is read. (With
        # --save_on_each_node true each node trained, but the second node's checkpoints lacked model.safetensors:
        # transformers 5 writes weights on global rank 0 only; that flag is refused on several nodes too.)
        refused = self.two_machines("row3-per-node", per_node=True, extra=[], expect_error="not one folder shared")
        row.failures += [f"per node: {f}" for f in refused]
        refused = self.two_machines(
            "row3-per-node-save-each", per_node=True, extra=["--save_on_each_node", "true"],
            expect_error="--save_on_each_node true on 2 nodes",
        )  # fmt: skip
        row.failures += [f"per node, --save_on_each_node: {f}" for f in refused]

    def two_machines(self, name: str, per_node: bool, extra: list[str], expect_error: str | None = None) -> list[str]:
        """One process on each of 2 localhost machines; the checks of `check_run`, or with `expect_error`, a one-line
        error holding it on both machines."""
        port = _port()
        launches = []
        for machine in range(2):
            out = self.work / (f"{name}-node{machine}" if per_node else name)
            if machine == 0 or per_node:
                shutil.rmtree(out, ignore_errors=True)
            argv = accelerate(
                ["--webvision_dir", str(self.data), "--output_dir", str(out), *extra],
                machines=2, machine_rank=machine, port=port,
            )  # fmt: skip
            log = self.work / "logs" / f"{name}-machine{machine}.log"
            launches.append(Launch(argv, log, total=self.total_steps).start())
        deadline = time.time() + self.cap
        errors = [launch.wait(deadline) for launch in launches]
        if expect_error:
            failures = []
            for launch, error in zip(launches, errors, strict=True):
                lines = [line for line in launch.log.read_text().splitlines() if line.startswith("error: ")]
                if error is None or len(lines) != 1 or expect_error not in lines[0]:
                    failures.append(f"{launch.log.name}: not refused with the one-line error ({error})")
            return failures
        failures = [e for e in errors if e]
        if failures:
            return failures
        return check_run(self.work / name, self.num_train)

    def row4(self, row: Row) -> None:
        if self.straight_run is None:
            self.row1(Row(1, "uninterrupted run for row 4"))
        if self.straight_run is None:
            row.failures.append("the uninterrupted run (row 1) failed")
            return
        name = "row4-killed"
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        argv = accelerate(["--webvision_dir", str(self.data), "--output_dir", str(out)])
        launch = Launch(argv, self.work / "logs" / f"{name}.log", total=self.total_steps).start()
        kill_at = self.steps_per_epoch + max(self.steps_per_epoch // 2, 1)  # mid second epoch
        deadline = time.time() + self.cap
        while launch.step < kill_at and launch.proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        pid = launch.rank_pid(1)
        if pid is None or launch.proc.poll() is not None:
            row.failures.append(f"rank 1 not found running at step {launch.step} (log {launch.log})")
            launch.wait(deadline)
            return
        os.kill(pid, signal.SIGKILL)
        killed_at = launch.step
        error = launch.wait(deadline)
        if error is None:
            row.failures.append("the launch exited 0 after its rank 1 was killed")
        elif error.startswith("hung"):
            row.failures.append(f"after kill -9 of rank 1: {error}")
            return
        row.notes.append(f"rank 1 killed at step {killed_at}/{EPOCHS * self.steps_per_epoch}")
        checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
        out, error = self.run(name, ["--resume_from_checkpoint", "last"], fresh=False, log=f"{name}-resume")
        if error:
            row.failures.append(f"resume: {error}")
            return
        # The proof that it resumed (a fresh start with the same seed would end with the same weights too): its
        # progress bar opened past the killed run's last checkpoint.
        first = self.last_launch.first_step
        row.notes.append(f"resumed from {checkpoints[-1] if checkpoints else 'nothing'}: its first step shown {first}")
        if not checkpoints or first is None or first <= int(checkpoints[-1].split("-")[1]):
            row.failures.append(f"the resumed run did not start past {checkpoints} (first step shown: {first})")
        row.failures += check_run(out, self.num_train)
        last = f"checkpoint-{EPOCHS * self.steps_per_epoch}"
        straight, resumed = (
            _weights(self.straight_run / last / "model.safetensors"),
            _weights(out / last / "model.safetensors"),
        )
        differ = [k for k in straight if k not in resumed or not (straight[k] == resumed[k]).all()]
        if differ or set(resumed) != set(straight):
            row.failures.append(
                f"{len(differ)} of {len(straight)} tensors differ from the uninterrupted run: {differ[:3]}"
            )
        else:
            row.notes.append(f"all {len(straight)} tensors of {last} equal the uninterrupted run's")

    def row5(self, row: Row) -> None:
        accelerate_config = self.work / "accelerate_bf16.yaml"
        # what `accelerate config` writes for one machine, asking for bf16 (launch flags add the CPU process count)
        accelerate_config.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n"
            "machine_rank: 0\nmixed_precision: bf16\nuse_cpu: false\n"
        )
        for name, flags, launch, expect in (
            ("row5-bf16", ["--bf16", "true"], {}, "bf16"),
            ("row5-compile", ["--torch_compile", "true"], {}, "compile"),
            ("row5-accelerate-bf16", [], {"config_file": str(accelerate_config)}, "bf16"),
        ):
            out, error = self.run(name, flags, **launch)
            if error:
                # a refusal is a pass only as a one-line error
                lines = [line for line in (self.work / "logs" / f"{name}.log").read_text().splitlines()]
                if any(line.startswith("error: ") for line in lines) and "Traceback" not in "\n".join(lines):
                    row.notes.append(f"{name}: refused ({error})")
                else:
                    row.failures.append(f"{name}: {error}")
                continue
            failures = check_run(out, self.num_train)
            failures += self.reported(out, expect, accelerate_config if launch else None)
            row.failures += [f"{name}: {f}" for f in failures]

    def reported(self, out: Path, expect: str, accelerate_config: Path | None) -> list[str]:
        """run_args.json, the model card and the plan (under the same flags / accelerate config) say what ran."""
        from evaluation.model_card import build_model_card
        from modeling_mopro import MoProConfig

        failures = []
        run_args = json.loads((out / "run_args.json").read_text())
        card = str(build_model_card(MoProConfig.from_pretrained(out), "user/rehearsal", run_args=run_args))
        plan_argv = [sys.executable, "-m", "training.plan", CONFIG, *SIZE_FLAGS, "--num_processes", "2", "--json",
                     "--num_train_samples", str(self.num_train)]  # fmt: skip
        if accelerate_config:
            plan_argv += ["--accelerate_config_file", str(accelerate_config)]
        if expect == "bf16":
            if not run_args["training_args"]["bf16"]:
                failures.append("run_args.json says bf16 false")
            if "| precision | bf16 autocast" not in card:
                failures.append("the model card does not say bf16")
            if not accelerate_config:
                plan_argv += ["--bf16", "true"]
        else:
            if not run_args["training_args"]["torch_compile"]:
                failures.append("run_args.json says torch_compile false")
            if "| torch.compile | backbones" not in card:
                failures.append("the model card does not say torch.compile")
            plan_argv += ["--torch_compile", "true"]
        result = subprocess.run(plan_argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
        if result.returncode:
            return [*failures, f"plan: {result.stderr.strip()[-300:]}"]
        plan = json.loads(result.stdout)
        if expect == "bf16" and not plan["precision"]["backbone"].startswith("bf16"):
            failures.append(f"the plan says {plan['precision']['backbone']}")
        if expect == "compile" and plan["torch_compile"] == "off":
            failures.append("the plan says torch.compile off")
        return failures


def measure_make_shards(work: Path, num_images: int) -> dict:
    """`python -m training.data.make_shards` time and disk on `num_images` generated JPEGs at WebVision's resized size
    (shorter side 256), in the official layout; projected linearly to WebVision V1 (2.4M) and V2 (16M) images.
    JPEG files pass into the shards undecoded, so the cost is reading, tar headers and writing: linear in images
    and bytes."""
    root = work / "make_shards_data"
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    lines, image_bytes = [], 0
    ramp = np.linspace(0, 255, 320)[None, :, None]
    for i in range(num_images):
        rel = f"google/q{i % 1000 + 1:04d}/img_{i:06d}.jpg"
        pixels = np.clip(ramp * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 12, size=(256, 320, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=85)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(buffer.getvalue())
        image_bytes += len(buffer.getvalue())
        lines.append(f"{rel} {i % 1000}")
    (root / "info").mkdir()
    (root / "info" / "train_filelist_google.txt").write_text("\n".join(lines) + "\n")
    (root / "info" / "train_filelist_flickr.txt").write_text("")
    timings = {}
    for count in (num_images // 10, num_images):
        # The slope between a tenth and all of the images: the interpreter start and imports fall out.
        (root / "info" / "train_filelist_google.txt").write_text("\n".join(lines[:count]) + "\n")
        out = work / "make_shards_out"
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, "-m", "training.data.make_shards", "--webvision_dir", str(root), "--split", "train",
                "--output_dir", str(out)]  # fmt: skip
        start = time.time()
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
        timings[count] = time.time() - start
    seconds = timings[num_images]
    per_image_s = (timings[num_images] - timings[num_images // 10]) / (num_images - num_images // 10)
    shard_bytes = sum(f.stat().st_size for f in (out / "train").glob("*.tar"))
    per_image_bytes = shard_bytes / num_images
    overhead = (shard_bytes - image_bytes) / num_images
    result = {
        "images": num_images,
        "mean_jpeg_bytes": round(image_bytes / num_images),
        "seconds": round(seconds, 1),
        f"seconds_for_{num_images // 10}": round(timings[num_images // 10], 1),
        "ms_per_image": round(1000 * per_image_s, 3),
        "shard_bytes": shard_bytes,
        "overhead_bytes_per_image": round(overhead),
        "note": "projections: linear in images at the measured slope (warm page cache, local disk), one process",
    }
    for name, count in (("v1_2.4M", 2_439_574), ("v2_16M", 16_000_000)):
        result[f"projected_{name}_hours"] = round(per_image_s * count / 3600, 2)
        result[f"projected_{name}_overhead_gb"] = round(overhead * count / 1e9, 2)
        result[f"projected_{name}_gb_at_this_jpeg_size"] = round(per_image_bytes * count / 1e9, 1)
    shutil.rmtree(root)
    shutil.rmtree(out)
    return result


ROWS = {
    1: ("2 processes, map-style (--webvision_dir)", Rehearsal.row1),
    2: ("2 processes streamed (make_shards shards; --webvision_dir --streaming true)", Rehearsal.row2),
    3: ("2 machines on localhost (shared folder; folder per node)", Rehearsal.row3),
    4: ("kill -9 of rank 1 mid-epoch, resume last: same weights", Rehearsal.row4),
    5: ("--bf16, --torch_compile, accelerate config bf16", Rehearsal.row5),
}


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,3,4,5", help="comma-separated rows to run")
    parser.add_argument("--classes", type=int, default=V1_CLASSES, help="classes with images (<= 1000)")
    parser.add_argument("--work_dir", default=str(ROOT / "bench" / "results" / "rehearsal"))
    parser.add_argument("--result", default=None, help="JSON result file (default WORK_DIR/rehearsal.json)")
    parser.add_argument("--time_cap", type=float, default=900, help="seconds per launch before it counts as hung")
    parser.add_argument("--measure_make_shards", type=int, default=0, metavar="N",
                        help="also time make_shards on N generated 256-px JPEGs (projected to 2.4M and 16M)")  # fmt: skip
    args = parser.parse_args(argv)
    if not 1 <= args.classes <= V1_CLASSES:
        parser.error(f"--classes must be in [1, {V1_CLASSES}]")
    rows = [int(r) for r in args.rows.split(",") if r]
    if not set(rows) <= set(ROWS):
        parser.error(f"--rows: choose from {sorted(ROWS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rehearsal = Rehearsal(work, args.classes, args.time_cap)
    results = []
    for number in rows:
        name, method = ROWS[number]
        row = Row(number, name)
        start = time.time()
        try:
            method(rehearsal, row)
        except Exception as error:  # a broken row is reported, and the others still run
            row.failures.append(f"{type(error).__name__}: {error}")
        row.wall_s = round(time.time() - start, 1)
        row.passed = not row.failures
        results.append(row)
        print(f"row {number}: {'pass' if row.passed else 'FAIL'} ({row.wall_s:.0f} s) {row.failures or row.notes}",
              flush=True)  # fmt: skip
    print("\n| row | what | result | wall time (s) |\n|---|---|---|---|")
    for row in results:
        print(f"| {row.row} | {row.name} | {'pass' if row.passed else 'FAIL'} | {row.wall_s:.0f} |")
    record = {
        "command": " ".join(["python", "bench/rehearsal.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": CONFIG,
        "size_flags": SIZE_FLAGS,
        "train_images": rehearsal.num_train,
        "validation_images": rehearsal.counts["validation"],
        "steps_per_epoch": rehearsal.steps_per_epoch,
        "machine": f"{os.cpu_count()} CPU cores (shared), torch {__import__('torch').__version__}",
        "total_wall_s": round(time.time() - started, 1),
        "rows": [asdict(row) for row in results],
    }
    if args.measure_make_shards:
        record["make_shards"] = measure_make_shards(work, args.measure_make_shards)
        print(f"make_shards: {json.dumps(record['make_shards'])}")
    result_file = Path(args.result or work / "rehearsal.json")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nresult: {result_file}")
    return results


if __name__ == "__main__":
    sys.exit(0 if all(row.passed for row in main()) else 1)
