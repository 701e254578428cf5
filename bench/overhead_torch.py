#!/usr/bin/env python3
"""bench/overhead_torch.py: the PyTorch peer of bench/overhead.lua.

The same tiny ops in eager PyTorch (CPU, float32, 1 intra-op thread, grad
mode on), timed the same way (this thread's CPU time unless BENCH_CLOCK=wall): a loop of N ops, elapsed / N in microseconds,
median over repetitions, cases interleaved within each repetition. Prints
    RESULT name=torch_overhead_<case> value=<us> unit=us
Optional: bench/run.sh runs it only when `import torch` works, and prints
keel/torch ratios.

usage: overhead_torch.py [reps [n [n_linear]]]   (defaults 5, 300000, 30000;
       BENCH_SCALE scales n and n_linear as in the Lua benchmarks)
"""
import os
import statistics
import sys
import time

import torch


def main():
    scale = float(os.environ.get("BENCH_SCALE", "1") or 1)
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("BENCH_OVH_REPS", 5))
    n = int(sys.argv[2]) if len(sys.argv) > 2 else int(os.environ.get("BENCH_OVH_N", 300000))
    nl = int(sys.argv[3]) if len(sys.argv) > 3 else int(os.environ.get("BENCH_OVH_N_LINEAR", 30000))
    n, nl = max(1, round(n * scale)), max(1, round(nl * scale))
    torch.set_num_threads(1)
    torch.manual_seed(1)
    # as bench/overhead.lua: this thread's CPU time unless BENCH_CLOCK=wall
    clock = os.environ.get("BENCH_CLOCK") or "thread"
    now = time.perf_counter if clock == "wall" else time.thread_time

    a, b = torch.randn(4), torch.randn(4)
    ag = torch.randn(4, requires_grad=True)
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    wl = torch.randn(4, 4, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)

    def f(p, q):
        return p

    def empty_loop(k):
        t0 = now()
        for _ in range(k):
            pass
        return now() - t0

    def py_call(k):
        t0 = now()
        for _ in range(k):
            c = f(a, b)
        return now() - t0

    def add(k):
        t0 = now()
        for _ in range(k):
            c = a + b
        return now() - t0

    def add_scalar(k):
        t0 = now()
        for _ in range(k):
            c = a + 1
        return now() - t0

    def add_grad(k):
        t0 = now()
        for _ in range(k):
            c = ag + b
        return now() - t0

    def relu(k):
        t0 = now()
        for _ in range(k):
            c = a.relu()
        return now() - t0

    def sum_(k):
        t0 = now()
        for _ in range(k):
            c = a.sum()
        return now() - t0

    def matmul(k):
        t0 = now()
        for _ in range(k):
            y = x.matmul(w)
        return now() - t0

    def linear_fwd_bwd(k):
        t0 = now()
        for _ in range(k):
            y = x.matmul(wl) + bias
            l = y.sum()
            l.backward()
            wl.grad = None
            bias.grad = None
        return now() - t0

    cases = [("py_empty_loop", n, empty_loop), ("py_call", n, py_call), ("add", n, add),
             ("add_scalar", n, add_scalar), ("add_grad", n, add_grad), ("relu", n, relu),
             ("sum", n, sum_), ("matmul", n, matmul), ("linear_fwd_bwd", nl, linear_fwd_bwd)]

    print(f"# overhead_torch: torch {torch.__version__}, {reps} reps of {n} ops ({nl} for linear_fwd_bwd); "
          f"{clock} clock", flush=True)
    for _, k, fn in cases:  # warmup
        fn(max(1, k // 10))
    samples = {name: [] for name, _, _ in cases}
    for _ in range(reps):
        for name, k, fn in cases:
            samples[name].append(fn(k) / k * 1e6)
    for name, _, _ in cases:
        s = samples[name]
        print(f"# torch_overhead_{name:<15} us/op: median {statistics.median(s):.4g} "
              f"min {min(s):.4g} max {max(s):.4g} (n={len(s)})")
    for name, _, _ in cases:
        print(f"RESULT name=torch_overhead_{name} value={statistics.median(samples[name]):.4g} unit=us")


if __name__ == "__main__":
    main()
