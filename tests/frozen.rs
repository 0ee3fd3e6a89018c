//! Frozen-weight linear and convolution ops (`engine::frozen`): same values as the plain candle
//! ops, the same input gradient as candle's own backward, and no gradient entry for the weights.
//!
//! Tolerances: forward 1e-6 relative (linear layers run the same candle ops on the same data, so
//! the difference is 0; CPU convolutions are im2col + GEMM, `engine::conv`, equal to candle's up to
//! summation order: a few f32 ulps); input gradient 1e-5 relative (a GEMM + col2im for
//! convolutions instead of candle's transposed convolution: rounding differences of a few ulps
//! over sums of up to C_out·k² terms). The convolution gradient is also checked against an
//! exact reference built without candle's backward (the convolution applied to every basis
//! vector), which catches errors that candle's backward shares; it covers strided convolutions
//! whose input sides have different parities, where candle's own backward fails.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use common::rel_err;
use pairstyle::engine::frozen::{frozen_conv2d, frozen_linear};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// A standard-normal tensor of `shape` from `rng`.
fn randn(rng: &mut StdRng, shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A nonlinear downstream loss so that the output gradient is not constant.
fn loss(y: &Tensor, r: &Tensor) -> Tensor {
    (y.tanh().unwrap() * r).unwrap().sum_all().unwrap()
}

fn stock_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x
        .reshape((rows, in_dim))
        .unwrap()
        .matmul(&w.t().unwrap())
        .unwrap();
    let y = match b {
        Some(b) => y.broadcast_add(b).unwrap(),
        None => y,
    };
    let mut out = dims.to_vec();
    *out.last_mut().unwrap() = w.dim(0).unwrap();
    y.reshape(out).unwrap()
}

