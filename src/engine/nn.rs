//! Neural-network building blocks whose backward pass is correct in candle.
//!
//! candle's fused softmax, layer norm and attention kernels have no backward (see
//! `shared/CANDLE.md`), so the layers here are composed from ops with correct gradients, or, for
//! f32/f64 on the CPU, use our own fused kernels with an analytic backward (attention:
//! [`crate::engine::attention`]; group and layer norm: [`crate::engine::norm`]; convolution:
//! [`crate::engine::conv`]). Norms compute their statistics in f32 when the model runs in half
//! precision.
//!
//! [`AdaptableLinear`] is the attention projection (`to_q`, `to_k`, `to_v`, `to_out.0`): a frozen
//! base weight plus any number of named low-rank adapters, each with a per-sample scale.

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};

use super::frozen::{frozen_conv2d, frozen_linear, frozen_lora_linear, plain_linear as linear};
use super::norm;
use super::weights::Weights;
use crate::error::{Error, Result};

/// A dense layer `y = x·Wᵀ + b` over the last axis (any number of leading axes).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Load `weight` [out, in] (and `bias` [out] when `bias` is true) under `w`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias {
            Some(w.get(&[out_dim], "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// The weight matrix [out, in].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Apply the layer. When `x` tracks gradients the weights are treated as frozen: backward
    /// computes only the input gradient ([`frozen_linear`]); otherwise the plain ops run.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            frozen_linear(x, &self.weight, self.bias.as_ref())
        } else {
            Ok(linear(x, &self.weight, self.bias.as_ref())?)
        }
    }
}

/// `x·wᵀ` for an adapter matrix: a trainable `w` keeps its gradient; a constant one (a frozen
/// down-projection, or ContentLoRA held fixed in the style step) gets none.
fn adapter_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !w.track_op() && x.track_op() {
        frozen_linear(x, w, None)
    } else {
        Ok(linear(x, w, None)?)
    }
}

/// One low-rank adapter on a linear layer: `Δy = scale · B(A·x)`.
#[derive(Debug, Clone)]
pub struct LowRankAdapter {
    /// Down-projection A [r, in].
    pub down: Tensor,
    /// Up-projection B [out, r].
    pub up: Tensor,
    /// α / r, the fixed part of the adapter's scale.
    pub alpha_over_rank: f64,
}

/// Per-sample scales of the adapters active in one forward call, by adapter name.
///
/// An adapter missing from the map is inactive (skipped, no cost). A scale is a tensor of shape
/// [batch] so that, e.g., the unconditional, conditional and style branches of style guidance can
/// run in one batched call with different adapters switched on per sample. The samples whose
/// scale is exactly zero are noted when the scale is set, so that inference runs an adapter only
/// on the samples it changes (an N-style guidance step then does N single-sample adapter passes,
/// not N full-batch ones).
#[derive(Debug, Clone, Default)]
pub struct AdapterScales {
    scales: HashMap<String, ActiveScale>,
}

/// One adapter's per-sample scales, and which samples they leave unchanged.
#[derive(Debug, Clone)]
struct ActiveScale {
    scales: Tensor,
    /// The scale of each sample, read once when set; `None` when the scale is a scalar (every
    /// sample) or could not be read.
    values: Option<Vec<f64>>,
}

impl AdapterScales {
    /// No adapter active: the base model.
    pub fn none() -> Self {
        Self::default()
    }

    /// Activate adapter `name` with one scale per sample (`scales.len()` = batch size).
    pub fn set(&mut self, name: &str, scales: Tensor) {
        let values = match scales.rank() {
            1 => scales
                .to_dtype(DType::F64)
                .and_then(|s| s.to_vec1::<f64>())
                .ok(),
            _ => None,
        };
        self.scales
            .insert(name.to_string(), ActiveScale { scales, values });
    }

