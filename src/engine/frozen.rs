//! Linear and convolution layers with frozen weights whose backward computes only the input
//! gradient.
//!
//! candle's `Tensor::backward` computes a gradient for both operands of every matmul and
//! convolution, and for both sides of every add, also when an operand is a plain (non-`Var`)
//! tensor such as a frozen base weight. For LoRA training that is wasted work and memory: the
//! weight gradient costs as much as the input gradient, and the stock graph also keeps the
//! pre-bias product alive until backward. (See `shared/CANDLE.md`: skipping frozen operands halves
//! backward time and memory.)
//!
//! [`frozen_linear`] and [`frozen_conv2d`] compute the layer's output with the untracked ops on a
//! detached input, so the value is exactly what inference computes, and attach it to the graph as
//! a [`CustomOp1`] of the input alone. Its backward returns only the input gradient (`grad·W` for
//! a linear layer; for a convolution a GEMM + col2im on the CPU, see [`crate::engine::conv`],
//! and candle's transposed convolution elsewhere); the weight and bias never enter the graph and
//! get no gradient entry.
//!
//! Use them only where the input tracks gradients (`x.track_op()`): for inference the plain ops
//! are cheaper (the custom op copies the output once). A weight or bias that tracks gradients
//! itself (a `Var`, e.g. in full fine-tuning) is never treated as frozen: the functions fall back
//! to the plain ops so that its gradient is kept.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, MetalStorage, Shape, Storage, Tensor,
};

use crate::engine::conv;
use crate::error::Result;

/// `x·wᵀ + b` over the last axis of `x` (rank ≥ 2; leading axes folded into one matmul) with `w`
/// [out, in] and `b` \[out\] frozen: backward yields a gradient for `x` only.
///
/// The value equals the plain op's (same candle ops on the same data). When `w` or `b` tracks
/// gradients itself, the plain op is used so that its gradient is not dropped.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if w.track_op() || b.is_some_and(Tensor::track_op) {
        return Ok(plain_linear(x, w, b)?);
    }
    let out = plain_linear(&x.detach(), w, b)?;
    attach(x, out, Backward::Linear { weight: w.clone() })
}

/// A 2-D convolution of `x` [B, C_in, H, W] with the frozen `kernel` [C_out, C_in, kh, kw] and
/// frozen `bias` \[C_out\] (dilation 1, one group): backward yields a gradient for `x` only.
///
/// The value equals the untracked op's ([`crate::engine::conv::conv2d`] on the CPU, candle's
/// convolution elsewhere). When `kernel` or `bias`
/// tracks gradients itself, the plain op is used so that its gradient is not dropped.
pub fn frozen_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if kernel.track_op() || bias.is_some_and(Tensor::track_op) {
        return Ok(plain_conv2d(x, kernel, bias, padding, stride)?);
    }
    let out = plain_conv2d(&x.detach(), kernel, bias, padding, stride)?;
    attach(
        x,
        out,
        Backward::Conv2d {
            kernel: kernel.clone(),
            padding,
            stride,
        },
    )
}

/// `x·wᵀ + b + h·upᵀ` over the last axis with `w` [out, in] and `b` \[out\] frozen: a LoRA layer
/// whose adapters' down-projections (and scales) are already applied, `h` [.., R] being the
/// scaled `A·x` of every active adapter side by side and `up` [out, R] their up-projections
/// side by side.
///
/// One graph node instead of four per adapter (base output, `B·h`, its scaled copy, the sum):
/// the composed form keeps all of them alive until backward, which at SD1.5 size was about a
/// quarter of a training step's activation memory. Backward gives `x` the base layer's input
/// gradient `grad·W`, `h` the gradient `grad·up` (which flows on to `x` through `h`'s own graph)
/// and `up` the gradient `gradᵀ·h`, each only where that operand tracks gradients. When `w` or
/// `b` tracks gradients itself, or dtypes differ, the composed ops are used.
pub fn frozen_lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    h: &Tensor,
    up: &Tensor,
) -> Result<Tensor> {
    let composed = w.track_op()
        || b.is_some_and(Tensor::track_op)
        || h.dtype() != x.dtype()
        || up.dtype() != x.dtype();
    if composed {
        let y = if x.track_op() {
            frozen_linear(x, w, b)?
        } else {
            plain_linear(x, w, b)?
        };
        return Ok((y + plain_linear(h, up, None)?)?);
    }
    let out = (plain_linear(&x.detach(), w, b)? + plain_linear(&h.detach(), &up.detach(), None)?)?;
    let op = LoraOp {
        input_shape: x.shape().clone(),
        output: Precomputed::new("frozen-lora-linear", out)?,
        weight: w.clone(),
    };
    Ok(x.apply_op3(h, up, op)?)
}