fn stock_conv(x: &Tensor, k: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Tensor {
    let y = x.conv2d(k, padding, stride, 1, 1).unwrap();
    match b {
        Some(b) => y
            .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
            .unwrap(),
        None => y,
    }
}

/// Shapes of the gradient entries in `store`.
fn entry_shapes(store: &GradStore) -> Vec<Vec<usize>> {
    store
        .get_ids()
        .map(|id| store.get_id(*id).unwrap().dims().to_vec())
        .collect()
}

/// Max relative forward and gradient errors, and the checks on the gradient store.
///
/// `weights` are the frozen operands; `weight_grad_shape` is the shape in which stock candle
/// stores the weight gradient (the kernel for a convolution, `wᵀ` [in, out] for a linear layer,
/// whose matmul takes the transposed weight). In the frozen graph every gradient entry must have
/// the shape of the input, of one of `views` (ops between the `Var` and the layer), of the output
/// or of the scalar loss: no weight gradient under any name.
#[allow(clippy::too_many_arguments)]
fn compare(
    what: &str,
    x: &Var,
    frozen: &Tensor,
    stock: &Tensor,
    r: &Tensor,
    weights: &[&Tensor],
    weight_grad_shape: &[usize],
    views: &[&[usize]],
) -> (f64, f64) {
    let fwd = rel_err(frozen, stock);
    let g_frozen = loss(frozen, r).backward().unwrap();
    let g_stock = loss(stock, r).backward().unwrap();
    let gx = g_frozen.get(x).expect("input gradient missing");
    let gs = g_stock.get(x).unwrap();
    let grad = rel_err(gx, gs);
    for (i, w) in weights.iter().enumerate() {
        assert!(
            g_frozen.get(w).is_none(),
            "{what}: frozen operand {i} got a gradient"
        );
    }
    let mut allowed: Vec<&[usize]> = vec![x.dims(), frozen.dims(), &[]];
    allowed.extend_from_slice(views);
    for shape in entry_shapes(&g_frozen) {
        assert!(
            allowed.contains(&shape.as_slice()),
            "{what}: unexpected gradient entry of shape {shape:?}"
        );
    }
    // Control: stock candle does store a weight gradient, so the checks above are not vacuous.
    assert!(
        entry_shapes(&g_stock)
            .iter()
            .any(|s| s.as_slice() == weight_grad_shape),
        "{what}: control failed, no stock entry of shape {weight_grad_shape:?}"
    );
    assert!(fwd <= 1e-6, "{what}: forward differs by {fwd:.3e}");
    assert!(grad <= 1e-5, "{what}: input gradient differs by {grad:.3e}");
    (fwd, grad)
}

#[test]
fn linear_matches_stock_and_skips_weight_gradients() {
    let mut rng = StdRng::seed_from_u64(7);
    let shapes: [&[usize]; 5] = [&[5, 7], &[3, 4, 9], &[2, 3, 5, 6], &[1, 1, 3], &[2, 17, 33]];
    let mut worst = (0f64, 0f64);
    for dtype in [DType::F32, DType::F64] {
        for (i, shape) in shapes.iter().enumerate() {
            let in_dim = *shape.last().unwrap();
            let out_dim = 3 + 4 * i;
            let x = Var::from_tensor(&randn(&mut rng, shape, dtype)).unwrap();
            let w = randn(&mut rng, &[out_dim, in_dim], dtype);
            let b = randn(&mut rng, &[out_dim], dtype);
            for bias in [None, Some(&b)] {
                let frozen = frozen_linear(x.as_tensor(), &w, bias).unwrap();
                let stock = stock_linear(x.as_tensor(), &w, bias);
                let r = randn(&mut rng, stock.dims(), dtype);
                let mut ws = vec![&w];
                ws.extend(bias);
                let what = format!(
                    "linear {dtype:?} {shape:?}→{out_dim} bias {}",
                    bias.is_some()
                );
                let (f, g) = compare(&what, &x, &frozen, &stock, &r, &ws, &[in_dim, out_dim], &[]);
                println!("{what}: forward {f:.1e}, input grad {g:.1e}");
                worst = (worst.0.max(f), worst.1.max(g));
            }
        }
    }
    println!(
        "linear worst: forward {:.1e}, input grad {:.1e}",
        worst.0, worst.1
    );
}

#[test]
fn linear_on_strided_views() {
    // A transposed input, a contiguous view at a nonzero offset, and a narrowed last axis (as
    // GEGLU's chunks).
    let mut rng = StdRng::seed_from_u64(11);
    let w = randn(&mut rng, &[6, 5], DType::F64);
    let b = randn(&mut rng, &[6], DType::F64);
    let base = Var::from_tensor(&randn(&mut rng, &[2, 5, 5], DType::F64)).unwrap();
    let t = base.as_tensor();
    let views = [
        t.transpose(1, 2).unwrap(),
        Tensor::cat(&[t, t], 0).unwrap().narrow(0, 1, 2).unwrap(),
        Tensor::cat(&[t, t], 2).unwrap().narrow(2, 3, 5).unwrap(),
    ];
    for (i, v) in views.iter().enumerate() {
        let frozen = frozen_linear(v, &w, Some(&b)).unwrap();
        let stock = stock_linear(v, &w, Some(&b));
        let r = randn(&mut rng, stock.dims(), DType::F64);
        let views: [&[usize]; 3] = [&[2, 5, 5], &[4, 5, 5], &[2, 5, 10]];
        let what = format!("view {i}");
        let (f, g) = compare(
            &what,
            &base,
            &frozen,
            &stock,
            &r,
            &[&w, &b],
            &[5, 6],
            &views,
        );
        println!("linear view {i}: forward {f:.1e}, input grad {g:.1e}");
    }
}

/// Exact input gradient of `sum(conv2d(x, k) · r)` for a single-sample `x` [1, C, H, W]: the
/// convolution applied to every basis image, contracted with `r` (no backward involved).
fn conv_grad_by_basis(
    shape: (usize, usize, usize),
    k: &Tensor,
    r: &Tensor,
    padding: usize,
    stride: usize,
) -> Tensor {
    let (c, h, w) = shape;
    let n = c * h * w;
    let basis = Tensor::eye(n, k.dtype(), &Device::Cpu)
        .unwrap()
        .reshape((n, c, h, w))
        .unwrap();
    let y = basis.conv2d(k, padding, stride, 1, 1).unwrap();
    y.broadcast_mul(r)
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .sum(1)
        .unwrap()
        .reshape((1, c, h, w))
        .unwrap()
}

#[test]
fn conv2d_matches_stock_and_skips_weight_gradients() {
    let mut rng = StdRng::seed_from_u64(3);
    // (batch, c_in, c_out, h, w, kernel, stride, padding)
    let cases = [
        (2, 3, 5, 7, 7, 3, 1, 1),
        (1, 4, 2, 9, 9, 3, 2, 1),
        (2, 3, 4, 8, 8, 3, 2, 1),
        (1, 2, 3, 5, 7, 3, 1, 0),
        (2, 5, 3, 6, 8, 1, 1, 0),
        (1, 3, 3, 7, 5, 1, 2, 0),
        (1, 2, 4, 9, 11, 3, 2, 0),
        (2, 3, 2, 6, 10, 3, 2, 1),
        (1, 4, 4, 5, 5, 1, 1, 1),
    ];
    let mut worst = (0f64, 0f64);
    for dtype in [DType::F32, DType::F64] {
        for &(bs, ci, co, h, w, k, s, p) in &cases {
            let x = Var::from_tensor(&randn(&mut rng, &[bs, ci, h, w], dtype)).unwrap();
            let kernel = randn(&mut rng, &[co, ci, k, k], dtype);
            let bias = randn(&mut rng, &[co], dtype);
            for b in [None, Some(&bias)] {
                let frozen = frozen_conv2d(x.as_tensor(), &kernel, b, p, s).unwrap();
                let stock = stock_conv(x.as_tensor(), &kernel, b, p, s);
                let r = randn(&mut rng, stock.dims(), dtype);
                let mut ws = vec![&kernel];
                ws.extend(b);
                let what = format!(
                    "conv {dtype:?} [{bs},{ci},{h},{w}] k{k} s{s} p{p} → {co}, bias {}",
                    b.is_some()
                );
                let (f, g) = compare(&what, &x, &frozen, &stock, &r, &ws, kernel.dims(), &[]);
                println!("{what}: forward {f:.1e}, input grad {g:.1e}");
                worst = (worst.0.max(f), worst.1.max(g));
            }
        }
    }
    println!(
        "conv worst: forward {:.1e}, input grad {:.1e}",
        worst.0, worst.1
    );
}

#[test]
fn conv2d_input_gradient_is_exact_including_mixed_parity() {
    // Includes strided convolutions whose height and width differ in parity (candle's own
    // backward picks one output padding from the height and fails on these).
    let mut rng = StdRng::seed_from_u64(5);
    let cases = [
        (3, 4, 9, 8, 3, 2, 1),
        (2, 3, 8, 9, 3, 2, 1),
        (2, 2, 7, 10, 1, 2, 0),
        (3, 2, 7, 7, 3, 1, 1),
        (2, 3, 10, 6, 3, 2, 0),
        (2, 2, 6, 7, 3, 3, 1),
        (2, 3, 9, 7, 5, 2, 2),
        (2, 2, 6, 6, 2, 1, 0),
        (2, 3, 5, 4, 3, 1, 2),
    ];
    let mut worst = 0f64;
    for &(ci, co, h, w, k, s, p) in &cases {
        let x = Var::from_tensor(&randn(&mut rng, &[1, ci, h, w], DType::F64)).unwrap();
        let kernel = randn(&mut rng, &[co, ci, k, k], DType::F64);
        let bias = randn(&mut rng, &[co], DType::F64);
        let y = frozen_conv2d(x.as_tensor(), &kernel, Some(&bias), p, s).unwrap();
        let r = randn(&mut rng, y.dims(), DType::F64);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let ours = grads.get(&x).unwrap();
        let exact = conv_grad_by_basis((ci, h, w), &kernel, &r, p, s);
        let e = rel_err(ours, &exact);
        println!("conv [{ci},{h},{w}] k{k} s{s} p{p}: input grad vs exact {e:.1e}");
        assert!(e <= 1e-12, "conv [{ci},{h},{w}] k{k} s{s} p{p}: {e:.3e}");
        assert!(grads.get(&kernel).is_none() && grads.get(&bias).is_none());
        worst = worst.max(e);
    }
    println!("conv vs exact worst: {worst:.1e}");
}

#[test]
fn untracked_input_gives_plain_values() {
    let mut rng = StdRng::seed_from_u64(9);
    let x = randn(&mut rng, &[2, 3, 6, 6], DType::F32);
    let k = randn(&mut rng, &[4, 3, 3, 3], DType::F32);
    let b = randn(&mut rng, &[4], DType::F32);
    let y = frozen_conv2d(&x, &k, Some(&b), 1, 2).unwrap();
    assert!(!y.track_op());
    // The CPU convolution is im2col + GEMM (`engine::conv`): candle's values up to summation order.
    assert!(rel_err(&y, &stock_conv(&x, &k, Some(&b), 1, 2)) <= 1e-6);
    let w = randn(&mut rng, &[5, 6], DType::F32);
    let y = frozen_linear(&x, &w, None).unwrap();
    assert_eq!(rel_err(&y, &stock_linear(&x, &w, None)), 0.0);
}

#[test]
fn trainable_weights_keep_their_gradient() {
    // A weight that is a Var is not frozen: the plain op runs and its gradient is kept.
    let mut rng = StdRng::seed_from_u64(13);
    let x = Var::from_tensor(&randn(&mut rng, &[3, 4], DType::F64)).unwrap();
    let w = Var::from_tensor(&randn(&mut rng, &[2, 4], DType::F64)).unwrap();
    let y = frozen_linear(x.as_tensor(), w.as_tensor(), None).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_some() && g.get(&w).is_some());
    let xc = Var::from_tensor(&randn(&mut rng, &[1, 2, 5, 5], DType::F64)).unwrap();
    let k = Var::from_tensor(&randn(&mut rng, &[3, 2, 3, 3], DType::F64)).unwrap();
    let y = frozen_conv2d(xc.as_tensor(), k.as_tensor(), None, 1, 1).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&xc).is_some() && g.get(&k).is_some());
}
