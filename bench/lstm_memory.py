"""Peak memory of one L2L meta-gradient with and without gradient checkpointing, and that both agree.

Each mode runs in a fresh subprocess (``python -m bench.lstm_memory`` in the repository root;
peak RSS is per process): on CPU the figure is the rise of peak RSS over the RSS
before the call; on CUDA also ``torch.cuda.max_memory_allocated``. Usage (from the
repository root):

    python -m bench.lstm_memory                       # 10-d quadratics, 400 problems, T=100, no truncation
    python -m bench.lstm_memory --problems 1000 --truncation 20 --device cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.algorithms.l2l import L2L, Quadratic
from tasks.families import quadratic
from tasks.families.quadratic import QuadraticTask

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One meta-gradient in this process; returns its memory and time, and writes the gradient."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = QuadraticTask(dim=args.dim)
    fields = quadratic.sample(task, np.random.default_rng(0), args.problems)
    episodes = quadratic.decode(task, {k: torch.from_numpy(v) for k, v in fields.items()}).to(device, torch.float64)
    learner = L2L(Quadratic(), unroll=args.unroll, truncation=args.truncation, checkpoint=args.checkpoint, dtype=torch.float64)
    params = {k: v.to(device) for k, v in learner.init(0).items()}
    before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    grads, _ = learner.meta_grad(params, episodes)
    seconds = time.perf_counter() - start
    result = {"rss_rise_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before, "seconds": seconds}
    if device.type == "cuda":
        result["cuda_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    save_file({k: v.cpu() for k, v in grads.items()}, args.grads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lstm_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=400, help="quadratics per meta-batch")
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--unroll", type=int, default=100)
    parser.add_argument("--truncation", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grads:  # child: one mode
        print(json.dumps(measure(args)))
        return
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("plain", "checkpoint"):
            path = str(Path(tmp) / f"{mode}.safetensors")
            command = [sys.executable, "-m", "bench.lstm_memory", "--grads", path] + [
                f"--{k}={getattr(args, k)}" for k in ("problems", "dim", "unroll", "truncation", "device", "threads")
            ]
            command += ["--checkpoint"] if mode == "checkpoint" else []
            out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
            grads[mode] = load_file(path)
    diff = max((grads["plain"][k] - grads["checkpoint"][k]).abs().max().item() for k in grads["plain"])
    scale = max(v.abs().max().item() for v in grads["plain"].values())
    coords = args.problems * args.dim
    print(f"L2L meta-gradient, {args.problems} quadratics x {args.dim} = {coords} coordinates, T={args.unroll}, "
          f"truncation {args.truncation}, float64, {args.device}")
    print("| mode | peak RSS rise (MiB) | " + ("CUDA peak (MiB) | " if args.device.startswith("cuda") else "") + "time (s) |")
    print("|---|---|" + ("---|" if args.device.startswith("cuda") else "") + "---|")
    for mode, r in results.items():
        cuda = f" {r['cuda_peak_mib']:.1f} |" if "cuda_peak_mib" in r else ""
        print(f"| {mode} | {r['rss_rise_mib']:.1f} |{cuda} {r['seconds']:.2f} |")
    print(f"max |grad difference| = {diff:.3g} (largest gradient entry {scale:.3g})")


if __name__ == "__main__":
    main()