/// The custom op of [`frozen_lora_linear`]: forward hands over the precomputed output, backward
/// returns the gradients of `x`, `h` and `up` that are tracked.
struct LoraOp {
    input_shape: Shape,
    output: Precomputed,
    /// The frozen base weight [out, in].
    weight: Tensor,
}

impl LoraOp {
    fn check_input(&self, layout: &Layout) -> candle_core::Result<()> {
        check_input_shape("frozen-lora-linear", &self.input_shape, layout)
    }
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "frozen-lora-linear"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check_input(l1)?;
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _s1: &CudaStorage,
        l1: &Layout,
        _s2: &CudaStorage,
        _l2: &Layout,
        _s3: &CudaStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.check_input(l1)?;
        self.output.cuda()
    }

    fn metal_fwd(
        &self,
        _s1: &MetalStorage,
        l1: &Layout,
        _s2: &MetalStorage,
        _l2: &Layout,
        _s3: &MetalStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.check_input(l1)?;
        self.output.metal()
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // y = x·Wᵀ + h·upᵀ over the folded leading axes.
        let out_dim = self.weight.dim(0)?;
        let rows = grad.elem_count() / out_dim.max(1);
        let g = grad.reshape((rows, out_dim))?;
        let dx = if x.track_op() {
            Some(g.matmul(&self.weight)?.reshape(x.dims())?)
        } else {
            None
        };
        let dh = if h.track_op() {
            Some(g.matmul(&up.detach())?.reshape(h.dims())?)
        } else {
            None
        };
        let dup = if up.track_op() {
            let r = h.dim(h.rank() - 1)?;
            Some(g.t()?.matmul(&h.detach().reshape((rows, r))?)?)
        } else {
            None
        };
        Ok((dx, dh, dup))
    }
}

/// `x·wᵀ + b` over the last axis of `x` (rank ≥ 2), folding leading axes into one matmul: the
/// plain op every layer uses when no gradient is tracked.
pub(crate) fn plain_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        candle_core::bail!("linear: input of rank {} (need ≥ 2)", dims.len());
    }
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    y.reshape(out_dims)
}

/// The convolution with a per-channel bias, as `nn::Conv2d` computes it when no gradient is
/// tracked: [`conv::conv2d`] on the CPU (f32/f64) when nothing tracks gradients, candle's ops
/// otherwise (they keep a trainable kernel's or input's gradient).
pub(crate) fn plain_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let untracked = !x.track_op() && !kernel.track_op() && !bias.is_some_and(Tensor::track_op);
    if untracked && conv::supported(x) && conv::supported(kernel) && x.dtype() == kernel.dtype() {
        return conv::conv2d(x, kernel, bias, padding, stride);
    }
    let y = x.conv2d(kernel, padding, stride, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// How the input gradient is computed from the output gradient.
enum Backward {
    /// `grad_x = grad·W` with `W` [out, in].
    Linear { weight: Tensor },
    /// `grad_x = conv_transpose2d(grad, K)` with the forward's stride and padding.
    Conv2d {
        kernel: Tensor,
        padding: usize,
        stride: usize,
    },
}

/// The custom op: its forward hands over the precomputed output, its backward returns the input
/// gradient only.
struct FrozenOp {
    name: &'static str,
    /// The input's shape at construction (checked in the forward).
    input_shape: Shape,
    /// The output, computed before the op is applied and taken by its forward (so that the op,
    /// which lives in the graph until backward, does not keep a second copy of it).
    output: Precomputed,
    backward: Backward,
}

/// The output of a custom op computed beforehand with untracked ops, handed over once by the op's
/// forward as an owned storage (one copy); a second forward is an error. Used by [`FrozenOp`]
/// and by [`super::attention_blockwise`].
pub(crate) struct Precomputed {
    name: &'static str,
    slot: Mutex<Option<Tensor>>,
}

impl Precomputed {
    /// Hold `out` for the forward of the op `name` (made contiguous from offset 0 first, which
    /// is what a forward must return).
    pub(crate) fn new(name: &'static str, out: Tensor) -> candle_core::Result<Self> {
        let out = if out.is_contiguous() && out.layout().start_offset() == 0 {
            out
        } else {
            out.force_contiguous()?
        };
        Ok(Self {
            name,
            slot: Mutex::new(Some(out)),
        })
    }

    fn take(&self) -> candle_core::Result<(Storage, Shape)> {
        let out = self
            .slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(out) = out else {
            candle_core::bail!("{}: forward run twice", self.name);
        };
        let (storage, out_layout) = out.storage_and_layout();
        let storage = storage.try_clone(out_layout)?;
        Ok((storage, out.shape().clone()))
    }

    fn wrong_device(&self, expected: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: output is not on the {expected} device of its input",
            self.name
        ))
    }

    /// The output for a CPU forward.
    pub(crate) fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => Err(self.wrong_device("cpu")),
        }
    }

    /// The output for a CUDA forward.
    pub(crate) fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        match self.take()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => Err(self.wrong_device("cuda")),
        }
    }

    /// The output for a Metal forward.
    pub(crate) fn metal(&self) -> candle_core::Result<(MetalStorage, Shape)> {
        match self.take()? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => Err(self.wrong_device("metal")),
        }
    }
}

