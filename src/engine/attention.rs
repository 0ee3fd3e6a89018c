//! Fused scaled-dot-product attention on the CPU, with a backward that recomputes the
//! probabilities (flash-attention style).
//!
//! [`fused_attention`] takes queries [B, N, H·D] and keys/values [B, M, H·D] as the projections
//! produce them and reads each head in place through the tensors' strides: no per-head
//! transposed copies. Work is split into tasks of (batch·head, block of query rows) run on
//! rayon's pool (the one candle's own CPU kernels use). A task computes its block of scores
//! `S = scale·Q_blk·Kᵀ` into a scratch buffer of `rows × M`, turns each row into softmax weights
//! (max-subtracted exponentials), multiplies them with `V` and scales each output row by the
//! inverse row sum. The full [B·H, N, M] probability tensor is never materialised; what is kept
//! for the backward is the output (candle keeps it anyway) and one log-sum-exp per query row.
//!
//! The backward recomputes `P = exp(S − lse)` block by block and forms
//! `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(dO∘O))`, `dQ = scale·dS·K`,
//! `dK = scale·dSᵀ·Q`. Blocks of one head that run on different threads accumulate `dK`/`dV` in
//! private buffers that are summed at the end.
//!
//! The small matrix products go through the `gemm` crate (single-threaded inside a task); the
//! exponentials use a branch-free polynomial `exp` for f32 that the compiler vectorises, compiled
//! again for AVX2+FMA and for AVX-512, and chosen at run time. f64 (for tests) uses the standard `exp`.
//! Only f32 and f64 on the CPU are supported ([`is_supported`]); other cases go through the
//! composed attention in [`super::nn`].

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::engine::fastmath::{exp_f32, Simd};
use crate::error::{Error, Result};

/// Whether [`fused_attention`] handles these inputs: all on the CPU, all f32 or all f64.
pub fn is_supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let dtype = q.dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && q.device().is_cpu()
        && k.device().is_cpu()
        && v.device().is_cpu()
}

/// Scaled dot-product attention `softmax(Q·Kᵀ/√D)·V` per head, on queries `q` [B, N, H·D] and
/// keys `k` / values `v` [B, M, H·D], split into `heads` heads of width D; returns [B, N, H·D].
///
/// Same value as [`super::nn::attention_composed`] up to rounding, with a gradient for `q`, `k`
/// and `v` (computed by recomputation, see the module docs). Inputs may have any strides.
/// Errors on shapes that do not fit, on an empty key sequence, and on inputs that are not all
/// f32 or all f64 on the CPU.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = AttnDims::new(q.dims(), k.dims(), v.dims(), heads)?;
    if !is_supported(q, k, v) {
        return Err(Error::InvalidArgument(format!(
            "fused attention needs f32 or f64 CPU tensors of one dtype, got {:?}/{:?}/{:?} on \
             {:?}/{:?}/{:?}",
            q.dtype(),
            k.dtype(),
            v.dtype(),
            q.device().location(),
            k.device().location(),
            v.device().location()
        )));
    }
    let op = FusedAttention {
        dims,
        lse: Mutex::new(None),
    };
    Ok(q.apply_op3_arc(k, v, Arc::new(Box::new(op)))?)
}

/// The sizes of one attention call, checked once (here and in [`super::attention_blockwise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttnDims {
    pub(crate) batch: usize,
    /// Query rows N.
    pub(crate) n: usize,
    /// Key/value rows M.
    pub(crate) m: usize,
    pub(crate) heads: usize,
    /// Head width D.
    pub(crate) d: usize,
}

impl AttnDims {
    /// Check queries [B, N, H·D] against keys/values [B, M, H·D] for `heads` heads.
    pub(crate) fn new(q: &[usize], k: &[usize], v: &[usize], heads: usize) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "attention: {why} (q {q:?}, k {k:?}, v {v:?}, {heads} heads)"
            ))
        };
        let (&[b, n, c], &[kb, m, kc], &[vb, vm, vc]) = (q, k, v) else {
            return Err(bad("inputs must have rank 3 [batch, tokens, heads·width]"));
        };
        if kb != b || vb != b || vm != m || kc != c || vc != c {
            return Err(bad("shapes do not fit"));
        }
        if heads == 0 || c % heads != 0 {
            return Err(bad("width does not divide into the heads"));
        }
        if m == 0 {
            return Err(bad("empty key sequence"));
        }
        Ok(Self {
            batch: b,
            n,
            m,
            heads,
            d: c / heads,
        })
    }

    fn width(&self) -> usize {
        self.heads * self.d
    }

    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }

    /// Query rows per block: a block of scores of at most 128 Ki elements (512 KiB of f32), at
    /// least 8 and at most 128 rows. At 4096 keys (SD1.5 at 512 px) that is 32 rows: with the
    /// earlier 16 Ki elements (8 rows) the GEMMs ran half-empty 16-row microkernels and re-packed
    /// K and V for every 8 queries (`docs/perf.md`, 2026-11-30).
    fn block_rows(&self) -> usize {
        (131_072 / self.m).clamp(8, 128).min(self.n.max(1))
    }
}

