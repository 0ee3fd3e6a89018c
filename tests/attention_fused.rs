//! The fused CPU attention (`engine::attention`, issue 7) against the composed reference
//! (`nn::attention_composed`, built only from candle ops with a correct backward):
//! - forward on random shapes (N ≠ M, cross-attention with M = 77, 1/4/8 heads, head widths
//!   2..64, batch 1..3): ~1e-5 relative in f32, 1e-12 in f64;
//! - gradients w.r.t. q, k and v in f64 against the composed path's candle gradients (1e-10);
//! - gradients in f64 against central finite differences on a small case;
//! - `nn::attention` dispatches f32/f64 CPU inputs to the fused op and keeps half precision on
//!   the composed path.
//!
//! Errors are max-norm relative: max|ours − ref| / max|ref|.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::rel_err;
use pairstyle::engine::attention::{fused_attention, is_supported};
use pairstyle::engine::nn::{attention, attention_composed};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn randn(rng: &mut StdRng, shape: &[usize], dtype: DType) -> Tensor {
    let count: usize = shape.iter().product();
    let data: Vec<f64> = (0..count).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// (batch, N, M, heads, head width): self- and cross-attention shapes, incl. the fixture UNet's
/// (8 heads of width 2 and 4) and SD-like widths.
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 16, 16, 1, 2),
    (2, 64, 64, 8, 2),
    (3, 33, 77, 4, 4),
    (1, 100, 77, 8, 8),
    (2, 9, 130, 1, 64),
    (1, 300, 300, 8, 4),
    (2, 50, 7, 4, 40),
    (1, 1, 77, 8, 3),
    (3, 129, 1, 1, 16),
    // Wide heads (the GEMM path) over several query blocks (119 rows per block at 1100 keys).
    (1, 300, 1100, 2, 24),
];

#[test]
fn forward_matches_composed_f32_and_f64() {
    let mut rng = StdRng::seed_from_u64(11);
    for &(b, n, m, heads, d) in SHAPES {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            // Scores of order a few units, as after trained projections.
            let q = (randn(&mut rng, &[b, n, heads * d], dtype) * 1.5).unwrap();
            let k = randn(&mut rng, &[b, m, heads * d], dtype);
            let v = randn(&mut rng, &[b, m, heads * d], dtype);
            let ours = fused_attention(&q, &k, &v, heads).unwrap();
            let reference = attention_composed(&q, &k, &v, heads, false).unwrap();
            let err = rel_err(&ours, &reference);
            assert!(
                err < tol,
                "{dtype:?} b={b} n={n} m={m} heads={heads} d={d}: relative error {err:e}"
            );
        }
    }
}

#[test]
fn forward_accepts_strided_views() {
    // q as a narrow of a wider projection, k as a transposed view, v with a batch stride gap.
    let mut rng = StdRng::seed_from_u64(12);
    let (b, n, m, heads, d) = (2, 40, 23, 4, 4);
    let c = heads * d;
    let wide = randn(&mut rng, &[b, n, 3 * c], DType::F32);
    let q = wide.narrow(2, c, c).unwrap();
    let k = randn(&mut rng, &[b, c, m], DType::F32)
        .transpose(1, 2)
        .unwrap();
    let v = randn(&mut rng, &[2 * b, m, c], DType::F32)
        .narrow(0, 1, b)
        .unwrap();
    let ours = fused_attention(&q, &k, &v, heads).unwrap();
    let reference = attention_composed(&q, &k, &v, heads, false).unwrap();
    assert!(rel_err(&ours, &reference) < 1e-5);
}