    /// The per-sample scale tensor of adapter `name`, if active.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.scales.get(name).map(|a| &a.scales)
    }

    /// For adapter `name`, whether each sample's scale is non-zero (`None`: not known per
    /// sample, treat every sample as active).
    pub fn nonzero_samples(&self, name: &str) -> Option<Vec<bool>> {
        self.sample_values(name)
            .map(|v| v.iter().map(|&s| s != 0.0).collect())
    }

    /// For adapter `name`, each sample's scale as read when it was set (`None`: not known per
    /// sample).
    pub fn sample_values(&self, name: &str) -> Option<&[f64]> {
        self.scales.get(name).and_then(|a| a.values.as_deref())
    }

    /// Whether no adapter is active.
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }
}

/// The maximal runs `(start, len)` of `true` in `mask`.
fn true_runs(mask: &[bool]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &on) in mask.iter().chain(std::iter::once(&false)).enumerate() {
        match (on, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s, i - s));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// An attention projection: frozen base weights plus named low-rank adapters, applied unmerged as
/// `W0·x + b + Σ_k s_k·(α_k/r_k)·B_k(A_k·x)` with `s_k` taken per sample from [`AdapterScales`].
#[derive(Debug, Clone)]
pub struct AdaptableLinear {
    /// Module path in diffusers naming, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    path: String,
    base: Linear,
    adapters: Vec<(String, LowRankAdapter)>,
}

