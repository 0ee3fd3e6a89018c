"""Per-op timings in PyTorch at the shapes of benches/ops.rs (one SD1.5-size sampling step,
batch 2, 64x64 latent), to find which ops make the gap in `pairstyle bench perf`.

Run: OMP_NUM_THREADS=2 python tools/reference/bench_ops.py --threads 2 [--reps N] [--quick]
Versions: tools/reference/requirements.txt.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def cases(quick):
    s, cd = (8, 8) if quick else (1, 1)
    b = 2
    out = []

    def conv(c_in, c_out, side, k):
        x = torch.randn(b, c_in, side, side)
        w = torch.randn(c_out, c_in, k, k) * 0.02
        bias = torch.randn(c_out)
        out.append((f"conv{k}x{k} {c_in}->{c_out} @{side} b{b}", 2 * b * c_out * c_in * k * k * side * side / 1e9,
                    lambda: F.conv2d(x, w, bias, padding=k // 2)))

    def linear(rows, d_in, d_out):
        x = torch.randn(rows, d_in)
        w = torch.randn(d_out, d_in) * 0.02
        bias = torch.randn(d_out)
        out.append((f"linear {rows}x{d_in}->{d_out}", 2 * rows * d_in * d_out / 1e9, lambda: F.linear(x, w, bias)))

    def attention(n, m, c, heads):
        q, k, v = torch.randn(b, n, c), torch.randn(b, m, c), torch.randn(b, m, c)

        def run():
            # diffusers' AttnProcessor2_0: view as heads, transpose, SDPA, transpose back.
            qh = q.view(b, n, heads, c // heads).transpose(1, 2)
            kh = k.view(b, m, heads, c // heads).transpose(1, 2)
            vh = v.view(b, m, heads, c // heads).transpose(1, 2)
            o = F.scaled_dot_product_attention(qh, kh, vh)
            return o.transpose(1, 2).reshape(b, n, c)

        out.append((f"attention b{b} n{n} m{m} {heads}x{c // heads}", 4 * b * n * m * c / 1e9, run))

    def group_norm(c, side):
        x = torch.randn(b, c, side, side)
        w, bias = torch.ones(c), torch.zeros(c)
        out.append((f"group_norm+silu {c} @{side} b{b}", 0.0, lambda: F.silu(F.group_norm(x, 32, w, bias, 1e-5))))

    def geglu(rows, d):
        x = torch.randn(rows, 2 * d)

        def run():
            h, gate = x.chunk(2, dim=-1)
            return h * F.gelu(gate)

        out.append((f"geglu {rows}x{2 * d}", 0.0, run))

    def add(c, side):
        x, y = torch.randn(b, c, side, side), torch.randn(b, c, side, side)
        out.append((f"add {c} @{side} b{b}", 0.0, lambda: x + y))

    conv(320 // cd, 320 // cd, 64 // s, 3)
    conv(640 // cd, 320 // cd, 64 // s, 3)
    conv(640 // cd, 640 // cd, 32 // s, 3)
    conv(1280 // cd, 1280 // cd, 16 // s, 3)
    conv(1280 // cd, 1280 // cd, max(8, s) // s, 3)
    conv(2560 // cd, 1280 // cd, max(8, s) // s, 3)
    conv(320 // cd, 320 // cd, 64 // s, 1)
    linear(b * 4096 // (s * s), 320 // cd, 320 // cd)
    linear(b * 4096 // (s * s), 320 // cd, 2560 // cd)
    linear(b * 4096 // (s * s), 1280 // cd, 320 // cd)
    linear(b * 256 // min(s * s, 256), 1280 // cd, 1280 // cd)
    attention(4096 // (s * s), 4096 // (s * s), 320 // cd, 8)
    attention(4096 // (s * s), 77, 320 // cd, 8)
    attention(1024 // (s * s), 1024 // (s * s), 640 // cd, 8)
    attention(256 // min(s * s, 64), 256 // min(s * s, 64), 1280 // cd, 8)
    group_norm(320 // cd, 64 // s)
    group_norm(1280 // cd, max(8, s) // s)
    geglu(b * 4096 // (s * s), 1280 // cd)
    add(320 // cd, 64 // s)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"# reference (PyTorch {torch.__version__}): ops of an SD1.5-size sampling step, f32, "
          f"{a.threads} threads, median of {a.reps} after 1 warm-up")
    print("| op | ms | GFLOP | GFLOP/s |")
    print("|---|---:|---:|---:|")
    with torch.no_grad():
        for name, gflop, run in cases(a.quick):
            run()
            times = []
            for _ in range(a.reps):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            rate = f"{gflop / med:.1f}" if gflop > 0 else ""
            print(f"| {name} | {med * 1e3:.2f} | {gflop:.3f} | {rate} |")


if __name__ == "__main__":
    main()
