//! The VAE (diffusers `AutoencoderKL`): images in [-1, 1] to latent posteriors and latents back
//! to images.
//!
//! Our own module rather than candle-transformers' `AutoEncoderKL`: that one keeps the posterior's
//! mean and log-variance private (we need both, and diffusers' log-variance clamp), hard-codes the
//! SD1.5 layout and loads through `VarBuilder`, whose errors name neither the file nor both shapes.
//! This one mirrors the diffusers module tree (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...)
//! over [`Weights`], so stock checkpoints load unchanged and every bad tensor is named. Both the
//! current (`to_q`/`to_k`/`to_v`/`to_out.0`) and the legacy (`query`/`key`/`value`/`proj_attn`)
//! mid-block attention names load, as diffusers converts them on load.
//!
//! The VAE is frozen everywhere in pairstyle (training encodes under no-grad), so it uses candle's
//! fused softmax freely. With f16/bf16 and `force_upcast` (the default, and what SD1.x, SD2.x and
//! SDXL ship), it computes in f32, as diffusers upcasts it, because the SDXL VAE overflows in f16.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear};

use super::model_dir::{read_json, ModelDir, Variant};
use super::noise::NoiseSource;
use super::weights::Weights;
use crate::error::{Error, Result};

/// Group-norm epsilon that diffusers' VAE encoder and decoder use everywhere.
const NORM_EPS: f64 = 1e-6;

/// Attention score elements computed at once (64 Mi f32 = 256 MiB); bigger inputs are split by
/// query rows, which gives the same numbers since softmax is per row.
const ATTN_CHUNK_ELEMS: usize = 1 << 26;

fn default_channels() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_one() -> usize {
    1
}
fn default_latent_channels() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_sample_size() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "silu".into()
}

/// `sample_size` is an int in most configs and `[h, w]` in a few: keep the first side.
fn de_sample_size<'de, De: serde::Deserializer<'de>>(
    d: De,
) -> std::result::Result<usize, De::Error> {
    use serde::Deserialize;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S {
        One(usize),
        Many(Vec<usize>),
    }
    match S::deserialize(d)? {
        S::One(n) => Ok(n),
        S::Many(v) => v
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

/// The architecture of an `AutoencoderKL`, read from `vae/config.json` (defaults as diffusers).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct VaeConfig {
    /// The diffusers class (`AutoencoderKL`); other VAE classes are refused.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Image channels in (3).
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    /// Encoder block types; only `DownEncoderBlock2D` exists in `AutoencoderKL`.
    #[serde(default = "default_down_types")]
    pub down_block_types: Vec<String>,
    /// Decoder block types; only `UpDecoderBlock2D`.
    #[serde(default = "default_up_types")]
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level, highest resolution first.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    /// Activation; only `silu` is used by these models.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Latent channels (4 for SD1.x/2.x/SDXL).
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Group-norm groups.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Training image size (informational).
    #[serde(default = "default_sample_size", deserialize_with = "de_sample_size")]
    pub sample_size: usize,
    /// Latents are multiplied by this before the UNet (SD1.x 0.18215, SDXL 0.13025).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling (SD3/Flux-style VAEs; null for SD).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent mean, used instead of the shift when given (with `latents_std`).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent std, used with `latents_mean`.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Run in f32 even when the pipeline runs in f16 (SD VAEs overflow in f16).
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// A 1×1 conv after the encoder.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// A 1×1 conv before the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks hold a self-attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Parse and check a `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Parse and check the `vae` component of a model folder.
    pub fn from_model_dir(md: &ModelDir) -> Result<Self> {
        let cfg: Self = md.config("vae")?;
        cfg.validate(&md.config_path("vae"))?;
        Ok(cfg)
    }

    /// Refuse architectures this module does not implement (naming them) and inconsistent sizes
    /// (naming `path`).
    pub fn validate(&self, path: &Path) -> Result<()> {
        if let Some(c) = &self.class_name {
            if c != "AutoencoderKL" {
                return Err(Error::Unsupported(format!(
                    "VAE class {c} in {} (only AutoencoderKL is implemented)",
                    path.display()
                )));
            }
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(Error::Unsupported(format!(
                    "VAE down block type {t} in {} (only DownEncoderBlock2D)",
                    path.display()
                )));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(Error::Unsupported(format!(
                    "VAE up block type {t} in {} (only UpDecoderBlock2D)",
                    path.display()
                )));
            }
        }
        if self.act_fn != "silu" {
            return Err(Error::Unsupported(format!(
                "VAE activation {} in {} (only silu)",
                self.act_fn,
                path.display()
            )));
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::config(path, "block_out_channels is empty"));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::config(
                path,
                format!(
                    "{} down and {} up block types for {n} block_out_channels",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            ));
        }
        let g = self.norm_num_groups;
        if g == 0
            || self
                .block_out_channels
                .iter()
                .any(|&c| c == 0 || c % g != 0)
        {
            return Err(Error::config(
                path,
                format!(
                    "norm_num_groups {g} must divide every block_out_channels {:?}",
                    self.block_out_channels
                ),
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err(Error::config(path, "channel counts must be positive"));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(Error::config(
                path,
                format!("scaling_factor {} must be positive", self.scaling_factor),
            ));
        }
        match (&self.latents_mean, &self.latents_std) {
            (Some(m), Some(s)) => {
                let l = self.latent_channels;
                if m.len() != l || s.len() != l {
                    return Err(Error::config(
                        path,
                        format!("latents_mean/latents_std need {l} values each"),
                    ));
                }
            }
            (None, None) => {}
            _ => {
                return Err(Error::config(
                    path,
                    "latents_mean and latents_std must be given together",
                ))
            }
        }
        Ok(())
    }

    /// How many pixels one latent covers per side (8 for the SD VAEs).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The diagonal Gaussian posterior q(z | x) the encoder predicts, unscaled.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// Mean, `[B, latent_channels, h, w]`.
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl Posterior {
    /// Build from the encoder's `[B, 2L, h, w]` moments (mean first), clamping the log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)?;
        if c % 2 != 0 {
            return Err(Error::InvalidArgument(format!(
                "posterior moments need an even channel count, got {c}"
            )));
        }
        let mean = moments.narrow(1, 0, c / 2)?.contiguous()?;
        let logvar = moments.narrow(1, c / 2, c / 2)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// A fresh sample `mean + std · ε` with ε drawn from `noise` (host-side, so seeds reproduce
    /// on every device).
    pub fn sample(&self, noise: &mut NoiseSource) -> Result<Tensor> {
        let noise = noise.randn(self.mean.dims(), self.mean.dtype(), self.mean.device())?;
        self.sample_with_noise(&noise)
    }

    /// `mean + std · noise` for a given standard-normal `noise` of the mean's shape.
    pub fn sample_with_noise(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            return Err(Error::InvalidArgument(format!(
                "posterior noise shape {:?} differs from the mean's {:?}",
                noise.dims(),
                self.mean.dims()
            )));
        }
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * noise)?)?)
    }

    /// The most likely latent (the mean), for deterministic encoding.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

