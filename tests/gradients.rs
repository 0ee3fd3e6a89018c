//! The gradient test of Pair Customization (issue 3, "How it is proven"): on the tiny fixture
//! UNets in f64, the back-propagated gradients of every adapter's up-projection B match central
//! finite differences, for every adapter layer; and no frozen weight gets a gradient.
//!
//! Setup: an adapter "style" on every attention projection (`to_q`, `to_k`, `to_v`, `to_out.0`
//! of attn1 and attn2) with a fixed random A [r, in] and a random, nonzero B [out, r] held in a
//! `Var`; loss = MSE(unet(x, t, ctx), target) on the first sample of the fixture's inputs (one
//! sample keeps the ~600 forward passes of the finite differences within CI time) and a fixed
//! random target. Per layer two entries of B are probed: its largest-gradient entry and a random
//! one.
//!
//! Error measure, per layer: max over the probed entries of |backprop − finite difference|,
//! divided by the largest |backprop| entry of that layer's B gradient (the max-norm relative error
//! of `common::rel_err`, restricted to the probed entries).
//!
//! Tolerance 1e-5, and why it is tight enough: a wrong or missing gradient path (what this test
//! exists to catch: candle's fused softmax or layer norm silently cutting the graph, see
//! `shared/CANDLE.md`, or a frozen-weight op returning a wrong input gradient) gives errors of
//! order 1. What legitimately remains, measured: (a) rounding in the central difference, about
//! ε·|L|/h ≈ 1e-16·1.5/1e-5 ≈ 1.5e-11 absolute, i.e. ≈ 1e-8 of the gradient scale (≥ 1e-3 here);
//! with h = 1e-6 it is ten times larger and reaches 2e-6, hence h = 1e-5; the truncation error
//! h²·|L'''| is below 1e-9; (b) a systematic ≈ 1e-7: candle's `gelu_erf` backward uses 0.398942
//! for 1/√(2π) (relative error 7e-7 in that term), so its gradient is not exactly the derivative
//! of its forward. 1e-5 leaves two orders of magnitude above both.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, get, refs};
use pairstyle::engine::model_dir::{ModelDir, Variant};
use pairstyle::engine::nn::{AdapterScales, LowRankAdapter};
use pairstyle::engine::unet::{AddedCond, UNet};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

const RANK: usize = 2;
const BATCH: usize = 1;
/// Random entries of B probed by finite differences per layer, besides the largest-gradient entry
/// (few, to keep the test fast; every layer is covered).
const RANDOM_PROBES: usize = 1;
const STEP: f64 = 1e-5;
const TOLERANCE: f64 = 1e-5;

