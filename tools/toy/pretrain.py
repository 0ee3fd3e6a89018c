#!/usr/bin/env python3
"""Pretrain pairstyle's embedded toy text-to-image model on the synthetic world.

The model has the architecture of Stable Diffusion 1.x at a small size (CLIP text encoder with a
CLIP BPE tokenizer, UNet2DConditionModel, AutoencoderKL, PNDM scheduler config) and is exported
as a diffusers folder that pairstyle loads through the same code as real models.

Data comes from the Rust side, so the images are exactly the world's renders:

    pairstyle toy dataset --count 100000 --seed 1 -o WORK/data-train
    pairstyle toy dataset --count 2000 --seed 3 -o WORK/data-val

Then (every command resumes from WORK; run `train` as often as needed, it stops cleanly after
--minutes with a checkpoint and continues where it stopped next time):

    python tools/toy/pretrain.py prepare --work WORK
    python tools/toy/pretrain.py train --work WORK --minutes 120
    python tools/toy/pretrain.py sample --work WORK --out grid.png
    python tools/toy/pretrain.py export --work WORK --out src/toy/model

Stages, in order: `vae` (encoder + decoder, then the decoder alone), `latents` (the training set
encoded once: posterior means and standard deviations), `unet` (UNet and text encoder trained
together from scratch on the pre-encoded latents; ε-prediction with Min-SNR-5 weighting, 10 %
caption dropout for classifier-free guidance, an EMA of the weights that is what gets exported).
Every random draw of step k is seeded by (seed, stage, k), so a resumed run is the run that would
have happened without the interruption.

Pinned environment: tools/toy/requirements.txt (Python 3.11, CPU is enough).
"""

import argparse
import copy
import csv
import json
import math
import os
import shutil
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
from make_fixtures import BOS, EOS, RefBPE, build_bpe, pre_tokenize, write_vocab_merges  # noqa: E402

# Everything that defines the model and its training. Written to WORK/settings.json by `prepare`;
# later commands read it from there, so a resumed run cannot silently change a setting.
DEFAULTS = {
    "seed": 20261129,
    "resolution": 64,
    "max_length": 48,
    # Words besides those of the captions that get their own token: the prompts of Pair
    # Customization ("a photo of a sks <subject> in <style> style") and the style names.
    "extra_words": "a photo of sks in style art painting picture image drawing invert sepia "
    "posterise pixelate outline blur hatch grain",
    "text": {"hidden": 128, "layers": 3, "heads": 4, "intermediate": 512},
    "vae": {
        "block_out": [16, 32, 64],
        "norm_groups": 8,
        "latent_channels": 4,
        "batch": 8,
        "lr": 1e-3,
        "joint_steps": 6000,
        "decoder_steps": 10500,
        "decoder_lr": 3e-4,
        "kl_weight": 1e-7,
    },
    "unet": {
        "block_out": [32, 64, 128],
        "layers_per_block": 1,
        "heads": 4,
        "norm_groups": 8,
        "batch": 64,
        "lr": 5e-4,
        "warmup": 500,
        "steps": 40000,
        "ema": 0.999,
        "min_snr_gamma": 5.0,
        "caption_dropout": 0.1,
        "photo_prefix": 0.25,
        "weight_decay": 0.01,
    },
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "train_steps": 1000},
    "checkpoint_minutes": 10,
    # Training scenes encoded for the UNet stage (the first N of the data set): encoding is the
    # VAE encoder over every image, half an hour for 100,000 on two cores.
    "latent_count": 40000,
}


STOP = {"requested": False}


def request_stop(signum, _frame):
    """SIGTERM/SIGINT: finish the current step, write a checkpoint, exit."""
    STOP["requested"] = True
    log(f"signal {signum}: stopping after this step")


