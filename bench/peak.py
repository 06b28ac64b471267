"""Peak memory and time of one meta-gradient, measured in a fresh subprocess (peak RSS is per process).

Shared by ``bench.memory`` (second-order MAML, ResNet-12) and ``bench.lstm_memory`` (L2L): the
parent runs one child per mode with ``--grads PATH``; the child measures one call with ``measure``
and prints its result as JSON; the parent reads it back with ``run_child``, gradient included, so
the modes' meta-gradients can be compared.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """This process's resident memory now, MiB (``VmRSS`` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(call: Callable[[], dict[str, torch.Tensor]], device: torch.device, grads_path: str) -> dict[str, float]:
    """Run ``call`` (one meta-gradient) once; its peak RSS rise over the RSS before it (MiB), its time (s) and,
    on CUDA, the peak of allocated device memory over what was allocated before (MiB). Writes the
    gradient to ``grads_path`` (safetensors)."""
    before = rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    grads = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = {"rss_rise_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
              "seconds": time.perf_counter() - start}
    if device.type == "cuda":
        result["cuda_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    save_file({k: v.cpu() for k, v in grads.items()}, grads_path)
    return result


def run_child(module: str, options: list[str], grads_path: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``python -m module --grads grads_path *options`` in the repository root; its JSON result and its gradient.

    Raises subprocess.CalledProcessError when the child fails."""
    command = [sys.executable, "-m", module, "--grads", grads_path, *options]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]), load_file(grads_path)
