"""Count the host synchronisations of a training step, on any device.

A GPU step runs ahead of the host until some call needs a value from the device: `.item()`, `int(t)`, `bool(t)`
(an `if` on a tensor), `.tolist()`, `.cpu()`, boolean-mask indexing and `nonzero` (their output size depends on the
values), `bincount` without a fixed length, `unique`, ... Each one drains the device's queue. On CUDA,
`torch.cuda.set_sync_debug_mode("warn")` reports the syncs the driver sees; on the CPU, where nothing waits, the same
calls are counted by name (`HostSyncCounter`, a `TorchFunctionMode`), so that a test on CPU fails when a step gains
one.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Calls that read a device value back to the host (or size their output by one).
_SYNCING = {
    "__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero", "masked_select",
    "bincount", "unique", "unique_consecutive", "repeat_interleave", "argwhere", "nonzero_static",
}  # fmt: skip


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncCounter(TorchFunctionMode):
    """Within `with HostSyncCounter() as counter:`, `counter.count` is the number of calls that would synchronise a
    GPU step, and `counter.calls` names them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _SYNCING:
            if not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
                self.calls[name] += 1
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_index(args[1]):
            self.calls[f"{name}[bool mask]"] += 1
        elif name == "to" and any(_is_cpu(a) for a in (*args[1:], kwargs.get("device"))):
            if isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
                self.calls["to(cpu)"] += 1
        return func(*args, **kwargs)


def _is_cpu(device: Any) -> bool:
    return (isinstance(device, str) and device.startswith("cpu")) or (
        isinstance(device, torch.device) and device.type == "cpu"
    )


def count_host_syncs(step: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run `step` once and count its host synchronisations: `{"calls": n, "by_name": {...}}` from
    `HostSyncCounter`, plus `"cuda": n` (the driver's count, `set_sync_debug_mode`) on a CUDA device."""
    result: dict[str, Any] = {}
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        result["cuda"] = sum("synchroniz" in str(warning.message) for warning in caught)
    with HostSyncCounter() as counter:
        step()
    result["calls"] = counter.count
    result["by_name"] = dict(counter.calls)
    return result


__all__ = ["HostSyncCounter", "count_host_syncs"]
