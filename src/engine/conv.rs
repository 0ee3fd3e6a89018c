//! 2-D convolution on the CPU as im2col + one GEMM per sample, and its input gradient as one GEMM
//! + col2im per sample.
//!
//! candle's CPU convolution first copies the whole input to NHWC and the kernel to
//! [C_out, kh·kw·C_in] on one thread, then builds im2col tiles element by element; its transposed
//! convolution (which candle's backward, and ours before, used for the input gradient) takes one
//! `C_in`-long dot product per output pixel and kernel tap, with no GEMM blocking at all. In a
//! real-size UNet's training step that transposed convolution was about half of the backward's
//! time (`docs/perf.md`).
//!
//! Here, per sample:
//! - forward: `cols` [C_in·kh·kw, Ho·Wo] is filled row by row (contiguous runs when the stride is
//!   1, parallel over input channels), then `y = K·cols` with the kernel as it is stored
//!   ([C_out, C_in·kh·kw], no reordering), written straight into the output, which was first filled
//!   with the bias (the GEMM accumulates onto it: no separate bias pass);
//! - input gradient: `cols = Kᵀ·G` (the kernel's transpose is a stride swap, no copy), then each
//!   column entry is added back to the input pixel the forward read it from (col2im, parallel
//!   over channels). The result has the input's exact size: a strided convolution's surplus input
//!   rows and columns, never read by the forward, get zero gradient, and no output padding is
//!   needed.
//!
//! A 1×1 convolution with stride 1 and no padding needs neither im2col nor col2im. The GEMMs run on
//! rayon's pool with its thread count. Only f32 and f64 on the CPU, dilation 1, one group
//! ([`supported`]); callers keep candle's ops otherwise. Neither op has a backward of its own: the
//! forward is used on untracked inputs (inference, or inside
//! [`frozen_conv2d`](crate::engine::frozen::frozen_conv2d), which supplies the backward).

use std::cell::RefCell;
use std::thread::LocalKey;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::engine::contiguous_cpu_slice as slice;

/// Whether [`conv2d`] and [`conv2d_input_grad`] handle tensors like `t` (CPU, f32 or f64).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// `conv2d(x, kernel, padding, stride) + bias` (dilation 1, one group) for `x` [B, C_in, H, W],
/// `kernel` [C_out, C_in, kh, kw] and `bias` \[C_out\]: the same values as candle's convolution
/// up to summation order. No gradient flows through it (see the module doc).
pub fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (_, c_in, h, w) = x.dims4()?;
    let (c_out, k_in, kh, kw) = kernel.dims4()?;
    if k_in != c_in {
        candle_core::bail!(
            "conv2d: input {:?} has {c_in} channels, kernel {:?} expects {k_in}",
            x.dims(),
            kernel.dims()
        );
    }
    let geometry = Geometry::new((c_in, h, w), (kh, kw), padding, stride)?;
    let bias = match bias {
        Some(b) if b.dims() != [c_out] => {
            candle_core::bail!("conv2d: bias {:?} for {c_out} output channels", b.dims())
        }
        Some(b) => Some(b.to_dtype(x.dtype())?.contiguous()?),
        None => None,
    };
    x.contiguous()?.apply_op2_no_bwd(
        &kernel.contiguous()?,
        &ConvForward {
            geometry,
            c_out,
            bias,
        },
    )
}

/// Gradient with respect to `x` [B, C_in, H, W] of `conv2d(x, kernel, padding, stride)`
/// (dilation 1, one group), given the output gradient `grad` [B, C_out, Ho, Wo] and `kernel`
/// [C_out, C_in, kh, kw].
pub fn conv2d_input_grad(
    input_dims: (usize, usize, usize, usize),
    grad: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (b, c_in, h, w) = input_dims;
    let (c_out, k_in, kh, kw) = kernel.dims4()?;
    let geometry = Geometry::new((c_in, h, w), (kh, kw), padding, stride)?;
    let expected = [b, c_out, geometry.out_h, geometry.out_w];
    if k_in != c_in || grad.dims() != expected {
        candle_core::bail!(
            "conv2d input gradient: grad {:?} and kernel {:?} do not fit input [{b}, {c_in}, \
             {h}, {w}] (expected grad {expected:?})",
            grad.dims(),
            kernel.dims()
        );
    }
    grad.contiguous()?
        .apply_op2_no_bwd(&kernel.contiguous()?, &ConvInputGrad { geometry, c_out })
}

