//! Analytic FLOP counts of UNet passes, from the config and the shapes alone (no tensors), for
//! `pairstyle bench perf`'s "GFLOP" and "% of peak" columns.
//!
//! # Convention
//!
//! One multiply-add is 2 FLOPs. Only matmul-class work is counted; group/layer norms, softmax,
//! activations, residual adds, noising, the loss and AdamW are elementwise and ignored (they are a
//! few per cent of the total on real-size UNets, more on the tiny fixture).
//!
//! Forward, per pass of batch `B`:
//! - a convolution: `2 · Cout · Cin · k² · Hout · Wout · B`;
//! - a linear: `2 · in · out · tokens` (tokens = `B` × tokens per sample: `H·W` in a transformer,
//!   77 for the text context, 1 for the time embedding);
//! - an attention over `N` query and `M` key tokens of width `D = heads · head_dim`: `Q·Kᵀ` and
//!   `P·V`, `2 · 2 · N · M · D · B`;
//! - a LoRA adapter of rank `r` on a linear: `2 · r · (in + out) · tokens`, counted only on the
//!   batch rows it applies to (a style-guided step needs each style's adapter on its one branch).
//!
//! Backward (training): what the gradient of the trainable LoRA up-projections *needs*, the
//! rule autograd follows when only the LoRA `B` matrices require grad. A tensor is *live* when it
//! depends on a trainable parameter; the UNet input, the time embedding and the text context
//! never are. For every op whose input is live, its input gradient costs its forward FLOPs again
//! (1× for a conv or linear; for attention `dQ`, `dK`, `dV` and `dP` cost one `2·N·M·D` each when
//! their operand is live, so 2× forward when all are). A trainable up-projection adds its weight
//! gradient, `2 · r · out · tokens`. Frozen weights get no gradient. So a training step is about
//! forward + 1× forward for the live part + the LoRA weight gradients, i.e. ≈ 2× forward plus the
//! attention matmuls once more, rather than the 3× of full training. A convolution whose input is
//! a concatenation of a live and a non-live tensor (the up path's skips) counts its full input
//! gradient, as both candle and PyTorch compute it.
//!
//! `tools/reference/bench_reference.py` counts the same quantities independently, by hooking the
//! PyTorch modules during one untimed run, so the two counts check each other.

use crate::engine::unet::UNetConfig;
use crate::error::{Error, Result};

/// Tokens of the text context (CLIP's 77).
pub const CONTEXT_TOKENS: usize = 77;

/// FLOPs by kind of work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlopsByKind {
    /// Convolutions (including 1×1 projections in SD1-style transformers).
    pub conv: u64,
    /// Linears of the base model (attention projections, feed-forwards, embeddings).
    pub linear: u64,
    /// The attention matmuls (`Q·Kᵀ`, `P·V`).
    pub attention: u64,
    /// LoRA adapter matmuls.
    pub lora: u64,
}

impl FlopsByKind {
    /// Sum over kinds.
    pub fn total(&self) -> u64 {
        self.conv + self.linear + self.attention + self.lora
    }

    fn add(&mut self, o: &FlopsByKind) {
        self.conv += o.conv;
        self.linear += o.linear;
        self.attention += o.attention;
        self.lora += o.lora;
    }
}

/// Forward and backward FLOPs of one or more passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassFlops {
    /// Forward work.
    pub forward: FlopsByKind,
    /// Backward work (zero for inference).
    pub backward: FlopsByKind,
}

impl PassFlops {
    /// Forward plus backward.
    pub fn total(&self) -> u64 {
        self.forward.total() + self.backward.total()
    }

    /// Accumulate another count into this one.
    pub fn add(&mut self, o: &PassFlops) {
        self.forward.add(&o.forward);
        self.backward.add(&o.backward);
    }
}

/// A LoRA adapter active during a pass (on every attention projection `to_q/k/v/out.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveAdapter {
    /// Rank.
    pub rank: usize,
    /// Batch rows it applies to (the rest have scale 0 and need none of its work).
    pub rows: usize,
    /// Whether its up-projection is trained in this pass.
    pub trainable: bool,
}