/// Apply a [`FrozenOp`] to `x` that outputs `out` and back-propagates through `backward`.
fn attach(x: &Tensor, out: Tensor, backward: Backward) -> Result<Tensor> {
    let name = match backward {
        Backward::Linear { .. } => "frozen-linear",
        Backward::Conv2d { .. } => "frozen-conv2d",
    };
    let op = FrozenOp {
        name,
        input_shape: x.shape().clone(),
        output: Precomputed::new(name, out)?,
        backward,
    };
    Ok(x.apply_op1(op)?)
}

impl FrozenOp {
    /// The forward must see the input it was built for.
    fn check_input(&self, layout: &Layout) -> candle_core::Result<()> {
        check_input_shape(self.name, &self.input_shape, layout)
    }
}

/// A custom op's forward must see the input shape it was built for (its output was computed
/// beforehand from that input).
fn check_input_shape(name: &str, built_for: &Shape, layout: &Layout) -> candle_core::Result<()> {
    if layout.shape() != built_for {
        candle_core::bail!(
            "{name}: applied to an input of shape {:?}, built for {built_for:?}",
            layout.shape()
        );
    }
    Ok(())
}

impl CustomOp1 for FrozenOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check_input(layout)?;
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.check_input(layout)?;
        self.output.cuda()
    }

    fn metal_fwd(
        &self,
        _storage: &MetalStorage,
        layout: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.check_input(layout)?;
        self.output.metal()
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad_arg = match &self.backward {
            Backward::Linear { weight } => {
                // y = x·Wᵀ  ⇒  ∂L/∂x = ∂L/∂y · W, over the folded leading axes.
                let dims = arg.dims();
                let out_dim = weight.dim(0)?;
                let rows: usize = dims[..dims.len() - 1].iter().product();
                grad.reshape((rows, out_dim))?
                    .matmul(weight)?
                    .reshape(dims)?
            }
            Backward::Conv2d {
                kernel,
                padding,
                stride,
            } => conv2d_input_grad(arg, grad, kernel, *padding, *stride)?,
        };
        Ok(Some(grad_arg))
    }
}

/// Gradient of `conv2d(x, kernel, padding, stride)` with respect to `x`: on the CPU (f32/f64) a
/// GEMM and a col2im scatter ([`crate::engine::conv_grad`]), elsewhere the transposed
/// convolution of `grad` with the same kernel, stride and padding.
///
/// A strided convolution maps several input sizes to the same output size; the transposed one
/// recovers the input size through `output_padding` (candle's own backward computes it from the
/// height only). Here it is computed per axis, the larger one used, and the surplus row or column
/// cut off: the extra padding only appends outputs and leaves the others unchanged.
fn conv2d_input_grad(
    x: &Tensor,
    grad: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    if conv::supported(grad) && conv::supported(kernel) {
        return conv::conv2d_input_grad(x.dims4()?, grad, kernel, padding, stride);
    }
    let (_, _, h, w) = x.dims4()?;
    let (_, _, gh, gw) = grad.dims4()?;
    let (_, _, kh, kw) = kernel.dims4()?;
    // Size of the transposed convolution without output padding:
    // (g − 1)·stride + (k − 1) + 1 − 2·padding; the output padding makes up the rest.
    let missing = |size: usize, g: usize, k: usize| -> candle_core::Result<usize> {
        let Some(g1) = g.checked_sub(1) else {
            candle_core::bail!("frozen-conv2d backward: empty output gradient");
        };
        let full = g1 * stride + k;
        let base = full.saturating_sub(2 * padding);
        match size.checked_sub(base) {
            Some(m) if m < stride.max(1) => Ok(m),
            _ => candle_core::bail!(
                "frozen-conv2d backward: input side {size} does not fit output side {g} \
                 (kernel {k}, stride {stride}, padding {padding})"
            ),
        }
    };
    let output_padding = missing(h, gh, kh)?.max(missing(w, gw, kw)?);
    let g = grad.conv_transpose2d(kernel, padding, output_padding, stride, 1)?;
    let (_, _, oh, ow) = g.dims4()?;
    if oh == h && ow == w {
        Ok(g)
    } else {
        g.narrow(2, 0, h)?.narrow(3, 0, w)
    }
}
