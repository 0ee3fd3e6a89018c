//! Memory-efficient attention from candle ops, for what the fused CPU kernel
//! ([`super::attention`]) does not cover: GPUs and half precision.
//!
//! The composed attention ([`super::nn::attention_composed`]) materialises the scores and the
//! softmax of all heads, [B·H, N, M] in f32, and autograd keeps several such tensors per layer
//! until the backward: at 512 px an SD1.5 training step held 50 GB on a GPU, and SDXL at 1024 px
//! did not fit in 139 GB (docs/perf.md). Here the forward runs over blocks of query rows with
//! untracked ops (so only one block's scores exist at a time, [`BLOCK_BYTES`]), and the result is
//! attached to the graph as a custom op of (Q, K, V) whose backward recomputes each block's
//! probabilities `P = softmax(scale·Q_blk·Kᵀ)` and forms
//! `dV += Pᵀ·dO_blk`, `dP = dO_blk·Vᵀ`, `dS = P∘(dP − rowsum(P∘dP))`, `dQ_blk = scale·dS·K`,
//! `dK += scale·dSᵀ·Q_blk` (the flash-attention backward; `rowsum(P∘dP) = rowsum(dO∘O)`).
//! Softmax and the element-wise parts run in f32; the matrix products in the inputs' dtype
//! (cuBLAS accumulates in f32); `dK`/`dV` are accumulated in f32.
//!
//! The forward uses candle's fused `softmax_last_dim`, whose *gradient* is wrong
//! (`shared/CANDLE.md`): it is never differentiated here, since the forward is untracked and the
//! backward is written out above.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, MetalStorage, Shape, Tensor, D};

use super::attention::AttnDims;
use super::frozen::Precomputed;
use super::nn::upcast;
use crate::error::{Error, Result};

/// Upper bound on one block's f32 score tensor [B·H, rows, M] in bytes; the number of query rows
/// per block follows from it (at least one row).
pub const BLOCK_BYTES: usize = 256 << 20;

/// Scaled dot-product attention `softmax(Q·Kᵀ/√D)·V` on queries `q` [B, N, H·D] and keys/values
/// `k`, `v` [B, M, H·D] split into `heads` heads; returns [B, N, H·D]. With `upcast_scores` the
/// score product itself runs in f32 (diffusers' `upcast_attention`); the softmax always does.
///
/// The same value as [`super::nn::attention_composed`] (up to the rounding of a fused softmax),
/// with a gradient for whichever of `q`, `k`, `v` track one; at most one block of scores
/// ([`BLOCK_BYTES`]) is alive at a time, forward or backward.
pub fn blockwise_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast_scores: bool,
) -> Result<Tensor> {
    let (b, _, _) = q.dims3()?;
    let m = k.dim(1)?;
    let rows = (BLOCK_BYTES / (4 * (b * heads).max(1) * m.max(1))).max(1);
    blockwise_attention_rows(q, k, v, heads, upcast_scores, rows)
}

/// [`blockwise_attention`] with an explicit number of query rows per block (tests use small
/// blocks to cover the block loop).
pub fn blockwise_attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast_scores: bool,
    rows: usize,
) -> Result<Tensor> {
    let dims = AttnDims::new(q.dims(), k.dims(), v.dims(), heads)?;
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(Error::InvalidArgument(format!(
            "attention: q, k and v must have one dtype (got {:?}/{:?}/{:?})",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )));
    }
    let g = Geometry {
        dims,
        rows: rows.max(1),
        upcast_scores,
    };
    let out = g.forward(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let op = BlockwiseAttention {
        geometry: g,
        output: Precomputed::new(NAME, out)?,
    };
    Ok(q.apply_op3(k, v, op)?)
}

/// One call's sizes and settings.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    dims: AttnDims,
    /// Query rows per block.
    rows: usize,
    upcast_scores: bool,
}

impl Geometry {
    fn scale(&self) -> f64 {
        1.0 / (self.dims.d as f64).sqrt()
    }

    /// [B, len, H·D] → [B·H, len, D], contiguous.
    fn split(&self, t: &Tensor, len: usize) -> candle_core::Result<Tensor> {
        let AttnDims {
            batch, heads, d, ..
        } = self.dims;
        t.reshape((batch, len, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch * heads, len, d))
    }

    /// [B·H, len, D] → [B, len, H·D].
    fn merge(&self, t: &Tensor, len: usize) -> candle_core::Result<Tensor> {
        let AttnDims {
            batch, heads, d, ..
        } = self.dims;
        t.reshape((batch, heads, len, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, len, heads * d))
    }