/// Sizes of one convolution, per sample.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    out_h: usize,
    out_w: usize,
    padding: usize,
    stride: usize,
}

impl Geometry {
    fn new(
        (c_in, h, w): (usize, usize, usize),
        (kh, kw): (usize, usize),
        padding: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        if stride == 0 || kh == 0 || kw == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!(
                "conv2d: kernel {kh}×{kw} with stride {stride} and padding {padding} does not \
                 fit a {h}×{w} input"
            );
        }
        Ok(Self {
            c_in,
            h,
            w,
            kh,
            kw,
            out_h: (h + 2 * padding - kh) / stride + 1,
            out_w: (w + 2 * padding - kw) / stride + 1,
            padding,
            stride,
        })
    }

    /// Rows of the column matrix (and columns of the kernel matrix): C_in·kh·kw.
    fn patch(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    fn in_pixels(&self) -> usize {
        self.h * self.w
    }

    /// A 1×1 convolution with stride 1 and no padding: the input is its own column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// The outputs `o` in `0..out` whose tap `k` reads inside `[0, size)`:
    /// `0 ≤ o·stride + k − padding < size`.
    fn valid(&self, k: usize, out: usize, size: usize) -> std::ops::Range<usize> {
        let lo = if k >= self.padding {
            0
        } else {
            (self.padding - k).div_ceil(self.stride)
        };
        let hi = match (size + self.padding).checked_sub(k + 1) {
            Some(top) => (top / self.stride + 1).min(out),
            None => 0,
        };
        lo..hi.max(lo)
    }

    /// Fill `cols` [C_in·kh·kw, Ho·Wo] from one sample `x` [C_in, H, W] (zeros where a tap
    /// reads the padding).
    fn im2col<T: WithDType>(&self, x: &[T], cols: &mut [T]) {
        let (s, p) = (self.stride, self.padding);
        let row_len = self.out_pixels();
        cols.par_chunks_mut(self.kh * self.kw * row_len)
            .enumerate()
            .for_each(|(c, rows)| {
                let img = &x[c * self.in_pixels()..][..self.in_pixels()];
                for ky in 0..self.kh {
                    let ys = self.valid(ky, self.out_h, self.h);
                    for kx in 0..self.kw {
                        let xs = self.valid(kx, self.out_w, self.w);
                        let row = &mut rows[(ky * self.kw + kx) * row_len..][..row_len];
                        for (oy, out_row) in row.chunks_mut(self.out_w).enumerate() {
                            if !ys.contains(&oy) || xs.is_empty() {
                                out_row.fill(T::zero());
                                continue;
                            }
                            out_row[..xs.start].fill(T::zero());
                            out_row[xs.end..].fill(T::zero());
                            let first = (oy * s + ky - p) * self.w + xs.start * s + kx - p;
                            let dst = &mut out_row[xs.clone()];
                            if s == 1 {
                                dst.copy_from_slice(&img[first..first + dst.len()]);
                            } else {
                                for (j, d) in dst.iter_mut().enumerate() {
                                    *d = img[first + j * s];
                                }
                            }
                        }
                    }
                }
            });
    }

    /// Add every entry of `cols` [C_in·kh·kw, Ho·Wo] to the pixel of `dx` [C_in, H, W] that
    /// [`Self::im2col`] reads it from (`dx` starts zeroed).
    fn col2im<T: WithDType>(&self, cols: &[T], dx: &mut [T]) {
        let (s, p) = (self.stride, self.padding);
        let row_len = self.out_pixels();
        dx.par_chunks_mut(self.in_pixels())
            .enumerate()
            .for_each(|(c, img)| {
                for ky in 0..self.kh {
                    let ys = self.valid(ky, self.out_h, self.h);
                    for kx in 0..self.kw {
                        let xs = self.valid(kx, self.out_w, self.w);
                        if xs.is_empty() {
                            continue;
                        }
                        let row = &cols[((c * self.kh + ky) * self.kw + kx) * row_len..][..row_len];
                        for oy in ys.clone() {
                            let src = &row[oy * self.out_w..][xs.clone()];
                            let first = (oy * s + ky - p) * self.w + xs.start * s + kx - p;
                            if s == 1 {
                                for (d, &v) in img[first..first + src.len()].iter_mut().zip(src) {
                                    *d += v;
                                }
                            } else {
                                for (j, &v) in src.iter().enumerate() {
                                    img[first + j * s] += v;
                                }
                            }
                        }
                    }
                }
            });
    }
}

