//! diffusers' `Transformer2DModel` with `BasicTransformerBlock`s: self-attention, cross-attention
//! to the text, and a GEGLU feed-forward, between group-norm/projection in and projection out.

use candle_core::{Tensor, D};

use crate::engine::nn::{
    attention, gelu, AdaptableLinear, AdapterScales, Conv2d, GroupNorm, LayerNorm, Linear,
};
use crate::engine::weights::Weights;
use crate::error::Result;

/// diffusers' `Attention` with `to_q`, `to_k`, `to_v` (no bias) and `to_out.0` (bias), each an
/// [`AdaptableLinear`] so that LoRA adapters can be attached by module path.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection.
    pub to_q: AdaptableLinear,
    /// Key projection.
    pub to_k: AdaptableLinear,
    /// Value projection.
    pub to_v: AdaptableLinear,
    /// Output projection (`to_out.0`).
    pub to_out: AdaptableLinear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    /// Load an attention of width `dim` attending to a context of width `context_dim`.
    pub fn load(
        w: &Weights,
        dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
    ) -> Result<Self> {
        Ok(Self {
            to_q: AdaptableLinear::load(&w.pp("to_q"), dim, dim, false)?,
            to_k: AdaptableLinear::load(&w.pp("to_k"), context_dim, dim, false)?,
            to_v: AdaptableLinear::load(&w.pp("to_v"), context_dim, dim, false)?,
            to_out: AdaptableLinear::load(&w.pp("to_out").pp(0), dim, dim, true)?,
            heads,
            upcast,
        })
    }

    /// Attend from `x` [B, N, dim] to `context` [B, M, context_dim] (itself when `None`).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        scales: &AdapterScales,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x, scales)?;
        let k = self.to_k.forward(ctx, scales)?;
        let v = self.to_v.forward(ctx, scales)?;
        let a = attention(&q, &k, &v, self.heads, self.upcast)?;
        self.to_out.forward(&a, scales)
    }

    /// The four projections, mutably (to attach adapters).
    pub fn linears_mut(&mut self) -> [&mut AdaptableLinear; 4] {
        [
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ]
    }

    /// The four projections.
    pub fn linears(&self) -> [&AdaptableLinear; 4] {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
    }
}

/// GEGLU feed-forward: `net.2(h · gelu(gate))` with `[h, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::load(&w.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::load(&w.pp("net").pp(2), inner, dim, true)?,
            inner,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hg = self.proj.forward(x)?;
        let h = hg.narrow(D::Minus1, 0, self.inner)?;
        let g = hg.narrow(D::Minus1, self.inner, self.inner)?;
        self.out.forward(&(h * gelu(&g)?)?)
    }
}

/// diffusers' `BasicTransformerBlock` (layer-norm variant).
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    /// Self-attention.
    pub attn1: Attention,
    norm2: LayerNorm,
    /// Cross-attention to the text.
    pub attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn load(
        w: &Weights,
        dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&w.pp("attn1"), dim, dim, heads, upcast)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads, upcast)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, scales: &AdapterScales) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, scales)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), scales)?
            + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + &x)?)
    }
}

/// Projection into and out of the token sequence: 1×1 convolution (SD1) or linear (SD2, SDXL).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` for continuous inputs.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    /// The transformer blocks.
    pub transformer_blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    /// Load a transformer over `channels` channels with `depth` blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        groups: usize,
        linear_projection: bool,
        upcast: bool,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if linear_projection {
                Projection::Linear(Linear::load(&w.pp(name), channels, channels, true)?)
            } else {
                Projection::Conv(Conv2d::load(&w.pp(name), channels, channels, 1, 1, 0)?)
            })
        };
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::load(
                    &w.pp("transformer_blocks").pp(i),
                    channels,
                    context_dim,
                    heads,
                    upcast,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&w.pp("norm"), groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            transformer_blocks: blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// Apply to `x` [B, C, H, W] conditioned on `context` [B, M, context_dim]; residual included.
    pub fn forward(&self, x: &Tensor, context: &Tensor, scales: &AdapterScales) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context, scales)?;
        }
        let to_image = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}
