"""The bench's products and attention in PyTorch on the same device (.ci/device/check.sh), so
that `deno task bench matmul attention`'s figures have a side: float32, TF32 off, CUDA when
present (else the CPU, two threads)."""

import time

import torch
import torch.nn.functional as F

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
if device == "cpu":
    torch.set_num_threads(2)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn):
    """Best of 3 rounds, each at least 0.1 s of calls after one warm-up call."""
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    iters = max(1, int(0.1 / once))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / iters)
    return best


# (name, M, N, K, layout) as in tests/bench.ts's matmulSection.
PRODUCTS = [
    ("x·Wᵀ", 256, 256, 256, "nt"),
    ("x·Wᵀ", 1024, 896, 896, "nt"),
    ("x·Wᵀ", 512, 4864, 896, "nt"),
    ("x·Wᵀ", 512, 2048, 2048, "nt"),
    ("x·Wᵀ decode", 8, 4864, 896, "nt"),
    ("dy·W", 512, 896, 4864, "nn"),
    ("dyᵀ·x", 896, 896, 1024, "tn"),
    ("x·Wᵀ odd", 97, 1001, 899, "nt"),
]
print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")
for name, M, N, K, layout in PRODUCTS:
    a = torch.randn(K, M, device=device).t() if layout[0] == "t" else torch.randn(M, K, device=device)
    b = torch.randn(N, K, device=device).t() if layout[1] == "t" else torch.randn(K, N, device=device)
    s = seconds_per_call(lambda: a @ b)
    label = f"torch matmul {name} {M}×{N}×{K}".ljust(40)
    print(f"{label} {2 * M * N * K / s / 1e9:9.2f} GFLOPS  {s * 1e3:.3f} ms")

# Causal attention, 1 row × 1,024 tokens, 14 query and 2 kv heads of 64 (the bench's shape).
T, H, KV, D = 1024, 14, 2, 64
q = torch.randn(1, H, T, D, device=device)
k = torch.randn(1, KV, T, D, device=device).repeat_interleave(H // KV, 1)
v = torch.randn(1, KV, T, D, device=device).repeat_interleave(H // KV, 1)
causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()


def attention():
    if hasattr(F, "scaled_dot_product_attention"):  # PyTorch 2 (the device machine's)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    scores = (q @ k.transpose(-1, -2)) / D**0.5  # Debian's PyTorch 1.13
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v


s = seconds_per_call(attention)
flops = 2 * 2 * D * H * (T * (T + 1)) / 2
print(f"{'torch attention 1×1024, 14/2 heads of 64'.ljust(40)} {flops / s / 1e9:9.2f} GFLOPS  {s * 1e3:.3f} ms")