impl AdaptableLinear {
    /// Load the base layer; `path` is the module's full diffusers name (adapter files key on it).
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            path: w.prefix().to_string(),
            base: Linear::load(w, in_dim, out_dim, bias)?,
            adapters: Vec::new(),
        })
    }

    /// The module's full diffusers name.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The frozen base layer `W0·x + b`.
    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// Input and output widths of the base layer.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.base.weight.dims();
        (d[1], d[0])
    }

    /// The dtype of the base weight. Adapters may match it or be f32 on a bf16/f16 base (mixed
    /// precision: the adapter math then runs in f32).
    pub fn weight_dtype(&self) -> DType {
        self.base.weight.dtype()
    }

    /// Attach (or replace) the adapter `name`. Shapes must fit the base layer.
    pub fn set_adapter(&mut self, name: &str, adapter: LowRankAdapter) -> Result<()> {
        let (in_dim, out_dim) = self.dims();
        let (r, a_in) = adapter.down.dims2()?;
        let (b_out, r2) = adapter.up.dims2()?;
        if a_in != in_dim || b_out != out_dim || r != r2 {
            return Err(Error::ShapeMismatch {
                name: format!("{}.{name}", self.path),
                expected: vec![out_dim, r, in_dim],
                found: vec![b_out, r2, a_in],
                file: "<adapter>".into(),
            });
        }
        self.adapters.retain(|(n, _)| n != name);
        self.adapters.push((name.to_string(), adapter));
        Ok(())
    }

    /// Detach the adapter `name` (no-op if absent).
    pub fn remove_adapter(&mut self, name: &str) {
        self.adapters.retain(|(n, _)| n != name);
    }

    /// The adapters attached, by name.
    pub fn adapters(&self) -> impl Iterator<Item = (&str, &LowRankAdapter)> {
        self.adapters.iter().map(|(n, a)| (n.as_str(), a))
    }

    /// Apply base layer and active adapters. `x` is [batch, tokens, in].
    ///
    /// When nothing tracks gradients, f32/f64 layers whose merged weights are cheaper than the
    /// adapters run each sample with its own merged weight (see `forward_merged`). Otherwise,
    /// when an adapter's scale is zero on some samples, the adapter runs only on the others and
    /// its delta is added into those rows of the fresh output in place (inference with style
    /// guidance); with gradients it runs on the whole batch.
    pub fn forward(&self, x: &Tensor, scales: &AdapterScales) -> Result<Tensor> {
        let batch = x.dim(0)?;
        if let Some(y) = self.forward_tracked(x, scales, batch)? {
            return Ok(y);
        }
        if let Some(y) = self.forward_merged(x, scales, batch)? {
            return Ok(y);
        }
        let mut y = self.base.forward(x)?;
        for (name, ad) in &self.adapters {
            let Some(s) = scales.get(name) else { continue };
            let tracked = x.track_op() || s.track_op() || ad.down.track_op() || ad.up.track_op();
            if let Some(mask) = scales.nonzero_samples(name) {
                if !tracked && mask.len() == batch && mask.contains(&false) {
                    if !y.is_contiguous() {
                        y = y.contiguous()?;
                    }
                    for (start, len) in true_runs(&mask) {
                        let rows = y.narrow(0, start, len)?;
                        let delta = ad.delta(&x.narrow(0, start, len)?, rows.dtype())?;
                        let s = (s.narrow(0, start, len)?.to_dtype(delta.dtype())?
                            * ad.alpha_over_rank)?
                            .reshape((len, 1, 1))?;
                        let updated = (rows + delta.broadcast_mul(&s)?)?;
                        // `y` is this call's own fresh output: nothing else sees the write.
                        y.slice_set(&updated, 0, start)?;
                    }
                    continue;
                }
            }
            let delta = ad.delta(x, y.dtype())?;
            let s = (s.to_dtype(delta.dtype())? * ad.alpha_over_rank)?;
            let s = match s.rank() {
                0 => s.reshape((1, 1, 1))?,
                _ => s.reshape((batch, 1, 1))?,
            };
            y = (y + delta.broadcast_mul(&s)?)?;
        }
        Ok(y)
    }

    /// Inference with adapters whose merged weight is cheaper than running them unmerged: each
    /// sample gets the weight `W0 + Σ_k s_k·(α_k/r_k)·B_k·A_k` of the adapters switched on for
    /// it (built once per distinct set of scales, shared by the samples with that set), and one
    /// batched matmul applies every sample's own weight, base samples using `W0`.
    ///
    /// Building a merged weight costs `out·in·r` multiply-adds; running the adapter on `n` samples
    /// of `t` tokens costs `n·t·r·(in + out)` and three extra passes over the output, so the merge
    /// is used when `out·in < n·t·(in + out)` for every set (the wide, short layers of a
    /// high-resolution block: at 64×64 latents SD1.5's 320- and 640-channel projections, not its
    /// 1280-channel ones, nor the key/value projections of the 77 text tokens). Only for f32/f64
    /// weights with adapters of the same dtype: a merged half-precision weight would round the
    /// small adapter term away. `None`: the caller runs the adapters unmerged.
    fn forward_merged(
        &self,
        x: &Tensor,
        scales: &AdapterScales,
        batch: usize,
    ) -> Result<Option<Tensor>> {
        let dtype = self.base.weight.dtype();
        if x.track_op()
            || x.rank() != 3
            || x.dtype() != dtype
            || !matches!(dtype, DType::F32 | DType::F64)
        {
            return Ok(None);
        }
        // Per sample: the (adapter index, scale) pairs with a non-zero scale.
        let mut per_sample: Vec<Vec<(usize, f64)>> = vec![Vec::new(); batch];
        let mut any = false;
        for (k, (name, ad)) in self.adapters.iter().enumerate() {
            let Some(s) = scales.get(name) else { continue };
            let Some(values) = scales.sample_values(name) else {
                return Ok(None);
            };
            if values.len() != batch
                || s.track_op()
                || ad.down.track_op()
                || ad.up.track_op()
                || ad.down.dtype() != dtype
                || ad.up.dtype() != dtype
            {
                return Ok(None);
            }
            for (b, &v) in values.iter().enumerate() {
                if v != 0.0 {
                    per_sample[b].push((k, v));
                    any = true;
                }
            }
        }
        if !any {
            return Ok(None);
        }
        // Distinct adapter sets, each with the number of samples that use it, and each sample's
        // set (`None`: the base weight).
        let mut sets: Vec<(&[(usize, f64)], usize)> = Vec::new();
        let set_of: Vec<Option<usize>> = per_sample
            .iter()
            .map(|set| {
                if set.is_empty() {
                    return None;
                }
                Some(match sets.iter().position(|(s, _)| *s == set.as_slice()) {
                    Some(i) => {
                        sets[i].1 += 1;
                        i
                    }
                    None => {
                        sets.push((set, 1));
                        sets.len() - 1
                    }
                })
            })
            .collect();
        let (in_dim, out_dim) = self.dims();
        let tokens = x.dim(1)?;
        if sets
            .iter()
            .any(|(_, n)| out_dim * in_dim >= n * tokens * (in_dim + out_dim))
        {
            return Ok(None);
        }
        let mut merged: Vec<Tensor> = Vec::with_capacity(sets.len());
        for (set, _) in &sets {
            let mut w = self.base.weight.clone();
            for &(k, v) in set.iter() {
                let ad = &self.adapters[k].1;
                let delta = (ad.up.matmul(&ad.down)? * (v * ad.alpha_over_rank))?;
                w = (w + delta)?;
            }
            merged.push(w);
        }
        let weights: Vec<&Tensor> = set_of
            .iter()
            .map(|i| i.map_or(&self.base.weight, |i| &merged[i]))
            .collect();
        // [batch, out, in] → [batch, in, out] as a transposed view: the GEMM reads it in place.
        let w_t = Tensor::stack(&weights, 0)?.transpose(1, 2)?;
        let y = x.contiguous()?.matmul(&w_t)?;
        Ok(Some(match &self.base.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }))
    }

    /// Training (something tracks gradients, every active adapter in the base dtype): base layer
    /// and all active adapters as one graph node ([`frozen_lora_linear`]) on the scaled `A·x`
    /// of the adapters side by side. `None`: nothing tracks, or an adapter in another dtype
    /// (mixed precision), so the caller composes the ops.
    fn forward_tracked(
        &self,
        x: &Tensor,
        scales: &AdapterScales,
        batch: usize,
    ) -> Result<Option<Tensor>> {
        let active: Vec<(&LowRankAdapter, &Tensor)> = self
            .adapters
            .iter()
            .filter_map(|(name, ad)| scales.get(name).map(|s| (ad, s)))
            .collect();
        let dtype = x.dtype();
        let tracked = x.track_op()
            || active
                .iter()
                .any(|(ad, s)| s.track_op() || ad.down.track_op() || ad.up.track_op());
        let same_dtype = active
            .iter()
            .all(|(ad, _)| ad.down.dtype() == dtype && ad.up.dtype() == dtype);
        if active.is_empty() || !tracked || !same_dtype || x.rank() != 3 {
            return Ok(None);
        }
        let mut hs = Vec::with_capacity(active.len());
        let mut ups = Vec::with_capacity(active.len());
        for (ad, s) in &active {
            let s = (s.to_dtype(dtype)? * ad.alpha_over_rank)?;
            let s = match s.rank() {
                0 => s.reshape((1, 1, 1))?,
                _ => s.reshape((batch, 1, 1))?,
            };
            hs.push(adapter_matmul(x, &ad.down)?.broadcast_mul(&s)?);
            ups.push(ad.up.clone());
        }
        let (h, up) = if hs.len() == 1 {
            (hs.remove(0), ups.remove(0))
        } else {
            (Tensor::cat(&hs, 2)?, Tensor::cat(&ups, 1)?)
        };
        frozen_lora_linear(x, &self.base.weight, self.base.bias.as_ref(), &h, &up).map(Some)
    }
}

