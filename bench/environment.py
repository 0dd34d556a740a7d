"""What every benchmark JSON records besides its figures (date, command, versions, cores, load), so runs compare."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def machine_info(device: Any = None) -> dict[str, Any]:
    """CPU count, torch threads, library versions, platform and load average; GPU name and CUDA for a CUDA device."""
    import datasets
    import PIL
    import timm
    import torch
    import torchvision
    import transformers

    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "timm_version": timm.__version__,
        "transformers_version": transformers.__version__,
        "datasets_version": datasets.__version__,
        "pillow_version": PIL.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


ROOT = Path(__file__).resolve().parent.parent


def head_commit() -> str:
    """The repository's HEAD as a short hash: the code a collected or scored result came from, unless told otherwise."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def write_result(path: Path, result: dict[str, Any], machine: dict[str, Any] | None = None) -> None:
    """Writes a benchmark's JSON with when, how (the command line) and where (`machine_info` unless given) it ran."""
    stamped = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **result,
        "machine": machine if machine is not None else machine_info(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    print(f"wrote {path}")