/// Per-row log-sum-exp of the scaled scores, [B·H·N], kept by the forward for the backward.
enum Lse {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// The custom op; `lse` is filled by the forward.
struct FusedAttention {
    dims: AttnDims,
    lse: Mutex<Option<Lse>>,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims;
        let check = |l: &Layout, rows: usize| -> candle_core::Result<()> {
            if l.dims() != [dims.batch, rows, dims.width()] {
                candle_core::bail!(
                    "fused-attention: applied to shape {:?}, built for {dims:?}",
                    l.dims()
                );
            }
            Ok(())
        };
        check(l1, dims.n)?;
        check(l2, dims.m)?;
        check(l3, dims.m)?;
        let shape = Shape::from((dims.batch, dims.n, dims.width()));
        let (out, lse) = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (out, lse) = forward::<f32>(
                    dims,
                    View::new(q, l1)?,
                    View::new(k, l2)?,
                    View::new(v, l3)?,
                );
                (CpuStorage::F32(out), Lse::F32(lse))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (out, lse) = forward::<f64>(
                    dims,
                    View::new(q, l1)?,
                    View::new(k, l2)?,
                    View::new(v, l3)?,
                );
                (CpuStorage::F64(out), Lse::F64(lse))
            }
            _ => candle_core::bail!(
                "fused-attention: needs f32 or f64 inputs of one dtype, got {:?}/{:?}/{:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        *self
            .lse
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(lse);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = Needs {
            dq: q.track_op(),
            dk: k.track_op(),
            dv: v.track_op(),
        };
        if !(need.dq || need.dk || need.dv) {
            return Ok((None, None, None));
        }
        let guard = self
            .lse
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(lse) = guard.as_ref() else {
            candle_core::bail!("fused-attention: backward before forward");
        };
        let grads = match lse {
            Lse::F32(lse) => {
                backward_tensors::<f32>(self.dims, need, [q, k, v, res, grad_res], lse)
            }
            Lse::F64(lse) => {
                backward_tensors::<f64>(self.dims, need, [q, k, v, res, grad_res], lse)
            }
        }?;
        Ok(grads)
    }
}

/// Which input gradients the backward computes (those of inputs that track the graph).
#[derive(Debug, Clone, Copy)]
struct Needs {
    dq: bool,
    dk: bool,
    dv: bool,
}

/// Read the five tensors' CPU storages and run [`backward`]; the gradients come back as tensors.
fn backward_tensors<T: Float>(
    dims: AttnDims,
    need: Needs,
    [q, k, v, o, g]: [&Tensor; 5],
    lse: &[T],
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (os, ol) = o.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    fn slice<T: Float>(s: &Storage) -> candle_core::Result<&[T]> {
        match s {
            Storage::Cpu(c) => T::cpu_storage_as_slice(c),
            _ => candle_core::bail!("fused-attention: backward needs CPU tensors"),
        }
    }
    let views = [
        View::new(slice::<T>(&qs)?, ql)?,
        View::new(slice::<T>(&ks)?, kl)?,
        View::new(slice::<T>(&vs)?, vl)?,
        View::new(slice::<T>(&os)?, ol)?,
        View::new(slice::<T>(&gs)?, gl)?,
    ];
    if lse.len() != dims.batch * dims.heads * dims.n {
        candle_core::bail!("fused-attention: stored log-sum-exp does not fit the inputs");
    }
    for (view, rows) in views.iter().zip([dims.n, dims.m, dims.m, dims.n, dims.n]) {
        if view.dims != [dims.batch, rows, dims.width()] {
            candle_core::bail!(
                "fused-attention backward: tensor of shape {:?}, expected {:?}",
                view.dims,
                [dims.batch, rows, dims.width()]
            );
        }
    }
    let (dq, dk, dv) = backward(dims, need, views, lse);
    let device = q.device();
    let wrap = |data: Option<Vec<T>>, rows: usize| -> candle_core::Result<Option<Tensor>> {
        data.map(|d| Tensor::from_vec(d, (dims.batch, rows, dims.width()), device))
            .transpose()
    };
    Ok((wrap(dq, dims.n)?, wrap(dk, dims.m)?, wrap(dv, dims.m)?))
}

/// A rank-3 tensor's data read through its layout: element (b, t, c) lies at
/// `ptr + b·stride[0] + t·stride[1] + c·stride[2]`. Construction checks that every element
/// lies inside the storage, which makes the raw reads in the kernels sound.
#[derive(Debug, Clone, Copy)]
struct View<T> {
    ptr: *const T,
    dims: [usize; 3],
    stride: [usize; 3],
}

// SAFETY: a `View` only reads, and the storage it points into outlives every use (the kernels
// run inside the calls that hold the storage borrowed).
unsafe impl<T: Sync> Send for View<T> {}
unsafe impl<T: Sync> Sync for View<T> {}

impl<T> View<T> {
    fn new(data: &[T], layout: &Layout) -> candle_core::Result<Self> {
        let (&[b, t, c], &[sb, st, sc]) = (layout.dims(), layout.stride()) else {
            candle_core::bail!("fused-attention: expected rank-3 tensors");
        };
        let start = layout.start_offset();
        let empty = b == 0 || t == 0 || c == 0;
        let last = start
            + (b.saturating_sub(1)) * sb
            + t.saturating_sub(1) * st
            + c.saturating_sub(1) * sc;
        if !empty && last >= data.len() {
            candle_core::bail!("fused-attention: layout reaches past its storage");
        }
        let ptr = if empty {
            data.as_ptr()
        } else {
            // In bounds: `start ≤ last < data.len()`.
            data[start..].as_ptr()
        };
        Ok(Self {
            ptr,
            dims: [b, t, c],
            stride: [sb, st, sc],
        })
    }

    /// Pointer to row `row` of head `head` (width `d`) of batch entry `b`.
    ///
    /// # Safety
    /// The indices must lie inside the view's dims.
    unsafe fn at(&self, b: usize, row: usize, head: usize, d: usize) -> *const T {
        self.ptr
            .add(b * self.stride[0] + row * self.stride[1] + head * d * self.stride[2])
    }

