//! Our own `UNet2DConditionModel`: loads diffusers weights unchanged (same tensor names), takes a
//! timestep per sample, supports SDXL's `text_time` added conditioning, and exposes its attention
//! projections so that LoRA adapters can be attached. Built only from ops with a correct backward
//! so that it can be trained through (candle-transformers' UNet cannot; see `shared/CANDLE.md`).

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod resnet;
pub mod transformer;

use candle_core::{DType, Device, Tensor};

use self::blocks::{DownBlock, MidBlock, UpBlock};
pub use self::config::{UNetConfig, UNetConfigFile};
use self::embeddings::{timestep_features, TimestepEmbedding};
use self::transformer::Attention;
use super::model_dir::{ModelDir, Variant};
use super::nn::{AdaptableLinear, AdapterScales, Conv2d, GroupNorm};
use super::weights::Weights;
use crate::error::{Error, Result};

/// SDXL's added conditioning: pooled text embedding and the six size/crop numbers per sample.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled text embeddings [B, P].
    pub text_embeds: Tensor,
    /// `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)` per sample [B, 6].
    pub time_ids: Tensor,
}

/// The denoising UNet.
#[derive(Debug, Clone)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Load `unet/` of a diffusers folder.
    pub fn load(model: &ModelDir, variant: Variant, dtype: DType, device: &Device) -> Result<Self> {
        let file: UNetConfigFile = model.config("unet")?;
        let config = UNetConfig::resolve(file, &model.config_path("unet"))?;
        let weights = model.weights("unet", variant, dtype, device)?;
        Self::new(config, &weights)
    }

    /// Build from a resolved config and weights (diffusers names at the root of `w`).
    pub fn new(config: UNetConfig, w: &Weights) -> Result<Self> {
        let ch = &config.file.block_out_channels;
        let c0 = ch[0];
        let kin = config.file.conv_in_kernel;
        let kout = config.file.conv_out_kernel;
        let conv_in = Conv2d::load(
            &w.pp("conv_in"),
            config.file.in_channels,
            c0,
            kin,
            1,
            kin / 2,
        )?;
        let time_embedding =
            TimestepEmbedding::load(&w.pp("time_embedding"), c0, config.time_embed_dim)?;
        let add_embedding = match config.text_time {
            Some((_, in_dim)) => Some(TimestepEmbedding::load(
                &w.pp("add_embedding"),
                in_dim,
                config.time_embed_dim,
            )?),
            None => None,
        };
        let mut down_blocks = Vec::new();
        let mut in_ch = c0;
        for (i, &out_ch) in ch.iter().enumerate() {
            down_blocks.push(DownBlock::load(
                &w.pp("down_blocks").pp(i),
                &config,
                i,
                in_ch,
                out_ch,
            )?);
            in_ch = out_ch;
        }
        let last = ch[ch.len() - 1];
        let mid_block = match &config.mid {
            Some(spec) => Some(MidBlock::load(&w.pp("mid_block"), &config, spec, last)?),
            None => None,
        };
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_ch = rev[0];
        for i in 0..rev.len() {
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(rev.len() - 1)];
            up_blocks.push(UpBlock::load(
                &w.pp("up_blocks").pp(i),
                &config,
                i,
                prev_out,
                out_ch,
                in_ch,
            )?);
        }
        Ok(Self {
            conv_norm_out: GroupNorm::load(
                &w.pp("conv_norm_out"),
                config.groups,
                c0,
                config.file.norm_eps,
            )?,
            conv_out: Conv2d::load(
                &w.pp("conv_out"),
                c0,
                config.file.out_channels,
                kout,
                1,
                kout / 2,
            )?,
            config,
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The output convolution (`conv_out`), e.g. to inspect its frozen weight.
    pub fn conv_out(&self) -> &Conv2d {
        &self.conv_out
    }

    /// Predict the model output (noise, velocity or sample, as trained) for `sample` [B, C, H, W]
    /// at `timesteps` [B] (one per sample), conditioned on `context` [B, M, cross_dim], SDXL's
    /// `added` conditions, and the adapters active in `scales`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        scales: &AdapterScales,
    ) -> Result<Tensor> {
        self.forward_inner(sample, None, timesteps, context, added, scales)
    }

    /// The same prediction for `batch` samples that all start from one `latent` [1, C, H, W] at
    /// one `timestep`, as the branches of a guidance step do (unconditional, conditional, one per
    /// style): the part of the network that sees neither text nor adapters is computed once and
    /// shared. That is `conv_in` always and, when the time embedding is the same for every
    /// sample (SD 1.x/2.x; SDXL's added conditions differ by branch), the first ResNet block too.
    /// Equal to [`Self::forward`] on the latent repeated `batch` times.
    pub fn forward_shared_latent(
        &self,
        latent: &Tensor,
        batch: usize,
        timestep: f32,
        context: &Tensor,
        added: Option<&AddedCond>,
        scales: &AdapterScales,
    ) -> Result<Tensor> {
        if latent.dim(0)? != 1 || batch == 0 {
            return Err(Error::InvalidArgument(format!(
                "shared-latent forward needs one latent and at least one sample, got {} and {batch}",
                latent.dim(0)?
            )));
        }
        let ts = Tensor::new(vec![timestep; batch], latent.device())?;
        let sample =
            latent.broadcast_as((batch, latent.dim(1)?, latent.dim(2)?, latent.dim(3)?))?;
        self.forward_inner(&sample, Some(latent), &ts, context, added, scales)
    }

    /// [`Self::forward`], with `shared` = the one latent every sample of `sample` repeats (the
    /// timesteps then being all equal), whose text- and adapter-free start is computed once.
    fn forward_inner(
        &self,
        sample: &Tensor,
        shared: Option<&Tensor>,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        scales: &AdapterScales,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let f = self.config.downscale();
        if h % f != 0 || w % f != 0 {
            return Err(Error::InvalidArgument(format!(
                "latent size {h}×{w} must divide by {f} for this UNet (image sides by {})",
                f * 8
            )));
        }
        let timesteps = match timesteps.rank() {
            0 => timesteps.broadcast_as(b)?.contiguous()?,
            _ => timesteps.clone(),
        };
        if timesteps.dim(0)? != b || context.dim(0)? != b {
            return Err(Error::InvalidArgument(format!(
                "batch mismatch: sample {b}, timesteps {}, context {}",
                timesteps.dim(0)?,
                context.dim(0)?
            )));
        }
        let dtype = sample.dtype();
        let c0 = self.config.file.block_out_channels[0];
        let t_feat = timestep_features(
            &timesteps,
            c0,
            self.config.file.flip_sin_to_cos,
            self.config.file.freq_shift,
        )?
        .to_dtype(dtype)?;
        let mut temb = self.time_embedding.forward(&t_feat)?;
        if let (Some(add), Some((dim, _))) = (&self.add_embedding, self.config.text_time) {
            let added = added.ok_or_else(|| {
                Error::InvalidArgument("this UNet (SDXL) needs text_embeds and time_ids".into())
            })?;
            let ids = added.time_ids.flatten_all()?;
            let feats = timestep_features(
                &ids,
                dim,
                self.config.file.flip_sin_to_cos,
                self.config.file.freq_shift,
            )?
            .reshape((b, ()))?
            .to_dtype(dtype)?;
            let input = Tensor::cat(&[&added.text_embeds.to_dtype(dtype)?, &feats], 1)?;
            temb = (temb + add.forward(&input)?)?;
        }

        let expand = |t: Tensor| -> Result<Tensor> {
            let (_, c, h, w) = t.dims4()?;
            Ok(t.broadcast_as((b, c, h, w))?.contiguous()?)
        };
        let (mut h, mut first) = match shared {
            None => (self.conv_in.forward(sample)?, None),
            Some(latent) => {
                let h1 = self.conv_in.forward(latent)?;
                // The time embedding is the same for every sample unless SDXL's added
                // conditions (which differ by branch) went into it.
                let first = match (self.add_embedding.is_none(), self.down_blocks.first()) {
                    (true, Some(block)) => {
                        Some(expand(block.first_resnet(&h1, &temb.narrow(0, 0, 1)?)?)?)
                    }
                    _ => None,
                };
                (expand(h1)?, first)
            }
        };
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward_from(&h, first.take(), &temb, context, scales, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &temb, context, scales)?;
        }
        for block in &self.up_blocks {
            h = block.forward(&h, &temb, context, scales, &mut skips)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }

    /// Every attention in module order (down, mid, up), with its diffusers path prefix.
    fn attentions(&self) -> Vec<&Attention> {
        let mut out = Vec::new();
        let transformers = self
            .down_blocks
            .iter()
            .flat_map(|b| b.attentions.iter())
            .chain(self.mid_block.iter().flat_map(|m| m.attentions.iter()))
            .chain(self.up_blocks.iter().flat_map(|b| b.attentions.iter()));
        for t in transformers {
            for blk in &t.transformer_blocks {
                out.push(&blk.attn1);
                out.push(&blk.attn2);
            }
        }
        out
    }

    /// Every attention projection (`to_q`, `to_k`, `to_v`, `to_out.0` of attn1 and attn2): the
    /// layers Pair Customization puts adapters on.
    pub fn adaptable_linears(&self) -> Vec<&AdaptableLinear> {
        self.attentions()
            .into_iter()
            .flat_map(|a| a.linears())
            .collect()
    }

    /// The same layers, mutably, to attach or remove adapters.
    pub fn adaptable_linears_mut(&mut self) -> Vec<&mut AdaptableLinear> {
        let mut out = Vec::new();
        let transformers = self
            .down_blocks
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut())
            .chain(
                self.mid_block
                    .iter_mut()
                    .flat_map(|m| m.attentions.iter_mut()),
            )
            .chain(
                self.up_blocks
                    .iter_mut()
                    .flat_map(|b| b.attentions.iter_mut()),
            );
        for t in transformers {
            for blk in t.transformer_blocks.iter_mut() {
                out.extend(blk.attn1.linears_mut());
                out.extend(blk.attn2.linears_mut());
            }
        }
        out
    }
}
