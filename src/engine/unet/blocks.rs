//! The down, mid and up blocks of the UNet (with or without cross-attention).

use candle_core::Tensor;

use super::config::{BlockSpec, UNetConfig};
use super::resnet::{Downsample, ResnetBlock, Upsample};
use super::transformer::SpatialTransformer;
use crate::engine::nn::AdapterScales;
use crate::engine::weights::Weights;
use crate::error::{Error, Result};

fn load_attentions(
    w: &Weights,
    cfg: &UNetConfig,
    spec: &BlockSpec,
    channels: usize,
    count: usize,
) -> Result<Vec<SpatialTransformer>> {
    if !spec.cross_attention {
        return Ok(Vec::new());
    }
    (0..count)
        .map(|j| {
            SpatialTransformer::load(
                &w.pp("attentions").pp(j),
                channels,
                spec.heads,
                spec.transformer_layers,
                spec.cross_attention_dim,
                cfg.groups,
                cfg.file.use_linear_projection,
                cfg.file.upcast_attention,
            )
        })
        .collect()
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`: resnets (each followed by an attention in the
/// cross-attention variant), then an optional stride-2 downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    /// Attentions (empty for `DownBlock2D`).
    pub attentions: Vec<SpatialTransformer>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    /// Load down block `index` mapping `in_ch` → `out_ch`.
    pub fn load(
        w: &Weights,
        cfg: &UNetConfig,
        index: usize,
        in_ch: usize,
        out_ch: usize,
    ) -> Result<Self> {
        let spec = &cfg.down[index];
        let resnets = (0..spec.layers)
            .map(|j| {
                let c_in = if j == 0 { in_ch } else { out_ch };
                ResnetBlock::load(
                    &w.pp("resnets").pp(j),
                    c_in,
                    out_ch,
                    cfg.time_embed_dim,
                    cfg.groups,
                    cfg.file.norm_eps,
                    1.0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let is_final = index + 1 == cfg.down.len();
        let downsample = if is_final {
            None
        } else {
            Some(Downsample::load(
                &w.pp("downsamplers").pp(0),
                out_ch,
                cfg.file.downsample_padding,
            )?)
        };
        Ok(Self {
            attentions: load_attentions(w, cfg, spec, out_ch, spec.layers)?,
            resnets,
            downsample,
        })
    }

    /// Apply; pushes every intermediate output onto `skips` for the up path.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        scales: &AdapterScales,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        self.forward_from(x, None, temb, context, scales, skips)
    }

    /// The first ResNet block alone (on `x` with time embedding `temb`), to be computed once for
    /// samples that share it and passed to [`Self::forward_from`].
    pub fn first_resnet(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        match self.resnets.first() {
            Some(r) => r.forward(x, temb),
            None => Ok(x.clone()),
        }
    }

    /// [`Self::forward`], with `first` = the first ResNet block's output on `x` when already
    /// computed ([`Self::first_resnet`]).
    pub fn forward_from(
        &self,
        x: &Tensor,
        mut first: Option<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        scales: &AdapterScales,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = match first.take() {
                Some(done) => done,
                None => resnet.forward(&h, temb)?,
            };
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context, scales)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsample {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock>,
    /// Attentions.
    pub attentions: Vec<SpatialTransformer>,
}

impl MidBlock {
    /// Load the mid block over `ch` channels.
    pub fn load(w: &Weights, cfg: &UNetConfig, spec: &BlockSpec, ch: usize) -> Result<Self> {
        let resnets = (0..=spec.layers)
            .map(|j| {
                ResnetBlock::load(
                    &w.pp("resnets").pp(j),
                    ch,
                    ch,
                    cfg.time_embed_dim,
                    cfg.groups,
                    cfg.file.norm_eps,
                    cfg.file.mid_block_scale_factor,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            attentions: load_attentions(w, cfg, spec, ch, spec.layers)?,
            resnets,
        })
    }

    /// Apply.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        scales: &AdapterScales,
    ) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, temb)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context, scales)?;
            h = resnet.forward(&h, temb)?;
        }
        Ok(h)
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`: each resnet takes the running state concatenated with a
/// skip from the down path; then an optional 2× upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    /// Attentions (empty for `UpBlock2D`).
    pub attentions: Vec<SpatialTransformer>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    /// Load up block `index` (deepest first) with diffusers' channel bookkeeping.
    pub fn load(
        w: &Weights,
        cfg: &UNetConfig,
        index: usize,
        prev_out: usize,
        out_ch: usize,
        in_ch: usize,
    ) -> Result<Self> {
        let spec = &cfg.up[index];
        let resnets = (0..spec.layers)
            .map(|j| {
                let skip = if j + 1 == spec.layers { in_ch } else { out_ch };
                let c_in = if j == 0 { prev_out } else { out_ch };
                ResnetBlock::load(
                    &w.pp("resnets").pp(j),
                    c_in + skip,
                    out_ch,
                    cfg.time_embed_dim,
                    cfg.groups,
                    cfg.file.norm_eps,
                    1.0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let is_final = index + 1 == cfg.up.len();
        let upsample = if is_final {
            None
        } else {
            Some(Upsample::load(&w.pp("upsamplers").pp(0), out_ch)?)
        };
        Ok(Self {
            attentions: load_attentions(w, cfg, spec, out_ch, spec.layers)?,
            resnets,
            upsample,
        })
    }

    /// Apply, consuming skips from the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        scales: &AdapterScales,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| Error::InvalidArgument("UNet skip connections exhausted".into()))?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context, scales)?;
            }
        }
        if let Some(up) = &self.upsample {
            h = up.forward(&h)?;
        }
        Ok(h)
    }
}