impl LowRankAdapter {
    /// `B(A·x)` without the scale, in `out_dtype`. Mixed precision: an f32 adapter on a bf16/f16
    /// base runs in its own dtype and its delta is cast back, so LoRA weights and their gradients
    /// stay f32.
    fn delta(&self, x: &Tensor, out_dtype: DType) -> Result<Tensor> {
        let xa = if x.dtype() == self.down.dtype() {
            x.clone()
        } else {
            x.to_dtype(self.down.dtype())?
        };
        let h = adapter_matmul(&xa, &self.down)?;
        let delta = adapter_matmul(&h, &self.up)?;
        Ok(if delta.dtype() != out_dtype {
            delta.to_dtype(out_dtype)?
        } else {
            delta
        })
    }
}

/// A 2-D convolution with diffusers' `weight` [out, in/groups, k, k] and `bias` [out].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Load a square-kernel convolution with bias.
    pub fn load(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[out_ch, in_ch, kernel, kernel], "weight")?,
            bias: Some(w.get(&[out_ch], "bias")?),
            stride,
            padding,
        })
    }

    /// The kernel [out, in, k, k].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Apply the convolution to [B, C, H, W]. When `x` tracks gradients the weights are treated
    /// as frozen: backward computes only the input gradient ([`frozen_conv2d`]); otherwise the
    /// plain ops run.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            return frozen_conv2d(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.padding,
                self.stride,
            );
        }
        Ok(crate::engine::frozen::plain_conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.padding,
            self.stride,
        )?)
    }
}

