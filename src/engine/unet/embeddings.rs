//! Timestep embeddings: sinusoidal features and the MLP that lifts them to the time embedding.

use candle_core::{DType, Device, Tensor};

use crate::engine::nn::{silu, Linear};
use crate::engine::weights::Weights;
use crate::error::Result;

/// Sinusoidal features of timesteps [B] → [B, dim] (f32), as diffusers' `get_timestep_embedding`
/// with max period 10 000 and scale 1.
pub fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let device: &Device = timesteps.device();
    let half = dim / 2;
    let denom = half as f64 - freq_shift;
    // diffusers builds the exponent in float32: -ln(10000) * arange(half) / (half - shift).
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let e = (-(10000f32.ln()) * i as f32) / denom as f32;
            e.exp()
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let t = timesteps.to_dtype(DType::F32)?.reshape(((), 1))?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], 1)?
    } else {
        Tensor::cat(&[&sin, &cos], 1)?
    };
    if dim % 2 == 1 {
        let b = emb.dim(0)?;
        let pad = Tensor::zeros((b, 1), DType::F32, device)?;
        return Ok(Tensor::cat(&[&emb, &pad], 1)?);
    }
    Ok(emb)
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Load `linear_1` [out, in] and `linear_2` [out, out].
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&w.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }

    /// Apply to [B, in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(x)?)?)
    }
}