/// Column matrices up to this many bytes are kept for the next convolution on the same thread
/// (94 MB is the largest of an SD1.5 step at a 64×64 latent); larger ones are freed after use.
const SCRATCH_KEEP_BYTES: usize = 128 << 20;

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// The float types the ops run on, each with its own per-thread column-matrix buffer.
///
/// The column matrix of a 64×64 convolution is 47–94 MB: above glibc's mmap threshold, so a fresh
/// `vec!` per call maps new pages that the kernel zeroes on first touch (8–14 % of a sampling
/// step in `perf`, `docs/perf.md`). Reusing one buffer per thread skips both the mapping and the
/// zeroing: every user overwrites all of it (im2col writes every entry, padding included; the
/// GEMM into it does not read its destination).
trait ConvFloat: WithDType {
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>>;
}

impl ConvFloat for f32 {
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>> {
        &SCRATCH_F32
    }
}

impl ConvFloat for f64 {
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>> {
        &SCRATCH_F64
    }
}

/// Run `f` on a buffer of `len` elements with arbitrary contents (`f` must overwrite what it
/// reads), taken from this thread's scratch and given back after unless it is very large.
fn with_scratch<T: ConvFloat, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let mut buf = T::scratch().with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        // Grow by replacing: the old contents need no copy.
        buf = vec![T::zero(); len];
    }
    let result = f(&mut buf[..len]);
    if buf.len() * std::mem::size_of::<T>() <= SCRATCH_KEEP_BYTES {
        T::scratch().with(|s| {
            let mut slot = s.borrow_mut();
            // A nested call may have put a buffer back meanwhile: keep the larger.
            if slot.len() < buf.len() {
                *slot = buf;
            }
        });
    }
    result
}