def follow_thread_file(work):
    """Threads for the next step from WORK/threads, when that file exists (read every step: a
    check costs microseconds, and a slow step is exactly when it matters): lets the trainer step
    down to 1 thread while builds share the machine (2 OpenMP threads competing with another
    process for 2 cores run many times slower than 1) and back up afterwards, without a restart."""
    try:
        with open(os.path.join(work, "threads")) as f:
            n = int(f.read().strip())
    except (OSError, ValueError):
        return
    if n >= 1 and n != torch.get_num_threads():
        torch.set_num_threads(n)
        log(f"threads: {n} (from {work}/threads)")


def out_of_time(deadline):
    return STOP["requested"] or time.time() > deadline


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def step_generator(settings, stage, step):
    """The generator of every random draw of `step` in `stage`: resumption is exact."""
    salt = {"vae": 1, "unet": 2}[stage]
    return torch.Generator().manual_seed((settings["seed"] * 1_000_003 + salt * 7_919 + step) % (1 << 63))


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Curve:
    """The learning curve, WORK/curve.csv: one row per logging interval. Rows beyond the step a
    stage resumes from are dropped, so the file always describes the run the checkpoint holds."""

    FIELDS = ["stage", "step", "loss", "val", "lr", "steps_per_s", "wall_s"]

    def __init__(self, work):
        self.path = os.path.join(work, "curve.csv")

    def rows(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate(self, stage, step):
        keep = [r for r in self.rows() if not (r["stage"] == stage and int(r["step"]) > step)]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(keep)
        os.replace(tmp, self.path)

    def add(self, **row):
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in self.FIELDS})


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def load_images(folder):
    from safetensors.numpy import load_file

    images = load_file(os.path.join(folder, "images.safetensors"))["images"]
    with open(os.path.join(folder, "captions.txt"), encoding="utf-8") as f:
        captions = [line.rstrip("\n") for line in f]
    assert len(captions) == images.shape[0], f"{folder}: {len(captions)} captions, {images.shape[0]} images"
    return images, captions