/// Group normalisation over [B, C, ...] with an affine `weight`/`bias` per channel.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Load `weight` and `bias` [channels]; `channels` must divide by `groups`.
    pub fn load(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::InvalidArgument(format!(
                "{}: {channels} channels do not divide into {groups} groups",
                w.prefix()
            )));
        }
        Ok(Self {
            weight: w.get(&[channels], "weight")?,
            bias: w.get(&[channels], "bias")?,
            groups,
            eps,
        })
    }

    /// Normalise `x` [B, C, *spatial] (statistics in f32 for half-precision inputs): the fused
    /// kernel of [`crate::engine::norm`] for f32/f64 on the CPU, [`Self::forward_composed`]
    /// otherwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if norm::supported(x) {
            let segments = norm::Segments::group_norm(x.dims(), self.groups)?;
            return fused_norm(x, &self.weight, &self.bias, segments, self.eps);
        }
        self.forward_composed(x)
    }

    /// `silu(self.forward(x))`, the norm-then-activation of resnet blocks: on the fused CPU
    /// kernel and with nothing tracking gradients, the activation runs inside the norm's pass
    /// ([`norm::normalize_silu`]).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if norm::supported(x) {
            let segments = norm::Segments::group_norm(x.dims(), self.groups)?;
            return Ok(norm::normalize_silu(
                x,
                &self.weight,
                &self.bias,
                segments,
                self.eps,
            )?);
        }
        silu(&self.forward_composed(x)?)
    }

    /// The group norm composed from candle ops (half precision, GPUs; the reference the fused
    /// kernel is tested against).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let x32 = upcast(x)?;
        let g = x32.reshape((b, self.groups, ()))?;
        let mean = g.mean_keepdim(D::Minus1)?;
        let centered = g.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let normed = normed.reshape(dims.as_slice())?.to_dtype(dtype)?;
        let y = normed
            .broadcast_mul(&self.weight.reshape(shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(shape.as_slice())?)?;
        Ok(y)
    }
}

/// The fused CPU kernel of [`crate::engine::norm`] for either norm (they differ only in how `x`
/// splits into normalised segments).
fn fused_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    segments: norm::Segments,
    eps: f64,
) -> Result<Tensor> {
    Ok(norm::normalize(x, weight, bias, segments, eps)?)
}

/// Layer normalisation over the last axis with affine parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Load `weight` and `bias` [dim].
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[dim], "weight")?,
            bias: w.get(&[dim], "bias")?,
            eps,
        })
    }

    /// Normalise over the last axis (statistics in f32 for half-precision inputs): the fused
    /// kernel of [`crate::engine::norm`] for f32/f64 on the CPU, [`Self::forward_composed`]
    /// otherwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if norm::supported(x) {
            let segments = norm::Segments::layer_norm(x.dims())?;
            return fused_norm(x, &self.weight, &self.bias, segments, self.eps);
        }
        self.forward_composed(x)
    }

    /// The layer norm composed from candle ops (half precision, GPUs; the reference the fused
    /// kernel is tested against).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = upcast(x)?;
        let mean = x32.mean_keepdim(D::Minus1)?;
        let centered = x32.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// Softmax over the last axis, composed from ops with a correct backward. The max subtracted for
