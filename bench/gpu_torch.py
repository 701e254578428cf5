"""bench/gpu_torch.py WHAT [batch]: the PyTorch twin of bench/gpu.lua.

Same models, batches, optimizers (clip_grad_norm_ before the step, as
keel's clip runs inside it) and synthetic data on the GPU; prints RESULT
lines named *_torch. For adamw it times both of PyTorch's multi-tensor
paths: foreach (the default) and fused=True.
"""
import os
import sys
import time

import torch
import torch.nn as nn

what = sys.argv[1] if len(sys.argv) > 1 else "cnn"
scale = float(os.environ.get("BENCH_SCALE", "1"))
dev = torch.device("cuda")
torch.manual_seed(0)


def scaled(n):
    return max(1, int(n * scale + 0.5))


def time_steps(step, warmup, reps, rounds):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) / reps)
    per.sort()
    return per[len(per) // 2]


def result(name, value, unit):
    print(f"RESULT name={name} value={value:.6g} unit={unit}", flush=True)


def trainer(model, opt, x, y, max_norm):
    params = list(model.parameters())

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
    return step


if what == "cnn":
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    s = time_steps(trainer(model, opt, x, y, 1.0), 5, scaled(50), 5)
    result(f"gpu_cnn_b{batch}_torch", batch / s, "img/s")
elif what == "mlp":
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    model = nn.Sequential(
        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 4096, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    s = time_steps(trainer(model, opt, x, y, 1.0), 3, scaled(20), 5)
    result(f"gpu_mlp_b{batch}_torch", batch / s, "samples/s")
elif what == "lstm":
    V, E, H, T, N = 65, 64, 256, 64, 32
    emb, lstm, head = nn.Embedding(V, E).to(dev), nn.LSTM(E, H).to(dev), nn.Linear(H, V).to(dev)
    params = list(emb.parameters()) + list(lstm.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    xs = torch.randint(0, V, (T, N), device=dev)
    ys = torch.randint(0, V, (T, N), device=dev)

    def step():
        out, _ = lstm(emb(xs))
        loss = nn.functional.cross_entropy(head(out.reshape(T * N, H)), ys.reshape(T * N))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()

    s = time_steps(step, 3, scaled(20), 5)
    result("gpu_lstm_torch", T * N / s, "tokens/s")
elif what == "adamw":
    total, n = 100 * 1000 * 1000, 100
    params = []
    for _ in range(n):
        p = torch.randn(total // n, device=dev, requires_grad=True)
        p.grad = torch.randn(total // n, device=dev)
        params.append(p)
    for label, kw in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        try:
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **kw)
        except (TypeError, RuntimeError) as e:
            print(f"# AdamW({kw}) unavailable: {e}", flush=True)
            continue

        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        s = time_steps(step, 2, scaled(10), 5)
        result(f"gpu_clip_adamw_100M_torch_{label}", s * 1e3, "ms")
        result(f"gpu_clip_adamw_100M_torch_{label}_bw", 28 * total / s / 1e9, "GB/s")
    src = torch.randn(total, device=dev)
    dst = torch.empty(total, device=dev)
    c = time_steps(lambda: dst.copy_(src), 2, scaled(20), 5)
    result("gpu_d2d_copy_torch_bw", 2 * 4 * total / c / 1e9, "GB/s")
elif what == "attn":
    B, Hd, L, E = 8, 16, 1024, 64
    q, k, v = (torch.randn(B, Hd, L, E, device=dev, requires_grad=True) for _ in range(3))
    g = torch.randn(B, Hd, L, E, device=dev)

    def step():
        q.grad = k.grad = v.grad = None
        nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    s = time_steps(step, 3, scaled(20), 5)
    result("gpu_attn_torch", B * Hd * L / s, "queries/s")
else:
    sys.exit(f"bench/gpu_torch.py: unknown workload {what} (cnn, mlp, lstm, adamw, attn)")