def to_pixels(u8):
    """u8 N×H×W×3 numpy → float N×3×H×W in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def load_tokenizer(work, settings):
    from transformers import CLIPTokenizer

    folder = os.path.join(work, "tokenizer")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=settings["max_length"])


def make_text_encoder(settings, vocab_size, bos_id, eos_id):
    from transformers import CLIPTextConfig, CLIPTextModel

    t = settings["text"]
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=t["hidden"],
        intermediate_size=t["intermediate"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        max_position_embeddings=settings["max_length"],
        hidden_act="quick_gelu",
        projection_dim=t["hidden"],
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(settings["seed"] + 11)
    return CLIPTextModel(cfg)


def make_vae(settings):
    from diffusers import AutoencoderKL

    v = settings["vae"]
    n = len(v["block_out"])
    torch.manual_seed(settings["seed"] + 12)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=v["block_out"],
        layers_per_block=1,
        latent_channels=v["latent_channels"],
        norm_num_groups=v["norm_groups"],
        sample_size=settings["resolution"],
    )


def make_unet(settings):
    from diffusers import UNet2DConditionModel

    u = settings["unet"]
    torch.manual_seed(settings["seed"] + 13)
    latent = settings["resolution"] // 2 ** (len(settings["vae"]["block_out"]) - 1)
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=settings["vae"]["latent_channels"],
        out_channels=settings["vae"]["latent_channels"],
        block_out_channels=u["block_out"],
        down_block_types=["CrossAttnDownBlock2D"] * (len(u["block_out"]) - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(u["block_out"]) - 1),
        layers_per_block=u["layers_per_block"],
        cross_attention_dim=settings["text"]["hidden"],
        attention_head_dim=u["heads"],  # diffusers' legacy name: this is the number of heads
        norm_num_groups=u["norm_groups"],
    )


def noise_schedule(settings):
    from diffusers import DDPMScheduler

    s = settings["scheduler"]
    return DDPMScheduler(
        num_train_timesteps=s["train_steps"],
        beta_start=s["beta_start"],
        beta_end=s["beta_end"],
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


def param_count(m):
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------


def cmd_prepare(args):
    work = args.work
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "settings.json")
    if args.init_from:
        return prepare_from_export(args, path)
    if os.path.exists(path):
        log(f"{path} exists: keeping it (delete the work folder to start over)")
        settings = json.load(open(path))
    else:
        settings = copy.deepcopy(DEFAULTS)
        settings["data_train"] = os.path.abspath(args.data_train)
        settings["data_val"] = os.path.abspath(args.data_val)
        write_json_atomic(settings, path)
    _, captions = load_images(settings["data_train"])
    words = set()
    for c in captions[:20000]:
        words.update(pre_tokenize(c))
    words.update(pre_tokenize(settings["extra_words"]))
    # every word once: the merges then make each of them a single token
    corpus = " ".join(sorted(words))
    vocab, merges = build_bpe(corpus=corpus, num_merges=None)
    folder = os.path.join(work, "tokenizer")
    write_vocab_merges(folder, vocab, merges)
    write_json_atomic({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS},
                      os.path.join(folder, "special_tokens_map.json"))
    write_json_atomic(
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "unk_token": EOS,
            "model_max_length": settings["max_length"],
            "tokenizer_class": "CLIPTokenizer",
        },
        os.path.join(folder, "tokenizer_config.json"),
    )
    ref = RefBPE(vocab, merges, EOS)
    for w in sorted(words):
        assert len(ref.bpe(w)) == 1, f"word {w!r} is not a single token: {ref.bpe(w)}"
    tok = load_tokenizer(work, settings)
    for c in captions[:500] + ["", "a photo of a sks a large red star on the left, on a grey background in invert style"]:
        ours = ref.encode(c, max_len=settings["max_length"])
        theirs = tok(c, padding="max_length", max_length=settings["max_length"], truncation=True).input_ids
        assert ours == theirs, f"tokenizer mismatch on {c!r}"
    longest = 2 + max(len([t for w in pre_tokenize(c) for t in ref.bpe(w)]) for c in captions[:20000])
    log(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges, {len(words)} words; longest caption {longest} tokens")


def prepare_from_export(args, settings_path):
    """Start a work folder from an exported model folder (the committed `src/toy/model`), so that
    pretraining spans sessions whose work folders do not survive: the settings, tokenizer and
    learning curve are the export's; the VAE continues from its exported weights at its exported
    step; the UNet and text encoder continue from the exported EMA weights (used as both the raw
    and the EMA weights) at the exported step. The optimizer moments are not in an export, so they
    restart from zero with a short learning-rate warm-up (`restart_warmup`); the restart's step is
    recorded in `restarts` and in the export's `training.json`. This is the one place where a
    resumed run differs from an uninterrupted one."""
    work, src = args.work, args.init_from
    if os.path.exists(settings_path):
        sys.exit(f"{settings_path} exists: --init-from starts a new work folder")
    info = json.load(open(os.path.join(src, "training.json")))
    settings = copy.deepcopy(info["settings"])
    settings["data_train"] = os.path.abspath(args.data_train)
    settings["data_val"] = os.path.abspath(args.data_val)
    settings.setdefault("restart_warmup", 200)
    settings["restarts"] = list(info.get("restarts", []))
    shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(work, "tokenizer"))
    vae_step = info.get("vae_steps")
    if vae_step is None:
        sys.exit(f"{src}/training.json has no vae_steps: this export cannot be continued")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = make_vae(settings)
    vae.load_state_dict(AutoencoderKL.from_pretrained(os.path.join(src, "vae")).state_dict())
    save_atomic({"model": vae.state_dict(), "step": vae_step, "phase": "restart",
                 "wall": float(info.get("vae_wall_s") or 0.0)}, os.path.join(work, "vae.pt"))
    unet_step = int(info.get("unet_steps") or 0)
    if unet_step > 0:
        tok, text, unet = build_unet_models(work, settings)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(os.path.join(src, "unet")).state_dict())
        text.load_state_dict(CLIPTextModel.from_pretrained(os.path.join(src, "text_encoder")).state_dict())
        save_atomic({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": unet.state_dict(),
                     "ema_text": text.state_dict(), "opt": None, "step": unet_step, "restart_step": unet_step,
                     "wall": float(info.get("unet_wall_s") or 0.0)}, os.path.join(work, "unet.pt"))
        settings["restarts"].append(unet_step)
    write_json_atomic(settings, settings_path)
    shutil.copy(os.path.join(src, "learning_curve.csv"), os.path.join(work, "curve.csv"))
    log(f"work folder {work} continues {src}: VAE at step {vae_step}, UNet at step {unet_step} "
        f"(fresh optimizer moments, {settings['restart_warmup']}-step warm-up)")


def load_settings(work):
    return json.load(open(os.path.join(work, "settings.json")))


# ------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------


def psnr(a, b):
    """PSNR in dB of images in [-1, 1] after quantisation to 8 bits, per image, then averaged."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((qa - qb) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(255.0**2 / mse)).mean().item()