/// stability is detached: softmax is invariant to it, so its gradient is zero anyway.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// SiLU, `x·σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(x)?)
}

/// Nearest-neighbour upsampling by 2 on [B, C, H, W], built from a broadcast so that its backward
/// sums the four children correctly (candle's `upsample_nearest2d` backward misbehaves when the
/// input has other consumers).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let y = x
        .reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, h * 2, w * 2))?;
    Ok(y)
}

/// `x` in f32 if it is a half-precision tensor, else unchanged.
pub fn upcast(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Scaled dot-product attention on [B, N, H·D] queries and [B, M, H·D] keys/values, split into
/// `heads` heads, with a correct backward.
///
/// f32 and f64 inputs on the CPU go through the fused kernel
/// ([`super::attention::fused_attention`]: no per-head copies, no [B·H, N, M] probability tensor
/// kept for the backward, which recomputes it); there `upcast_scores` changes nothing, scores
/// already being in the input precision. Everything else (half precision, GPU devices) goes
/// through [`super::attention_blockwise::blockwise_attention`] (blocks of query rows, a backward
/// that recomputes them: the same memory saving from candle ops).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast_scores: bool,
) -> Result<Tensor> {
    if super::attention::is_supported(q, k, v) {
        super::attention::fused_attention(q, k, v, heads)
    } else {
        super::attention_blockwise::blockwise_attention(q, k, v, heads, upcast_scores)
    }
}

/// Scaled dot-product attention composed from candle ops with a correct backward: the reference
/// that the fused and the blockwise attention are tested against. With
/// `upcast_scores`, scores and softmax are computed in f32 (diffusers' `upcast_attention`).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast_scores: bool,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    if inner % heads != 0 {
        return Err(Error::InvalidArgument(format!(
            "attention width {inner} does not divide into {heads} heads"
        )));
    }
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| -> candle_core::Result<Tensor> {
        t.reshape((b, len, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, len, d))
    };
    let (qh, kh, vh) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let dtype = q.dtype();
    let scale = 1.0 / (d as f64).sqrt();
    let (qs, ks) = if upcast_scores {
        (upcast(&qh)?, upcast(&kh)?)
    } else {
        (qh, kh)
    };
    let scores = (qs.matmul(&ks.t()?)? * scale)?;
    let probs = softmax_last(&upcast(&scores)?)?.to_dtype(dtype)?;
    let out = probs.matmul(&vh)?;
    Ok(out
        .reshape((b, heads, n, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, inner))?)
}