    fn row_stride(&self) -> isize {
        self.stride[1] as isize
    }

    fn col_stride(&self) -> isize {
        self.stride[2] as isize
    }
}

/// A pointer into an output buffer that tasks write disjoint parts of.
#[derive(Debug, Clone, Copy)]
struct OutPtr<T>(*mut T);

// SAFETY: tasks write disjoint elements (each owns its rows of one head), and the buffer outlives
// the parallel section.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}

/// `dst[m×n] (= dst·[read_dst]) + beta·lhs[m×k]·rhs[k×n]`, single-threaded, with strides in
/// elements as (row, column).
///
/// # Safety
/// All three matrices must be valid for their extents and strides; `dst` must not alias `lhs`
/// or `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    (dst_rs, dst_cs): (isize, isize),
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (isize, isize),
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        accumulate,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        T::from_f64(1.0),
        beta,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// The element types of the fused kernel, with the row operations it needs.
trait Float: WithDType {
    /// `row[j] ← exp(row[j] − shift)`; returns the sum of the new values.
    fn exp_shift_sum(row: &mut [Self], shift: Self) -> Self;
    /// `row[j] ← exp(row[j] − shift)`.
    fn exp_shift(row: &mut [Self], shift: Self);
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// `e^self` (for f32 the branch-free polynomial, so that loops over it vectorise).
    fn exp(self) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn exp_shift_sum(row: &mut [f32], shift: f32) -> f32 {
        Self::exp_shift(row, shift);
        let mut acc = [0.0_f32; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                acc[l] += c[l];
            }
        }
        let tail: f32 = chunks.remainder().iter().sum();
        acc.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    fn exp_shift(row: &mut [f32], shift: f32) {
        for x in row.iter_mut() {
            *x = exp_f32(*x - shift);
        }
    }

    fn ln(self) -> f32 {
        f32::ln(self)
    }

    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn exp_shift_sum(row: &mut [f64], shift: f64) -> f64 {
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }

    #[inline(always)]
    fn exp_shift(row: &mut [f64], shift: f64) {
        for x in row.iter_mut() {
            *x = (*x - shift).exp();
        }
    }

    fn ln(self) -> f64 {
        f64::ln(self)
    }

    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
}

/// The largest entry of `row` (NaN entries are skipped; the exponentials then carry them).
#[inline(always)]
fn row_max<T: Float>(row: &[T]) -> T {
    let mut acc = [row[0]; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = acc[0];
    for &x in acc[1..].iter().chain(chunks.remainder()) {
        if x > m {
            m = x;
        }
    }
    m
}

/// Head widths up to this use the row-wise kernels on transposed copies of K and V (a few
/// vectorised passes over each score row) instead of `gemm`, whose per-call cost dominates the
/// products with an inner dimension of a few elements.
const SMALL_HEAD: usize = 16;

/// `x` [B, M, H·D] as [B·H, D, M] (each head transposed, contiguous): row `d` of head `bh` holds
/// feature `d` of all M tokens, so the row-wise kernels read it with unit stride.
fn pack_transposed<T: Float>(dims: AttnDims, x: View<T>) -> Vec<T> {
    let AttnDims { m, heads, d, .. } = dims;
    let mut packed = vec![T::from_f64(0.0); dims.batch * heads * d * m];
    packed
        .par_chunks_mut(d * m)
        .enumerate()
        .for_each(|(bh, dst)| {
            let (b, h) = (bh / heads, bh % heads);
            for j in 0..m {
                // SAFETY: b < B, j < M, h < H and feature < D lie inside the checked view.
                let src = unsafe { x.at(b, j, h, d) };
                for f in 0..d {
                    dst[f * m + j] = unsafe { *src.offset(f as isize * x.col_stride()) };
                }
            }
        });
    packed
}

/// `x` [B, M, H·D] as [B·H, M, D] (each head's rows contiguous). Given to `gemm` as the
/// right-hand side, a compact operand that it reads in place: with the heads read through the
/// projections' strides it re-packed all of K and V for every block of queries, which was a
/// third of the attention time at 4096 keys (`docs/perf.md`, 2026-12-05).
fn pack_heads<T: Float>(dims: AttnDims, x: View<T>) -> Vec<T> {
    let AttnDims { m, heads, d, .. } = dims;
    let mut packed = vec![T::from_f64(0.0); dims.batch * heads * m * d];
    packed
        .par_chunks_mut(m * d)
        .enumerate()
        .for_each(|(bh, dst)| {
            let (b, h) = (bh / heads, bh % heads);
            for (j, row) in dst.chunks_exact_mut(d).enumerate() {
                // SAFETY: b < B, j < M, h < H and feature < D lie inside the checked view.
                let src = unsafe { x.at(b, j, h, d) };
                for (f, y) in row.iter_mut().enumerate() {
                    *y = unsafe { *src.offset(f as isize * x.col_stride()) };
                }
            }
        });
    packed
}

/// K and V of all heads as [B·H, M, D] ([`pack_heads`]), for heads wider than [`SMALL_HEAD`].
#[derive(Debug, Clone, Copy)]
struct HeadMajor<T> {
    k: *const T,
    v: *const T,
}

// SAFETY: read-only pointers into buffers that outlive the parallel sections.
unsafe impl<T: Sync> Send for HeadMajor<T> {}
unsafe impl<T: Sync> Sync for HeadMajor<T> {}

impl<T> HeadMajor<T> {
    /// Head `bh`'s K and V, each `m × d` row-major.
    ///
    /// # Safety
    /// `bh` must be a head of the packed buffers.
    unsafe fn head(&self, bh: usize, m: usize, d: usize) -> (*const T, *const T) {
        (self.k.add(bh * m * d), self.v.add(bh * m * d))
    }
}

/// The per-query (column) maximum of a score block held query-fastest (`s[j·rows + i]`).
#[inline(always)]
fn col_max<T: Float>(s: &[T], mx: &mut [T]) {
    let rows = mx.len();
    mx.copy_from_slice(&s[..rows]);
    for col in s.chunks_exact(rows).skip(1) {
        for (a, &x) in mx.iter_mut().zip(col) {
            *a = if x > *a { x } else { *a };
        }
    }
}

/// `s[j·rows + i] ← exp(s[j·rows + i] − shift[i])`, adding each new value into `sums[i]` when
/// given.
#[inline(always)]
fn col_exp<T: Float>(s: &mut [T], shift: &[T], mut sums: Option<&mut [T]>) {
    let rows = shift.len();
    for col in s.chunks_exact_mut(rows) {
        for (x, &sh) in col.iter_mut().zip(shift) {
            *x = (*x - sh).exp();
        }
        if let Some(sums) = sums.as_deref_mut() {
            for (a, &x) in sums.iter_mut().zip(col.iter()) {
                *a += x;
            }
        }
    }
}

/// `y ← a·x` (first pass) or `y += a·x`.
#[inline(always)]
fn axpy<T: Float>(y: &mut [T], a: T, x: &[T], first: bool) {
    if first {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = a * x;
        }
    } else {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }
}

