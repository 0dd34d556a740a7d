"""Throws a folder of bad inputs at every command and sorts what each one does (issue 11, "nothing silent, nothing lost").

Every case runs a command as a user would (a subprocess, offline, one thread, in its own working folder) on one bad
input, and its outcome is classified from what the user sees:

* ``clear error``: exit status != 0, no traceback, and the last line of stderr is one ``error: ...`` line
  (argparse's ``prog: error: ...`` counts too);
* ``unclear error``: exit status != 0 without a traceback, but no such line;
* ``raw traceback``: exit status != 0 with a traceback (every input here is a user error, so this is a failure);
* ``skip counted``: exit 0, and the case's check finds the skip count / the file's name in the output or results;
* ``handled``: exit 0, and the case's check finds the right result (e.g. a 16-bit PNG classified as its 8-bit twin);
* ``silent``: exit 0, but the check fails (an error or a skip was due, or the result is wrong);
* ``lost``: a file that existed before the command was changed or removed without being asked;
* ``timeout``: the command ran past ``--timeout``.

A case is ``ok`` when its outcome is what it expects ("error" -> clear error, "skip" -> skip counted, "handled" ->
handled; "a|b" accepts either). The script prints a table and the totals and writes them with the machine's details.

    python bench/bad_inputs.py [--only NAME[,NAME]] [--quick] [--json PATH] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from environment import write_result  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
OUTCOMES = (
    "clear error", "skip counted", "handled", "unclear error", "raw traceback", "silent", "lost", "timeout",
)  # fmt: skip
GOOD_OUTCOMES = {"error": {"clear error"}, "skip": {"skip counted"}, "handled": {"handled"}}
COMMANDS = {
    "run_mopro": [str(REPO / "training" / "run_mopro.py")],
    "classification": ["-m", "evaluation.classification"],
    "knn": ["-m", "evaluation.knn"],
    "lowshot_svm": ["-m", "evaluation.lowshot_svm"],
    "finetune": ["-m", "evaluation.finetune"],
    "robustness": ["-m", "evaluation.robustness"],
    "noise_report": ["-m", "evaluation.noise_report"],
    "classifier_retrain": ["-m", "evaluation.classifier_retrain"],
    "make_shards": ["-m", "training.data.make_shards"],
    "converter": ["-m", "modeling_mopro.convert_original_checkpoint"],
    "release": ["-m", "evaluation.release"],
    "python": [],  # the harness's own self-checks
}
CLASSES = ["apple", "bee", "cat", "dog"]
# The tiny training run of tests/test_run_mopro.py, smaller still: 2 steps of 4 images at 32 px, 4 threads of nothing.
TINY_TRAIN = [
    "--backbone", "resnet18", "--backbone_kwargs", '{"layers": [1, 1, 1, 1], "channels": [4, 8, 16, 32], "stem_width": 4}',
    "--image_size", "32", "--projection_hidden_size", "16", "--embedding_size", "8", "--queue_size", "16",
    "--momentum_encoder_bn_groups", "2", "--global_batch_size", "4", "--per_device_eval_batch_size", "16",
    "--max_steps", "2", "--dataloader_num_workers", "0", "--eval_strategy", "no", "--disable_tqdm", "true",
    "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
]  # fmt: skip
EVAL_TINY = ["--batch_size", "8", "--num_workers", "0", "--device", "cpu"]
# The result key of classification and kNN (required since issue 20: never defaulted to WebVision).
NAMED = ["--dataset", "imagenet"]


ARCHITECTURE_FLAGS = (
    "--backbone", "--backbone_kwargs", "--image_size", "--projection_hidden_size", "--embedding_size", "--queue_size",
)  # fmt: skip


def without_architecture(flags: list[str]) -> list[str]:
    """`flags` less the architecture flags and their values (a saved model folder fixes those)."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in ARCHITECTURE_FLAGS:
            skip = True
        else:
            kept.append(flag)
    return kept


