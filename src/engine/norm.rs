//! Fused group and layer normalisation for f32/f64 on the CPU, with an analytic backward.
//!
//! Composed from candle ops, a group norm is eight passes over the activation forward (mean,
//! subtract, square, mean, add ε, sqrt, divide, scale and shift, with single-threaded reductions)
//! and about as many backward, each allocating a fresh tensor; a real-size UNet runs about a
//! hundred of them per step. Here one op computes, per normalised segment (one (sample, group) of
//! a group norm, one row of a layer norm), the mean and 1/σ in one parallel pass and writes
//! `y = (x − μ)/σ · w + b` in a second; the statistics are kept for the backward, which computes
//! the input gradient in two passes per segment:
//! `dx = (g − mean(g) − x̂·mean(g·x̂)) / σ` with `g = dy·w` and `x̂ = (x − μ)/σ`.
//! The affine weight and bias get gradients (`Σ dy·x̂`, `Σ dy`) only when they track gradients
//! themselves (full fine-tuning, never LoRA training); those are composed from candle ops.
//!
//! Statistics accumulate in f64 for both dtypes (as candle's composed path does in f32 for f32
//! inputs, so values agree to rounding, `tests` and `tests/norm_fused.rs`).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::engine::fastmath::{exp_f32, Simd};

/// Whether [`normalize`] runs the fused kernel for `x` (f32 or f64 on the CPU).
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// How the elements of `x` split into normalised segments and map to affine channels.
///
/// `x` is seen as `[segments, len]`, contiguous. Element `j` of segment `s` uses affine channel
/// `(s mod groups)·per_group + j / spatial`: for a group norm over [B, C, S] with G groups,
/// `groups = G`, `per_group = C/G`, `spatial = S`; for a layer norm over rows of D,
/// `groups = 1`, `per_group = D`, `spatial = 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    /// Number of segments (the product of all other axes).
    pub count: usize,
    /// Groups per sample (segment `s` is group `s mod groups`).
    pub groups: usize,
    /// Affine channels per group.
    pub per_group: usize,
    /// Elements per channel within a segment.
    pub spatial: usize,
}

impl Segments {
    /// Elements per segment.
    pub fn len(&self) -> usize {
        self.per_group * self.spatial
    }

    /// Whether the segments are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of affine channels (the length of `weight` and `bias`).
    pub fn channels(&self) -> usize {
        self.groups * self.per_group
    }

    /// A group norm of `x` [B, C, *spatial] with `groups` groups.
    pub fn group_norm(dims: &[usize], groups: usize) -> candle_core::Result<Self> {
        if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
            candle_core::bail!("group norm: {dims:?} does not split into {groups} groups");
        }
        Ok(Self {
            count: dims[0] * groups,
            groups,
            per_group: dims[1] / groups,
            spatial: dims[2..].iter().product(),
        })
    }

    /// A layer norm over the last axis of `x`.
    pub fn layer_norm(dims: &[usize]) -> candle_core::Result<Self> {
        let Some((&d, rest)) = dims.split_last() else {
            candle_core::bail!("layer norm of a scalar");
        };
        Ok(Self {
            count: rest.iter().product(),
            groups: 1,
            per_group: d,
            spatial: 1,
        })
    }
}

/// `(x − μ)/√(σ² + eps) · weight + bias` over each segment of `x` (see [`Segments`]), `weight` and
/// `bias` of [`Segments::channels`] elements, for f32/f64 CPU tensors ([`supported`]). Gradients
/// flow to `x`, and to `weight`/`bias` when they track gradients.
pub fn normalize(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    segments: Segments,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let (x, weight, bias) = norm_operands(x, weight, bias, segments)?;
    x.apply_op3(
        &weight,
        &bias,
        FusedNorm {
            segments,
            eps,
            silu: false,
            stats: Mutex::new(None),
        },
    )
}

/// `silu(normalize(x, weight, bias, segments, eps))`, the norm-then-activation of every UNet
/// resnet block. When nothing tracks gradients (inference) the activation is applied in the
/// norm's own pass over each segment (while it is in cache) instead of in a second,
/// single-threaded pass over the whole tensor; otherwise the two ops are composed, so that
/// gradients flow as through [`normalize`].
pub fn normalize_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    segments: Segments,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if x.track_op() || weight.track_op() || bias.track_op() {
        return candle_nn::ops::silu(&normalize(x, weight, bias, segments, eps)?);
    }
    let (x, weight, bias) = norm_operands(x, weight, bias, segments)?;
    x.apply_op3_no_bwd(
        &weight,
        &bias,
        &FusedNorm {
            segments,
            eps,
            silu: true,
            stats: Mutex::new(None),
        },
    )
}

/// Checked, contiguous operands of the fused norm: `x` and the flattened affine parameters in
/// its dtype.
fn norm_operands(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    segments: Segments,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    if segments.count * segments.len() != x.elem_count() {
        candle_core::bail!("norm: {segments:?} does not cover {:?}", x.dims());
    }
    let channels = segments.channels();
    if weight.elem_count() != channels || bias.elem_count() != channels {
        candle_core::bail!(
            "norm: weight {:?} and bias {:?} for {channels} channels",
            weight.dims(),
            bias.dims()
        );
    }
    let dtype = x.dtype();
    Ok((
        x.contiguous()?,
        weight.to_dtype(dtype)?.flatten_all()?,
        bias.to_dtype(dtype)?.flatten_all()?,
    ))
}