/// `Σ x·y` with eight partial sums (so that it vectorises).
#[inline(always)]
fn dot<T: Float>(x: &[T], y: &[T]) -> T {
    let zero = T::from_f64(0.0);
    let mut acc = [zero; 8];
    let mut xc = x.chunks_exact(8);
    let mut yc = y.chunks_exact(8);
    for (a, b) in (&mut xc).zip(&mut yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut tail = zero;
    for (&a, &b) in xc.remainder().iter().zip(yc.remainder()) {
        tail += a * b;
    }
    let mut sum = zero;
    for a in acc {
        sum += a;
    }
    sum + tail
}

/// K and V of all heads transposed ([`pack_transposed`]), for heads of width ≤ [`SMALL_HEAD`].
#[derive(Debug, Clone, Copy)]
struct Packed<T> {
    kt: *const T,
    vt: *const T,
}

// SAFETY: read-only pointers into buffers that outlive the parallel sections.
unsafe impl<T: Sync> Send for Packed<T> {}
unsafe impl<T: Sync> Sync for Packed<T> {}

impl<T> Packed<T> {
    /// Row `f` (feature) of head `bh`'s transposed K and V, `m` long each.
    ///
    /// # Safety
    /// `bh`, `f` and `m` must fit the packed buffers.
    unsafe fn rows<'a>(&self, bh: usize, f: usize, d: usize, m: usize) -> (&'a [T], &'a [T]) {
        let at = (bh * d + f) * m;
        (
            std::slice::from_raw_parts(self.kt.add(at), m),
            std::slice::from_raw_parts(self.vt.add(at), m),
        )
    }
}

/// Forward over all (batch·head, query block) tasks: the output [B, N, H·D] and the per-row
/// log-sum-exp [B·H·N].
fn forward<T: Float>(dims: AttnDims, q: View<T>, k: View<T>, v: View<T>) -> (Vec<T>, Vec<T>) {
    let AttnDims {
        batch, n, heads, ..
    } = dims;
    let c = dims.width();
    let zero = T::from_f64(0.0);
    let mut out = vec![zero; batch * n * c];
    let mut lse = vec![zero; batch * heads * n];
    let rows = dims.block_rows();
    let blocks = n.div_ceil(rows);
    let tasks: Vec<(usize, usize)> = (0..batch * heads)
        .flat_map(|bh| (0..blocks).map(move |blk| (bh, blk)))
        .collect();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let lse_ptr = OutPtr(lse.as_mut_ptr());
    let simd = Simd::detect();
    let small =
        (dims.d <= SMALL_HEAD).then(|| (pack_transposed(dims, k), pack_transposed(dims, v)));
    let packed = small.as_ref().map(|(kt, vt)| Packed {
        kt: kt.as_ptr(),
        vt: vt.as_ptr(),
    });
    let wide = (dims.d > SMALL_HEAD).then(|| (pack_heads(dims, k), pack_heads(dims, v)));
    let head_major = wide.as_ref().map(|(kh, vh)| HeadMajor {
        k: kh.as_ptr(),
        v: vh.as_ptr(),
    });
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scratch, &(bh, blk)| {
            let i0 = blk * rows;
            let i1 = (i0 + rows).min(n);
            let task = FwdTask {
                dims,
                q,
                out: out_ptr,
                lse: lse_ptr,
                packed,
                head_major,
                bh,
                i0,
                i1,
            };
            // SAFETY: the views were bounds-checked, the task writes only its own rows of its head
            // in `out` and `lse`, and each build runs only where `Simd::detect` found its
            // features.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                match simd {
                    Simd::Avx512 => return task.run_avx512(scratch),
                    Simd::Avx2Fma => return task.run_avx2(scratch),
                    Simd::Baseline => {}
                }
                let _ = simd;
                task.run(scratch);
            }
        });
    (out, lse)
}

