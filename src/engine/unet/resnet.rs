//! diffusers' `ResnetBlock2D` (default time conditioning), `Downsample2D` and `Upsample2D`.

use candle_core::Tensor;

use crate::engine::nn::{silu, upsample_nearest2x, Conv2d, GroupNorm, Linear};
use crate::engine::weights::Weights;
use crate::error::Result;

/// Two 3×3 convolutions with group norms, the time embedding added in between, and a residual
/// (through a 1×1 `conv_shortcut` when the width changes).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock {
    /// Load a block mapping `in_ch` → `out_ch` channels conditioned on a `temb_dim` embedding.
    pub fn load(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        temb_dim: usize,
        groups: usize,
        eps: f64,
        output_scale: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(Conv2d::load(
                &w.pp("conv_shortcut"),
                in_ch,
                out_ch,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(&w.pp("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: Linear::load(&w.pp("time_emb_proj"), temb_dim, out_ch, true)?,
            norm2: GroupNorm::load(&w.pp("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut,
            output_scale,
        })
    }

    /// Apply to `x` [B, C, H, W] with the activated-later time embedding `temb` [B, T].
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time_emb_proj.forward(&silu(temb)?)?;
        let (b, c) = t.dims2()?;
        let h = h.broadcast_add(&t.reshape((b, c, 1, 1))?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        Ok(if self.output_scale == 1.0 {
            out
        } else {
            (out / self.output_scale)?
        })
    }
}

/// Stride-2 3×3 convolution (`downsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// Load `conv` with the given padding (diffusers' `downsample_padding`).
    pub fn load(w: &Weights, ch: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&w.pp("conv"), ch, ch, 3, 2, padding)?,
        })
    }

    /// Halve the spatial size.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// Nearest 2× upsampling followed by a 3×3 convolution (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Load `conv`.
    pub fn load(w: &Weights, ch: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&w.pp("conv"), ch, ch, 3, 1, 1)?,
        })
    }

    /// Double the spatial size.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&upsample_nearest2x(x)?)
    }
}