#[test]
fn gradients_match_composed_in_f64() {
    let mut rng = StdRng::seed_from_u64(13);
    for &(b, n, m, heads, d) in SHAPES {
        let q = Var::from_tensor(&randn(&mut rng, &[b, n, heads * d], DType::F64)).unwrap();
        let k = Var::from_tensor(&randn(&mut rng, &[b, m, heads * d], DType::F64)).unwrap();
        let v = Var::from_tensor(&randn(&mut rng, &[b, m, heads * d], DType::F64)).unwrap();
        let w = randn(&mut rng, &[b, n, heads * d], DType::F64);
        let loss = |out: Tensor| out.mul(&w).unwrap().sum_all().unwrap();
        let ours = loss(fused_attention(&q, &k, &v, heads).unwrap())
            .backward()
            .unwrap();
        let reference = loss(attention_composed(&q, &k, &v, heads, false).unwrap())
            .backward()
            .unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let a = ours.get(var.as_tensor()).unwrap();
            let r = reference.get(var.as_tensor()).unwrap();
            let err = rel_err(a, r);
            assert!(
                err < 1e-10,
                "d{name}, b={b} n={n} m={m} heads={heads} d={d}: relative error {err:e}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let mut rng = StdRng::seed_from_u64(14);
    let (b, n, m, heads, d) = (2, 5, 4, 2, 3);
    let shapes = [[b, n, heads * d], [b, m, heads * d], [b, m, heads * d]];
    let inputs: Vec<Tensor> = shapes
        .iter()
        .map(|s| randn(&mut rng, s, DType::F64))
        .collect();
    let w = randn(&mut rng, &[b, n, heads * d], DType::F64);
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> Tensor {
        fused_attention(q, k, v, heads)
            .unwrap()
            .mul(&w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let grads = loss(&vars[0], &vars[1], &vars[2]).backward().unwrap();
    let h = 1e-6;
    for which in 0..3 {
        let analytic: Vec<f64> = grads
            .get(vars[which].as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = inputs[which].flatten_all().unwrap().to_vec1().unwrap();
        let scale = analytic.iter().fold(0.0_f64, |a, x| a.max(x.abs()));
        let mut worst = 0.0_f64;
        // Probe a spread of entries (all would be ~200 forward passes per input; still cheap).
        for idx in (0..base.len()).step_by(3) {
            let shifted = |delta: f64| -> f64 {
                let mut data = base.clone();
                data[idx] += delta;
                let t = Tensor::from_vec(data, &shapes[which][..], &Device::Cpu).unwrap();
                let mut args = inputs.clone();
                args[which] = t;
                loss(&args[0], &args[1], &args[2])
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
            worst = worst.max((fd - analytic[idx]).abs());
        }
        let err = worst / scale;
        assert!(err < 1e-7, "input {which}: finite-difference error {err:e}");
    }
}

#[test]
fn dispatch_uses_fused_for_f32_f64_and_composed_for_half() {
    let mut rng = StdRng::seed_from_u64(15);
    let (b, n, m, heads, d) = (1, 12, 12, 2, 4);
    for dtype in [DType::F32, DType::F64] {
        let q = randn(&mut rng, &[b, n, heads * d], dtype);
        let k = randn(&mut rng, &[b, m, heads * d], dtype);
        let v = randn(&mut rng, &[b, m, heads * d], dtype);
        assert!(is_supported(&q, &k, &v));
        let via_nn = attention(&q, &k, &v, heads, true).unwrap();
        let fused = fused_attention(&q, &k, &v, heads).unwrap();
        assert_eq!(rel_err(&via_nn, &fused), 0.0, "{dtype:?}");
    }
    for dtype in [DType::F16, DType::BF16] {
        let q = randn(&mut rng, &[b, n, heads * d], dtype);
        let k = randn(&mut rng, &[b, m, heads * d], dtype);
        let v = randn(&mut rng, &[b, m, heads * d], dtype);
        assert!(!is_supported(&q, &k, &v));
        let via_nn = attention(&q, &k, &v, heads, true).unwrap();
        let composed = attention_composed(&q, &k, &v, heads, true).unwrap();
        assert_eq!(rel_err(&via_nn, &composed), 0.0, "{dtype:?}");
    }
}

#[test]
fn large_scores_stay_finite() {
    // Scores in the hundreds: a naive exp would overflow; the max-subtracted one must not.
    let mut rng = StdRng::seed_from_u64(16);
    let (b, n, m, heads, d) = (1, 20, 30, 2, 8);
    let q = (randn(&mut rng, &[b, n, heads * d], DType::F32) * 30.0).unwrap();
    let k = (randn(&mut rng, &[b, m, heads * d], DType::F32) * 30.0).unwrap();
    let v = randn(&mut rng, &[b, m, heads * d], DType::F32);
    let ours = fused_attention(&q, &k, &v, heads).unwrap();
    let reference = attention_composed(&q, &k, &v, heads, false).unwrap();
    let values: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|x| x.is_finite()));
    // Scores ~1e3 carry f32 rounding of ~1e-4 absolute, which the softmax passes on.
    assert!(rel_err(&ours, &reference) < 1e-3);
}

/// Timing of the fused against the composed attention on the fixture UNet's attention shapes
/// (prints numbers, asserts nothing). Run with
/// `cargo test --release --test attention_fused -- --ignored --nocapture timing`.
#[test]
#[ignore]
fn timing_fused_vs_composed() {
    use std::time::Instant;
    let mut rng = StdRng::seed_from_u64(17);
    // (batch, N, M, heads, width): tiny-sd15 at latent 32 (self/cross, both block widths).
    let cases = [
        (2, 1024, 1024, 8, 2),
        (2, 1024, 77, 8, 2),
        (2, 256, 256, 8, 4),
        (2, 4096, 4096, 8, 40),
    ];
    for &(b, n, m, heads, d) in &cases {
        let reps = if n >= 4096 { 1 } else { 5 };
        let q = randn(&mut rng, &[b, n, heads * d], DType::F32);
        let k = randn(&mut rng, &[b, m, heads * d], DType::F32);
        let v = randn(&mut rng, &[b, m, heads * d], DType::F32);
        let w = randn(&mut rng, &[b, n, heads * d], DType::F32);
        type Attn = fn(&Tensor, &Tensor, &Tensor, usize) -> Tensor;
        let fused: Attn = |q, k, v, h| fused_attention(q, k, v, h).unwrap();
        let composed: Attn = |q, k, v, h| attention_composed(q, k, v, h, false).unwrap();
        for (name, f) in [("composed", composed), ("fused", fused)] {
            if n >= 4096 && name == "composed" {
                continue;
            }
            let t0 = Instant::now();
            for _ in 0..reps {
                let _ = f(&q, &k, &v, heads);
            }
            let fwd = t0.elapsed().as_secs_f64() / reps as f64;
            let (qv, kv, vv) = (
                Var::from_tensor(&q).unwrap(),
                Var::from_tensor(&k).unwrap(),
                Var::from_tensor(&v).unwrap(),
            );
            let t0 = Instant::now();
            for _ in 0..reps {
                let _ = f(&qv, &kv, &vv, heads)
                    .mul(&w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            }
            let fb = t0.elapsed().as_secs_f64() / reps as f64;
            println!(
                "b={b} n={n} m={m} heads={heads} d={d} {name:>8}: forward {:.2} ms, forward+backward {:.2} ms",
                fwd * 1e3,
                fb * 1e3
            );
        }
    }
}