/// A row-major matrix view for [`matmul`]: pointer, rows, columns, row and column strides.
struct Mat<T> {
    ptr: *const T,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<T> Mat<T> {
    fn row_major(data: &[T], rows: usize, cols: usize) -> Self {
        debug_assert!(data.len() >= rows * cols);
        Self {
            ptr: data.as_ptr(),
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    fn transposed(self) -> Self {
        Self {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `dst (+)= lhs·rhs` for a row-major `dst` of `lhs.rows × rhs.cols` (accumulating onto its
/// contents when `accumulate`), on rayon's pool.
fn matmul<T: WithDType>(dst: &mut [T], accumulate: bool, lhs: Mat<T>, rhs: Mat<T>) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert!(
        rhs.rows == k && dst.len() >= m * n,
        "conv matmul: shapes do not fit"
    );
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: `lhs` and `rhs` point into live slices covering their extents (built by
    // `Mat::row_major` from slices of at least rows·cols elements, possibly transposed); `dst` is
    // a distinct, exclusively borrowed slice of at least m·n elements.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// What the two ops share: a per-sample computation on `(data, kernel)` of one float type, run by
/// [`run_on_cpu`] for f32 and f64.
trait PerSampleOp {
    const NAME: &'static str;

    /// The result for `batch` samples of `data`, all contiguous.
    fn run<T: ConvFloat>(
        &self,
        data: &[T],
        batch: usize,
        kernel: &[T],
    ) -> candle_core::Result<Vec<T>>;

    /// The result's shape for `batch` samples.
    fn shape(&self, batch: usize) -> Shape;
}

/// `op` on CPU storages of f32 or f64 (both the same type).
fn run_on_cpu<O: PerSampleOp>(
    op: &O,
    data: &CpuStorage,
    data_layout: &Layout,
    kernel: &CpuStorage,
    kernel_layout: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let batch = data_layout.dims()[0];
    let out = match (data, kernel) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(op.run(
            slice::<f32>(data, data_layout, O::NAME)?,
            batch,
            slice::<f32>(kernel, kernel_layout, O::NAME)?,
        )?),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(op.run(
            slice::<f64>(data, data_layout, O::NAME)?,
            batch,
            slice::<f64>(kernel, kernel_layout, O::NAME)?,
        )?),
        _ => candle_core::bail!(
            "{}: dtypes {:?} and {:?} (need both f32 or both f64)",
            O::NAME,
            data.dtype(),
            kernel.dtype()
        ),
    };
    Ok((out, op.shape(batch)))
}

/// The forward op: `(x, kernel) → conv2d(x, kernel) + bias`.
struct ConvForward {
    geometry: Geometry,
    c_out: usize,
    bias: Option<Tensor>,
}

impl PerSampleOp for ConvForward {
    const NAME: &'static str = "conv2d-gemm";

    fn shape(&self, batch: usize) -> Shape {
        let g = &self.geometry;
        Shape::from((batch, self.c_out, g.out_h, g.out_w))
    }

    fn run<T: ConvFloat>(&self, x: &[T], b: usize, kernel: &[T]) -> candle_core::Result<Vec<T>> {
        let g = &self.geometry;
        let (c_out, out_len) = (self.c_out, self.c_out * g.out_pixels());
        let mut out = vec![T::zero(); b * out_len];
        let bias = match &self.bias {
            Some(bias) => Some(bias.to_vec1::<T>()?),
            None => None,
        };
        let cols_len = if g.is_pointwise() {
            0
        } else {
            g.patch() * g.out_pixels()
        };
        with_scratch(cols_len, |cols: &mut [T]| {
            for (i, y) in out.chunks_mut(out_len).enumerate() {
                if let Some(bias) = &bias {
                    for (row, &v) in y.chunks_mut(g.out_pixels()).zip(bias) {
                        row.fill(v);
                    }
                }
                let sample = &x[i * g.c_in * g.in_pixels()..][..g.c_in * g.in_pixels()];
                let rhs = if g.is_pointwise() {
                    Mat::row_major(sample, g.c_in, g.in_pixels())
                } else {
                    g.im2col(sample, cols);
                    Mat::row_major(cols, g.patch(), g.out_pixels())
                };
                let lhs = Mat::row_major(kernel, c_out, g.patch());
                matmul(y, bias.is_some(), lhs, rhs);
            }
        });
        Ok(out)
    }
}

impl CustomOp2 for ConvForward {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_on_cpu(self, x, x_layout, kernel, kernel_layout)
    }
}

/// The input-gradient op: `(grad, kernel) → ∂L/∂x`.
struct ConvInputGrad {
    geometry: Geometry,
    c_out: usize,
}

impl PerSampleOp for ConvInputGrad {
    const NAME: &'static str = "conv2d-input-grad-gemm";

    fn shape(&self, batch: usize) -> Shape {
        let g = &self.geometry;
        Shape::from((batch, g.c_in, g.h, g.w))
    }

    fn run<T: ConvFloat>(&self, grad: &[T], b: usize, kernel: &[T]) -> candle_core::Result<Vec<T>> {
        let g = &self.geometry;
        let in_len = g.c_in * g.in_pixels();
        let mut dx = vec![T::zero(); b * in_len];
        let cols_len = if g.is_pointwise() {
            0
        } else {
            g.patch() * g.out_pixels()
        };
        with_scratch(cols_len, |cols: &mut [T]| {
            for (i, dx) in dx.chunks_mut(in_len).enumerate() {
                let gi = &grad[i * self.c_out * g.out_pixels()..][..self.c_out * g.out_pixels()];
                let lhs = Mat::row_major(kernel, self.c_out, g.patch()).transposed();
                let rhs = Mat::row_major(gi, self.c_out, g.out_pixels());
                if g.is_pointwise() {
                    matmul(dx, false, lhs, rhs);
                } else {
                    // Overwrites all of `cols` (the GEMM does not read its destination).
                    matmul(cols, false, lhs, rhs);
                    g.col2im(cols, dx);
                }
            }
        });
        Ok(dx)
    }
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_on_cpu(self, grad, grad_layout, kernel, kernel_layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn valid_ranges_keep_exactly_the_in_image_taps() {
        for (h, k, s, p) in [
            (8, 3, 1, 1),
            (9, 3, 2, 1),
            (8, 3, 2, 1),
            (5, 1, 1, 0),
            (7, 4, 3, 2),
        ] {
            let g = Geometry::new((1, h, h), (k, k), p, s).unwrap();
            for tap in 0..k {
                let range = g.valid(tap, g.out_h, h);
                for o in 0..g.out_h {
                    let inside = o * s + tap >= p && o * s + tap - p < h;
                    assert_eq!(
                        inside,
                        range.contains(&o),
                        "h{h} k{k} s{s} p{p} tap{tap} o{o}"
                    );
                }
            }
        }
    }

    #[test]
    fn forward_matches_candle_on_odd_shapes() {
        let dev = Device::Cpu;
        // (batch, c_in, c_out, h, w, k, stride, padding)
        for (b, ci, co, h, w, k, s, p) in [
            (2, 3, 5, 7, 9, 3, 1, 1),
            (1, 4, 2, 9, 8, 3, 2, 1),
            (2, 2, 3, 6, 6, 1, 1, 0),
            (1, 3, 2, 7, 5, 1, 2, 1),
            (2, 2, 2, 8, 7, 5, 3, 2),
            (1, 1, 1, 3, 3, 3, 1, 0),
        ] {
            let x = Tensor::randn(0f64, 1., (b, ci, h, w), &dev).unwrap();
            let kern = Tensor::randn(0f64, 1., (co, ci, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f64, 1., co, &dev).unwrap();
            let ours = conv2d(&x, &kern, Some(&bias), p, s).unwrap();
            let stock = x
                .conv2d(&kern, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let diff = (ours - &stock).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f64>().unwrap();
            assert!(diff < 1e-12, "[{b},{ci},{h},{w}] k{k} s{s} p{p}: {diff:e}");
        }
    }

    /// The reused column buffer may hold anything: poisoned with NaN (and bigger than needed),
    /// both ops still give candle's values, so every entry they read was written first.
    #[test]
    fn stale_scratch_contents_never_leak_into_results() {
        let dev = Device::Cpu;
        // Sizes where candle's own strided backward needs no output padding (its reference).
        for (b, ci, co, h, w, k, s, p) in [
            (2, 3, 5, 7, 9, 3, 1, 1),
            (1, 4, 2, 9, 9, 3, 2, 1),
            (2, 2, 2, 7, 7, 5, 2, 2),
            (1, 2, 3, 4, 4, 3, 1, 0),
        ] {
            SCRATCH_F64.with(|sc| *sc.borrow_mut() = vec![f64::NAN; 4096]);
            let x = Tensor::randn(0f64, 1., (b, ci, h, w), &dev).unwrap();
            let kern = Tensor::randn(0f64, 1., (co, ci, k, k), &dev).unwrap();
            let ours = conv2d(&x, &kern, None, p, s).unwrap();
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let stock = xv.as_tensor().conv2d(&kern, p, s, 1, 1).unwrap();
            let diff = (&ours - &stock).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                diff.to_scalar::<f64>().unwrap() < 1e-12,
                "forward k{k} s{s} p{p}"
            );

            SCRATCH_F64.with(|sc| *sc.borrow_mut() = vec![f64::NAN; 4096]);
            let g = Tensor::randn(0f64, 1., stock.dims(), &dev).unwrap();
            let grads = (&stock * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let want = grads.get(xv.as_tensor()).unwrap();
            let dx = conv2d_input_grad((b, ci, h, w), &g, &kern, p, s).unwrap();
            let diff = (&dx - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                diff.to_scalar::<f64>().unwrap() < 1e-12,
                "input grad k{k} s{s} p{p}"
            );
        }
    }
}