/// One forward task: rows `i0..i1` of head `bh % heads` of batch entry `bh / heads`.
struct FwdTask<T> {
    dims: AttnDims,
    q: View<T>,
    out: OutPtr<T>,
    lse: OutPtr<T>,
    /// Transposed K and V, for the row-wise kernel (small heads).
    packed: Option<Packed<T>>,
    /// Head-major K and V, for the block kernel (wider heads).
    head_major: Option<HeadMajor<T>>,
    bh: usize,
    i0: usize,
    i1: usize,
}

impl<T: Float> FwdTask<T> {
    /// # Safety
    /// As for [`FwdTask::run`], and the CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, scratch: &mut Vec<T>) {
        self.run(scratch)
    }

    /// # Safety
    /// As for [`FwdTask::run`], and the CPU must support AVX-512 F/VL/BW/DQ, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    unsafe fn run_avx512(&self, scratch: &mut Vec<T>) {
        self.run(scratch)
    }

    /// # Safety
    /// The views must be bounds-checked for `dims`, and no other task may write this task's
    /// rows of its head.
    #[inline(always)]
    unsafe fn run(&self, scratch: &mut Vec<T>) {
        let AttnDims { n, m, heads, d, .. } = self.dims;
        let c = self.dims.width();
        let (b, h) = (self.bh / heads, self.bh % heads);
        let rows = self.i1 - self.i0;
        let zero = T::from_f64(0.0);
        if let Some(packed) = self.packed {
            // Row by row: s = Σ_f (scale·q_f)·Kᵀ_f, softmax weights, o_f = e·Vᵀ_f / Σe.
            let scale = T::from_f64(self.dims.scale());
            scratch.clear();
            scratch.resize(m, zero);
            for i in self.i0..self.i1 {
                let qi = self.q.at(b, i, h, d);
                for f in 0..d {
                    let (kt, _) = packed.rows(self.bh, f, d, m);
                    let qf = *qi.offset(f as isize * self.q.col_stride());
                    axpy(scratch, scale * qf, kt, f == 0);
                }
                let mx = row_max(scratch);
                let sum = T::exp_shift_sum(scratch, mx);
                *self.lse.0.add(self.bh * n + i) = mx + sum.ln();
                let inv = T::from_f64(1.0) / sum;
                let o = self.out.0.add(b * n * c + i * c + h * d);
                for f in 0..d {
                    let (_, vt) = packed.rows(self.bh, f, d, m);
                    *o.add(f) = dot(scratch, vt) * inv;
                }
            }
            return;
        }
        let Some(head_major) = self.head_major else {
            return;
        };
        // The score block is held query-fastest, `s[j·rows + i]` (column-major rows × M): the
        // products then read K, V and the weights in place (no re-packing per block) and the
        // softmax runs down the keys with all the block's queries in one vector.
        let one = T::from_f64(1.0);
        let (kh, vh) = head_major.head(self.bh, m, d);
        scratch.clear();
        scratch.resize(rows * (m + d + 2), zero);
        let (s_blk, rest) = scratch.split_at_mut(rows * m);
        let (o_t, rest) = rest.split_at_mut(rows * d);
        let (mx, sums) = rest.split_at_mut(rows);
        let q = self.q;
        // Sᵀ-layout scores: s[j·rows + i] = scale·q_i·k_j.
        matmul(
            (rows, m, d),
            s_blk.as_mut_ptr(),
            (1, rows as isize),
            false,
            q.at(b, self.i0, h, d),
            (q.row_stride(), q.col_stride()),
            kh,
            (1, d as isize),
            T::from_f64(self.dims.scale()),
        );
        // Unnormalised softmax weights, their sums and the log-sum-exp per query.
        col_max(s_blk, mx);
        col_exp(s_blk, mx, Some(sums));
        for r in 0..rows {
            *self.lse.0.add(self.bh * n + self.i0 + r) = mx[r] + sums[r].ln();
            sums[r] = one / sums[r];
        }
        // Oᵀ-layout output block o_t[f·rows + i] = Σ_j e_ij·v_jf, then each row divided by its
        // sum on the way into the output.
        matmul(
            (rows, d, m),
            o_t.as_mut_ptr(),
            (1, rows as isize),
            false,
            s_blk.as_ptr(),
            (1, rows as isize),
            vh,
            (d as isize, 1),
            one,
        );
        for (r, &inv) in sums.iter().enumerate() {
            let row = self.out.0.add(b * n * c + (self.i0 + r) * c + h * d);
            for f in 0..d {
                *row.add(f) = o_t[f * rows + r] * inv;
            }
        }
    }
}

/// dQ, dK, dV as flat buffers, each present only when asked for.
type GradBufs<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