def vae_eval(vae, val_px):
    vae.eval()
    with torch.no_grad():
        out = []
        for i in range(0, val_px.shape[0], 100):
            x = val_px[i : i + 100]
            out.append(vae.decode(vae.encode(x).latent_dist.mean).sample)
        rec = torch.cat(out)
    vae.train()
    return psnr(rec, val_px)


def train_vae(args, settings, work, deadline, curve, upto):
    """Train the VAE up to step `upto` (the joint phase is steps [0, joint_steps), the decoder
    phase the decoder_steps after it). The decoder phase leaves the encoder, hence the latents,
    unchanged, so it may run after the UNet stage."""
    v = settings["vae"]
    ckpt_path = os.path.join(work, "vae.pt")
    dev = torch.device(args.device)
    vae = make_vae(settings)
    total = upto
    step, wall0 = 0, 0.0
    state = None
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        vae.load_state_dict(state["model"])
        step = state["step"]
        wall0 = state.get("wall", 0.0)
    if step >= total:
        return vae, True
    vae.to(dev)
    images, _ = load_images(settings["data_train"])
    val_images, _ = load_images(settings["data_val"])
    val_px = to_pixels(val_images[:200]).to(dev)
    curve.truncate("vae", step)

    def make_opt(phase):
        if phase == "joint":
            return torch.optim.AdamW(vae.parameters(), lr=v["lr"], weight_decay=0.0)
        params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        return torch.optim.AdamW(params, lr=v["decoder_lr"], weight_decay=0.0)

    phase = "joint" if step < v["joint_steps"] else "decoder"
    opt = make_opt(phase)
    if state is not None and state.get("phase") == phase and "opt" in state:
        opt.load_state_dict(state["opt"])
    log(f"vae: {param_count(vae) / 1e6:.2f} M parameters, resuming at step {step}/{total} ({phase})")

    def checkpoint():
        save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "phase": phase,
                     "wall": wall0 + time.time() - t0}, ckpt_path)

    last_ckpt = time.time()
    t0, s0, acc = time.time(), step, 0.0
    while step < total:
        if step == v["joint_steps"] and phase == "joint":
            phase = "decoder"
            opt = make_opt(phase)
            log("vae: encoder frozen, decoder only from here")
        g = step_generator(settings, "vae", step)
        idx = torch.randint(0, images.shape[0], (v["batch"],), generator=g).numpy()
        x = to_pixels(images[np.sort(idx)]).to(dev)
        lr_scale = min(1.0, (step + 1) / 100) if phase == "joint" else 1.0
        for group in opt.param_groups:
            group["lr"] = (v["lr"] if phase == "joint" else v["decoder_lr"]) * lr_scale
        if phase == "joint":
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
            kl = post.kl().mean()
        else:
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean
            kl = torch.zeros(())
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + v["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        acc += loss.item()
        follow_thread_file(work)
        if step % 100 == 0 or step == total:
            n = min(step - s0, step % 100 or 100)
            val = vae_eval(vae, val_px) if step % 500 == 0 or step == total else ""
            rate = (step - s0) / (time.time() - t0)
            curve.add(stage="vae", step=step, loss=f"{acc / max(n, 1):.6f}", val=val, lr=opt.param_groups[0]["lr"],
                      steps_per_s=f"{rate:.3f}", wall_s=f"{wall0 + time.time() - t0:.0f}")
            log(f"vae step {step}/{total} loss {acc / max(n, 1):.5f} {'psnr %.2f dB' % val if val != '' else ''} {rate:.2f} steps/s")
            acc = 0.0
        if time.time() - last_ckpt > settings["checkpoint_minutes"] * 60:
            checkpoint()
            last_ckpt = time.time()
        if out_of_time(deadline):
            checkpoint()
            log(f"vae: time budget spent at step {step}; checkpoint written")
            return vae.cpu(), False
    checkpoint()
    return vae.cpu(), True


# ------------------------------------------------------------------------------------------
# Latents
# ------------------------------------------------------------------------------------------


def encode_latents(settings, work, vae, dev):
    path = os.path.join(work, "latents.npz")
    if os.path.exists(path):
        return
    vae.to(dev).eval()
    out = {}
    for name, folder in (("train", settings["data_train"]), ("val", settings["data_val"])):
        images, _ = load_images(folder)
        if name == "train":
            images = images[: settings.get("latent_count", images.shape[0])]
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, images.shape[0], 500):
                post = vae.encode(to_pixels(images[i : i + 500]).to(dev)).latent_dist
                means.append(post.mean.half().cpu().numpy())
                stds.append(post.std.half().cpu().numpy())
        out[f"{name}_mean"] = np.concatenate(means)
        out[f"{name}_std"] = np.concatenate(stds)
        log(f"latents: encoded {images.shape[0]} {name} images")
    sample = out["train_mean"][:20000].astype(np.float32)
    vae.cpu()
    out["scaling_factor"] = np.array(1.0 / sample.std(), dtype=np.float64)
    log(f"latents: std {sample.std():.4f} -> scaling factor {float(out['scaling_factor']):.5f}")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# UNet + text encoder
