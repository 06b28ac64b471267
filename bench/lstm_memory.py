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
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.peak import measure as measure_call
from bench.peak import run_child
from pipeline.algorithms.l2l import L2L, Quadratic
from tasks.families import quadratic
from tasks.families.quadratic import QuadraticTask


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One meta-gradient in this process; returns its memory and time, and writes the gradient."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = QuadraticTask(dim=args.dim)
    fields = quadratic.sample(task, np.random.default_rng(0), args.problems)
    episodes = quadratic.decode(task, {k: torch.from_numpy(v) for k, v in fields.items()}).to(device, torch.float64)
    learner = L2L(Quadratic(), unroll=args.unroll, truncation=args.truncation, checkpoint=args.checkpoint, dtype=torch.float64)
    params = {k: v.to(device) for k, v in learner.init(0).items()}
    return measure_call(lambda: learner.meta_grad(params, episodes)[0], device, args.grads)


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
            options = [f"--{k}={getattr(args, k)}" for k in ("problems", "dim", "unroll", "truncation", "device", "threads")]
            options += ["--checkpoint"] if mode == "checkpoint" else []
            results[mode], grads[mode] = run_child("bench.lstm_memory", options, str(Path(tmp) / f"{mode}.safetensors"))
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