/// The shapes of one UNet call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassShape {
    /// Batch size.
    pub batch: usize,
    /// Latent height.
    pub height: usize,
    /// Latent width.
    pub width: usize,
    /// Tokens of the text context.
    pub context_tokens: usize,
    /// Adapters active in this call.
    pub adapters: Vec<ActiveAdapter>,
    /// Whether a backward pass follows (training).
    pub backward: bool,
}

/// Walks the network in forward order, tracking whether the hidden state is live.
struct Counter<'a> {
    s: &'a PassShape,
    out: PassFlops,
}

impl Counter<'_> {
    /// A frozen convolution producing `h_out × w_out`; returns whether its output is live.
    fn conv(&mut self, c_in: usize, c_out: usize, k: usize, hw_out: usize, live: bool) -> bool {
        let f = 2 * (c_out * c_in * k * k * hw_out * self.s.batch) as u64;
        self.out.forward.conv += f;
        if self.s.backward && live {
            self.out.backward.conv += f;
        }
        live
    }

    /// A frozen linear over `tokens` tokens per sample (no adapters).
    fn linear(&mut self, n_in: usize, n_out: usize, tokens: usize, live: bool) -> bool {
        let f = 2 * (n_in * n_out * tokens * self.s.batch) as u64;
        self.out.forward.linear += f;
        if self.s.backward && live {
            self.out.backward.linear += f;
        }
        live
    }

    /// An attention projection carrying the pass's adapters.
    fn adaptable(&mut self, n_in: usize, n_out: usize, tokens: usize, live: bool) -> bool {
        self.linear(n_in, n_out, tokens, live);
        let mut out_live = live;
        for a in &self.s.adapters {
            let rows = (a.rows.min(self.s.batch) * tokens) as u64;
            let down = 2 * (a.rank * n_in) as u64 * rows;
            let up = 2 * (a.rank * n_out) as u64 * rows;
            self.out.forward.lora += down + up;
            if self.s.backward {
                if live {
                    // dU = dY · B, then dX += dU · A.
                    self.out.backward.lora += up + down;
                }
                if a.trainable {
                    // dB = dYᵀ · U.
                    self.out.backward.lora += up;
                    out_live = true;
                }
            }
        }
        out_live
    }

    /// `softmax(Q·Kᵀ)·V` over `n` query and `m` key tokens of total width `dim`.
    fn attention(&mut self, n: usize, m: usize, dim: usize, q: bool, k: bool, v: bool) -> bool {
        let mm = 2 * (n * m * dim * self.s.batch) as u64;
        self.out.forward.attention += 2 * mm;
        if self.s.backward {
            let b = &mut self.out.backward.attention;
            if q || k {
                *b += mm; // dP = dO · Vᵀ
            }
            if v {
                *b += mm; // dV = Pᵀ · dO
            }
            if q {
                *b += mm; // dQ = dS · K
            }
            if k {
                *b += mm; // dK = dSᵀ · Q
            }
        }
        q || k || v
    }

    /// `ResnetBlock2D` at `hw` positions.
    fn resnet(&mut self, c_in: usize, c_out: usize, temb: usize, hw: usize, live: bool) -> bool {
        self.conv(c_in, c_out, 3, hw, live);
        self.linear(temb, c_out, 1, false); // time_emb_proj: the time embedding is never live
        self.conv(c_out, c_out, 3, hw, live);
        if c_in != c_out {
            self.conv(c_in, c_out, 1, hw, live);
        }
        live
    }

    /// `Transformer2DModel` over `ch` channels at `hw` positions.
    #[allow(clippy::too_many_arguments)]
    fn transformer(
        &mut self,
        ch: usize,
        hw: usize,
        depth: usize,
        cross_dim: usize,
        linear_projection: bool,
        mut live: bool,
    ) -> bool {
        let proj = |c: &mut Self, live: bool| {
            if linear_projection {
                c.linear(ch, ch, hw, live)
            } else {
                c.conv(ch, ch, 1, hw, live)
            }
        };
        live = proj(self, live);
        let m = self.s.context_tokens;
        for _ in 0..depth {
            // attn1: self-attention.
            let q = self.adaptable(ch, ch, hw, live);
            let k = self.adaptable(ch, ch, hw, live);
            let v = self.adaptable(ch, ch, hw, live);
            let a = self.attention(hw, hw, ch, q, k, v);
            live |= self.adaptable(ch, ch, hw, a);
            // attn2: cross-attention to the (never live) text context.
            let q = self.adaptable(ch, ch, hw, live);
            let k = self.adaptable(cross_dim, ch, m, false);
            let v = self.adaptable(cross_dim, ch, m, false);
            let a = self.attention(hw, m, ch, q, k, v);
            live |= self.adaptable(ch, ch, hw, a);
            // GEGLU feed-forward.
            self.linear(ch, 8 * ch, hw, live);
            self.linear(4 * ch, ch, hw, live);
        }
        proj(self, live)
    }
}