fn conv2d(
    w: &Weights,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let weight = w.get(&[cout, cin, k, k], "weight")?;
    let bias = w.get(&[cout], "bias")?;
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

fn group_norm(w: &Weights, groups: usize, channels: usize) -> Result<GroupNorm> {
    let weight = w.get(&[channels], "weight")?;
    let bias = w.get(&[channels], "bias")?;
    Ok(GroupNorm::new(weight, bias, channels, groups, NORM_EPS)?)
}

/// A `[c, c]` linear; a few checkpoints store it as a `[c, c, 1, 1]` 1×1 conv.
fn square_linear(w: &Weights, c: usize) -> Result<Linear> {
    let weight = match w.get(&[c, c], "weight") {
        Ok(t) => t,
        Err(Error::ShapeMismatch { found, .. }) if found == [c, c, 1, 1] => {
            w.get(&[c, c, 1, 1], "weight")?.reshape((c, c))?
        }
        Err(e) => return Err(e),
    };
    let bias = w.get(&[c], "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

/// diffusers `ResnetBlock2D` without time embedding: two norm-silu-conv stages and a residual.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(w: &Weights, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(&w.pp("norm1"), groups, cin)?,
            conv1: conv2d(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: group_norm(&w.pp("norm2"), groups, cout)?,
            conv2: conv2d(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(conv2d(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// The mid-block's single-head spatial self-attention with a residual connection.
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(w: &Weights, c: usize, groups: usize) -> Result<Self> {
        let (q, k, v, o) = if w.contains("to_q.weight") || !w.contains("query.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            group_norm: group_norm(&w.pp("group_norm"), groups, c)?,
            to_q: square_linear(&w.pp(q), c)?,
            to_k: square_linear(&w.pp(k), c)?,
            to_v: square_linear(&w.pp(v), c)?,
            to_out: square_linear(&w.pp(o), c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        let hs = self
            .group_norm
            .forward(x)?
            .reshape((b, c, n))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&hs)?;
        let k = self.to_k.forward(&hs)?;
        let v = self.to_v.forward(&hs)?;
        // Scores and softmax in f32 (diffusers' upcast_softmax), chunked over batch and rows.
        let scale = 1.0 / (c as f64).sqrt();
        let dtype = x.dtype();
        let rows = (ATTN_CHUNK_ELEMS / n.max(1)).clamp(1, n);
        let mut outs = Vec::with_capacity(b);
        for bi in 0..b {
            let kt = k.get(bi)?.to_dtype(DType::F32)?.t()?.contiguous()?;
            let vb = v.get(bi)?.to_dtype(DType::F32)?;
            let qb = q.get(bi)?.to_dtype(DType::F32)?;
            let mut parts = Vec::with_capacity(n.div_ceil(rows));
            let mut start = 0;
            while start < n {
                let len = rows.min(n - start);
                let scores = (qb.narrow(0, start, len)?.matmul(&kt)? * scale)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                parts.push(probs.matmul(&vb)?);
                start += len;
            }
            outs.push(Tensor::cat(&parts, 0)?);
        }
        let attn = Tensor::stack(&outs, 0)?.to_dtype(dtype)?;
        let out = self
            .to_out
            .forward(&attn)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}

/// diffusers `UNetMidBlock2D` (one layer): resnet, optional attention, resnet.
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<AttentionBlock>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(w: &Weights, c: usize, groups: usize, attention: bool) -> Result<Self> {
        let r = w.pp("resnets");
        Ok(Self {
            resnet0: ResnetBlock::new(&r.pp(0), c, c, groups)?,
            attention: if attention {
                Some(AttentionBlock::new(&w.pp("attentions").pp(0), c, groups)?)
            } else {
                None
            },
            resnet1: ResnetBlock::new(&r.pp(1), c, c, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h)
    }
}

/// diffusers `DownEncoderBlock2D`: resnets, then a stride-2 conv on a (0,1,0,1)-padded input.
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(conv) = &self.downsample {
            let padded = h
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            h = conv.forward(&padded)?;
        }
        Ok(h)
    }
}

/// diffusers `UpDecoderBlock2D`: resnets, then 2× nearest upsampling and a conv.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(conv) = &self.upsample {
            let (_, _, hh, ww) = h.dims4()?;
            h = conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
        }
        Ok(h)
    }
}

struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let last = ch[ch.len() - 1];
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let bw = w.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let inc = if j == 0 { cin } else { cout };
                    ResnetBlock::new(&bw.pp("resnets").pp(j), inc, cout, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < ch.len() {
                Some(conv2d(
                    &bw.pp("downsamplers").pp(0).pp("conv"),
                    cout,
                    cout,
                    3,
                    2,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            cin = cout;
        }
        Ok(Self {
            conv_in: conv2d(&w.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::new(&w.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            conv_norm_out: group_norm(&w.pp("conv_norm_out"), g, last)?,
            conv_out: conv2d(&w.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        let h = self.conv_norm_out.forward(&h)?.silu()?;
        Ok(self.conv_out.forward(&h)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let first = cfg.block_out_channels[0];
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let bw = w.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let inc = if j == 0 { cin } else { cout };
                    ResnetBlock::new(&bw.pp("resnets").pp(j), inc, cout, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() {
                Some(conv2d(
                    &bw.pp("upsamplers").pp(0).pp("conv"),
                    cout,
                    cout,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            cin = cout;
        }
        Ok(Self {
            conv_in: conv2d(&w.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?,
            mid_block: MidBlock::new(&w.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: group_norm(&w.pp("conv_norm_out"), g, first)?,
            conv_out: conv2d(&w.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        let h = self.conv_norm_out.forward(&h)?.silu()?;
        Ok(self.conv_out.forward(&h)?)
    }
}

/// A loaded `AutoencoderKL`: encode images to posteriors, decode latents to images, and convert
/// between raw latents and the scaled latents the UNet works in.
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    /// Precision the VAE computes in (f32 when upcast).
    compute_dtype: DType,
    /// Precision the caller's model runs in; scaled latents are returned in it.
    model_dtype: DType,
    device: Device,
}

impl Vae {
    /// Load `vae/` of a model folder: its config, then its weights (memory-mapped, `variant`
    /// preferred) as `dtype` on `device`, upcast to f32 when the config forces it.
    pub fn load(md: &ModelDir, variant: Variant, dtype: DType, device: &Device) -> Result<Self> {
        let config = VaeConfig::from_model_dir(md)?;
        let weights = md.weights("vae", variant, dtype, device)?;
        Self::new(config, &weights)
    }

    /// Build from a checked config and any weight source (files, memory, random); `weights`'
    /// dtype is the model dtype, computation is f32 instead when `force_upcast` asks for it.
    pub fn new(config: VaeConfig, weights: &Weights) -> Result<Self> {
        let model_dtype = weights.dtype();
        let compute_dtype = match model_dtype {
            DType::F16 | DType::BF16 if config.force_upcast => DType::F32,
            d => d,
        };
        let w = weights.with_dtype(compute_dtype);
        let l = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(&w.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(&w.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(&w.pp("encoder"), &config)?,
            decoder: Decoder::new(&w.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            compute_dtype,
            model_dtype,
            device: w.device().clone(),
            config,
        })
    }

    /// The architecture and scaling constants.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The VAE's latent scaling factor (SD1.x 0.18215, SDXL 0.13025).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// The precision the VAE computes in (f32 when the config forces upcasting).
    pub fn dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn check_image(&self, images: &Tensor) -> Result<()> {
        let f = self.config.downscale_factor();
        match images.dims() {
            &[_, c, h, w] if c == self.config.in_channels && h % f == 0 && w % f == 0 => Ok(()),
            dims => Err(Error::InvalidArgument(format!(
                "VAE input must be [B, {}, H, W] with H and W multiples of {f}, got {dims:?}",
                self.config.in_channels
            ))),
        }
    }

    /// Encode images `[B, 3, H, W]` in [-1, 1] into the latent posterior (unscaled, in the
    /// compute dtype).
    pub fn encode(&self, images: &Tensor) -> Result<Posterior> {
        self.check_image(images)?;
        let x = images
            .to_device(&self.device)?
            .to_dtype(self.compute_dtype)?;
        let h = self.encoder.forward(&x)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&h)?,
            None => h,
        };
        Posterior::from_moments(&moments)
    }

    /// Decode unscaled latents `[B, L, h, w]` into images `[B, 3, 8h, 8w]` (about [-1, 1]), f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match latents.dims() {
            &[_, l, _, _] if l == self.config.latent_channels => {}
            dims => {
                return Err(Error::InvalidArgument(format!(
                    "VAE latents must be [B, {}, h, w], got {dims:?}",
                    self.config.latent_channels
                )))
            }
        }
        let z = latents
            .to_device(&self.device)?
            .to_dtype(self.compute_dtype)?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(&z)?,
            None => z,
        };
        Ok(self.decoder.forward(&z)?.to_dtype(DType::F32)?)
    }

    /// Per-channel `[1, L, 1, 1]` (shift, scale) so that scaled = (z - shift) · scale.
    fn latent_affine(&self) -> Result<(Tensor, Tensor)> {
        let l = self.config.latent_channels;
        let sf = self.config.scaling_factor;
        let (shift, scale): (Vec<f32>, Vec<f32>) =
            match (&self.config.latents_mean, &self.config.latents_std) {
                (Some(m), Some(s)) => m
                    .iter()
                    .zip(s)
                    .map(|(&m, &s)| (m as f32, (sf / s) as f32))
                    .unzip(),
                _ => {
                    let shift = self.config.shift_factor.unwrap_or(0.0) as f32;
                    (vec![shift; l], vec![sf as f32; l])
                }
            };
        let t = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (1, l, 1, 1), &self.device)?.to_dtype(self.compute_dtype)?)
        };
        Ok((t(shift)?, t(scale)?))
    }

    /// Raw latents to the UNet's scale: `(z - shift) · scaling_factor` (or the per-channel
    /// `latents_mean`/`latents_std` form when the config has them).
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let (shift, scale) = self.latent_affine()?;
        let z = z.to_dtype(self.compute_dtype)?;
        Ok(z.broadcast_sub(&shift)?.broadcast_mul(&scale)?)
    }

    /// The inverse of [`Vae::scale_latents`]: `z / scaling_factor + shift`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let (shift, scale) = self.latent_affine()?;
        let z = z.to_dtype(self.compute_dtype)?;
        Ok(z.broadcast_div(&scale)?.broadcast_add(&shift)?)
    }

    /// What training feeds the UNet: a fresh posterior sample of each image, scaled, in the model
    /// dtype.
    pub fn encode_scaled_sample(&self, images: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        let z = self.encode(images)?.sample(noise)?;
        Ok(self.scale_latents(&z)?.to_dtype(self.model_dtype)?)
    }

    /// Deterministic counterpart of [`Vae::encode_scaled_sample`]: the scaled posterior mean.
    pub fn encode_scaled_mode(&self, images: &Tensor) -> Result<Tensor> {
        let z = self.encode(images)?.mode();
        Ok(self.scale_latents(&z)?.to_dtype(self.model_dtype)?)
    }

    /// What sampling ends with: UNet-scale latents back to raw latents, decoded to f32 images.
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.unscale_latents(&latents.to_device(&self.device)?)?;
        self.decode(&z)
    }
}