/// Backward over all tasks. Views: q, k, v, o (the forward's output) and g (its gradient).
/// Returns dQ [B, N, H·D], dK and dV [B, M, H·D], each only where `need` asks for it.
fn backward<T: Float>(dims: AttnDims, need: Needs, views: [View<T>; 5], lse: &[T]) -> GradBufs<T> {
    let AttnDims {
        batch,
        n,
        m,
        heads,
        d,
    } = dims;
    let c = dims.width();
    let zero = T::from_f64(0.0);
    let mut dq = need.dq.then(|| vec![zero; batch * n * c]);
    let rows = dims.block_rows();
    let blocks = n.div_ceil(rows);
    // Split a head's query blocks into chunks only as far as needed to keep every thread busy:
    // each chunk accumulates its own dK/dV, summed below.
    let bh_count = batch * heads;
    let threads = rayon::current_num_threads().max(1);
    let chunks = (2 * threads)
        .div_ceil(bh_count.max(1))
        .clamp(1, blocks.max(1));
    let per_chunk = blocks.div_ceil(chunks).max(1);
    let tasks: Vec<(usize, usize, usize)> = (0..bh_count)
        .flat_map(|bh| {
            (0..blocks)
                .step_by(per_chunk)
                .map(move |b0| (bh, b0, (b0 + per_chunk).min(blocks)))
        })
        .collect();
    let dq_ptr = OutPtr(dq.as_mut().map_or(std::ptr::null_mut(), |v| v.as_mut_ptr()));
    let lse_ptr = OutPtr(lse.as_ptr().cast_mut());
    let simd = Simd::detect();
    let [_, k_view, v_view, ..] = views;
    let small =
        (d <= SMALL_HEAD).then(|| (pack_transposed(dims, k_view), pack_transposed(dims, v_view)));
    let packed = small.as_ref().map(|(kt, vt)| Packed {
        kt: kt.as_ptr(),
        vt: vt.as_ptr(),
    });
    let wide = (d > SMALL_HEAD).then(|| (pack_heads(dims, k_view), pack_heads(dims, v_view)));
    let head_major = wide.as_ref().map(|(kh, vh)| HeadMajor {
        k: kh.as_ptr(),
        v: vh.as_ptr(),
    });
    let partials: Vec<(usize, Vec<T>, Vec<T>)> = tasks
        .par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(s_buf, dp_buf), &(bh, b0, b1)| {
                let mut dk = if need.dk {
                    vec![zero; m * d]
                } else {
                    Vec::new()
                };
                let mut dv = if need.dv {
                    vec![zero; m * d]
                } else {
                    Vec::new()
                };
                let task = BwdTask {
                    dims,
                    need,
                    views,
                    lse: lse_ptr,
                    dq: dq_ptr,
                    packed,
                    head_major,
                    bh,
                    i0: b0 * rows,
                    i1: (b1 * rows).min(n),
                    rows,
                };
                // SAFETY: views bounds-checked, `lse` has B·H·N entries (checked by the caller),
                // the task writes only its own rows of its head in dQ and its own dK/dV
                // buffers, and each build runs only where `Simd::detect` found its features.
                unsafe {
                    match simd {
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx512 => task.run_avx512(s_buf, dp_buf, &mut dk, &mut dv),
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx2Fma => task.run_avx2(s_buf, dp_buf, &mut dk, &mut dv),
                        _ => task.run(s_buf, dp_buf, &mut dk, &mut dv),
                    }
                }
                (bh, dk, dv)
            },
        )
        .collect();
    // Sum the chunks' dK/dV (each [D, M]: both kernels accumulate them transposed) into
    // [B, M, H·D].
    let mut dk = need.dk.then(|| vec![zero; batch * m * c]);
    let mut dv = need.dv.then(|| vec![zero; batch * m * c]);
    for (bh, pk, pv) in &partials {
        let (b, h) = (bh / heads, bh % heads);
        for (full, part) in [(&mut dk, pk), (&mut dv, pv)] {
            let Some(full) = full.as_mut() else { continue };
            for (f, src) in part.chunks_exact(m).enumerate() {
                for (j, &y) in src.iter().enumerate() {
                    full[b * m * c + j * c + h * d + f] += y;
                }
            }
        }
    }
    (dq, dk, dv)
}

/// One backward task: query rows `i0..i1` (in blocks of `rows`) of one head; dK/dV are
/// accumulated transposed ([D, M]) into the task's own buffers.
struct BwdTask<T> {
    dims: AttnDims,
    need: Needs,
    views: [View<T>; 5],
    lse: OutPtr<T>,
    dq: OutPtr<T>,
    /// Transposed K and V, for the row-wise kernel (small heads).
    packed: Option<Packed<T>>,
    /// Head-major K and V, for the block kernel (wider heads).
    head_major: Option<HeadMajor<T>>,
    bh: usize,
    i0: usize,
    i1: usize,
    rows: usize,
}