# ------------------------------------------------------------------------------------------------- the inputs
def png_bytes(label: int, seed: int) -> bytes:
    import numpy as np

    from tests.fixtures_eval import class_image

    buffer = io.BytesIO()
    class_image(label, np.random.default_rng(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 40) -> bytes:
    import numpy as np

    from tests.fixtures_eval import class_image

    buffer = io.BytesIO()
    class_image(0, np.random.default_rng(seed), size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(1, 64)
    return data[: len(data) // 3]


def oversized_jpeg(side: int = 16000) -> bytes:
    """A small JPEG whose frame header claims side x side pixels (a decompression bomb's header, 256M pixels, more
    than twice PIL's MAX_IMAGE_PIXELS): a reader that checks the size refuses it before allocating ~770 MB."""
    data = bytearray(jpeg_bytes(2, 16))
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5 : at + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")  # height, width
            return bytes(data)
    raise RuntimeError("no SOF marker in the generated JPEG")


def write_folder(root: Path, per_class: dict[str, int], seed: int = 0, extra: dict[str, bytes] | None = None) -> Path:
    """`root/<class>/<class>_<i>.png` for each class (0 makes an empty folder), plus `extra` files by relative path."""
    for label, name in enumerate(per_class):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class[name]):
            (root / name / f"{name}_{i}.png").write_bytes(png_bytes(label, seed * 1000 + label * 100 + i))
    for relative, data in (extra or {}).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def bad_train_folder(root: Path, bad: dict[str, bytes]) -> Path:
    """8 training samples (2 steps of 4: every sample is read each epoch), `len(bad)` of them bad ones in `apple/`."""
    counts = {name: 2 for name in CLASSES}
    counts["apple"] -= len(bad)
    assert counts["apple"] >= 0
    return write_folder(root, counts, extra={f"apple/{name}": data for name, data in bad.items()})


class Setup:
    """The valid things the bad inputs are made from, each built on first use (so `--only` builds only what it needs)."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / "setup" / name

    @cached_property
    def model(self) -> Path:
        """A tiny MoPro release model whose labels are CLASSES."""
        from tests.fixtures_eval import save_tiny_model

        id2label = dict(enumerate(CLASSES))
        # 2 key-BatchNorm groups, so that the tiny batches of TINY_TRAIN fit it when training starts from this folder
        return save_tiny_model(
            self.path("model"), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            momentum_encoder_bn_groups=2,
        )  # fmt: skip

    @cached_property
    def images(self) -> Path:
        return write_folder(self.path("images"), dict.fromkeys(CLASSES, 3), seed=1)

    @cached_property
    def val_images(self) -> Path:
        return write_folder(self.path("val_images"), dict.fromkeys(CLASSES, 1), seed=2)

    @cached_property
    def not_mopro(self) -> Path:
        """A model folder of another architecture (a BERT config)."""
        folder = self.path("bert")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        return folder

    @cached_property
    def a_file(self) -> Path:
        path = self.path("a_file.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not a folder\n")
        return path

    def train(self, *extra: str) -> list[str]:
        return ["--train_dir", str(self.images), "--validation_dir", str(self.val_images), *TINY_TRAIN, *extra]

    @cached_property
    def trained_run(self) -> Path:
        """A finished tiny training run into its default output folder (relative to its working folder), with a
        checkpoint at step 2: `--train_dir` without a YAML file takes the own-data recipe, so its `output_dir`."""
        import yaml

        cwd = self.path("default_cwd")
        cwd.mkdir(parents=True)
        run_command("run_mopro", self.train("--save_strategy", "steps", "--save_steps", "2"), cwd, timeout=300)
        out = cwd / yaml.safe_load((REPO / "training" / "configs" / "own_data.yaml").read_text())["output_dir"]
        if not (out / "checkpoint-2").is_dir():
            raise RuntimeError(f"the setup's training run wrote no checkpoint-2 in {out}")
        return out

    @cached_property
    def skipping_run(self) -> Path:
        """A tiny run over a folder with one undecodable image, checkpointed at step 2 (one epoch, one skip)."""
        out = self.path("skipping_run")
        folder = bad_train_folder(self.path("skipping_images"), {"broken.jpg": b"this is not an image"})
        argv = ["--train_dir", str(folder), "--validation_dir", str(self.val_images), *TINY_TRAIN, "--output_dir",
                str(out), "--save_strategy", "steps", "--save_steps", "2", "--noise_report", "false"]  # fmt: skip
        run_command("run_mopro", argv, self.root, timeout=300)
        if not (out / "checkpoint-2").is_dir():
            raise RuntimeError(f"the setup's skipping run wrote no checkpoint-2 in {out}")
        return out

    @cached_property
    def official_checkpoint(self) -> Path:
        """A fake official MoPro checkpoint (`module.encoder_q/k`, queue, prototypes; epoch/arch/optimizer) of a tiny
        ResNet-18, as tests/test_conversion.py builds a ResNet-50 one."""
        import timm
        import torch
        import torch.nn.functional as F

        torch.manual_seed(0)
        state = {}
        for encoder in ("encoder_q", "encoder_k"):
            network = timm.create_model(
                "resnet18", num_classes=0, layers=[1, 1, 1, 1], channels=[4, 8, 16, 32], stem_width=4
            )
            for key, value in network.state_dict().items():
                state[f"module.{encoder}.{key}"] = value.clone()
            for key, shape in {"classifier.weight": (4, 32), "classifier.bias": (4,), "fc1.weight": (16, 32),
                               "fc1.bias": (16,), "fc2.weight": (8, 16), "fc2.bias": (8,)}.items():  # fmt: skip
                state[f"module.{encoder}.{key}"] = torch.randn(shape) * 0.05
        state["module.queue"] = F.normalize(torch.randn(8, 16), dim=0)
        state["module.queue_ptr"] = torch.tensor([4])
        state["module.prototypes"] = F.normalize(torch.randn(4, 8), dim=1)
        optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}]}
        path = self.path("official") / "MoPro_tiny_epoch90.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state, "optimizer": optimizer}, path)
        return path

    def official_variant(self, name: str, change: Callable[[dict], None]) -> Path:
        import torch

        checkpoint = torch.load(self.official_checkpoint, weights_only=True)
        change(checkpoint)
        path = self.path("official") / name
        torch.save(checkpoint, path)
        return path

    @cached_property
    def grey16(self) -> tuple[Path, float]:
        """A folder with one 16-bit greyscale PNG in the class the model gives its 8-bit twin, where a reader that
        clips 16-bit values to 8 bits (almost all white) gives another class; returns (folder, expected top-1 %)."""
        import numpy as np
        import torch
        from PIL import Image

        from evaluation.features import load_model
        from training.data.transforms import transforms_from_config

        model = load_model(str(self.model), "cpu")
        transform = transforms_from_config(model.config)
        rng = np.random.default_rng(0)
        for _ in range(50):
            # a smooth random pattern, so that the classes differ by more than noise
            grey = np.kron(rng.integers(0, 256, size=(5, 5)), np.ones((8, 8))).astype(np.uint16)  # 40x40, 8-bit values
            right = Image.fromarray(grey.astype(np.uint8)).convert("RGB")
            clipped = Image.fromarray(np.clip(grey * 257, 0, 255).astype(np.uint8)).convert("RGB")  # the bug's view
            with torch.no_grad():
                logits = model(pixel_values=torch.stack([transform(right), transform(clipped)])).logits
            right_class, clipped_class = logits.argmax(1).tolist()
            if right_class != clipped_class:
                break
        else:
            raise RuntimeError("no pattern found whose 16-bit and clipped readings the tiny model tells apart")
        # One ordinary image per class besides (an empty class folder is a case of its own): the expected top-1
        # is what the model gives them and the 8-bit twin; the clipped reading loses exactly the twin's point.
        folder = write_folder(self.path("grey16"), dict.fromkeys(CLASSES, 1), seed=3)
        Image.fromarray(grey * 257).save(folder / CLASSES[right_class] / "grey16.png")  # uint16 -> mode I;16
        correct = 1
        for label, name in enumerate(CLASSES):
            image = Image.open(folder / name / f"{name}_0.png").convert("RGB")
            with torch.no_grad():
                correct += int(model(pixel_values=transform(image)[None]).logits.argmax(1).item() == label)
        return folder, 100.0 * correct / (len(CLASSES) + 1)

    @cached_property
    def voc(self) -> Path:
        from tests.fixtures_eval import write_voc07

        return write_voc07(self.path("voc"), num_trainval=24, num_test=20)

    @cached_property
    def webvision_out_of_range(self) -> Path:
        """A WebVision-1.0-like root whose training list has a label (1000) outside the 1000 classes."""
        root = self.path("webvision")
        (root / "google" / "q0001").mkdir(parents=True)
        for i in range(4):
            (root / "google" / "q0001" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
        (root / "val_images_256").mkdir(parents=True)
        (root / "val_images_256" / "val000001.jpg").write_bytes(jpeg_bytes(9))
        (root / "info").mkdir()
        labels = [0, 1, 1000, 2]
        lines = [f"google/q0001/{i}.jpg {label}" for i, label in enumerate(labels)]
        (root / "info" / "train_filelist_google.txt").write_text("\n".join(lines) + "\n")
        (root / "info" / "train_filelist_flickr.txt").write_text("")
        (root / "info" / "val_filelist.txt").write_text("val000001.jpg 0\n")
        (root / "info" / "synsets.txt").write_text("".join(f"n{i:08d} class {i}\n" for i in range(1000)))
        return root


# ----------------------------------------------------------------------------------------------- running one case
@dataclass
class Run:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    cwd: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_command(command: str, argv: list[str], cwd: Path, timeout: float) -> Run:
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MOPRO_TRACEBACK", None)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, *COMMANDS[command], *argv], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return Run(done.returncode, done.stdout, done.stderr, time.perf_counter() - start, cwd)
    except subprocess.TimeoutExpired as expired:
        as_text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return Run(None, as_text(expired.stdout), as_text(expired.stderr), time.perf_counter() - start, cwd)


def snapshot(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths` (folders recursively)."""
    files = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return files


ERROR_LINE = re.compile(r"^(\S+: )?error: \S")


def classify(expected: str, run: Run, check_ok: bool, lost: list[str]) -> str:
    """The outcome of one run, from what the user sees (see the module docstring)."""
    if lost:
        return "lost"
    if run.returncode is None:
        return "timeout"
    if run.returncode != 0:
        if "Traceback (most recent call last)" in run.stderr:
            return "raw traceback"
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        return "clear error" if lines and ERROR_LINE.match(lines[-1]) else "unclear error"
    if not check_ok:
        return "silent"
    return "skip counted" if "skip" in expected.split("|") else "handled"


def is_ok(expected: str, outcome: str) -> bool:
    good = set().union(*(GOOD_OUTCOMES[kind] for kind in expected.split("|")))
    if "error" in expected.split("|"):
        good.add("handled")  # an error case whose check accepts the result (e.g. the flag was applied after all)
    return outcome in good


def message_of(run: Run) -> str:
    """The line a user reads first: the last stderr line for a failure, else the check's subject."""
    lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    if run.returncode not in (0, None) and lines:
        return lines[-1][:160]
    return ""


@dataclass
class Case:
    """One bad input: `argv(setup, work)` builds the command line (and the input, in the case's own folder `work`);
    `check(setup, work, run)` judges an exit 0; `protect(setup, work)` lists what must survive the command."""

    name: str
    command: str
    expected: str
    argv: Callable[[Setup, Path], list[str]]
    check: Callable[[Setup, Path, Run], bool] | None = None
    protect: Callable[[Setup, Path], list[Path]] | None = None
    note: str = ""
    quick: bool = False


@dataclass
class Row:
    name: str
    command: str
    expected: str
    outcome: str
    ok: bool
    returncode: int | None
    seconds: float
    message: str
    note: str = ""
    lost: list[str] = field(default_factory=list)


def run_case(case: Case, setup: Setup, timeout: float) -> Row:
    work = setup.root / "cases" / case.name
    work.mkdir(parents=True, exist_ok=True)
    try:
        argv = case.argv(setup, work)
        protected = case.protect(setup, work) if case.protect else []
    except Exception as error:  # the harness's own setup failed: say so, do not count it as an outcome
        return Row(case.name, case.command, case.expected, "setup failed", False, None, 0.0, f"{error!r}"[:160])
    before = snapshot(protected)
    run = run_command(case.command, argv, work, timeout)
    after = snapshot(protected)
    (work / "stdout.txt").write_text(run.stdout)  # for --keep: what the user saw
    (work / "stderr.txt").write_text(run.stderr)
    lost = sorted(name for name, digest in before.items() if after.get(name) != digest)
    check_ok = False
    if run.returncode == 0 and case.check is not None:
        try:
            check_ok = bool(case.check(setup, work, run))
        except Exception:  # a check that cannot read the result: the result is not there
            check_ok = False
    outcome = classify(case.expected, run, check_ok, lost)
    message = message_of(run) or ("; ".join(lost)[:160] if lost else "")
    return Row(case.name, case.command, case.expected, outcome, is_ok(case.expected, outcome), run.returncode,
               round(run.seconds, 1), message, case.note, lost)  # fmt: skip


# ------------------------------------------------------------------------------------------------------ checks
def results(work: Path, *parts: str) -> dict:
    return json.loads(work.joinpath(*parts).read_text())


def skip_reported(count: int, name: str, output: str = "out") -> Callable[[Setup, Path, Run], bool]:
    """The run counted `count` skipped images, named the file, and finished (noise report included)."""

    def check(s: Setup, w: Path, r: Run) -> bool:
        metrics = results(w, output, "all_results.json")
        return metrics.get("train_skipped_images") == count and name in r.output and "eval_accuracy" in metrics

    return check


def named_in_output(*names: str) -> Callable[[Setup, Path, Run], bool]:
    return lambda s, w, r: all(name in r.output for name in names)


def config_of(work: Path, output: str = "out") -> dict:
    return results(work, output, "config.json")


# ------------------------------------------------------------------------------------------------------- cases
def training_cases() -> list[Case]:
    out = lambda w: ["--output_dir", str(w / "out")]  # noqa: E731
    # The case's own validation folder, at the depth of its training folder: `datasets`' imagefolder drops the
    # labels when the two are at different depths (a case of its own below).
    val = lambda w: str(write_folder(w / "val", dict.fromkeys(CLASSES, 1), seed=2))  # noqa: E731
    demo = lambda s: s.trained_run  # noqa: E731

    def with_model(*flags):
        # Only the flag under test may disagree with the folder: TINY_TRAIN's architecture flags are left out.
        def argv(s, w):
            data = ["--train_dir", str(s.images), "--validation_dir", str(s.val_images)]
            return ["--model_name_or_path", str(s.model), *data, *without_architecture(TINY_TRAIN), *flags, *out(w)]

        return argv

    def bad_files(bad: dict[str, bytes]):
        def argv(s, w):
            folder = bad_train_folder(w / "train", bad)
            return ["--train_dir", str(folder), "--validation_dir", val(w), *TINY_TRAIN, "--max_steps", "4",
                    *out(w)]  # fmt: skip

        return argv

    def resumed_checkpoint(change: Callable[[Path], None]):
        def argv(s, w):
            checkpoint = w / "checkpoint-2"
            shutil.copytree(demo(s) / "checkpoint-2", checkpoint)
            change(checkpoint)
            return [*s.train("--max_steps", "4"), "--resume_from_checkpoint", str(checkpoint), *out(w)]

        return argv

    def nan_weights(checkpoint: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(checkpoint / "model.safetensors")
        save_file({k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()},
                  checkpoint / "model.safetensors", metadata={"format": "pt"})  # fmt: skip

    def corrupted_shard(s, w):
        (w / "shards" / "train").mkdir(parents=True)
        (w / "shards" / "train" / "shard-000000.tar").write_bytes(b"garbage, not a tar file" * 100)
        (w / "shards" / "id2label.json").write_text(json.dumps(dict(enumerate(CLASSES))))
        return ["--shard_dir", str(w / "shards"), *TINY_TRAIN, "--noise_report", "false", *out(w)]

    def default_output_again(s, w):
        if not (w / "outputs").exists():
            shutil.copytree(demo(s).parent, w / "outputs")
        return s.train("--baseline", "ce")  # no --output_dir: the default one, relative to the working folder

    return [
        Case("train_flag_ignored_alpha", "run_mopro", "handled|error", with_model("--alpha", "0.9"),
             check=lambda s, w, r: config_of(w)["alpha"] == 0.9, note="--alpha with --model_name_or_path"),
        Case("train_flag_ignored_image_size", "run_mopro", "error", with_model("--image_size", "64"),
             check=lambda s, w, r: config_of(w)["image_size"] == 64, note="--image_size with --model_name_or_path"),
        Case("train_second_run_same_output", "run_mopro", "error",
             lambda s, w: [*s.train("--num_train_epochs", "1"), "--output_dir", str(demo(s))],
             protect=lambda s, w: [demo(s)], note="a finished run's folder again, without resume or overwrite"),
        Case("train_baseline_ce_default_output", "run_mopro", "error",
             default_output_again,
             protect=lambda s, w: [w / "outputs"], note="--baseline ce into the default folder of a MoPro run"),
        Case("train_checkpoint_nan_weights", "run_mopro", "error", resumed_checkpoint(nan_weights),
             note="resume from a checkpoint whose weights are NaN"),
        Case("train_checkpoint_no_optimizer", "run_mopro", "error",
             resumed_checkpoint(lambda c: (c / "optimizer.pt").unlink()), note="resume without optimizer.pt"),
        Case("train_resume_skip_count", "run_mopro", "skip",
             lambda s, w: ["--train_dir", str(s.path("skipping_images")), "--validation_dir", str(s.val_images),
                           *TINY_TRAIN, "--max_steps", "4", "--noise_report", "false", "--resume_from_checkpoint",
                           str(s.skipping_run / "checkpoint-2"), *out(w)],
             check=lambda s, w, r: results(w, "out", "all_results.json").get("train_skipped_images") == 2,
             note="1 bad image read per epoch, 2 epochs, resumed after the first: count must be 2"),
        Case("train_smaller_than_one_batch", "run_mopro", "error",
             lambda s, w: ["--train_dir", str(write_folder(w / "train", dict.fromkeys(CLASSES[:2], 1))),
                           "--validation_dir", str(write_folder(w / "val", dict.fromkeys(CLASSES[:2], 1))),
                           *TINY_TRAIN, "--max_steps", "-1",
                           "--num_train_epochs", "1", *out(w)],
             note="2 images, batch 4: 0 steps"),
        Case("train_empty_class_folder", "run_mopro", "error",
             lambda s, w: ["--train_dir", str(write_folder(w / "train", {**dict.fromkeys(CLASSES, 2), "emu": 0})),
                           "--validation_dir", val(w), *TINY_TRAIN, *out(w)],
             check=lambda s, w, r: "emu" in config_of(w)["id2label"].values(), note="class folder emu/ is empty"),
        Case("train_truncated_jpeg", "run_mopro", "handled", bad_files({"truncated.jpg": truncated_jpeg()}),
             check=lambda s, w, r: skip_reported(0, "")(s, w, r) or skip_reported(2, "truncated.jpg")(s, w, r),
             note="decoded as the official code does (PIL fills the rest), or skipped, counted and named"),
        Case("train_not_an_image", "run_mopro", "skip", bad_files({"notes.jpg": b"<html>not an image</html>"}),
             check=skip_reported(2, "notes.jpg")),
        Case("train_oversized_jpeg", "run_mopro", "skip", bad_files({"bomb.jpg": oversized_jpeg()}),
             check=skip_reported(2, "bomb.jpg"), note="JPEG header claims 16000x16000"),
        Case("train_bad_files_noise_report", "run_mopro", "skip",
             bad_files({"a.jpg": b"nope", "b.png": b"nope either"}), check=skip_reported(4, "a.jpg"),
             note="2 bad files: training skips them, then the noise report reads them too"),
        Case("train_dir_without_validation_dir", "run_mopro", "error",
             lambda s, w: ["--train_dir", str(s.images), *TINY_TRAIN, "--eval_strategy", "epoch", *out(w)],
             check=lambda s, w, r: (w / "out" / "model.safetensors").is_file(),
             note="with --eval_strategy epoch: an error naming --validation_dir, or training without evaluation"),
        Case("train_val_at_other_depths", "run_mopro", "handled",
             lambda s, w: ["--train_dir", str(write_folder(w / "data" / "train", dict.fromkeys(CLASSES, 2))),
                           "--validation_dir", str(s.val_images), *TINY_TRAIN, "--noise_report", "false", *out(w)],
             check=lambda s, w, r: (w / "out" / "model.safetensors").is_file(),
             note="valid folders, data/train/<class> and val_images/<class>: one level apart"),
        Case("train_dir_missing", "run_mopro", "error",
             lambda s, w: ["--train_dir", str(w / "nope"), "--validation_dir", str(s.val_images), *TINY_TRAIN, *out(w)]),
        Case("train_dir_is_a_file", "run_mopro", "error",
             lambda s, w: ["--train_dir", str(s.a_file), "--validation_dir", str(s.val_images), *TINY_TRAIN, *out(w)]),
        Case("train_corrupted_shard", "run_mopro", "error", corrupted_shard,
             check=named_in_output("shard-000000.tar"), note="garbage .tar; the message must name the shard"),
        Case("train_webvision_label_out_of_range", "run_mopro", "error|skip",
             lambda s, w: ["--webvision_dir", str(s.webvision_out_of_range), *TINY_TRAIN, "--noise_report",
                           "false", "--global_batch_size", "2", "--momentum_encoder_bn_groups", "1", *out(w)],
             check=named_in_output("train_filelist_google.txt"),
             note="label 1000 in a 1000-class list: dropped by the first-N-classes rule, so it must be counted"),
        Case("train_model_not_mopro", "run_mopro", "error",
             lambda s, w: ["--model_name_or_path", str(s.not_mopro), *s.train(), *out(w)]),
        Case("train_model_missing", "run_mopro", "error",
             lambda s, w: ["--model_name_or_path", str(w / "no_model"), *s.train(), *out(w)]),
        Case("train_negative_batch", "run_mopro", "error", lambda s, w: [*s.train("--global_batch_size", "-4"), *out(w)]),
        Case("train_negative_lr", "run_mopro", "error", lambda s, w: [*s.train("--learning_rate", "-0.1"), *out(w)]),
        Case("train_unknown_flag", "run_mopro", "error", lambda s, w: [*s.train("--alpah", "0.9"), *out(w)]),
        Case("train_unknown_correction_schedule", "run_mopro", "error",
             lambda s, w: [*s.train("--noise_correction_schedule", "sometimes"), *out(w)]),
        Case("train_agreement_out_of_range", "run_mopro", "error",
             lambda s, w: [*s.train("--noise_correction_schedule", "adaptive", "--correction_min_agreement", "60"),
                           *out(w)]),
        Case("train_crop_scale_out_of_range", "run_mopro", "error",
             lambda s, w: [*s.train("--crop_min_scale", "0"), *out(w)]),
    ]  # fmt: skip


def evaluation_cases() -> list[Case]:
    out = lambda w: ["--output_dir", str(w / "out")]  # noqa: E731

    def classify_on(folder: Callable[[Setup, Path], Path], *extra: str):
        return lambda s, w: ["--model_name_or_path", str(s.model), "--data_dir", str(folder(s, w)), *EVAL_TINY,
                             *NAMED, *out(w), *extra]  # fmt: skip

    def grey16_right(s: Setup, w: Path, r: Run) -> bool:
        metrics = results(w, "out", "eval_classification_imagenet.json")
        return abs(float(metrics["top1"]) - s.grey16[1]) < 1e-3

    other_names = lambda s, w: write_folder(w / "data", dict.fromkeys(["w", "x", "y", "z"], 1))  # noqa: E731

    def with_bad(name: str, data: bytes) -> Callable[[Setup, Path], Path]:
        return lambda s, w: write_folder(w / "data", dict.fromkeys(CLASSES, 1), extra={f"bee/{name}": data})

    def knn(train: Callable[[Setup, Path], Path], *extra: str):
        return lambda s, w: ["--model_name_or_path", str(s.model), "--train_data_dir", str(train(s, w)),
                             "--data_dir", str(s.val_images), *EVAL_TINY, *NAMED, *out(w), "--k", "3", *extra]  # fmt: skip

    def svm(data: Callable[[Setup, Path], Path], *extra: str):
        return lambda s, w: ["--model_name_or_path", str(s.model), "--task", "voc07", "--data_dir", str(data(s, w)),
                             *EVAL_TINY, *out(w), *extra]  # fmt: skip

    def finetune(*extra: str, train: Callable[[Setup, Path], Path] = lambda s, w: s.images):
        return lambda s, w: ["--model_name_or_path", str(s.model), "--output_dir", str(w / "ft"),
                             "--train_data_dir", str(train(s, w)), "--data_dir", str(s.val_images), "--epochs", "1",
                             "--batch_size", "4", "--num_workers", "0", "--results_dir", str(w / "out"), *extra]  # fmt: skip

    def robustness(data: Callable[[Setup, Path], Path], subset: Callable[[Setup, Path], Path]):
        return lambda s, w: ["--model_name_or_path", str(s.model), "--data_dir", str(data(s, w)), "--class_subset",
                             str(subset(s, w)), *EVAL_TINY, *out(w)]  # fmt: skip

    def subset_file(s, w):
        (w / "subset.txt").write_text("n01443537\nn01484850\n")
        return w / "subset.txt"

    def noise(folder: Callable[[Setup, Path], Path]):
        return lambda s, w: ["--model_name_or_path", str(s.model), "--data_dir", str(folder(s, w)), *EVAL_TINY,
                             *out(w)]  # fmt: skip

    def earlier_report(s, w):
        (w / "out").mkdir(parents=True, exist_ok=True)
        (w / "out" / "noise_report_summary.json").write_text("{}")
        return s.images

    def retrain(annotation: Callable[[Setup, Path], Path]):
        return lambda s, w: ["--model_name_or_path", str(s.model), "--output_dir", str(w / "rt"), "--annotation",
                             str(annotation(s, w)), "--train_data_dir", str(s.images), "--results_dir", str(w / "out")]  # fmt: skip

    def garbage_json(s, w):
        (w / "pseudo_label.json").write_text("{not json")
        return w / "pseudo_label.json"

    return [
        Case("classify_other_class_names", "classification", "error", classify_on(other_names),
             note="folders w,x,y,z; the model's labels are apple,bee,cat,dog"),
        Case("classify_data_missing", "classification", "error", classify_on(lambda s, w: w / "nope")),
        Case("classify_data_is_a_file", "classification", "error", classify_on(lambda s, w: s.a_file)),
        Case("classify_model_not_mopro", "classification", "error",
             lambda s, w: ["--model_name_or_path", str(s.not_mopro), "--data_dir", str(s.val_images), *EVAL_TINY,
                           *NAMED, *out(w)]),
        Case("classify_model_missing", "classification", "error",
             lambda s, w: ["--model_name_or_path", str(w / "none"), "--data_dir", str(s.val_images), *EVAL_TINY,
                           *NAMED, *out(w)]),
        Case("classify_negative_batch", "classification", "error",
             lambda s, w: [*classify_on(lambda s, w: s.val_images)(s, w), "--batch_size", "-1"]),
        Case("classify_unknown_flag", "classification", "error", classify_on(lambda s, w: s.val_images, "--topk", "5")),
        Case("classify_grey16_png", "classification", "handled", classify_on(lambda s, w: s.grey16[0]),
             check=grey16_right, note="16-bit greyscale PNG: must score as its 8-bit twin"),
        Case("classify_truncated_jpeg", "classification", "handled", classify_on(with_bad("cut.jpg", truncated_jpeg())),
             check=lambda s, w, r: results(w, "out", "eval_classification_imagenet.json")["num_samples"] == 5,
             note="decoded as the official code does: all 5 images scored"),
        Case("classify_not_an_image", "classification", "error|skip", classify_on(with_bad("x.jpg", b"plain text")),
             check=named_in_output("x.jpg")),
        Case("classify_oversized_jpeg", "classification", "error|skip", classify_on(with_bad("bomb.jpg", oversized_jpeg())),
             check=named_in_output("bomb.jpg"), note="JPEG header claims 16000x16000"),
        Case("knn_other_class_names", "knn", "error", knn(other_names), note="train folders w,x,y,z"),
        Case("knn_train_missing", "knn", "error", knn(lambda s, w: w / "nope")),
        Case("knn_k_zero", "knn", "error", knn(lambda s, w: s.images, "--k", "0")),
        Case("svm_data_missing", "lowshot_svm", "error", svm(lambda s, w: w / "nope")),
        Case("svm_not_voc", "lowshot_svm", "error", svm(lambda s, w: s.images), note="an image folder, no VOCdevkit/"),
        Case("svm_zero_shots", "lowshot_svm", "error", svm(lambda s, w: s.voc, "--shots", "0")),
        Case("svm_zero_runs", "lowshot_svm", "error", svm(lambda s, w: s.voc, "--runs", "0", "--shots", "1")),
        Case("finetune_fraction_above_one", "finetune", "error", finetune("--label_fraction", "1.5")),
        Case("finetune_negative_lr", "finetune", "error", finetune("--learning_rate", "-1")),
        Case("finetune_other_class_names", "finetune", "error", finetune(train=other_names)),
        Case("robustness_data_missing", "robustness", "error", robustness(lambda s, w: w / "nope", subset_file)),
        Case("robustness_subset_missing", "robustness", "error", robustness(lambda s, w: s.images, lambda s, w: w / "no.txt")),
        Case("robustness_wnids_not_in_data", "robustness", "error", robustness(lambda s, w: s.images, subset_file),
             note="class folders apple..dog, subset of two wnids"),
        Case("noise_report_data_missing", "noise_report", "error", noise(lambda s, w: w / "nope")),
        Case("noise_report_other_class_names", "noise_report", "error", noise(other_names)),
        Case("noise_report_not_an_image", "noise_report", "error|skip", noise(with_bad("x.jpg", b"plain text")),
             check=named_in_output("x.jpg")),
        Case("noise_report_over_a_report", "noise_report", "error", noise(earlier_report),
             protect=lambda s, w: [w / "out" / "noise_report_summary.json"],
             note="--output_dir holds an earlier report: refused, the report kept"),
        Case("noise_report_push_offline", "noise_report", "error",
             lambda s, w: [*noise(lambda s, w: s.images)(s, w), "--push_to_hub", "org/report"],
             note="HF_HUB_OFFLINE=1: refused before any work"),
        Case("noise_report_push_bad_repo_id", "noise_report", "error",
             lambda s, w: [*noise(lambda s, w: s.images)(s, w), "--push_to_hub", "a/b/c"]),
        Case("retrain_annotation_missing", "classifier_retrain", "error", retrain(lambda s, w: w / "none.json")),
        Case("retrain_annotation_garbage", "classifier_retrain", "error", retrain(garbage_json)),
    ]  # fmt: skip


def tool_cases() -> list[Case]:
    def shards(source: list[str] | Callable[[Setup, Path], list[str]], *extra: str):
        return lambda s, w: [*(source(s, w) if callable(source) else source), "--output_dir", str(w / "shards"),
                             "--samples_per_shard", "4", *extra]  # fmt: skip

    def existing_shards(s, w):
        run_command("make_shards", ["--image_folder", str(s.images), "--output_dir", str(w / "shards")], w, 120)
        return ["--image_folder", str(s.val_images), "--output_dir", str(w / "shards")]

    def convert(checkpoint: Callable[[Setup, Path], Path], *extra: str):
        return lambda s, w: ["--checkpoint_path", str(checkpoint(s, w)), "--output_dir", str(w / "converted"), *extra]

    def nan_state(checkpoint: dict) -> None:
        for value in checkpoint["state_dict"].values():
            if value.is_floating_point():
                value.fill_(float("nan"))

    def refused_pickle(s, w):
        import torch

        torch.save({"state_dict": {}, "args": argparse.Namespace(arch="resnet18")}, w / "pickle.tar")
        return w / "pickle.tar"

    def converted_exists(s, w):
        (w / "converted").mkdir(exist_ok=True)
        (w / "converted" / "model.safetensors").write_bytes(b"an earlier conversion")
        return ["--checkpoint_path", str(s.official_checkpoint), "--output_dir", str(w / "converted")]

    def release(model: Callable[[Setup, Path], Path], *extra: str):
        return lambda s, w: ["--model_dir", str(model(s, w)), "--release_dir", str(w / "release"), "--no_timm", *extra]

    def existing_release(s, w):
        (w / "release").mkdir(exist_ok=True)
        (w / "release" / "README.md").write_text("an earlier release\n")
        return ["--model_dir", str(s.model), "--release_dir", str(w / "release"), "--no_timm"]

    def card_of_demo(s, w, r):
        card = (w / "release" / "README.md").read_text()
        return "webvision" not in card.lower() and "90 epoch" not in card.lower()

    return [
        Case("shards_folder_missing", "make_shards", "error", shards(lambda s, w: ["--image_folder", str(w / "no")]),
             quick=True),
        Case("shards_folder_is_a_file", "make_shards", "error", shards(lambda s, w: ["--image_folder", str(s.a_file)])),
        Case("shards_bad_files", "make_shards", "skip",
             shards(lambda s, w: ["--image_folder", str(write_folder(w / "data", dict.fromkeys(CLASSES, 1),
                                  extra={"bee/x.jpg": b"text", "cat/y.png": b"more text"}))]),
             check=named_in_output("x.jpg", "y.png"), note="two non-images: counted and named"),
        Case("shards_zero_per_shard", "make_shards", "error",
             lambda s, w: [*shards(["--image_folder", str(s.images)])(s, w), "--samples_per_shard", "0"]),
        Case("shards_webvision_label_out_of_range", "make_shards", "error|skip",
             shards(lambda s, w: ["--webvision_dir", str(s.webvision_out_of_range)]),
             check=named_in_output("train_filelist_google.txt"), note="label 1000 in a 1000-class list"),
        Case("shards_output_exists", "make_shards", "error", existing_shards,
             check=lambda s, w, r: False, protect=lambda s, w: [w / "shards"],
             note="shards of another folder already in --output_dir"),
        Case("shards_unknown_flag", "make_shards", "error",
             lambda s, w: ["--image_folder", str(s.images), "--output_dir", str(w / "o"), "--shard_size", "4"]),
        Case("convert_checkpoint_missing", "converter", "error", convert(lambda s, w: w / "none.tar")),
        Case("convert_not_a_checkpoint", "converter", "error",
             convert(lambda s, w: (w / "x.tar").write_bytes(b"garbage") and w / "x.tar")),
        Case("convert_refused_pickle", "converter", "error", convert(refused_pickle),
             note="an object weights_only refuses"),
        Case("convert_nan_weights", "converter", "error",
             convert(lambda s, w: s.official_variant("nan.tar", nan_state))),
        Case("convert_missing_key", "converter", "error",
             convert(lambda s, w: s.official_variant(
                 "nokey.tar", lambda c: c["state_dict"].pop("module.encoder_q.layer2.0.bn2.running_mean")))),
        Case("convert_wrong_num_labels", "converter", "error",
             convert(lambda s, w: s.official_checkpoint, "--num_labels", "7")),
        Case("convert_output_exists", "converter", "error", converted_exists,
             check=lambda s, w, r: False, protect=lambda s, w: [w / "converted"]),
        Case("release_model_missing", "release", "error", release(lambda s, w: w / "none")),
        Case("release_model_not_mopro", "release", "error", release(lambda s, w: s.not_mopro)),
        Case("release_dir_exists", "release", "error", existing_release, protect=lambda s, w: [w / "release"]),
        Case("release_demo_like_card", "release", "handled", release(lambda s, w: s.trained_run),
             check=card_of_demo, note="a tiny image-folder run: the card must not claim WebVision or 90 epochs"),
    ]  # fmt: skip


# Processes that stand in for a run still going on (a held output folder); ended when the harness ends.
_HOLDERS: list[subprocess.Popen] = []


def issue20_cases() -> list[Case]:
    """Issue 20's inputs, one per defect found by trying the commands as a new user (and each kind's neighbour)."""
    out = lambda w: ["--output_dir", str(w / "out")]  # noqa: E731
    val = lambda w: str(write_folder(w / "val", dict.fromkeys(CLASSES, 1), seed=2))  # noqa: E731

    def train_on(folder: Callable[[Setup, Path], Path], *extra: str, validation: bool = True):
        return lambda s, w: ["--train_dir", str(folder(s, w)), *(["--validation_dir", val(w)] if validation else []),
                             *TINY_TRAIN, *extra, *out(w)]  # fmt: skip

    def with_fifo(s, w):
        folder = bad_train_folder(w / "train", {})
        os.mkfifo(folder / "apple" / "x.png")  # a named pipe named like an image: open() would block forever
        return folder

    def with_odd_entries(s, w):
        folder = write_folder(w / "train", dict.fromkeys(CLASSES, 2))
        (folder / "apple" / "readme.txt").write_text("not an image")
        (w / "extra").mkdir()
        (w / "extra" / "linked.png").write_bytes(png_bytes(0, 77))
        (folder / "apple" / "more").symlink_to(w / "extra")  # a linked sub-folder: followed and read
        return folder

    def parent_of_splits(s, w):
        write_folder(w / "data" / "train", dict.fromkeys(CLASSES, 2))
        write_folder(w / "data" / "val", dict.fromkeys(CLASSES, 1))
        return w / "data"

    def held_folder(s, w):
        """An output folder another run holds (a process that claimed it and is still going)."""
        (w / "out").mkdir(parents=True, exist_ok=True)
        (w / "out" / "checkpoint-1").mkdir(exist_ok=True)
        (w / "out" / "checkpoint-1" / "optimizer.pt").write_bytes(b"the other run's state")
        code = ("import sys, time; from training.run_folder import claim_output_dir; claim_output_dir(sys.argv[1]); "
                "print('held', flush=True); time.sleep(600)")  # fmt: skip
        env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
        holder = subprocess.Popen([sys.executable, "-c", code, str(w / "out")], env=env, stdout=subprocess.PIPE,
                                  text=True)  # fmt: skip
        _HOLDERS.append(holder)
        if holder.stdout.readline().strip() != "held":
            raise RuntimeError("the holder process did not claim the folder")
        return [*s.train(), "--overwrite_output_dir", "true", *out(w)]

    def model_copy(s, w):
        if not (w / "model").exists():
            shutil.copytree(s.model, w / "model")
        return w / "model"

    def broken_model(change: Callable[[Path], None]):
        def argv(s, w):
            model = model_copy(s, w)
            change(model)
            return ["--model_name_or_path", str(model), "--data_dir", str(s.val_images), *EVAL_TINY, *NAMED, *out(w)]

        return argv

    def truncate_weights(model: Path) -> None:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])

    def wrong_num_labels(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "num_labels": 7}))

    def yaml_file(text: str):
        def argv(s, w):
            (w / "run.yaml").write_text(text)
            return [str(w / "run.yaml"), *s.train(), *out(w)]

        return argv

    def resumed_with(*flags: str, data: Callable[[Setup, Path], list[str]] | None = None):
        def argv(s, w):
            run = w / "run"
            if not run.exists():
                shutil.copytree(s.trained_run, run)
            train = data(s, w) if data else ["--train_dir", str(s.images), "--validation_dir", str(s.val_images)]
            return [*train, *TINY_TRAIN, "--max_steps", "4", "--resume_from_checkpoint", str(run / "checkpoint-2"),
                    "--output_dir", str(run), *flags]  # fmt: skip

        return argv

    def disk_full(s, w):
        run = w / "run"
        if not run.exists():
            shutil.copytree(s.trained_run, run)
        code = (
            "import errno\n"
            "from training.trainer import MoProTrainer\n"
            "def full(self, output_dir): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "MoProTrainer._save_optimizer_and_scheduler = full\n"
            "from modeling_mopro.cli import run_command; from training.run_mopro import main; run_command(main)\n"
        )
        argv = [*s.train("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"),
                "--resume_from_checkpoint", str(run / "checkpoint-2"), "--output_dir", str(run)]  # fmt: skip
        return ["-c", code, *argv]  # `python -c CODE ARGS`: run_mopro's main reads ARGS from sys.argv[1:]

    def missing_ids(s, w):
        (w / "pseudo_label.json").write_text(json.dumps({"images": ["apple/none.png"], "labels": [0]}))
        return w / "pseudo_label.json"

    def subset_out_of_range(s, w):
        (w / "subset.txt").write_text("apple 0\nbee 1\ncat 2\ndog 4000\n")
        return w / "subset.txt"

    def subset_missing_folder(s, w):
        (w / "subset.txt").write_text("apple 0\nbee 1\ncat 2\n")  # dog/ has no entry
        return w / "subset.txt"

    def wide_png(s, w):
        import numpy as np
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.zeros((1, 100_000, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return write_folder(w / "data", dict.fromkeys(CLASSES, 1), extra={"bee/line.png": buffer.getvalue()})

    def fifo_eval(s, w):
        folder = write_folder(w / "data", dict.fromkeys(CLASSES, 1))
        os.mkfifo(folder / "bee" / "x.png")
        return folder

    def passed_over(reason: str, count: int, name: str):
        def check(s: Setup, w: Path, r: Run) -> bool:
            return results(w, "out", "all_results.json").get(f"train_passed_over_{reason}") == count and name in r.output

        return check

    def protect_model(s, w):
        return [model_copy(s, w)]

    def svm_small(s, w):
        from tests.fixtures_eval import write_voc07

        if not (w / "voc").exists():
            write_voc07(w / "voc", num_trainval=24, num_test=10)
        return w / "voc"

    return [
        # lost
        Case("i20_train_folder_held_by_another_run", "run_mopro", "error", held_folder,
             protect=lambda s, w: [w / "out"], note="another run holds --output_dir; even --overwrite_output_dir"),
        Case("i20_noise_report_into_model_folder", "noise_report", "error",
             lambda s, w: ["--model_name_or_path", str(model_copy(s, w)), "--data_dir", str(s.images), *EVAL_TINY,
                           "--output_dir", str(model_copy(s, w)), "--overwrite"],
             protect=protect_model, note="--output_dir is the model folder (its README.md is the model card)"),
        Case("i20_train_disk_full_during_save", "python", "error", disk_full,
             protect=lambda s, w: [w / "run" / "checkpoint-2"],
             check=lambda s, w, r: False, note="ENOSPC while saving checkpoint-4: checkpoint-2 intact, no partial"),
        # hangs
        Case("i20_train_named_pipe", "run_mopro", "skip", train_on(with_fifo, "--max_steps", "4"),
             check=passed_over("not_a_regular_file", 1, "x.png"), note="apple/x.png is a named pipe"),
        Case("i20_classify_named_pipe", "classification", "skip", lambda s, w: [
             "--model_name_or_path", str(s.model), "--data_dir", str(fifo_eval(s, w)), *EVAL_TINY, *NAMED, *out(w)],
             check=named_in_output("x.png", "not a regular file"), note="bee/x.png is a named pipe"),
        # silent
        Case("i20_train_webvision_yaml_without_dir", "run_mopro", "error",
             lambda s, w: [str(REPO / "training" / "configs" / "webvision_v1_r50.yaml"), *TINY_TRAIN, *out(w)],
             check=lambda s, w, r: False, note="the WebVision recipe without --webvision_dir"),
        Case("i20_classify_without_dataset", "classification", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--data_dir", str(s.val_images), *EVAL_TINY, *out(w)],
             check=lambda s, w, r: not (w / "out" / "eval_classification_webvision.json").exists(),
             note="an image folder without --dataset (was filed as WebVision)"),
        Case("i20_knn_without_dataset", "knn", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--train_data_dir", str(s.images), "--data_dir",
                           str(s.val_images), *EVAL_TINY, "--k", "3", *out(w)],
             check=lambda s, w, r: not (w / "out" / "eval_knn_webvision.json").exists()),
        Case("i20_train_dir_parent_of_splits", "run_mopro", "error", train_on(parent_of_splits, validation=False),
             check=lambda s, w, r: False, note="--train_dir data/ holding train/ and val/"),
        Case("i20_train_single_class", "run_mopro", "error",
             train_on(lambda s, w: write_folder(w / "train", {"apple": 8}), validation=False),
             check=lambda s, w, r: False, note="one class folder"),
        Case("i20_train_odd_entries_counted", "run_mopro", "skip", train_on(with_odd_entries, "--max_steps", "2"),
             check=passed_over("extension", 1, "readme.txt"),
             note="an unknown extension (counted) and a linked sub-folder (followed)"),
        Case("i20_train_max_steps_zero", "run_mopro", "error", lambda s, w: [*s.train("--max_steps", "0"), *out(w)],
             check=lambda s, w, r: False),
        Case("i20_train_epochs_zero", "run_mopro", "error",
             lambda s, w: [*s.train("--max_steps", "-1", "--num_train_epochs", "0"), *out(w)],
             check=lambda s, w, r: False),
        Case("i20_train_resume_other_seed", "run_mopro", "error", resumed_with("--seed", "7"),
             check=lambda s, w, r: "seed" in json.dumps(results(w, "run", "run_args.json").get("resumes")),
             protect=lambda s, w: [w / "run" / "checkpoint-2"], note="or recorded with --allow_changed_resume"),
        Case("i20_train_resume_other_batch", "run_mopro", "error", resumed_with("--global_batch_size", "2"),
             check=lambda s, w, r: False, protect=lambda s, w: [w / "run" / "checkpoint-2"]),
        Case("i20_knn_k_above_data", "knn", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--train_data_dir", str(s.images), "--data_dir",
                           str(s.val_images), *EVAL_TINY, *NAMED, "--k", "200", *out(w)],
             check=lambda s, w, r: False, note="k 200 on 12 images (ran k = 12, filed as k200)"),
        Case("i20_svm_shots_above_data", "lowshot_svm", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--task", "voc07", "--data_dir", str(svm_small(s, w)),
                           *EVAL_TINY, *out(w), "--shots", "64", "--runs", "1"],
             check=lambda s, w, r: False, note="64 shots, 24 training images"),
        # unclear
        Case("i20_classify_100000x1_png", "classification", "skip|error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--data_dir", str(wide_png(s, w)), *EVAL_TINY,
                           *NAMED, *out(w)],
             check=named_in_output("line.png", "too large"), note="a 100000 x 1 PNG (~26 GB once resized at 224 px)"),
        Case("i20_train_nan_lr", "run_mopro", "error", lambda s, w: [*s.train("--learning_rate", "nan"), *out(w)],
             check=lambda s, w, r: False),
        Case("i20_train_inf_lr", "run_mopro", "error", lambda s, w: [*s.train("--learning_rate=-inf"), *out(w)],
             check=lambda s, w, r: False),
        Case("i20_train_yaml_list", "run_mopro", "error", yaml_file("- a\n- b\n"), check=lambda s, w, r: False),
        Case("i20_train_yaml_syntax", "run_mopro", "error", yaml_file("a: [1,\n"), check=lambda s, w, r: False),
        Case("i20_train_yaml_eval_strategy_no", "run_mopro", "error", yaml_file("eval_strategy: no\n"),
             check=lambda s, w, r: False, note="unquoted: YAML reads it as False"),
        Case("i20_classify_config_num_labels", "classification", "error", broken_model(wrong_num_labels),
             note="config.json num_labels 7, id2label 4"),
        Case("i20_classify_truncated_safetensors", "classification", "error", broken_model(truncate_weights)),
        Case("i20_train_resume_other_classes", "run_mopro", "error",
             resumed_with(data=lambda s, w: ["--train_dir", str(write_folder(w / "other", dict.fromkeys("wxyz", 2)))]),
             check=lambda s, w, r: False, protect=lambda s, w: [w / "run" / "checkpoint-2"]),
        Case("i20_train_resume_other_architecture", "run_mopro", "error", resumed_with("--embedding_size", "16"),
             check=lambda s, w, r: False, protect=lambda s, w: [w / "run" / "checkpoint-2"]),
        Case("i20_retrain_ids_missing", "classifier_retrain", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--output_dir", str(w / "rt"), "--annotation",
                           str(missing_ids(s, w)), "--train_data_dir", str(s.images), "--results_dir", str(w / "out")],
             note="pseudo_label.json names an image the data lacks (a file list)"),
        Case("i20_retrain_ids_missing_imagefolder", "classifier_retrain", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--output_dir", str(w / "rt"), "--annotation",
                           str(missing_ids(s, w)), "--train_data_dir", str(s.images), "--train_data_format",
                           "imagefolder", "--results_dir", str(w / "out")],
             note="the same, matched on an image folder's ids (was a KeyError)"),
        Case("i20_robustness_index_out_of_range", "robustness", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--data_dir", str(s.images), "--class_subset",
                           str(subset_out_of_range(s, w)), *EVAL_TINY, *out(w)]),
        Case("i20_robustness_folder_not_in_subset", "robustness", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--data_dir", str(s.images), "--class_subset",
                           str(subset_missing_folder(s, w)), *EVAL_TINY, *out(w)]),
        Case("i20_classify_device_cuda_without_gpu", "classification", "error",
             lambda s, w: ["--model_name_or_path", str(s.model), "--data_dir", str(s.val_images), "--batch_size", "8",
                           "--num_workers", "0", "--device", "cuda", *NAMED, *out(w)],
             check=lambda s, w, r: __import__("torch").cuda.is_available(), note="handled where a GPU exists"),
    ]  # fmt: skip