fn randn(rng: &mut StdRng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            scale * z
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

struct Setup {
    unet: UNet,
    /// (module path, B) per adapter layer.
    ups: Vec<(String, Var)>,
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    added: Option<AddedCond>,
    target: Tensor,
    scales: AdapterScales,
}

impl Setup {
    fn new(model: &str, seed: u64) -> Self {
        let dir = ModelDir::open(fixture(model)).unwrap();
        let mut unet = UNet::load(&dir, Variant::Auto, DType::F64, &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ups = Vec::new();
        for lin in unet.adaptable_linears_mut() {
            let (in_dim, out_dim) = lin.dims();
            let down = randn(&mut rng, &[RANK, in_dim], 1.0 / (in_dim as f64).sqrt());
            let up = Var::from_tensor(&randn(&mut rng, &[out_dim, RANK], 0.1)).unwrap();
            lin.set_adapter(
                "style",
                LowRankAdapter {
                    down,
                    up: up.as_tensor().clone(),
                    alpha_over_rank: 0.5,
                },
            )
            .unwrap();
            ups.push((lin.path().to_string(), up));
        }
        let r = refs(model);
        let f64_batch = |name: &str| {
            get(&r, name)
                .narrow(0, 0, BATCH)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let sample = f64_batch("unet.sample");
        let added = r.get("unet.text_embeds").map(|_| AddedCond {
            text_embeds: f64_batch("unet.text_embeds"),
            time_ids: f64_batch("unet.time_ids"),
        });
        let target = randn(&mut rng, sample.dims(), 1.0);
        let mut scales = AdapterScales::none();
        scales.set(
            "style",
            Tensor::ones(BATCH, DType::F64, &Device::Cpu).unwrap(),
        );
        Self {
            unet,
            ups,
            timesteps: f64_batch("unet.timesteps"),
            context: f64_batch("unet.encoder_hidden_states"),
            sample,
            added,
            target,
            scales,
        }
    }

    fn loss(&self) -> Tensor {
        let out = self
            .unet
            .forward(
                &self.sample,
                &self.timesteps,
                &self.context,
                self.added.as_ref(),
                &self.scales,
            )
            .unwrap();
        (out - &self.target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    }

    fn loss_value(&self) -> f64 {
        self.loss().to_scalar::<f64>().unwrap()
    }
}

/// Set entry (i, j) of `var` to `value`.
fn set_entry(var: &Var, i: usize, j: usize, value: f64) {
    let mut m = var.as_tensor().to_vec2::<f64>().unwrap();
    m[i][j] = value;
    let t = Tensor::new(m, &Device::Cpu).unwrap();
    var.set(&t).unwrap();
}

/// Shapes of every gradient entry in `grads`.
fn entry_shapes(grads: &GradStore) -> Vec<Vec<usize>> {
    grads
        .get_ids()
        .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
        .collect()
}

/// Returns the worst per-layer relative error.
fn check(model: &str, seed: u64) -> f64 {
    let s = Setup::new(model, seed);
    let grads = s.loss().backward().unwrap();

    // Frozen weights get no gradient: the output convolution (downstream of every adapter, so
    // stock candle would compute its kernel gradient) and the base weights of the adapted layers.
    assert!(
        grads.get(s.unet.conv_out().weight()).is_none(),
        "{model}: conv_out.weight got a gradient"
    );
    for lin in s.unet.adaptable_linears() {
        assert!(
            grads.get(lin.base().weight()).is_none(),
            "{model}: {} base weight got a gradient",
            lin.path()
        );
    }
    // Nor under another name: stock candle stores a linear weight's gradient as the transposed
    // weight [in, out] (its matmul operand) and a convolution's as the kernel [out, in, k, k].
    // Activations here are rank 3 or 4 with a batch or token axis, so no entry of rank 4 ending
    // in a 1×1 or 3×3 window and no rank-2 entry [in, out] of a base layer may appear.
    let base_t: Vec<Vec<usize>> = s
        .unet
        .adaptable_linears()
        .iter()
        .map(|l| {
            let (i, o) = l.dims();
            vec![i, o]
        })
        .collect();
    for shape in entry_shapes(&grads) {
        let kernel_like = shape.len() == 4 && shape[2] == shape[3] && shape[2] <= 3;
        assert!(
            !kernel_like,
            "{model}: gradient entry of kernel shape {shape:?}"
        );
        assert!(
            !base_t.contains(&shape),
            "{model}: gradient entry of transposed-weight shape {shape:?}"
        );
    }

    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut worst: (f64, &str) = (0.0, "");
    let mut probes = 0;
    for (path, up) in &s.ups {
        let g = grads
            .get(up)
            .unwrap_or_else(|| panic!("{model}: no gradient for {path}"));
        let g = g.to_vec2::<f64>().unwrap();
        let (rows, cols) = (g.len(), g[0].len());
        let scale = g.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{model}: zero gradient for {path}");
        let mut entries = Vec::new();
        let argmax = (0..rows * cols)
            .max_by(|&a, &b| {
                g[a / cols][a % cols]
                    .abs()
                    .total_cmp(&g[b / cols][b % cols].abs())
            })
            .unwrap();
        entries.push((argmax / cols, argmax % cols));
        for _ in 0..RANDOM_PROBES {
            entries.push((rng.random_range(0..rows), rng.random_range(0..cols)));
        }
        let mut layer_err = 0f64;
        for (i, j) in entries {
            let orig = up.as_tensor().to_vec2::<f64>().unwrap()[i][j];
            set_entry(up, i, j, orig + STEP);
            let plus = s.loss_value();
            set_entry(up, i, j, orig - STEP);
            let minus = s.loss_value();
            set_entry(up, i, j, orig);
            let fd = (plus - minus) / (2.0 * STEP);
            layer_err = layer_err.max((g[i][j] - fd).abs() / scale);
            probes += 1;
        }
        if layer_err > worst.0 {
            worst = (layer_err, path);
        }
        assert!(
            layer_err <= TOLERANCE,
            "{model}: {path}: gradient error {layer_err:.3e} exceeds {TOLERANCE:.0e}"
        );
    }
    println!(
        "{model}: {} adapter layers, {probes} entries probed: worst relative error {:.3e} ({}), \
         tolerance {TOLERANCE:.0e}",
        s.ups.len(),
        worst.0,
        worst.1
    );
    worst.0
}

#[test]
fn lora_gradients_match_finite_differences_sd15() {
    check("tiny-sd15", 1);
}

#[test]
fn lora_gradients_match_finite_differences_sdxl() {
    check("tiny-sdxl", 2);
}