    /// The query blocks as (first row, row count).
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let n = self.dims.n;
        (0..n)
            .step_by(self.rows)
            .map(move |s| (s, self.rows.min(n - s)))
    }

    /// f32 softmax weights of one query block `qb` [B·H, r, D] against all keys `kh`.
    fn probs(&self, qb: &Tensor, kh: &Tensor) -> candle_core::Result<Tensor> {
        let (qs, ks) = if self.upcast_scores {
            (upcast(qb)?, upcast(kh)?)
        } else {
            (qb.clone(), kh.clone())
        };
        let scores = (qs.matmul(&ks.t()?)? * self.scale())?;
        candle_nn::ops::softmax_last_dim(&upcast(&scores)?)
    }

    /// The attention output from untracked inputs.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = q.dtype();
        let (qh, kh, vh) = (
            self.split(q, self.dims.n)?,
            self.split(k, self.dims.m)?,
            self.split(v, self.dims.m)?,
        );
        let mut parts = Vec::new();
        for (s, r) in self.blocks() {
            let p = self.probs(&qh.narrow(1, s, r)?, &kh)?;
            parts.push(p.to_dtype(dtype)?.matmul(&vh)?);
        }
        let out = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 1)?
        };
        self.merge(&out, self.dims.n)
    }

    /// (dQ, dK, dV) for the output gradient `grad` [B, N, H·D], by recomputation per block.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let dtype = q.dtype();
        let scale = self.scale();
        let (qh, kh, vh) = (
            self.split(q, self.dims.n)?,
            self.split(k, self.dims.m)?,
            self.split(v, self.dims.m)?,
        );
        let gh = self.split(&grad.to_dtype(dtype)?, self.dims.n)?;
        let kv_shape = (self.dims.batch * self.dims.heads, self.dims.m, self.dims.d);
        // f32 accumulators for half precision; f32/f64 inputs accumulate in their own dtype.
        let acc = upcast(&Tensor::zeros(kv_shape, dtype, q.device())?)?;
        let (mut dk, mut dv) = (acc.clone(), acc);
        let mut dq_parts = Vec::new();
        for (s, r) in self.blocks() {
            let qb = qh.narrow(1, s, r)?;
            let gb = gh.narrow(1, s, r)?;
            let p = self.probs(&qb, &kh)?;
            dv = (dv + upcast(&p.to_dtype(dtype)?.t()?.matmul(&gb)?)?)?;
            let dp = upcast(&gb.matmul(&vh.t()?)?)?;
            let rowdot = (&p * &dp)?.sum_keepdim(D::Minus1)?;
            let ds = ((p * dp.broadcast_sub(&rowdot)?)? * scale)?.to_dtype(dtype)?;
            dq_parts.push(ds.matmul(&kh)?);
            dk = (dk + upcast(&ds.t()?.matmul(&qb)?)?)?;
        }
        let dq = if dq_parts.len() == 1 {
            dq_parts.remove(0)
        } else {
            Tensor::cat(&dq_parts, 1)?
        };
        let m = self.dims.m;
        Ok((
            self.merge(&dq, self.dims.n)?,
            self.merge(&dk.to_dtype(dtype)?, m)?,
            self.merge(&dv.to_dtype(dtype)?, m)?,
        ))
    }
}

/// The custom op: its forward hands over the precomputed output, its backward recomputes.
struct BlockwiseAttention {
    geometry: Geometry,
    output: Precomputed,
}

const NAME: &str = "blockwise-attention";

impl CustomOp3 for BlockwiseAttention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.output.metal()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self
            .geometry
            .backward(&q.detach(), &k.detach(), &v.detach(), grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::nn::attention_composed;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        let d = diff.max(0).unwrap().to_scalar::<f64>().unwrap();
        let s = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        d / s.to_scalar::<f64>().unwrap().max(1e-300)
    }

    /// f64, blocks of 3 rows over 10 queries (a ragged last block), cross-attention shapes: value
    /// and all three gradients equal the composed attention's (candle autograd through plain
    /// ops) to 1e-12 — the same arithmetic in another order, so only rounding differs.
    #[test]
    fn matches_composed_attention_and_its_gradients() {
        let (b, n, m, heads, d) = (2, 10, 7, 2, 4);
        let q = Var::from_tensor(&randn(&[b, n, heads * d], 1)).unwrap();
        let k = Var::from_tensor(&randn(&[b, m, heads * d], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[b, m, heads * d], 3)).unwrap();
        let w = randn(&[b, n, heads * d], 4);
        let ours = blockwise_attention_rows(&q, &k, &v, heads, false, 3).unwrap();
        let reference = attention_composed(&q, &k, &v, heads, false).unwrap();
        assert!(max_rel(&ours, &reference) < 1e-12);
        let loss = |o: &Tensor| (o * &w).unwrap().sum_all().unwrap();
        let g_ours = loss(&ours).backward().unwrap();
        let g_ref = loss(&reference).backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let a = g_ours.get(x.as_tensor()).expect("no gradient");
            let r = g_ref.get(x.as_tensor()).expect("no reference gradient");
            let e = max_rel(a, r);
            assert!(e < 1e-12, "d{name}: rel err {e:e}");
        }
    }

    #[test]
    fn untracked_inputs_give_the_plain_value_and_bad_shapes_fail() {
        let q = randn(&[1, 5, 8], 5);
        let k = randn(&[1, 6, 8], 6);
        let out = blockwise_attention(&q, &k, &k, 2, true).unwrap();
        let reference = attention_composed(&q, &k, &k, 2, true).unwrap();
        assert!(max_rel(&out, &reference) < 1e-12);
        assert!(!out.track_op());
        assert!(blockwise_attention(&q, &k, &k, 3, false).is_err());
        assert!(blockwise_attention(&q, &randn(&[1, 6, 4], 7), &k, 2, false).is_err());
    }
}