/// FLOPs of one UNet call with the given shapes (see the module docs for the convention).
pub fn unet_pass(cfg: &UNetConfig, s: &PassShape) -> Result<PassFlops> {
    let f = cfg.downscale();
    if s.batch == 0
        || s.height == 0
        || s.width == 0
        || !s.height.is_multiple_of(f)
        || !s.width.is_multiple_of(f)
    {
        return Err(Error::InvalidArgument(format!(
            "latent {}×{} (batch {}) must be non-empty and divide by {f} for this UNet",
            s.height, s.width, s.batch
        )));
    }
    let file = &cfg.file;
    let ch = &file.block_out_channels;
    let c0 = ch[0];
    let temb = cfg.time_embed_dim;
    let lin_proj = file.use_linear_projection;
    let mut c = Counter {
        s,
        out: PassFlops::default(),
    };
    // Time embedding (and SDXL's added embedding): one token per sample, never live.
    c.linear(c0, temb, 1, false);
    c.linear(temb, temb, 1, false);
    if let Some((_, in_dim)) = cfg.text_time {
        c.linear(in_dim, temb, 1, false);
        c.linear(temb, temb, 1, false);
    }
    let (mut h, mut w) = (s.height, s.width);
    let mut live = c.conv(file.in_channels, c0, file.conv_in_kernel, h * w, false);
    let mut in_ch = c0;
    for (i, spec) in cfg.down.iter().enumerate() {
        let out_ch = ch[i];
        for j in 0..spec.layers {
            let c_in = if j == 0 { in_ch } else { out_ch };
            live = c.resnet(c_in, out_ch, temb, h * w, live);
            if spec.cross_attention {
                let d = spec.transformer_layers;
                live = c.transformer(out_ch, h * w, d, spec.cross_attention_dim, lin_proj, live);
            }
        }
        if i + 1 < cfg.down.len() {
            let p = file.downsample_padding;
            h = (h + 2 * p - 3) / 2 + 1;
            w = (w + 2 * p - 3) / 2 + 1;
            live = c.conv(out_ch, out_ch, 3, h * w, live);
        }
        in_ch = out_ch;
    }
    if let Some(spec) = &cfg.mid {
        let last = in_ch;
        live = c.resnet(last, last, temb, h * w, live);
        for _ in 0..spec.layers {
            if spec.cross_attention {
                let d = spec.transformer_layers;
                live = c.transformer(last, h * w, d, spec.cross_attention_dim, lin_proj, live);
            }
            live = c.resnet(last, last, temb, h * w, live);
        }
    }
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut out_ch = rev[0];
    for (i, spec) in cfg.up.iter().enumerate() {
        let prev_out = out_ch;
        out_ch = rev[i];
        let skip_last = rev[(i + 1).min(rev.len() - 1)];
        for j in 0..spec.layers {
            let skip = if j + 1 == spec.layers {
                skip_last
            } else {
                out_ch
            };
            let c_in = if j == 0 { prev_out } else { out_ch };
            // The skip is older than the running state, so the concatenation is live exactly
            // when the running state is.
            live = c.resnet(c_in + skip, out_ch, temb, h * w, live);
            if spec.cross_attention {
                let d = spec.transformer_layers;
                live = c.transformer(out_ch, h * w, d, spec.cross_attention_dim, lin_proj, live);
            }
        }
        if i + 1 < cfg.up.len() {
            h *= 2;
            w *= 2;
            live = c.conv(out_ch, out_ch, 3, h * w, live);
        }
    }
    c.conv(c0, file.out_channels, file.conv_out_kernel, h * w, live);
    Ok(c.out)
}