/// The element types of the fused norms (f32, f64), with the activation they can fuse.
trait NormFloat: WithDType {
    /// `x ← x·σ(x)` (SiLU) on every element.
    fn silu_in_place(xs: &mut [Self]);
}

impl NormFloat for f32 {
    #[inline(always)]
    fn silu_in_place(xs: &mut [f32]) {
        for x in xs {
            *x /= 1.0 + exp_f32(-*x);
        }
    }
}

impl NormFloat for f64 {
    #[inline(always)]
    fn silu_in_place(xs: &mut [f64]) {
        for x in xs {
            *x /= 1.0 + (-*x).exp();
        }
    }
}

/// `Σ f(x)` over `xs` in f64, with eight partial sums so that the loop vectorises (a single
/// running f64 sum is bound by the add latency: the statistics passes were 5× PyTorch's norm).
#[inline(always)]
fn lane_sum<T: WithDType>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += f(c[l].to_f64());
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| f(v.to_f64())).sum();
    acc.iter().sum::<f64>() + tail
}

/// Per-segment mean and 1/σ, in f64.
#[derive(Debug, Clone, Default)]
struct Stats {
    mean: Vec<f64>,
    rstd: Vec<f64>,
}

/// The fused forward; it keeps the statistics for its backward.
struct FusedNorm {
    segments: Segments,
    eps: f64,
    /// Apply SiLU to the output (inference only: the op then has no backward).
    silu: bool,
    stats: Mutex<Option<Stats>>,
}

/// The contiguous data of a CPU storage as `T`.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::engine::contiguous_cpu_slice(s, l, "norm")
}

impl FusedNorm {
    fn forward<T: NormFloat>(&self, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Stats) {
        let seg = self.segments;
        let n = seg.len();
        let mut y = vec![T::zero(); x.len()];
        let mut mean = vec![0f64; seg.count];
        let mut rstd = vec![0f64; seg.count];
        let simd = Simd::detect();
        y.par_chunks_mut(n.max(1))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .enumerate()
            .for_each(|(s, (ys, (m, r)))| {
                let xs = &x[s * n..][..n];
                // SAFETY: each build runs only where `Simd::detect` found its features.
                (*m, *r) = unsafe {
                    match simd {
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx512 => self.segment_avx512(s, xs, ys, w, b),
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx2Fma => self.segment_avx2(s, xs, ys, w, b),
                        _ => self.segment(s, xs, ys, w, b),
                    }
                };
            });
        (y, Stats { mean, rstd })
    }

    /// # Safety
    /// The CPU must support AVX-512 F/VL/BW/DQ, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    unsafe fn segment_avx512<T: NormFloat>(
        &self,
        s: usize,
        xs: &[T],
        ys: &mut [T],
        w: &[T],
        b: &[T],
    ) -> (f64, f64) {
        self.segment(s, xs, ys, w, b)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn segment_avx2<T: NormFloat>(
        &self,
        s: usize,
        xs: &[T],
        ys: &mut [T],
        w: &[T],
        b: &[T],
    ) -> (f64, f64) {
        self.segment(s, xs, ys, w, b)
    }

    /// Segment `s`: its mean and 1/σ (returned), then `ys` = the normalised, scaled and shifted
    /// `xs` (and SiLU of it when asked), one channel at a time while the segment is in cache.
    #[inline(always)]
    fn segment<T: NormFloat>(
        &self,
        s: usize,
        xs: &[T],
        ys: &mut [T],
        w: &[T],
        b: &[T],
    ) -> (f64, f64) {
        let seg = self.segments;
        let n = xs.len().max(1) as f64;
        let mu = lane_sum(xs, |v| v) / n;
        let var = lane_sum(xs, |v| (v - mu) * (v - mu)) / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        let base = (s % seg.groups) * seg.per_group;
        for (c, (yc, xc)) in ys
            .chunks_mut(seg.spatial.max(1))
            .zip(xs.chunks(seg.spatial.max(1)))
            .enumerate()
        {
            // y = x·a + k with a = w/σ and k = b − μ·w/σ for this channel.
            let a = w[base + c].to_f64() * inv;
            let k = b[base + c].to_f64() - mu * a;
            for (yv, xv) in yc.iter_mut().zip(xc) {
                *yv = T::from_f64(xv.to_f64() * a + k);
            }
            if self.silu {
                T::silu_in_place(yc);
            }
        }
        (mu, inv)
    }
}