/// GELU with the exact erf form, as PyTorch's default `F.gelu`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn true_runs_finds_every_run() {
        assert_eq!(true_runs(&[]), vec![]);
        assert_eq!(true_runs(&[false, false]), vec![]);
        assert_eq!(true_runs(&[true, true]), vec![(0, 2)]);
        assert_eq!(
            true_runs(&[false, true, false, true, true]),
            vec![(1, 1), (3, 2)]
        );
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_dtype(DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .unwrap()
    }

    /// `y + Σ_k s_k·(α/r)·B_k(A_k·x)` composed of candle's own ops, `s_k` one scale per sample.
    fn adapter_formula(y: Tensor, x: &Tensor, terms: &[(&LowRankAdapter, Tensor)]) -> Tensor {
        let batch = x.dim(0).unwrap();
        terms.iter().fold(y, |y, (ad, s)| {
            let d = x
                .broadcast_matmul(&ad.down.t().unwrap())
                .unwrap()
                .broadcast_matmul(&ad.up.t().unwrap())
                .unwrap();
            let s = (s * ad.alpha_over_rank)
                .unwrap()
                .reshape((batch, 1, 1))
                .unwrap();
            (y + d.broadcast_mul(&s).unwrap()).unwrap()
        })
    }

    fn adapter(seed: u64, dev: &Device) -> LowRankAdapter {
        let w = Weights::random(seed, 0.3, DType::F32, dev);
        LowRankAdapter {
            down: w.get(&[4, 24], "down").unwrap(),
            up: w.get(&[16, 4], "up").unwrap(),
            alpha_over_rank: 0.5,
        }
    }

    /// The per-sample path (adapters run only on samples with a non-zero scale, added in place)
    /// equals the formula `W0·x + Σ_k s_k·(α/r)·B_k(A_k·x)` evaluated on the whole batch, and the
    /// gradient-tracking path that runs every adapter on every sample.
    #[test]
    fn adapters_on_some_samples_match_the_whole_batch_formula() {
        let dev = Device::Cpu;
        let w = Weights::random(7, 0.2, DType::F32, &dev).pp("to_q");
        let mut lin = AdaptableLinear::load(&w, 24, 16, true).unwrap();
        let (a, b) = (adapter(1, &dev), adapter(2, &dev));
        lin.set_adapter("a", a.clone()).unwrap();
        lin.set_adapter("b", b.clone()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 3, 24), &dev).unwrap();
        let sa = [0f32, 1.5, 0.0, 0.7, -0.7];
        let sb = [0f32, 0.0, 2.0, 0.0, 0.0];
        let mut scales = AdapterScales::none();
        scales.set("a", Tensor::new(&sa, &dev).unwrap());
        scales.set("b", Tensor::new(&sb, &dev).unwrap());
        assert_eq!(
            scales.nonzero_samples("a"),
            Some(vec![false, true, false, true, true])
        );
        let fast = lin.forward(&x, &scales).unwrap();

        let by_formula = adapter_formula(
            lin.base().forward(&x).unwrap(),
            &x,
            &[
                (&a, Tensor::new(&sa, &dev).unwrap()),
                (&b, Tensor::new(&sb, &dev).unwrap()),
            ],
        );
        let xv = Var::from_tensor(&x).unwrap();
        let tracked = lin.forward(xv.as_tensor(), &scales).unwrap();
        for (what, other) in [("formula", &by_formula), ("tracked path", &tracked)] {
            let err = max_abs_diff(&fast, other);
            // f32 GEMMs of different row counts may block differently: rounding only.
            assert!(err < 1e-5, "per-sample path vs {what}: max abs err {err:e}");
        }
        // The base rows (sample 0: no adapter) are the base layer's exactly.
        let base = lin.base().forward(&x).unwrap();
        let row0 = max_abs_diff(&fast.get(0).unwrap(), &base.get(0).unwrap());
        assert_eq!(row0, 0.0);
    }

    /// The merged-weight path (each sample's own `W0 + Σ s·(α/r)·B·A`, one batched matmul) equals
    /// the formula in f64 to 1e-10 (the same products summed in another order: rounding only),
    /// with base samples, two samples sharing one adapter set, and a sample with two adapters;
    /// it is chosen for many tokens and not for few (where the unmerged adapters are cheaper).
    #[test]
    fn merged_weights_match_the_formula_and_are_used_only_when_cheaper() {
        let dev = Device::Cpu;
        let w = Weights::random(9, 0.2, DType::F64, &dev).pp("to_q");
        let mut lin = AdaptableLinear::load(&w, 24, 16, true).unwrap();
        let to_f64 = |ad: LowRankAdapter| LowRankAdapter {
            down: ad.down.to_dtype(DType::F64).unwrap(),
            up: ad.up.to_dtype(DType::F64).unwrap(),
            alpha_over_rank: ad.alpha_over_rank,
        };
        let (a, b) = (to_f64(adapter(3, &dev)), to_f64(adapter(4, &dev)));
        lin.set_adapter("a", a.clone()).unwrap();
        lin.set_adapter("b", b.clone()).unwrap();
        let sa = [0f64, 0.0, 1.0, 0.0, 0.8, 1.0];
        let sb = [0f64, 0.0, 0.0, 1.5, -0.4, 0.0];
        let mut scales = AdapterScales::none();
        scales.set("a", Tensor::new(&sa, &dev).unwrap());
        scales.set("b", Tensor::new(&sb, &dev).unwrap());
        for (tokens, merges) in [(64, true), (3, false)] {
            let x = Tensor::randn(0f64, 1.0, (6, tokens, 24), &dev).unwrap();
            assert_eq!(
                lin.forward_merged(&x, &scales, 6).unwrap().is_some(),
                merges,
                "{tokens} tokens"
            );
            let y = lin.forward(&x, &scales).unwrap();
            let by_formula = adapter_formula(
                lin.base().forward(&x).unwrap(),
                &x,
                &[
                    (&a, Tensor::new(&sa, &dev).unwrap()),
                    (&b, Tensor::new(&sb, &dev).unwrap()),
                ],
            );
            let err = max_abs_diff(&y, &by_formula);
            assert!(err < 1e-10, "{tokens} tokens: max abs err {err:e}");
        }
    }

    /// Training path: base layer and adapters as one graph node give the same value and the same
    /// gradients (input, a trainable up-projection, a trainable down-projection) as the formula
    /// composed of candle's own ops, in f64 to 1e-10, with a per-sample scale and a constant
    /// second adapter (ContentLoRA held fixed in the style step).
    #[test]
    fn fused_training_path_matches_composed_gradients() {
        let dev = Device::Cpu;
        let w = Weights::random(11, 0.2, DType::F64, &dev).pp("to_q");
        let mut lin = AdaptableLinear::load(&w, 24, 16, true).unwrap();
        let rnd = |seed: u64, shape: &[usize]| {
            Weights::random(seed, 0.3, DType::F64, &dev)
                .get(shape, "t")
                .unwrap()
        };
        let up_a = Var::from_tensor(&rnd(1, &[16, 4])).unwrap();
        let down_a = Var::from_tensor(&rnd(2, &[4, 24])).unwrap();
        let (down_b, up_b) = (rnd(3, &[3, 24]), rnd(4, &[16, 3]));
        let a = LowRankAdapter {
            down: down_a.as_tensor().clone(),
            up: up_a.as_tensor().clone(),
            alpha_over_rank: 0.5,
        };
        let b = LowRankAdapter {
            down: down_b.clone(),
            up: up_b.clone(),
            alpha_over_rank: 2.0,
        };
        lin.set_adapter("a", a.clone()).unwrap();
        lin.set_adapter("b", b.clone()).unwrap();
        let x = Var::from_tensor(&rnd(5, &[2, 3, 24])).unwrap();
        let r = rnd(6, &[2, 3, 16]);
        let (sa, sb) = ([1.0f64, -0.5], [0.0f64, 1.5]);
        let mut scales = AdapterScales::none();
        scales.set("a", Tensor::new(&sa, &dev).unwrap());
        scales.set("b", Tensor::new(&sb, &dev).unwrap());
        let fused = lin.forward(x.as_tensor(), &scales).unwrap();

        let base = x
            .as_tensor()
            .broadcast_matmul(&lin.base().weight().t().unwrap())
            .unwrap()
            .broadcast_add(&w.get(&[16], "bias").unwrap())
            .unwrap();
        let composed = adapter_formula(
            base,
            x.as_tensor(),
            &[
                (&a, Tensor::new(&sa, &dev).unwrap()),
                (&b, Tensor::new(&sb, &dev).unwrap()),
            ],
        );
        assert!(max_abs_diff(&fused, &composed) < 1e-12, "values differ");
        let g_fused = (&fused * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (&composed * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("up_a", &up_a), ("down_a", &down_a)] {
            let gf = g_fused.get(v.as_tensor()).expect("fused gradient");
            let gc = g_comp.get(v.as_tensor()).expect("composed gradient");
            let e = max_abs_diff(gf, gc);
            assert!(e < 1e-10, "gradient of {name}: max abs err {e:e}");
        }
        // The constant down-projection gets no gradient entry. (The constant up-projection may
        // get one, [out, r], unused: candle's `cat` backward fills an entry for every operand.)
        assert!(g_fused.get(&down_b).is_none());
    }
}
