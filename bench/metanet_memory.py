"""Peak memory and time of one MetaNet meta-gradient by ``algorithm.task_chunk``, and that the chunks agree.

Workload: the shipped ``configs/metanet_omniglot_5w1s.yaml`` network (the authors' settings: 5 conv
blocks of 64 filters per trunk, fast weights on every layer, generators of 20 hidden units) on
Omniglot-sized 5-way 1-shot 15-query episodes of random 28x28 pixels, one ``meta_grad`` of
``--tasks`` episodes (16: the paper's meta-batch) with the episodes backpropagated ``task_chunk``
at a time. Each row runs in a fresh subprocess: on CPU the memory figure is the rise of peak RSS
over the RSS before the call; on CUDA also ``torch.cuda.max_memory_allocated``. The rows'
meta-gradients are compared with the first row's (float32: agree to rounding).

    python -m bench.metanet_memory                          # CPU: 16 episodes in chunks of 16, 4 and 1 (13 GB)
    python -m bench.metanet_memory --tasks 4 --chunks 4 1   # a quicker, smaller check
    python -m bench.metanet_memory --device cuda
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.peak import measure as measure_call
from bench.peak import run_child
from pipeline.algorithms.metanet import MetaNet
from tasks.episodes import Episodes


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One meta-gradient in this process; returns its memory and time, and writes the gradient to ``args.grads``."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = MetaNet(ways=args.ways, task_chunk=args.task_chunk)  # the dataclass defaults are the shipped config's
    gen = torch.Generator().manual_seed(0)
    labels = lambda n: torch.arange(args.ways).repeat_interleave(n).repeat(args.tasks, 1)  # noqa: E731
    episodes = Episodes(
        torch.rand(args.tasks, args.ways, 1, 28, 28, generator=gen), labels(1),
        torch.rand(args.tasks, args.ways * args.queries, 1, 28, 28, generator=gen), labels(args.queries),
    ).to(device)
    params = {k: v.to(device) for k, v in net.init(0).items()}
    return measure_call(lambda: net.meta_grad(params, episodes)[0], device, args.grads)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metanet_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=16, help="episodes per meta_grad (the meta-batch)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 4, 1], help="task_chunk of each row")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15, help="queries per class")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--task-chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grads:  # child: one row
        print(json.dumps(measure(args)))
        return
    shared = [f"--{k}={getattr(args, k)}" for k in ("tasks", "ways", "queries", "device", "threads")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in args.chunks:
            result, grads = run_child("bench.metanet_memory", [f"--task-chunk={chunk}", *shared], str(Path(tmp) / f"{chunk}.safetensors"))
            first = rows[0][2] if rows else grads
            result["grad_diff"] = max((grads[k] - first[k]).abs().max().item() for k in grads)
            rows.append((chunk, result, grads))
    cuda = args.device.startswith("cuda")
    print(f"MetaNet (configs/metanet_omniglot_5w1s.yaml's network), {args.ways}-way 1-shot {args.queries}-query 28x28, "
          f"{args.tasks} episodes per meta_grad, {args.device}, torch {torch.__version__}, {args.threads} threads")
    print("| task_chunk | peak RSS rise (MiB) | " + ("CUDA peak (MiB) | " if cuda else "") + "time (s) | max grad diff vs first row |")
    print("|---|---|" + ("---|" if cuda else "") + "---|---|")
    for chunk, r, _ in rows:
        peak = f" {r['cuda_peak_mib']:.0f} |" if cuda else ""
        print(f"| {chunk} | {r['rss_rise_mib']:.0f} |{peak} {r['seconds']:.2f} | {r['grad_diff']:.2g} |")


if __name__ == "__main__":
    main()