impl<T: Float> BwdTask<T> {
    /// # Safety
    /// As for [`BwdTask::run`], and the CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, s_buf: &mut Vec<T>, dp_buf: &mut Vec<T>, dk: &mut [T], dv: &mut [T]) {
        self.run(s_buf, dp_buf, dk, dv)
    }

    /// # Safety
    /// As for [`BwdTask::run`], and the CPU must support AVX-512 F/VL/BW/DQ, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    unsafe fn run_avx512(
        &self,
        s_buf: &mut Vec<T>,
        dp_buf: &mut Vec<T>,
        dk: &mut [T],
        dv: &mut [T],
    ) {
        self.run(s_buf, dp_buf, dk, dv)
    }

    /// # Safety
    /// Views bounds-checked for `dims`, `lse` valid for B·H·N reads, `dq` (when needed) valid
    /// for B·N·H·D writes of which no other task writes this task's rows of its head; `dk`/`dv`
    /// hold M·D entries when needed.
    #[inline(always)]
    unsafe fn run(&self, s_buf: &mut Vec<T>, dp_buf: &mut Vec<T>, dk: &mut [T], dv: &mut [T]) {
        let AttnDims { n, m, heads, d, .. } = self.dims;
        let c = self.dims.width();
        let [q, _, _, o, g] = self.views;
        let (b, h) = (self.bh / heads, self.bh % heads);
        let scale = T::from_f64(self.dims.scale());
        let zero = T::from_f64(0.0);
        let one = T::from_f64(1.0);
        if let Some(packed) = self.packed {
            // Row by row with dK/dV held transposed ([D, M]).
            s_buf.clear();
            s_buf.resize(m, zero);
            dp_buf.clear();
            dp_buf.resize(m, zero);
            for i in self.i0..self.i1 {
                let qi = q.at(b, i, h, d);
                let gi = g.at(b, i, h, d);
                let oi = o.at(b, i, h, d);
                let qf = |f: usize| *qi.offset(f as isize * q.col_stride());
                let gf = |f: usize| *gi.offset(f as isize * g.col_stride());
                // p = exp(scale·q_i·Kᵀ − lse_i).
                for f in 0..d {
                    let (kt, _) = packed.rows(self.bh, f, d, m);
                    axpy(s_buf, scale * qf(f), kt, f == 0);
                }
                T::exp_shift(s_buf, *self.lse.0.add(self.bh * n + i));
                // dVᵀ_f += dO_if·p.
                if self.need.dv {
                    for (f, row) in dv.chunks_exact_mut(m).enumerate() {
                        axpy(row, gf(f), s_buf, false);
                    }
                }
                if !(self.need.dq || self.need.dk) {
                    continue;
                }
                // dp = dO_i·Vᵀ; dS = p∘(dp − dO_i·o_i).
                let mut di = zero;
                for f in 0..d {
                    let (_, vt) = packed.rows(self.bh, f, d, m);
                    axpy(dp_buf, gf(f), vt, f == 0);
                    di += gf(f) * *oi.offset(f as isize * o.col_stride());
                }
                for (x, &p) in dp_buf.iter_mut().zip(s_buf.iter()) {
                    *x = p * (*x - di);
                }
                // dQ_if = scale·dS·K_f.
                if self.need.dq {
                    let dqi = self.dq.0.add(b * n * c + i * c + h * d);
                    for f in 0..d {
                        let (kt, _) = packed.rows(self.bh, f, d, m);
                        *dqi.add(f) = scale * dot(dp_buf, kt);
                    }
                }
                // dKᵀ_f += scale·q_if·dS.
                if self.need.dk {
                    for (f, row) in dk.chunks_exact_mut(m).enumerate() {
                        axpy(row, scale * qf(f), dp_buf, false);
                    }
                }
            }
            return;
        }
        let Some(head_major) = self.head_major else {
            return;
        };
        // As in the forward, every block matrix is held query-fastest (`s[j·rows + i]`) and dK,
        // dV, dQ are produced transposed, so that `gemm` reads K and V in place from the
        // head-major copies and packs only the block's own operands (with row-major products
        // it transposed the problem and re-packed all of K or V for every block of queries).
        let (kh, vh) = head_major.head(self.bh, m, d);
        let mut i0 = self.i0;
        while i0 < self.i1 {
            let rows = self.rows.min(self.i1 - i0);
            s_buf.clear();
            s_buf.resize(rows * m, zero);
            dp_buf.clear();
            dp_buf.resize(rows * m + rows + rows * d, zero);
            let (dp_blk, rest) = dp_buf.split_at_mut(rows * m);
            let (di, dq_t) = rest.split_at_mut(rows);
            let q_blk = q.at(b, i0, h, d);
            let g_blk = g.at(b, i0, h, d);
            let q_rc = (q.row_stride(), q.col_stride());
            let g_rc = (g.row_stride(), g.col_stride());
            // S = scale·Q_blk·Kᵀ, then P = exp(S − lse).
            matmul(
                (rows, m, d),
                s_buf.as_mut_ptr(),
                (1, rows as isize),
                false,
                q_blk,
                q_rc,
                kh,
                (1, d as isize),
                scale,
            );
            let lse = std::slice::from_raw_parts(self.lse.0.add(self.bh * n + i0), rows);
            col_exp(s_buf, lse, None);
            // dVᵀ += (Pᵀ·dO_blk)ᵀ: dV [M, D] written column-major.
            if self.need.dv {
                matmul(
                    (m, d, rows),
                    dv.as_mut_ptr(),
                    (1, m as isize),
                    true,
                    s_buf.as_ptr(),
                    (rows as isize, 1),
                    g_blk,
                    g_rc,
                    one,
                );
            }
            if !(self.need.dq || self.need.dk) {
                i0 += rows;
                continue;
            }
            // dP = dO_blk·Vᵀ.
            matmul(
                (rows, m, d),
                dp_blk.as_mut_ptr(),
                (1, rows as isize),
                false,
                g_blk,
                g_rc,
                vh,
                (1, d as isize),
                one,
            );
            // dS = P∘(dP − rowsum(dO∘O)), into the dP buffer.
            for (r, dr) in di.iter_mut().enumerate() {
                let go = g_blk.offset(r as isize * g.row_stride());
                let oo = o.at(b, i0 + r, h, d);
                let mut acc = zero;
                for f in 0..d {
                    acc += *go.offset(f as isize * g.col_stride())
                        * *oo.offset(f as isize * o.col_stride());
                }
                *dr = acc;
            }
            for (ds_col, p_col) in dp_blk.chunks_exact_mut(rows).zip(s_buf.chunks_exact(rows)) {
                for ((x, &p), &dr) in ds_col.iter_mut().zip(p_col).zip(di.iter()) {
                    *x = p * (*x - dr);
                }
            }
            // dQ_blk = scale·dS·K, held transposed (dq_t[f·rows + i]) and then scattered.
            if self.need.dq {
                matmul(
                    (rows, d, m),
                    dq_t.as_mut_ptr(),
                    (1, rows as isize),
                    false,
                    dp_blk.as_ptr(),
                    (1, rows as isize),
                    kh,
                    (d as isize, 1),
                    scale,
                );
                for r in 0..rows {
                    let row = self.dq.0.add(b * n * c + (i0 + r) * c + h * d);
                    for f in 0..d {
                        *row.add(f) = dq_t[f * rows + r];
                    }
                }
            }
            // dKᵀ += (scale·dSᵀ·Q_blk)ᵀ: dK [M, D] written column-major.
            if self.need.dk {
                matmul(
                    (m, d, rows),
                    dk.as_mut_ptr(),
                    (1, m as isize),
                    true,
                    dp_blk.as_ptr(),
                    (rows as isize, 1),
                    q_blk,
                    q_rc,
                    scale,
                );
            }
            i0 += rows;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        // A small deterministic generator (no RNG crate needed in unit tests).
        let count: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f64> = (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("random tensor")
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .expect("a");
        let b = b
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .expect("b");
        let diff = (&a - &b)
            .and_then(|t| t.abs())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f64>())
            .expect("diff");
        let scale = b
            .abs()
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f64>())
            .expect("scale");
        diff / scale.max(1e-300)
    }

    /// Shapes that reach both kernels: heads of width ≤ `SMALL_HEAD` (row-wise) and wider ones
    /// (block kernel), the latter with several query blocks and a ragged last one
    /// (1100 keys give blocks of 119 rows; 150 queries make 119 + 31).
    const SHAPES: [(usize, usize, usize, usize, usize); 2] =
        [(2, 37, 19, 3, 5), (2, 150, 1100, 2, 24)];

    #[test]
    fn forward_matches_composed_and_strided_inputs_work() {
        for ((dtype, tol), (b, n, m, heads, d)) in [(DType::F32, 1e-5), (DType::F64, 1e-12)]
            .into_iter()
            .flat_map(|t| SHAPES.into_iter().map(move |s| (t, s)))
        {
            let dims = AttnDims::new(
                &[b, n, heads * d],
                &[b, m, heads * d],
                &[b, m, heads * d],
                heads,
            )
            .expect("dims");
            assert!(
                d <= SMALL_HEAD || dims.block_rows() < n,
                "one query block only"
            );
            let q = randn(&[b, n, heads * d], 1, dtype);
            let k = randn(&[b, m, heads * d], 2, dtype);
            let v = randn(&[b, m, heads * d], 3, dtype);
            let ours = fused_attention(&q, &k, &v, heads).expect("fused");
            let reference =
                crate::engine::nn::attention_composed(&q, &k, &v, heads, false).expect("composed");
            let err = max_rel(&ours, &reference);
            assert!(err < tol, "{dtype:?} d{d}: relative error {err}");
            // Keys given as a transposed view: same result.
            let kt = randn(&[b, heads * d, m], 2, dtype)
                .transpose(1, 2)
                .expect("transpose");
            let ours = fused_attention(&q, &kt, &v, heads).expect("fused");
            let reference =
                crate::engine::nn::attention_composed(&q, &kt, &v, heads, false).expect("composed");
            let err = max_rel(&ours, &reference);
            assert!(err < tol, "{dtype:?} d{d} strided: relative error {err}");
        }
    }

    #[test]
    fn gradients_match_composed_in_f64() {
        for (b, n, m, heads, d) in [(2, 45, 30, 2, 3), (1, 150, 1100, 2, 24)] {
            let q = Var::from_tensor(&randn(&[b, n, heads * d], 4, DType::F64)).expect("q");
            let k = Var::from_tensor(&randn(&[b, m, heads * d], 5, DType::F64)).expect("k");
            let v = Var::from_tensor(&randn(&[b, m, heads * d], 6, DType::F64)).expect("v");
            let w = randn(&[b, n, heads * d], 7, DType::F64);
            let loss = |out: Tensor| out.mul(&w).and_then(|t| t.sum_all()).expect("loss");
            let g_ours = loss(fused_attention(&q, &k, &v, heads).expect("fused"))
                .backward()
                .expect("backward");
            let g_ref = loss(
                crate::engine::nn::attention_composed(&q, &k, &v, heads, false).expect("composed"),
            )
            .backward()
            .expect("backward");
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = g_ours.get(var.as_tensor()).expect("ours");
                let r = g_ref.get(var.as_tensor()).expect("reference");
                let err = max_rel(a, r);
                assert!(
                    err < 1e-10,
                    "d{name} (head width {d}): relative error {err}"
                );
            }
        }
    }

    #[test]
    fn only_tracked_inputs_get_gradients() {
        for (b, n, m, heads, d) in [(1, 9, 7, 2, 2), (1, 9, 7, 2, 20)] {
            let q = Var::from_tensor(&randn(&[b, n, heads * d], 8, DType::F64)).expect("q");
            let k = randn(&[b, m, heads * d], 9, DType::F64);
            let v = randn(&[b, m, heads * d], 10, DType::F64);
            let grads = fused_attention(&q, &k, &v, heads)
                .and_then(|t| Ok(t.sum_all()?))
                .expect("forward")
                .backward()
                .expect("backward");
            assert!(grads.get(q.as_tensor()).is_some());
            assert!(grads.get(&k).is_none());
            assert!(grads.get(&v).is_none());
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let q = randn(&[1, 4, 6], 1, DType::F32);
        let k = randn(&[1, 5, 6], 2, DType::F32);
        assert!(fused_attention(&q, &k, &k, 4).is_err());
        assert!(fused_attention(&q, &q, &k, 2).is_err());
        let empty = randn(&[1, 0, 6], 3, DType::F32);
        assert!(fused_attention(&q, &empty, &empty, 2).is_err());
        let half = q.to_dtype(DType::F16).expect("f16");
        assert!(fused_attention(&half, &half, &half, 2).is_err());
    }
}
