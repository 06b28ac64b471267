"""Peak memory and time of second-order MAML with ResNet-12, with and without checkpointed inner steps.

Workload: Mini-ImageNet 5-way 1-shot 15-query on random 84x84 inputs, ResNet-12
(64-160-320-640; pipeline/nets/resnet12.py), second-order MAML (inner lr 0.01), one
``meta_grad`` of ``--tasks`` tasks, for 1, 3 and 5 inner steps, plain and with
``algorithm.checkpoint: true`` (each inner step recomputed in the backward pass). Each
row runs in a fresh subprocess: on CPU the memory figure is the rise of peak RSS over the
RSS before the call; on CUDA also ``torch.cuda.max_memory_allocated``. Time: the one call.
The meta-gradients of the two modes are compared (float32: agree to rounding).

    python -m bench.memory                              # CPU, the paper's sizes
    python -m bench.memory --device cuda
    python -m bench.memory --image-size 16 --widths 8 8 8 8 --queries 1 --steps 1 2   # a quick check
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from bench.peak import measure as measure_call
from bench.peak import run_child
from pipeline.algorithms.maml import MAML
from pipeline.nets.module import ModuleNet
from tasks.episodes import Episodes


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One meta-gradient in this process; returns its memory and time, and writes the gradient to ``args.grads``."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kwargs = {"in_channels": 3, "ways": args.ways, "widths": list(args.widths)}
    maml = MAML(ModuleNet("pipeline.nets.resnet12:ResNet12", kwargs), "cross_entropy", inner_lr=0.01,
                inner_steps=args.inner_steps, batching="loop", checkpoint=args.checkpoint)
    gen = torch.Generator().manual_seed(0)
    size, ways = args.image_size, args.ways
    episodes = Episodes(
        torch.rand(args.tasks, ways, 3, size, size, generator=gen), torch.arange(ways).repeat(args.tasks, 1),
        torch.rand(args.tasks, ways * args.queries, 3, size, size, generator=gen),
        torch.arange(ways).repeat_interleave(args.queries).repeat(args.tasks, 1),
    ).to(device, torch.float32)
    params = {k: v.to(device).requires_grad_() for k, v in maml.init(0).items()}
    # load torch.utils.checkpoint's lazy imports before the baseline, in both modes alike
    checkpoint(lambda t: t * 2, torch.ones(1, requires_grad=True), use_reentrant=False).sum().backward()
    return measure_call(lambda: maml.meta_grad(params, episodes)[0], device, args.grads)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3, 5], help="inner steps of each row pair")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15, help="queries per class")
    parser.add_argument("--tasks", type=int, default=1, help="tasks per meta_grad (memory grows with it)")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--widths", type=int, nargs=4, default=[64, 160, 320, 640])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grads:  # child: one row
        print(json.dumps(measure(args)))
        return
    shared = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("ways", "queries", "tasks", "image_size", "device", "threads")]
    shared += ["--widths", *map(str, args.widths)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            grads = {}
            for mode in ("plain", "checkpoint"):
                options = [f"--inner-steps={steps}", *shared] + (["--checkpoint"] if mode == "checkpoint" else [])
                result, grads[mode] = run_child("bench.memory", options, str(Path(tmp) / f"{steps}-{mode}.safetensors"))
                rows.append((steps, mode, result))
            diff = max((grads["plain"][k] - grads["checkpoint"][k]).abs().max().item() for k in grads["plain"])
            rows[-1][2]["grad_diff"] = diff
    cuda = args.device.startswith("cuda")
    print(f"second-order MAML, ResNet-12 {'-'.join(map(str, args.widths))}, {args.ways}-way 1-shot {args.queries}-query, "
          f"{args.image_size}x{args.image_size}, {args.tasks} task(s) per meta_grad, {args.device}, torch {torch.__version__}, "
          f"{args.threads} threads")
    print("| inner steps | mode | peak RSS rise (MiB) | " + ("CUDA peak (MiB) | " if cuda else "") + "time (s) | max grad diff |")
    print("|---|---|---|" + ("---|" if cuda else "") + "---|---|")
    for steps, mode, r in rows:
        peak = f" {r['cuda_peak_mib']:.0f} |" if cuda else ""
        diff = f"{r['grad_diff']:.2g}" if "grad_diff" in r else ""
        print(f"| {steps} | {mode} | {r['rss_rise_mib']:.0f} |{peak} {r['seconds']:.2f} | {diff} |")


if __name__ == "__main__":
    main()
