"""bench/train_torch.py WHAT [batch]: the PyTorch twin of bench/train.lua.

Same models, batches, optimizers and synthetic data shapes; prints
RESULT lines named *_torch. TORCH_THREADS (default: OPENBLAS_NUM_THREADS,
else 1) sets torch.set_num_threads; bench/train.sh runs torch with one
BLAS thread, its best configuration in BASELINE.md.
"""
import os
import sys
import time

import torch
import torch.nn as nn

what = sys.argv[1] if len(sys.argv) > 1 else "cnn"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
threads = os.environ.get("TORCH_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))
torch.set_num_threads(int(threads))
scale = float(os.environ.get("BENCH_SCALE", "1"))
torch.manual_seed(0)


def scaled(n):
    return max(1, int(n * scale + 0.5))


def time_steps(step, warmup, reps, rounds):
    for _ in range(warmup):
        step()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        per.append((time.perf_counter() - t0) / reps)
    per.sort()
    return per[len(per) // 2]


def result(name, value, unit):
    print(f"RESULT name={name} value={value:.6g} unit={unit}", flush=True)


if what == "cnn":
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    s = time_steps(step, 3, scaled(10), 3)
    result(f"train_cnn_b{batch}_t{threads}_torch", batch / s, "img/s")
elif what == "lstm":
    V, E, H, T, N = 65, 64, 256, 64, 32
    emb, lstm, head = nn.Embedding(V, E), nn.LSTM(E, H), nn.Linear(H, V)
    params = list(emb.parameters()) + list(lstm.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    xs = torch.randint(0, V, (T, N))
    ys = torch.randint(0, V, (T, N))

    def step():
        out, _ = lstm(emb(xs))
        loss = nn.functional.cross_entropy(head(out.reshape(T * N, H)), ys.reshape(T * N))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()

    s = time_steps(step, 2, scaled(5), 3)
    result(f"train_lstm_t{threads}_torch", T * N / s, "tokens/s")
elif what == "adamw":
    total, n = 10 * 1000 * 1000, 50
    params = [torch.randn(total // n, requires_grad=True) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(total // n)
    for foreach in (False, True):
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, foreach=foreach)

        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        s = time_steps(step, 2, scaled(5), 3)
        tag = "foreach" if foreach else "loop"
        result(f"clip_adamw_10M_t{threads}_torch_{tag}", s * 1e3, "ms")
else:
    sys.exit(f"train_torch.py: unknown workload {what} (cnn, lstm, adamw)")
