#!/usr/bin/env python3
"""PyTorch + diffusers + PEFT reference for `pairstyle bench perf` (formerly `bench cost`).

Runs the same cases with the same shapes as `src/bench/mod.rs` (`run_perf_bench`) on the CPU in
f32 (default) or on a CUDA GPU (`--device cuda`, `--dtype f32|bf16|f16`: frozen weights and
activations in that dtype, LoRA parameters and AdamW state in f32, as ours; the memory column is
then `peak device MiB`: device memory in use, total − free, sampled every millisecond while the
case runs, above what was in use once CUDA was initialised, as ours), and prints the same
markdown table
(case | s | × plain CFG step | peak RSS MiB | latent | GFLOP | GFLOP/s | % of peak):

1. one Pair Customization training iteration: content step (only the content LoRA active, MSE
   against the noise, backward, AdamW on the content B's) then style step (content LoRA active as a
   constant + style LoRA, backward, AdamW on the style B's); batch 1;
2. a sampling step with plain CFG: one UNet forward at batch 2 under no_grad, adapters disabled;
3. for each N > 0 in --styles: a style-guided sampling step with N styles, done the way the
   published Pair Customization pipeline does it (PEFT has no per-sample adapter scale vector):
   the batched [uncond, cond] base pass plus one batch-1 pass per style.

GFLOP is counted, not assumed: one extra untimed run of each case with forward hooks on every
nn.Conv2d / nn.Linear (PEFT's LoRA A and B are nn.Linear too) and a wrapper around
F.scaled_dot_product_attention, with the convention of src/bench/flops.rs (2 FLOPs per multiply-add;
backward = the input gradient of every op whose input requires grad, plus the weight gradient of
every weight that requires grad; attention dQ/dK/dV/dP per operand that requires grad). The
machine peak is the best of 10 torch.matmul 1024×1024×1024 in f32 with the same threads.

See README.md next to this file for what each case measures and how the numbers compare.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

# Published `unet/config.json` files, copied from src/bench/mod.rs (SD15_UNET_CONFIG,
# SDXL_UNET_CONFIG) so both sides build the same architecture.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TIMESTEP = 500  # the fixed timestep src/bench/mod.rs uses
LOAD_AT_START = "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="PyTorch/diffusers/PEFT reference for `pairstyle bench perf` (CPU, f32).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path,
                     help="diffusers model folder whose UNet to load (its real weights)")
    src.add_argument("--size", choices=["sd15", "sdxl"],
                     help="real-size architecture with random weights")
    p.add_argument("--latent", type=int, default=32,
                   help="latent side of the training iteration (32 = 256 px)")
    p.add_argument("--sample-latent", type=int, default=None,
                   help="latent side of the sampling steps (default: --latent)")
    p.add_argument("--no-train", action="store_true", help="skip the training iteration")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of both adapters")
    p.add_argument("--reps", type=int, default=3,
                   help="timed repetitions per case after one warm-up; the median is printed")
    p.add_argument("--styles", default="0,1,2,4",
                   help="comma-separated style counts for the sampling cases (0 = plain CFG)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads(N)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                   help="frozen weights and activations (GPU only; LoRA and AdamW stay f32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--as-published", action="store_true",
                   help="copy two quirks of the published Pair Customization code: frozen A "
                        "matrices of the active adapters still get gradients (its set_adapter + "
                        "requires_grad pattern), and the base pass of a style-guided step runs "
                        "with the style adapter active at weight 0 instead of disabled")
    p.add_argument("--mixed-batch", action="store_true",
                   help="also time each N-style step as ONE batch-(2+N) forward using PEFT's "
                        "mixed-adapter batches (adapter_names=['__base__', '__base__', "
                        "'style0', ...]); extra rows, not what the published pipeline does")
    a = p.parse_args(argv)
    try:
        a.styles = [int(s) for s in a.styles.split(",") if s.strip() != ""]
    except ValueError:
        p.error(f"--styles {a.styles!r}: expected comma-separated integers")
    if any(s < 0 for s in a.styles):
        p.error("--styles: counts must be >= 0")
    if a.sample_latent is None:
        a.sample_latent = a.latent
    if a.latent <= 0 or a.sample_latent <= 0 or a.rank <= 0 or a.threads <= 0:
        p.error("--latent, --sample-latent, --rank and --threads must be positive")
    if a.device == "cpu" and a.dtype != "f32":
        p.error("--dtype: the CPU run is f32")
    return a


ARGS = parse_args() if __name__ == "__main__" else None

# Thread pools must be sized before torch is imported (OpenMP reads these at start-up).
if ARGS is not None:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = str(ARGS.threads)

try:
    import torch  # noqa: E402
    import torch.nn.functional as F  # noqa: E402
    import diffusers  # noqa: E402
    import peft  # noqa: E402
    from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
    from peft import LoraConfig  # noqa: E402
    from peft.tuners.lora import LoraLayer  # noqa: E402
except ImportError as _e:
    sys.exit(f"bench_reference.py: {_e} (install the pinned packages: pip install -r "
             f"{Path(__file__).resolve().parent / 'requirements.txt'})")

# PEFT warns on every add_adapter after the first; several adapters are the point here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


# ---------------------------------------------------------------------------------------------
# Memory

def rss_field_mib(field: str) -> float:
    """A `Vm*` line of /proc/self/status in MiB (NaN where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), like src/bench/mod.rs does."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_mib() -> float:
    """Process-lifetime peak RSS (getrusage; KiB on Linux). Cannot be reset."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


# ---------------------------------------------------------------------------------------------
# FLOPs and the machine peak

GEMM_N = 1024
GEMM_TRIES = 10


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak_gflops(n: int = GEMM_N, tries: int = GEMM_TRIES, device=None,
                     dtype=None) -> float:
    """Best of `tries` n×n×n torch.matmul after one warm-up, in GFLOP/s (2·n³ each)."""
    device = device or torch.device("cpu")
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(max(tries, 1)):
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def device_in_use_mib(device) -> float:
    """Memory in use on the GPU (total − free, whole device) in MiB, as ours reads it."""
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / (1024.0 * 1024.0)


class PeakSampler:
    """Polls device_in_use_mib every millisecond in a thread; .finish() gives the maximum."""

    def __init__(self, device):
        import threading
        self.device = device
        self.peak = device_in_use_mib(device)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, device_in_use_mib(self.device))
            time.sleep(0.001)

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak


class FlopCounter:
    """Counts the matmul-class FLOPs of what runs inside `with FlopCounter(unet) as c:`.

    Forward hooks on every nn.Conv2d and nn.Linear under `module`, and a wrapper around
    F.scaled_dot_product_attention (what diffusers' AttnProcessor2_0 calls). Backward work is
    added at forward time from requires_grad, as src/bench/flops.rs defines it."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.forward = {"conv": 0, "linear": 0, "attention": 0, "lora": 0}
        self.backward = dict(self.forward)
        self.handles = []
        self.sdpa = None

    def total(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values())

    def _add(self, kind, f, x_live, w_live):
        self.forward[kind] += f
        if torch.is_grad_enabled():
            self.backward[kind] += f * (int(bool(x_live)) + int(bool(w_live)))

    def _hook(self, kind):
        def hook(m, inputs, output):
            x = inputs[0]
            if isinstance(m, torch.nn.Conv2d):
                kh, kw = m.kernel_size
                f = 2 * output.numel() * (m.in_channels // m.groups) * kh * kw
            else:
                f = 2 * (x.numel() // m.in_features) * m.in_features * m.out_features
            self._add(kind, f, x.requires_grad, m.weight.requires_grad)
        return hook

    def __enter__(self):
        lora_ids = set()
        for _, m in self.module.named_modules():
            if isinstance(m, LoraLayer):
                for d in (m.lora_A, m.lora_B):
                    lora_ids.update(id(x) for x in d.values())
        for _, m in self.module.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                kind = ("lora" if id(m) in lora_ids else
                        "conv" if isinstance(m, torch.nn.Conv2d) else "linear")
                self.handles.append(m.register_forward_hook(self._hook(kind)))
        self.sdpa = F.scaled_dot_product_attention
        original = self.sdpa

        def sdpa(q, k, v, *args, **kwargs):
            b_h = q.numel() // (q.shape[-2] * q.shape[-1])
            n, m, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
            qk, pv = 2 * b_h * n * m * d, 2 * b_h * n * m * dv
            self.forward["attention"] += qk + pv
            if torch.is_grad_enabled():
                ql, kl, vl = q.requires_grad, k.requires_grad, v.requires_grad
                self.backward["attention"] += ((pv if ql or kl else 0) + (pv if vl else 0)
                                               + (qk if ql else 0) + (qk if kl else 0))
            return original(q, k, v, *args, **kwargs)

        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        F.scaled_dot_product_attention = self.sdpa
        return False


# ---------------------------------------------------------------------------------------------
# Model

def init_like_ours(unet: torch.nn.Module, seed: int) -> None:
    """Random weights the way src/engine/weights.rs draws them: N(0, 0.02) for every tensor,
    1 + N(0, 0.02) for 1-D `.weight` tensors (norm scales). Not bit-identical, same statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.normal_(0.0, 0.02, generator=g)
            if p.dim() == 1 and name.endswith(".weight"):
                p.add_(1.0)


def build_unet(args) -> tuple[str, UNet2DConditionModel]:
    """The UNet in f32 on the CPU (main moves it to the device and dtype)."""
    if args.model is not None:
        d = args.model
        if (d / "unet" / "config.json").is_file():
            unet = UNet2DConditionModel.from_pretrained(
                d, subfolder="unet", torch_dtype=torch.float32, local_files_only=True)
        elif (d / "config.json").is_file():  # a bare unet folder
            unet = UNet2DConditionModel.from_pretrained(
                d, torch_dtype=torch.float32, local_files_only=True)
        else:
            raise SystemExit(f"--model {d}: no unet/config.json (expected a diffusers folder)")
        return str(d), unet.float()
    cfg = dict(SD15_UNET_CONFIG if args.size == "sd15" else SDXL_UNET_CONFIG)
    label = ("SD1.5-size UNet, random weights" if args.size == "sd15"
             else "SDXL-size UNet, random weights")
    # Build on the meta device (no default init work), then allocate and fill like ours.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    if any(True for _ in unet.buffers()):  # would be left uninitialised by to_empty
        unet = UNet2DConditionModel.from_config(cfg)
    else:
        unet = unet.to_empty(device="cpu")
    init_like_ours(unet, args.seed)
    return label, unet.float()


def orthonormal_basis(n: int, seed: int) -> torch.Tensor:
    """Rows of a seeded orthonormal n×n matrix (QR of a Gaussian), as in the method."""
    g = torch.Generator().manual_seed(seed + n)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q.T.contiguous()


class Adapters:
    """The PEFT adapters on the UNet and the parameter lists each step needs."""

    def __init__(self, unet, rank: int, names: list[str], seed: int):
        self.unet = unet
        self.names = names
        unet.requires_grad_(False)
        for name in names:
            cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                             init_lora_weights=True, target_modules=list(TARGETS))
            unet.add_adapter(cfg, adapter_name=name)
        self.layers = [m for _, m in unet.named_modules() if isinstance(m, LoraLayer)]
        for m in self.layers:  # f32 LoRA on a bf16/f16 base (mixed precision, as ours)
            for name in names:
                m.lora_A[name].float()
                m.lora_B[name].float()
        self.short_basis = False
        bases: dict[int, torch.Tensor] = {}
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in self.layers:
                n_in = m.in_features
                if n_in not in bases:
                    bases[n_in] = orthonormal_basis(n_in, seed)
                basis = bases[n_in]
                for i, name in enumerate(names):
                    # content → rows [0, r), style → rows [r, 2r); style copies reuse [r, 2r).
                    start = 0 if i == 0 else rank
                    a = m.lora_A[name].weight  # [rank, n_in]
                    if start + rank <= n_in:
                        a.copy_(basis[start:start + rank])
                    else:  # not enough directions: Gaussian rows (timing is unaffected)
                        self.short_basis = True
                        a.copy_(torch.randn(a.shape, generator=g) / n_in ** 0.5)
                    b = m.lora_B[name].weight  # [n_out, rank]; ours: N(0, 0.01)
                    b.copy_(torch.randn(b.shape, generator=g) * 0.01)
        self.a = {n: [m.lora_A[n].weight for m in self.layers] for n in names}
        self.b = {n: [m.lora_B[n].weight for m in self.layers] for n in names}
        unet.requires_grad_(False)

    def copy_adapter(self, src: str, dst: str, rank: int) -> None:
        """Add adapter `dst` with the same A and B as `src`."""
        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                         init_lora_weights=True, target_modules=list(TARGETS))
        self.unet.add_adapter(cfg, adapter_name=dst)
        with torch.no_grad():
            for m in self.layers:
                m.lora_A[dst].float()
                m.lora_B[dst].float()
                m.lora_A[dst].weight.copy_(m.lora_A[src].weight)
                m.lora_B[dst].weight.copy_(m.lora_B[src].weight)
        self.names.append(dst)
        self.a[dst] = [m.lora_A[dst].weight for m in self.layers]
        self.b[dst] = [m.lora_B[dst].weight for m in self.layers]
        self.unet.requires_grad_(False)

    def trainable(self, names: list[str]) -> None:
        """Exactly the B matrices of `names` require grad; everything else is frozen."""
        for n in self.names:
            for p in self.a[n]:
                p.requires_grad_(False)
            for p in self.b[n]:
                p.requires_grad_(n in names)


# ---------------------------------------------------------------------------------------------
# Cases

def median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2]  # the same (upper) median as src/bench/mod.rs


DEVICE = None  # torch.device of the run (set in main)
DEVICE_BASELINE_MIB = None  # GPU memory in use once CUDA was initialised (GPU runs only)


def timed(reps: int, f) -> tuple[float, float, float, float]:
    """(median s, peak MiB, MiB at start, lifetime MiB) of f after 1 warm-up; the device is
    synchronised after each call. CPU: VmHWM since reset, RSS at start, ru_maxrss. GPU: peak
    device memory in use above DEVICE_BASELINE_MIB (sampled), in use at start above it, and
    torch.cuda.max_memory_allocated."""
    gc.collect()
    cpu = torch.device("cpu")
    gpu = DEVICE is not None and DEVICE.type == "cuda"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        start = device_in_use_mib(DEVICE) - DEVICE_BASELINE_MIB
        sampler = PeakSampler(DEVICE)
    else:
        start = rss_field_mib("VmRSS")
        reset_peak_rss()
    f()  # warm-up
    sync(DEVICE or cpu)
    times = []
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        f()
        sync(DEVICE or cpu)
        times.append(time.perf_counter() - t)
    if gpu:
        peak = sampler.finish() - DEVICE_BASELINE_MIB
        return (median(times), peak, start,
                torch.cuda.max_memory_allocated(DEVICE) / (1024.0 * 1024.0))
    return median(times), rss_field_mib("VmHWM"), start, ru_maxrss_mib()


def main(args) -> int:
    global LOAD_AT_START, DEVICE, DEVICE_BASELINE_MIB
    try:
        LOAD_AT_START = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        LOAD_AT_START = "unknown"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = DEVICE = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.init()
        torch.empty(1, device=device)  # creates the context
        sync(device)
        DEVICE_BASELINE_MIB = device_in_use_mib(device)

    label, unet = build_unet(args)
    unet = unet.to(device, dtype)
    cfg = unet.config
    cross = cfg.cross_attention_dim
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    pooled_dim = None
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim

    L = args.latent
    in_ch = cfg.in_channels

    def latent(batch, side=L):
        return torch.randn(batch, in_ch, side, side).to(device, dtype)

    def cond(batch):
        ctx = torch.randn(batch, 77, cross).to(device, dtype)
        if pooled_dim is None:
            return ctx, None
        added = {
            "text_embeds": torch.randn(batch, pooled_dim).to(device, dtype),
            "time_ids": torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]]
                                     ).to(device, dtype).repeat(batch, 1),
        }
        return ctx, added

    def sub(added, i, j):
        return None if added is None else {k: v[i:j] for k, v in added.items()}

    ad = Adapters(unet, args.rank, ["content", "style"], args.seed)
    content_b, style_b = list(ad.b["content"]), list(ad.b["style"])
    adamw = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)  # AdamWConfig::default
    opt_c = torch.optim.AdamW(content_b, **adamw)
    opt_s = torch.optim.AdamW(style_b, **adamw)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type="epsilon")

    ctx_c, added_c = cond(1)
    ctx_s, added_s = cond(1)
    x0_c, x0_s, noise = latent(1), latent(1), latent(1)
    t = torch.tensor([TIMESTEP], dtype=torch.long, device=device)

    def set_grads(step: str) -> None:
        if not args.as_published:
            ad.trainable(["content"] if step == "content" else ["style"])
            return
        # The published training loop: set_adapter (which makes the active adapters' A and B
        # require grad) then requires_grad on every "content" parameter, True in the content
        # step and False in the style step. Its frozen A's therefore still get gradients.
        for n in ad.names:
            on = n == "content" if step == "content" else n in ("content", "style")
            for p in ad.a[n] + ad.b[n]:
                p.requires_grad_(on and not (step == "style" and n == "content"))

    def train_iteration():
        # Content step: only ContentLoRA active.
        unet.set_adapter(["content"])
        set_grads("content")
        xt = sched.add_noise(x0_c, noise, t)
        pred = unet(xt, t, encoder_hidden_states=ctx_c, added_cond_kwargs=added_c,
                    return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        # Style step: ContentLoRA as a constant + StyleLoRA.
        unet.set_adapter(["content", "style"])
        set_grads("style")
        xt = sched.add_noise(x0_s, noise, t)
        pred = unet(xt, t, encoder_hidden_states=ctx_s, added_cond_kwargs=added_s,
                    return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)
        if args.as_published:  # frozen A's got grads the optimizers never clear
            for n in ad.names:
                for p in ad.a[n]:
                    p.grad = None

    attention_missed = False

    def measure(f):
        """(FLOPs counted in one untimed run, then timed(...))."""
        nonlocal attention_missed
        with FlopCounter(unet) as c:
            f()
        if c.forward["attention"] == 0 and any(
                True for _, m in unet.named_modules() if type(m).__name__ == "Attention"):
            attention_missed = True
        return (c.total(),) + timed(args.reps, f)

    rows = []  # (case, s, peak MiB, start MiB, ru_maxrss MiB, latent, FLOPs)
    if not args.no_train:
        unet.train()
        fl, s, m, r0, ru = measure(train_iteration)
        rows.append((f"training iteration (content + style step), rank {args.rank}",
                     s, m, r0, ru, L, fl))
    ad.trainable([])
    unet.eval()

    # Sampling: style0..style{max-1}, each a copy of the style adapter (as ours does).
    max_styles = max(args.styles, default=0)
    for i in range(max_styles):
        ad.copy_adapter("style", f"style{i}", args.rank)
    ad.trainable([])

    def base_pass(x, ts, ctx, added):
        if args.as_published:
            # Published pipeline: set_adapters(name, 0), the adapter active at weight 0.
            unet.set_adapters(["style0"], weights=[0.0])
        else:
            unet.disable_adapters()
        return unet(x[:2], ts[:2], encoder_hidden_states=ctx[:2], added_cond_kwargs=sub(added, 0, 2),
                    return_dict=False)[0]

    for n in args.styles:
        batch = 2 + n
        ctx, added = cond(batch)
        x = latent(batch, args.sample_latent)
        ts = torch.full((batch,), float(TIMESTEP), dtype=torch.float32, device=device)

        if n == 0:
            def step():
                with torch.no_grad():
                    unet.disable_adapters()
                    unet(x, ts, encoder_hidden_states=ctx, added_cond_kwargs=added,
                         return_dict=False)
            case = "sampling step, plain CFG (batch 2)"
        else:
            def step(n=n, x=x, ts=ts, ctx=ctx, added=added):
                with torch.no_grad():
                    base_pass(x, ts, ctx, added)
                    if not args.as_published:
                        unet.enable_adapters()
                    for i in range(n):
                        # One batch-1 pass per style on the cond latent with its style prompt.
                        unet.set_adapters([f"style{i}"], weights=[1.0])
                        unet(x[1:2], ts[1:2], encoder_hidden_states=ctx[2 + i:3 + i],
                             added_cond_kwargs=sub(added, 2 + i, 3 + i), return_dict=False)
            case = (f"sampling step, {n} style(s) (reference: batch-2 base pass "
                    f"+ {n} batch-1 style pass(es))")
        if n > 0 and args.as_published:
            unet.enable_adapters()  # the published pipeline never disables them
        fl, s, m, r0, ru = measure(step)
        rows.append((case, s, m, r0, ru, args.sample_latent, fl))

        if n > 0 and args.mixed_batch:
            names = ["__base__", "__base__"] + [f"style{i}" for i in range(n)]

            def hook(_module, fargs, fkwargs, names=names):
                fkwargs["adapter_names"] = names
                return fargs, fkwargs

            def mixed(x=x, ts=ts, ctx=ctx, added=added):
                with torch.no_grad():
                    unet.enable_adapters()
                    unet(x, ts, encoder_hidden_states=ctx, added_cond_kwargs=added,
                         return_dict=False)

            handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in ad.layers]
            try:
                fl, s, m, r0, ru = measure(mixed)
            finally:
                for h in handles:
                    h.remove()
            rows.append((f"sampling step, {n} style(s) (batch {batch}, PEFT mixed-adapter "
                         f"batch, one forward)", s, m, r0, ru, args.sample_latent, fl))

    switch_ms = None
    if max_styles > 0:  # what one diffusers adapter switch costs (N-style steps do N + 2)
        sw = []
        for _ in range(5):
            t0 = time.perf_counter()
            unet.set_adapters(["style0"], weights=[1.0])
            sw.append(time.perf_counter() - t0)
        switch_ms = median(sw) * 1e3

    gemm_n = 8192 if gpu else GEMM_N
    peak = gemm_peak_gflops(gemm_n, GEMM_TRIES, device, dtype)
    plain = next((r[1] for r in rows if "plain CFG" in r[0]), None)
    reset_ok = reset_peak_rss()
    mem_note = ("peak RSS = VmHWM after clear_refs 5 at the start of each case (process RSS "
                "before the case included)" if reset_ok else
                "peak RSS = process-lifetime ru_maxrss (clear_refs not writable here)")
    print(f"# reference (PyTorch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"PEFT {peft.__version__}, Python {platform.python_version()}): {label}; "
          f"latent {L}x{L}"
          + (f" (sampling {args.sample_latent}x{args.sample_latent})"
             if args.sample_latent != L else "")
          + ", batch 1 per branch, "
          + (f"cuda ({torch.cuda.get_device_name(device)}), {args.dtype} weights and activations,"
             f" f32 LoRA and AdamW" if gpu else "f32")
          + f", rank {args.rank}, threads {args.threads}, "
          f"median of {args.reps} after 1 warm-up"
          + ("; --as-published" if args.as_published else ""))
    print(f"# machine peak: {peak:.1f} GFLOP/s ({args.dtype} GEMM {gemm_n}×{gemm_n}×{gemm_n}, "
          f"torch.matmul, best of {GEMM_TRIES}, "
          + ("cuda)" if gpu else f"{args.threads} threads)"))
    print("# GFLOP: counted with module hooks in one untimed run (convention of "
          "src/bench/flops.rs)"
          + ("; WARNING: no scaled_dot_product_attention call was seen, attention FLOPs are "
             "missing" if attention_missed else ""))
    if gpu:
        mem_note = (f"peak device MiB = device memory in use (total − free, sampled every ms) "
                    f"above the {DEVICE_BASELINE_MIB:.0f} MiB in use once CUDA was initialised; "
                    f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                    f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} (defaults)")
    print(f"# {mem_note}")
    print(f"# load average at start: {LOAD_AT_START}"
          + (f"; one adapter switch (unet.set_adapters) takes {switch_ms:.1f} ms, an N-style "
             + ("step does N + 1 (weight 0 for the base pass, one per style)" if args.as_published
                else "step does N + 2 (disable, enable, one per style)")
             if switch_ms is not None else ""))
    if ad.short_basis:
        print("# note: some layers have fewer than 2×rank input features; their A rows are "
              "Gaussian, not orthonormal (no effect on cost)")
    mem_col = "peak device MiB" if gpu else "peak RSS MiB"
    print(f"| case | s | × plain CFG step | {mem_col} | latent | GFLOP | GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for case, s, m, _, ru, lat, fl in rows:
        ratio = f"{s / plain:.2f}" if plain and case.startswith("sampling") else ""
        mib = m if (reset_ok or gpu) else ru
        achieved = fl / s / 1e9
        print(f"| {case} | {s:.3f} | {ratio} | {mib:.0f} | {lat} | {fl / 1e9:.3f} "
              f"| {achieved:.1f} | {100 * achieved / peak:.1f} |")
    print()
    print("| case (memory detail) | in use before case MiB | peak since reset MiB | "
          + ("torch max_memory_allocated MiB |" if gpu else "ru_maxrss MiB |"))
    print("|---|---|---|---|")
    for case, _, m, r0, ru, _, _ in rows:
        print(f"| {case} | {r0:.0f} | {m:.0f} | {ru:.0f} |")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
