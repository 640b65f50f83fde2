"""Micro-benchmark of one GPTQ solve: the column loop and the MSE scale search alone.

Shapes are SmolLM2-135M's: ``576x1536`` (out x in: down_proj), ``1536x576`` (gate or up),
``3072x576`` (gate+up stacked, as the pipeline solves them), ``960x576`` (q/k/v stacked),
``576x576`` (o_proj). The weights are random normal (std 0.02, a few outliers), the Hessian is
``2 XᵀX / n`` of random activations with per-channel scales spread over two decades, both from
a fixed seed, so every run solves the same problem.

    python bench/bench_solve.py [--shapes 576x1536,1536x576] [--threads 1,2] [--workers 1,2]
                                [--repeat 3] [--observer mse] [--device cuda --kernels torch,triton]

``--threads``: torch intra-op (OpenMP) threads; ``--workers``: ``GPTQParams.workers``, threads
running the column loop on row chunks (the pipeline runs solves with 1 intra-op thread and
as many workers as the rank has cores). Prints the best of ``--repeat`` wall and CPU times
per (shape, threads, workers) for the whole solve and the wall time of the scale search of
all groups (one ``compute_qparams`` call per group, as GPTQ makes them), plus a digest of the
integers and scales, so the outputs of two code versions or settings can be compared.

``--device cuda``: the problem is built and solved on the GPU (timings synchronized);
``--kernels``: ``quant.kernel`` values (``torch``: the column loop in torch ops, ``triton``: one
fused launch per group, ``algorithms/gptq_triton.py``), each row with the fraction of its
integers equal to the first kernel's and the output error ``tr(ΔW H ΔWᵀ)`` relative to it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_quant.algorithms.gptq import GPTQParams, gptq_quantize  # noqa: E402
from dist_quant.quant.qparams import QuantArgs, compute_qparams  # noqa: E402


def problem(out_f: int, in_f: int, tokens: int = 4096, seed: int = 0, device: str = "cpu"):
    g = torch.Generator(device).manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, device=device) * 0.02
    w[torch.rand(out_f, in_f, generator=g, device=device) < 1e-3] *= 8.0
    chan = 10 ** (torch.rand(in_f, generator=g, device=device) * 2 - 1)
    x = torch.randn(tokens, in_f, generator=g, device=device) * chan
    h = (2.0 / tokens) * (x.T.double() @ x.double())
    return w.to(torch.bfloat16).float(), h.float()


def sync(device: str) -> None:
    if device != "cpu":
        getattr(torch, device).synchronize()


def digest(*ts: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def best(fn, repeat: int, device: str = "cpu") -> tuple[float, float, object]:
    times, cpu, out = [], [], None
    for _ in range(repeat):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), min(cpu), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="576x1536,1536x576,3072x576,960x576,576x576")
    p.add_argument("--threads", default="1")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--observer", default="mse", choices=("mse", "minmax"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernels", default="torch", help="quant.kernel values, comma-separated")
    a = p.parse_args()
    args = QuantArgs(bits=4, group_size=a.group_size, symmetric=True, scale_dtype=torch.bfloat16,
                     mse=a.observer == "mse")
    params = GPTQParams()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, observer {a.observer}, group {a.group_size}")
    print(f"device {a.device}" + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))
    print("| shape (out x in) | threads | workers | kernel | solve wall s | solve CPU s | scale search s | "
          "ints = first kernel | error / first kernel's | digest |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        w, h = problem(out_f, in_f, device=a.device)
        groups = w.reshape(out_f, in_f // args.columns_per_group(in_f), -1).transpose(0, 1)
        for threads in map(int, a.threads.split(",")):
            torch.set_num_threads(threads)
            t_search, _, _ = best(lambda: [compute_qparams(gw, args) for gw in groups], a.repeat, a.device)
            for workers in map(int, a.workers.split(",")):
                first = None
                for kernel in a.kernels.split(","):
                    pw = replace(params, workers=workers, kernel=kernel)
                    t_solve, c_solve, r = best(lambda: gptq_quantize(w, h, args, pw), a.repeat, a.device)
                    d = w - r.dequantize(args)
                    err = float(torch.einsum("ij,jk,ik->", d.double(), h.double(), d.double()))
                    first = first or (r, err)
                    same = (r.q == first[0].q).float().mean().item()
                    print(f"| {shape} | {threads} | {workers} | {kernel} | {t_solve:.3f} | {c_solve:.3f} | "
                          f"{t_search:.3f} | {same:.5f} | {err / first[1]:.5f} | {digest(r.q, r.scale, r.zero)} |",
                          flush=True)


if __name__ == "__main__":
    main()