impl CustomOp3 for FusedNorm {
    fn name(&self) -> &'static str {
        "fused-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, stats) = match x {
            CpuStorage::F32(_) => {
                let (y, s) = self.forward(slice::<f32>(x, xl)?, slice(w, wl)?, slice(b, bl)?);
                (CpuStorage::F32(y), s)
            }
            CpuStorage::F64(_) => {
                let (y, s) = self.forward(slice::<f64>(x, xl)?, slice(w, wl)?, slice(b, bl)?);
                (CpuStorage::F64(y), s)
            }
            other => candle_core::bail!("fused-norm: unsupported dtype {:?}", other.dtype()),
        };
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(stats) = stats else {
            candle_core::bail!("fused-norm: backward before forward");
        };
        let seg = self.segments;
        let grad = grad.contiguous()?;
        let (dw, db) = if w.track_op() || b.track_op() {
            // x̂ and the per-channel sums, composed: [groups-of-samples, per_group, spatial].
            let shape = (
                seg.count / seg.groups,
                seg.groups * seg.per_group,
                seg.spatial,
            );
            let dev = x.device();
            let per_seg = |v: &[f64]| {
                Tensor::from_slice(v, (shape.0, seg.groups, 1, 1), dev)?.to_dtype(x.dtype())
            };
            let x4 = x.reshape((shape.0, seg.groups, seg.per_group, seg.spatial))?;
            let xhat = x4
                .broadcast_sub(&per_seg(&stats.mean)?)?
                .broadcast_mul(&per_seg(&stats.rstd)?)?
                .reshape(shape)?;
            let g = grad.reshape(shape)?;
            let dw = (g.clone() * xhat)?.sum(2)?.sum(0)?.reshape(w.shape())?;
            let db = g.sum(2)?.sum(0)?.reshape(b.shape())?;
            (w.track_op().then_some(dw), b.track_op().then_some(db))
        } else {
            (None, None)
        };
        // The weight gradients read the statistics first; the input gradient then takes them.
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(
                &grad,
                w,
                &NormInputGrad {
                    segments: seg,
                    stats,
                },
            )?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `(Σ g, Σ g·(x − mu))` over one channel in f64, with eight partial sums of each (see
/// [`lane_sum`]).
#[inline(always)]
fn lane_sums_g_gx<T: WithDType>(xs: &[T], gs: &[T], mu: f64) -> (f64, f64) {
    let (mut sg, mut sgx) = ([0f64; 8], [0f64; 8]);
    let mut xc = xs.chunks_exact(8);
    let mut gc = gs.chunks_exact(8);
    for (x, g) in (&mut xc).zip(&mut gc) {
        for l in 0..8 {
            let gv = g[l].to_f64();
            sg[l] += gv;
            sgx[l] += gv * (x[l].to_f64() - mu);
        }
    }
    let (mut tg, mut tgx) = (0f64, 0f64);
    for (x, g) in xc.remainder().iter().zip(gc.remainder()) {
        tg += g.to_f64();
        tgx += g.to_f64() * (x.to_f64() - mu);
    }
    (sg.iter().sum::<f64>() + tg, sgx.iter().sum::<f64>() + tgx)
}

/// The input-gradient kernel: `(x, dy, w) → dx` with the forward's statistics.
struct NormInputGrad {
    segments: Segments,
    stats: Stats,
}

impl NormInputGrad {
    fn run<T: WithDType>(&self, x: &[T], dy: &[T], w: &[T]) -> Vec<T> {
        let seg = self.segments;
        let n = seg.len();
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(s, out)| {
                let (mu, inv) = (self.stats.mean[s], self.stats.rstd[s]);
                let xs = &x[s * n..][..n];
                let gs = &dy[s * n..][..n];
                let base = (s % seg.groups) * seg.per_group;
                // mean(g) and mean(g·x̂) with g = dy·w.
                let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                for (c, (xc, gc)) in xs
                    .chunks(seg.spatial)
                    .zip(gs.chunks(seg.spatial))
                    .enumerate()
                {
                    let wc = w[base + c].to_f64();
                    let (sg, sgx) = lane_sums_g_gx(xc, gc, mu);
                    sum_g += wc * sg;
                    sum_gx += wc * sgx * inv;
                }
                let (mean_g, mean_gx) = (sum_g / n as f64, sum_gx / n as f64);
                for (c, ((oc, xc), gc)) in out
                    .chunks_mut(seg.spatial)
                    .zip(xs.chunks(seg.spatial))
                    .zip(gs.chunks(seg.spatial))
                    .enumerate()
                {
                    let wc = w[base + c].to_f64();
                    for ((o, xv), gv) in oc.iter_mut().zip(xc).zip(gc) {
                        let xhat = (xv.to_f64() - mu) * inv;
                        *o = T::from_f64(inv * (gv.to_f64() * wc - mean_g - xhat * mean_gx));
                    }
                }
            });
        dx
    }
}

impl CustomOp3 for NormInputGrad {
    fn name(&self) -> &'static str {
        "fused-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dx = match x {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.run(slice::<f32>(x, xl)?, slice(g, gl)?, slice(w, wl)?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.run(slice::<f64>(x, xl)?, slice(g, gl)?, slice(w, wl)?))
            }
            other => candle_core::bail!("fused-norm: unsupported dtype {:?}", other.dtype()),
        };
        Ok((dx, xl.shape().clone()))
    }
}