/// One Pair Customization training iteration at batch 1 on a `latent × latent` latent: the
/// content step (content adapter trained) plus the style step (content adapter active and frozen,
/// style adapter trained), both of rank `rank`.
pub fn training_iteration(cfg: &UNetConfig, latent: usize, rank: usize) -> Result<PassFlops> {
    let adapter = |trainable| ActiveAdapter {
        rank,
        rows: 1,
        trainable,
    };
    let step = |adapters| PassShape {
        batch: 1,
        height: latent,
        width: latent,
        context_tokens: CONTEXT_TOKENS,
        adapters,
        backward: true,
    };
    let mut total = unet_pass(cfg, &step(vec![adapter(true)]))?;
    total.add(&unet_pass(cfg, &step(vec![adapter(false), adapter(true)]))?);
    Ok(total)
}

/// One sampling step with `styles` style adapters of rank `rank`: the UNet at batch `2 + styles`
/// ([uncond, cond] and one branch per style), each style's adapter on its own branch only.
pub fn sampling_step(
    cfg: &UNetConfig,
    latent: usize,
    styles: usize,
    rank: usize,
) -> Result<PassFlops> {
    unet_pass(
        cfg,
        &PassShape {
            batch: 2 + styles,
            height: latent,
            width: latent,
            context_tokens: CONTEXT_TOKENS,
            adapters: vec![
                ActiveAdapter {
                    rank,
                    rows: 1,
                    trainable: false,
                };
                styles
            ],
            backward: false,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::unet::UNetConfigFile;

    fn tiny() -> UNetConfig {
        let json = include_str!("../../tests/fixtures/tiny-sd15/unet/config.json");
        let file: UNetConfigFile = serde_json::from_str(json).expect("fixture config parses");
        UNetConfig::resolve(file, std::path::Path::new("tiny-sd15")).expect("fixture resolves")
    }

    fn shape(batch: usize, latent: usize, adapters: Vec<ActiveAdapter>, bwd: bool) -> PassShape {
        PassShape {
            batch,
            height: latent,
            width: latent,
            context_tokens: CONTEXT_TOKENS,
            adapters,
            backward: bwd,
        }
    }

    #[test]
    fn one_conv_counts_two_flops_per_multiply_add() {
        let s = shape(2, 4, vec![], true);
        let mut c = Counter {
            s: &s,
            out: PassFlops::default(),
        };
        // 8 outputs channels × 3 input channels × 3×3 taps × 16 positions × 2 samples.
        c.conv(3, 8, 3, 16, false);
        assert_eq!(c.out.forward.conv, 2 * 8 * 3 * 9 * 16 * 2);
        assert_eq!(
            c.out.backward.total(),
            0,
            "a non-live input needs no gradient"
        );
        c.conv(3, 8, 3, 16, true);
        assert_eq!(c.out.backward.conv, 2 * 8 * 3 * 9 * 16 * 2);
    }

    #[test]
    fn attention_backward_counts_only_live_operands() {
        let s = shape(1, 4, vec![], true);
        let mut c = Counter {
            s: &s,
            out: PassFlops::default(),
        };
        let mm = 2 * 16 * 77 * 32;
        // Cross-attention with only the query live: dP and dQ.
        assert!(c.attention(16, 77, 32, true, false, false));
        assert_eq!(c.out.forward.attention, 2 * mm);
        assert_eq!(c.out.backward.attention, 2 * mm);
        // Only V live: dV alone.
        c.out = PassFlops::default();
        c.attention(16, 77, 32, false, false, true);
        assert_eq!(c.out.backward.attention, mm);
        // Everything live: 2× forward.
        c.out = PassFlops::default();
        c.attention(16, 77, 32, true, true, true);
        assert_eq!(c.out.backward.attention, 4 * mm);
    }

    #[test]
    fn lora_on_a_projection_follows_the_gradient_rule() {
        let adapters = vec![
            ActiveAdapter {
                rank: 4,
                rows: 1,
                trainable: false,
            },
            ActiveAdapter {
                rank: 4,
                rows: 1,
                trainable: true,
            },
        ];
        let s = shape(1, 4, adapters, true);
        let mut c = Counter {
            s: &s,
            out: PassFlops::default(),
        };
        let (down, up) = (2 * 4 * 32 * 10, 2 * 4 * 16 * 10);
        // Input not live: forward of both adapters, the trainable one's dB; output becomes live.
        assert!(c.adaptable(32, 16, 10, false));
        assert_eq!(c.out.forward.lora, 2 * (down + up));
        assert_eq!(c.out.backward.lora, up);
        assert_eq!(c.out.backward.linear, 0);
        // Input live: dX through the base and both adapters too.
        c.out = PassFlops::default();
        c.adaptable(32, 16, 10, true);
        assert_eq!(c.out.backward.linear, 2 * 32 * 16 * 10);
        assert_eq!(c.out.backward.lora, 2 * (down + up) + up);
    }

    /// The tiny fixture's forward total, derived here block by block from its config
    /// (channels 16/32, 2 layers, 8 groups, cross width 32, 1×1 conv projections, mid block).
    fn tiny_forward_by_hand(l: usize, batch: u64, rank: u64) -> u64 {
        let hw0 = (l * l) as u64;
        let hw1 = hw0 / 4;
        let m = 77u64;
        let temb = 64u64;
        let conv = |ci: u64, co: u64, k: u64, hw: u64| 2 * co * ci * k * k * hw;
        let resnet = |ci: u64, co: u64, hw: u64| {
            conv(ci, co, 3, hw)
                + 2 * temb * co
                + conv(co, co, 3, hw)
                + if ci != co { conv(ci, co, 1, hw) } else { 0 }
        };
        let lora = |i: u64, o: u64, t: u64| 2 * rank * (i + o) * t;
        let transformer = |c: u64, n: u64| {
            let projections = 2 * conv(c, c, 1, n);
            let attn1 = 4 * (2 * c * c * n + lora(c, c, n)) + 4 * n * n * c;
            let attn2 = 2 * (2 * c * c * n + lora(c, c, n))
                + 2 * (2 * 32 * c * m + lora(32, c, m))
                + 4 * n * m * c;
            let ff = 2 * c * 8 * c * n + 2 * 4 * c * c * n;
            projections + attn1 + attn2 + ff
        };
        let time = 2 * 16 * temb + 2 * temb * temb;
        let conv_in = conv(4, 16, 3, hw0);
        let down0 = 2 * (resnet(16, 16, hw0) + transformer(16, hw0)) + conv(16, 16, 3, hw1);
        let down1 = resnet(16, 32, hw1) + resnet(32, 32, hw1);
        let mid = 2 * resnet(32, 32, hw1) + transformer(32, hw1);
        // up0 (UpBlock2D, 32): skips 32, 32, 16 (the downsampler's output).
        let up0 = resnet(64, 32, hw1) + resnet(64, 32, hw1) + resnet(48, 32, hw1);
        let upsample = conv(32, 32, 3, hw0);
        // up1 (CrossAttnUpBlock2D, 16): inputs 32+16, 16+16, 16+16.
        let up1 = resnet(48, 16, hw0) + 2 * resnet(32, 16, hw0) + 3 * transformer(16, hw0);
        let conv_out = conv(16, 4, 3, hw0);
        batch * (time + conv_in + down0 + down1 + mid + up0 + upsample + up1 + conv_out)
    }

    #[test]
    fn tiny_fixture_forward_matches_a_count_by_hand() {
        let cfg = tiny();
        for (latent, batch) in [(8, 1), (32, 2)] {
            let plain = unet_pass(&cfg, &shape(batch, latent, vec![], false)).expect("count");
            assert_eq!(
                plain.forward.total(),
                tiny_forward_by_hand(latent, batch as u64, 0),
                "latent {latent} batch {batch}"
            );
            assert_eq!(plain.backward.total(), 0);
        }
        let adapter = ActiveAdapter {
            rank: 4,
            rows: 1,
            trainable: false,
        };
        let with = unet_pass(&cfg, &shape(1, 8, vec![adapter], false)).expect("count");
        assert_eq!(with.forward.total(), tiny_forward_by_hand(8, 1, 4));
    }

    #[test]
    fn training_backward_skips_work_before_the_first_adapter() {
        let cfg = tiny();
        let l = 8usize;
        let hw = (l * l) as u64;
        let adapter = ActiveAdapter {
            rank: 4,
            rows: 1,
            trainable: true,
        };
        let step = unet_pass(&cfg, &shape(1, l, vec![adapter], true)).expect("count");
        // No gradient for conv_in, the first resnet's two convs, nor the first proj_in; every
        // other conv's input is live.
        let dead = 2 * 16 * 4 * 9 * hw + 2 * (2 * 16 * 16 * 9 * hw) + 2 * 16 * 16 * hw;
        assert_eq!(step.backward.conv, step.forward.conv - dead);
        // Attention: the first self-attention's Q, K and V come from trainable adapters, so every
        // attention is fully live: 2× forward.
        assert_eq!(step.backward.attention, 2 * step.forward.attention);
        // The training iteration is a content step plus a style step with one more adapter.
        let it = training_iteration(&cfg, l, 4).expect("count");
        assert!(it.total() > 2 * step.total());
        assert!(it.backward.total() > it.forward.total());
        assert!(it.backward.total() < 3 * it.forward.total());
    }

    #[test]
    fn style_adapters_cost_only_their_branch() {
        let cfg = tiny();
        let base = sampling_step(&cfg, 8, 0, 4).expect("count");
        let two = sampling_step(&cfg, 8, 2, 4).expect("count");
        let per_sample = tiny_forward_by_hand(8, 1, 0);
        assert_eq!(base.total(), 2 * per_sample);
        // 4 samples of base work plus two adapters' work on one sample each.
        let lora_one = tiny_forward_by_hand(8, 1, 4) - per_sample;
        assert_eq!(two.total(), 4 * per_sample + 2 * lora_one);
        assert_eq!(two.forward.lora, 2 * lora_one);
    }

    /// The reference (`tools/reference/bench_reference.py`) counted these with PyTorch module hooks
    /// on diffusers' SD1.5 UNet + PEFT, 2026-11-29 (`--size sd15 --latent 32 --rank 64`), printed
    /// in GFLOP to 3 decimals: an independent check of the whole walk at real size.
    #[test]
    fn sd15_counts_match_the_reference_hook_count() {
        let cfg = super::super::config_from_json(super::super::SD15_UNET_CONFIG).expect("sd15");
        let gflop = |f: PassFlops| f.total() as f64 / 1e9;
        let cases = [
            (
                gflop(training_iteration(&cfg, 32, 64).expect("count")),
                754.476,
            ),
            (
                gflop(sampling_step(&cfg, 32, 0, 64).expect("count")),
                360.213,
            ),
            (
                gflop(sampling_step(&cfg, 32, 1, 64).expect("count")),
                545.243,
            ),
            (
                gflop(sampling_step(&cfg, 32, 2, 64).expect("count")),
                730.273,
            ),
        ];
        for (ours, reference) in cases {
            assert!(
                (ours - reference).abs() < 0.0006,
                "ours {ours:.4} vs {reference}"
            );
        }
    }

    #[test]
    fn latents_that_do_not_divide_are_refused() {
        let cfg = tiny();
        assert!(unet_pass(&cfg, &shape(1, 7, vec![], false)).is_err());
        assert!(unet_pass(&cfg, &shape(0, 8, vec![], false)).is_err());
    }
}