def self_check_cases() -> list[Case]:
    """Fake commands with known outcomes, so the classifier itself is tested (tests/test_benchmarks.py)."""
    py = lambda code: lambda s, w: ["-c", code]  # noqa: E731
    return [
        Case("self_raw_traceback", "python", "error", py("raise ValueError('bad input')")),
        Case("self_clear_error", "python", "error",
             py("import sys; print('error: --x must be positive', file=sys.stderr); sys.exit(2)")),
        Case("self_silent", "python", "error", py("print('done')"), check=lambda s, w, r: False),
        Case("self_skip_counted", "python", "skip", py("print('skipped 1 image: a.jpg')"),
             check=named_in_output("skipped 1", "a.jpg")),
        Case("self_lost", "python", "error",
             lambda s, w: (w / "keep.txt").write_text("old") and ["-c", "open('keep.txt', 'w').write('new')"],
             protect=lambda s, w: [w / "keep.txt"]),
    ]  # fmt: skip


def all_cases() -> list[Case]:
    return [*training_cases(), *evaluation_cases(), *tool_cases(), *issue20_cases()]


# ---------------------------------------------------------------------------------------------------------- main
def print_table(rows: list[Row]) -> None:
    header = f"{'input':38} {'command':18} {'expected':10} {'outcome':14} {'ok':3} {'s':>5}  message"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.name:38} {row.command:18} {row.expected:10} {row.outcome:14} {'y' if row.ok else 'N':3} "
              f"{row.seconds:5.1f}  {row.message}")  # fmt: skip