# ------------------------------------------------------------------------------------------


def tokenize_all(tok, captions, max_length):
    return tok(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def build_unet_models(work, settings):
    tok = load_tokenizer(work, settings)
    vocab = tok.get_vocab()
    text = make_text_encoder(settings, len(vocab), vocab[BOS], vocab[EOS])
    unet = make_unet(settings)
    return tok, text, unet


def ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def train_unet(args, settings, work, deadline, curve):
    u = settings["unet"]
    total = args.unet_steps or u["steps"]
    ckpt_path = os.path.join(work, "unet.pt")
    dev = torch.device(args.device)
    tok, text, unet = build_unet_models(work, settings)
    text.to(dev)
    unet.to(dev)
    ema_text, ema_unet = copy.deepcopy(text), copy.deepcopy(unet)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=u["lr"], weight_decay=u["weight_decay"])
    step, wall0, restart_step = 0, 0.0, None
    if os.path.exists(ckpt_path):
        st = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        wall0 = st.get("wall", 0.0)
        unet.load_state_dict(st["unet"])
        text.load_state_dict(st["text"])
        ema_unet.load_state_dict(st["ema_unet"])
        ema_text.load_state_dict(st["ema_text"])
        if st.get("opt") is not None:
            opt.load_state_dict(st["opt"])
        step = st["step"]
        restart_step = st.get("restart_step")
    if step >= total:
        return True
    curve.truncate("unet", step)
    lat = np.load(os.path.join(work, "latents.npz"))
    scale = float(lat["scaling_factor"])
    mean, std = lat["train_mean"], lat["train_std"]
    _, captions = load_images(settings["data_train"])
    captions = captions[: mean.shape[0]]
    _, val_captions = load_images(settings["data_val"])
    L = settings["max_length"]
    log(f"unet: {param_count(unet) / 1e6:.2f} M parameters, text encoder {param_count(text) / 1e6:.2f} M; "
        f"tokenising {len(captions)} captions")
    ids_plain = tokenize_all(tok, captions, L)
    ids_photo = tokenize_all(tok, ["a photo of " + c for c in captions], L)
    ids_empty = tokenize_all(tok, [""], L)[0]
    # fixed validation batch: 256 val latents, fixed timesteps and noise (EMA weights)
    vg = torch.Generator().manual_seed(settings["seed"] + 99)
    val_n = 256
    val_z = (torch.from_numpy(lat["val_mean"][:val_n].astype(np.float32))
             + torch.from_numpy(lat["val_std"][:val_n].astype(np.float32)) * torch.randn((val_n, 4, 16, 16), generator=vg)) * scale
    val_t = torch.randint(0, settings["scheduler"]["train_steps"], (val_n,), generator=vg)
    val_eps = torch.randn(val_z.shape, generator=vg)
    val_ids = tokenize_all(tok, val_captions[:val_n], L)
    val_z, val_t, val_eps, val_ids = val_z.to(dev), val_t.to(dev), val_eps.to(dev), val_ids.to(dev)
    sched = noise_schedule(settings)
    alphas = sched.alphas_cumprod
    snr_all = alphas / (1 - alphas)

    def val_loss():
        ema_unet.eval()
        ema_text.eval()
        with torch.no_grad():
            tot = 0.0
            for i in range(0, val_n, 64):
                ctx = ema_text(val_ids[i : i + 64]).last_hidden_state
                noisy = sched.add_noise(val_z[i : i + 64], val_eps[i : i + 64], val_t[i : i + 64])
                pred = ema_unet(noisy, val_t[i : i + 64], ctx).sample
                tot += F.mse_loss(pred, val_eps[i : i + 64], reduction="sum").item()
        return tot / val_eps.numel()

    def checkpoint():
        save_atomic({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                     "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step,
                     "restart_step": restart_step, "wall": wall0 + time.time() - t0}, ckpt_path)

    log(f"unet: resuming at step {step}/{total}")
    last_ckpt = time.time()
    t0, s0, acc, nacc = time.time(), step, 0.0, 0
    B = u["batch"]
    while step < total:
        g = step_generator(settings, "unet", step)
        idx = torch.randint(0, mean.shape[0], (B,), generator=g)
        photo = torch.rand(B, generator=g) < u["photo_prefix"]
        drop = torch.rand(B, generator=g) < u["caption_dropout"]
        t = torch.randint(0, settings["scheduler"]["train_steps"], (B,), generator=g)
        eps_post = torch.randn((B, 4, 16, 16), generator=g)
        noise = torch.randn((B, 4, 16, 16), generator=g)
        ids = torch.where(photo[:, None], ids_photo[idx], ids_plain[idx])
        ids = torch.where(drop[:, None], ids_empty[None, :], ids)
        ix = idx.numpy()
        z = (torch.from_numpy(mean[ix].astype(np.float32)) + torch.from_numpy(std[ix].astype(np.float32)) * eps_post) * scale
        lr = u["lr"] * min(1.0, (step + 1) / u["warmup"])
        if restart_step is not None:
            lr *= min(1.0, (step - restart_step + 1) / settings.get("restart_warmup", 200))
        for group in opt.param_groups:
            group["lr"] = lr
        snr = snr_all[t]
        w = (torch.clamp(snr, max=u["min_snr_gamma"]) / snr).to(dev)
        ids, z, noise, t = ids.to(dev), z.to(dev), noise.to(dev), t.to(dev)
        ctx = text(ids).last_hidden_state
        noisy = sched.add_noise(z, noise, t)
        pred = unet(noisy, t, ctx).sample
        loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(u["ema"], (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        acc += loss.item()
        nacc += 1
        follow_thread_file(work)
        if step % 50 == 0 or step == total:
            val = f"{val_loss():.6f}" if step % 500 == 0 or step == total else ""
            rate = (step - s0) / (time.time() - t0)
            curve.add(stage="unet", step=step, loss=f"{acc / nacc:.6f}", val=val, lr=f"{lr:.3g}",
                      steps_per_s=f"{rate:.3f}", wall_s=f"{wall0 + time.time() - t0:.0f}")
            log(f"unet step {step}/{total} loss {acc / nacc:.5f} {'val ' + val if val else ''} {rate:.2f} steps/s")
            acc, nacc = 0.0, 0
        if time.time() - last_ckpt > settings["checkpoint_minutes"] * 60:
            checkpoint()
            last_ckpt = time.time()
        if out_of_time(deadline):
            checkpoint()
            log(f"unet: time budget spent at step {step}; checkpoint written")
            return False
    checkpoint()
    return True


def cmd_train(args):
    torch.set_num_threads(args.threads)
    work = args.work
    follow_thread_file(work)
    settings = load_settings(work)
    deadline = time.time() + args.minutes * 60
    curve = Curve(work)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    v = settings["vae"]
    if args.stage in ("all", "unet"):
        vae, done = train_vae(args, settings, work, deadline, curve, v["joint_steps"])
        if not done:
            return
        encode_latents(settings, work, vae, torch.device(args.device))
        if out_of_time(deadline) or not train_unet(args, settings, work, deadline, curve):
            return
    if args.stage in ("all", "decoder"):
        if not os.path.exists(os.path.join(work, "latents.npz")):
            sys.exit("the decoder stage runs after the joint VAE stage and the latents")
        _, done = train_vae(args, settings, work, deadline, curve, v["joint_steps"] + v["decoder_steps"])
        if done:
            log("training complete")


# ------------------------------------------------------------------------------------------
# Sampling (a quick look) and export
# ------------------------------------------------------------------------------------------


def load_trained(work, settings):
    """The trained models (EMA weights for the UNet and text encoder) and how far each stage got:
    {unet_steps, unet_wall_s, vae_steps, vae_wall_s}."""
    vae = make_vae(settings)
    vae_state = torch.load(os.path.join(work, "vae.pt"), weights_only=False, map_location="cpu")
    vae.load_state_dict(vae_state["model"])
    tok, text, unet = build_unet_models(work, settings)
    st = torch.load(os.path.join(work, "unet.pt"), weights_only=False, map_location="cpu")
    unet.load_state_dict(st["ema_unet"])
    text.load_state_dict(st["ema_text"])
    scale = float(np.load(os.path.join(work, "latents.npz"))["scaling_factor"])
    vae.config.scaling_factor = scale
    vae.register_to_config(scaling_factor=scale)
    progress = {"unet_steps": st["step"], "unet_wall_s": st.get("wall"),
                "vae_steps": vae_state["step"], "vae_wall_s": vae_state.get("wall")}
    return tok, text, unet, vae, progress


def scheduler_config(settings):
    from diffusers import PNDMScheduler

    s = settings["scheduler"]
    return PNDMScheduler(
        num_train_timesteps=s["train_steps"],
        beta_start=s["beta_start"],
        beta_end=s["beta_end"],
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def make_pipeline(work, settings):
    from diffusers import StableDiffusionPipeline

    tok, text, unet, vae, progress = load_trained(work, settings)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=scheduler_config(settings), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe, progress


def cmd_sample(args):
    from diffusers import DDIMScheduler
    from PIL import Image

    torch.set_num_threads(args.threads)
    settings = load_settings(args.work)
    pipe, progress = make_pipeline(args.work, settings)
    step = progress["unet_steps"]
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    _, captions = load_images(settings["data_val"])
    prompts = args.prompt or captions[: args.count]
    res = settings["resolution"]
    tiles = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(i)
        img = pipe(p, height=res, width=res, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=g, output_type="pil").images[0]
        tiles.append(img)
        print(f"{i}: {p}")
    cols = min(8, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * res, rows * res))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * res, (i // cols) * res))
    grid.save(args.out)
    log(f"step {step}: wrote {args.out}")


def cmd_export(args):
    settings = load_settings(args.work)
    pipe, progress = make_pipeline(args.work, settings)
    step = progress["unet_steps"]
    out = args.out
    tmp = out.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # the tokenizer exactly as prepared (vocab.json + merges.txt + configs), no tokenizer.json
    shutil.rmtree(os.path.join(tmp, "tokenizer"))
    shutil.copytree(os.path.join(args.work, "tokenizer"), os.path.join(tmp, "tokenizer"))
    for name in ("safety_checker", "feature_extractor"):
        p = os.path.join(tmp, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
    curve = Curve(args.work).rows()
    shutil.copy(os.path.join(args.work, "curve.csv"), os.path.join(tmp, "learning_curve.csv"))
    vae_rows = [r for r in curve if r["stage"] == "vae" and r["val"]]
    unet_rows = [r for r in curve if r["stage"] == "unet" and r["val"]]
    import diffusers
    import transformers

    info = {
        "what": "pairstyle's embedded toy model: Stable Diffusion 1.x architecture trained from scratch on the synthetic world",
        "command": "python tools/toy/pretrain.py prepare/train/export (see tools/toy/README.md)",
        "settings": settings,
        "unet_steps": step,
        "vae_steps": progress["vae_steps"],
        "vae_wall_s": progress["vae_wall_s"],
        "unet_wall_s": progress["unet_wall_s"],
        "restarts": settings.get("restarts", []),
        "vae_psnr_db_val": float(vae_rows[-1]["val"]) if vae_rows else None,
        "unet_val_loss": float(unet_rows[-1]["val"]) if unet_rows else None,
        "vae_wall_hours": round(float(vae_rows[-1]["wall_s"]) / 3600, 2) if vae_rows else None,
        "unet_wall_hours": round(float(unet_rows[-1]["wall_s"]) / 3600, 2) if unet_rows else None,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
    }
    write_json_atomic(info, os.path.join(tmp, "training.json"))
    if args.guidance_scale is not None:
        # pairstyle's per-model sampling defaults, used where its config says cfg = "auto"
        write_json_atomic({"guidance_scale": args.guidance_scale, "note": args.guidance_note or ""},
                          os.path.join(tmp, "pairstyle.json"))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    log(f"exported step {step} to {out} ({size / 1e6:.1f} MB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write settings.json and the tokenizer")
    p.add_argument("--work", required=True)
    p.add_argument("--data-train", default=None)
    p.add_argument("--data-val", default=None)
    p.add_argument("--init-from", default=None,
                   help="continue an exported model folder (e.g. src/toy/model) in a new work folder")
    p = sub.add_parser("train", help="train (resumes; stops after --minutes with a checkpoint)")
    p.add_argument("--work", required=True)
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument("--unet-steps", type=int, default=None, help="total UNet steps (default: settings)")
    p.add_argument("--stage", choices=["all", "unet", "decoder"], default="all",
                   help="all: VAE, latents, UNet, then the decoder fine-tune; unet: stop after the UNet; "
                   "decoder: only the decoder fine-tune (needs the latents)")
    p = sub.add_parser("sample", help="a grid of samples from the current EMA weights")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompt", action="append")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("export", help="write the diffusers folder")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="write pairstyle.json with this recommended CFG scale (choose it with "
                   "`pairstyle bench toy-model --seed 1 --cfg C` on the export; see README)")
    p.add_argument("--guidance-note", default=None, help="how the scale was chosen (pairstyle.json note)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        args.data_train = args.data_train or os.path.join(args.work, "data-train")
        args.data_val = args.data_val or os.path.join(args.work, "data-val")
    {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "export": cmd_export}[args.cmd](args)


if __name__ == "__main__":
    main()