def totals(rows: list[Row]) -> dict[str, int]:
    counted = Counter(row.outcome for row in rows)
    return {outcome: counted.get(outcome, 0) for outcome in (*OUTCOMES, "setup failed")} | {
        "cases": len(rows),
        "ok": sum(row.ok for row in rows),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated case names (or name prefixes)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: the self-checks and one fast case")
    parser.add_argument("--self_check", action="store_true", help="run only the classifier's self-checks")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per case")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "bad_inputs.json"))
    args = parser.parse_args(argv)

    cases = all_cases()
    if args.self_check:
        cases = self_check_cases()
    elif args.quick:
        cases = [*self_check_cases(), *(case for case in cases if case.quick)]
    if args.only:
        wanted = args.only.split(",")
        cases = [c for c in [*cases, *self_check_cases()] if any(c.name.startswith(w) for w in wanted)]
        if not cases:
            parser.error(f"no case matches --only {args.only}")

    root = Path(tempfile.mkdtemp(prefix="mopro_bad_inputs_"))
    start = time.perf_counter()
    rows = []
    try:
        setup = Setup(root)
        for case in cases:
            row = run_case(case, setup, args.timeout)
            print(f"[{len(rows) + 1}/{len(cases)}] {row.name}: {row.outcome} ({row.seconds:.0f}s)", flush=True)
            rows.append(row)
    finally:
        for holder in _HOLDERS:
            holder.kill()
            holder.wait()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - start

    print()
    print_table(rows)
    summary = totals(rows)
    print()
    shown = {k: v for k, v in summary.items() if v or k in ("silent", "lost", "raw traceback")}
    print("totals: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    print(f"total time {seconds:.0f} s for {len(rows)} cases")
    result = {"totals": summary, "seconds": round(seconds, 1), "rows": [row.__dict__ for row in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    write_result(Path(args.output), result)
    return result


if __name__ == "__main__":
    main()
