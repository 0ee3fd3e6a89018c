//! The fused group and layer norms (`engine::norm`, used by `nn::GroupNorm` and `nn::LayerNorm`
//! for f32/f64 on the CPU) against the composed candle ops (`forward_composed`) and against
//! central finite differences.
//!
//! Tolerances: f64 values and gradients 1e-10 relative (the same formulas, summed in a different
//! order); f32 1e-5 (the fused kernel accumulates its statistics in f64, the composed path in f32,
//! a few ulps over sums of a few hundred terms); finite differences in f64 with step 1e-5, whose
//! truncation error is O(h²)·|f'''| ≈ 1e-9 here, hence 1e-6.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::rel_err;
use pairstyle::engine::nn::{GroupNorm, LayerNorm};
use pairstyle::engine::weights::Weights;

/// Input, affine weight and bias (trainable or not), and the output weights `r` of the loss
/// `sum(norm(x)·r)`.
struct Case {
    x: Var,
    weight: Var,
    bias: Var,
    r: Tensor,
}

impl Case {
    fn new(dims: &[usize], channels: usize, dtype: DType, seed: u64) -> Self {
        let dev = Device::Cpu;
        dev.set_seed(seed).ok();
        let randn = |shape: &[usize], mean: f64, std: f64| {
            Tensor::randn(mean, std, shape, &dev)
                .and_then(|t| t.to_dtype(dtype))
                .unwrap()
        };
        // An offset mean and a spread scale, so that centring and scaling both matter.
        let x = Var::from_tensor(&randn(dims, 0.7, 2.0)).unwrap();
        let weight = Var::from_tensor(&randn(&[channels], 1.0, 0.5)).unwrap();
        let bias = Var::from_tensor(&randn(&[channels], 0.0, 0.5)).unwrap();
        let r = randn(dims, 0.0, 1.0);
        Self { x, weight, bias, r }
    }

    /// Weights for `load`: tracked (`Var`) or plain copies of weight and bias.
    fn weights(&self, trainable: bool) -> Weights {
        let (w, b) = if trainable {
            (
                self.weight.as_tensor().clone(),
                self.bias.as_tensor().clone(),
            )
        } else {
            (
                self.weight.as_tensor().detach(),
                self.bias.as_tensor().detach(),
            )
        };
        let map = HashMap::from([("weight".to_string(), w), ("bias".to_string(), b)]);
        Weights::from_map(map, self.x.dtype(), &Device::Cpu)
    }

    /// `(y, dx, dweight, dbias)` of `sum(f(x)·r)`; the weight gradients only when trainable.
    fn run(
        &self,
        f: impl Fn(&Tensor) -> Tensor,
        trainable: bool,
    ) -> (Tensor, Tensor, Option<Tensor>, Option<Tensor>) {
        let y = f(self.x.as_tensor());
        let loss = (&y * &self.r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let dx = grads.get(self.x.as_tensor()).unwrap().clone();
        let dw = grads.get(self.weight.as_tensor()).cloned();
        let db = grads.get(self.bias.as_tensor()).cloned();
        if !trainable {
            assert!(dw.is_none() && db.is_none(), "frozen affine got a gradient");
        }
        (y, dx, dw, db)
    }
}

fn check(
    what: &str,
    case: &Case,
    fused: impl Fn(&Tensor) -> Tensor,
    composed: impl Fn(&Tensor) -> Tensor,
    tol: f64,
    trainable: bool,
) {
    let (y, dx, dw, db) = case.run(fused, trainable);
    let (ry, rdx, rdw, rdb) = case.run(composed, trainable);
    let errs = [
        ("value", rel_err(&y, &ry)),
        ("dx", rel_err(&dx, &rdx)),
        (
            "dweight",
            dw.map_or(0.0, |d| rel_err(&d, rdw.as_ref().unwrap())),
        ),
        (
            "dbias",
            db.map_or(0.0, |d| rel_err(&d, rdb.as_ref().unwrap())),
        ),
    ];
    println!("{what}: {errs:?}");
    for (name, e) in errs {
        assert!(
            e <= tol,
            "{what}: {name} differs by {e:.3e} (tolerance {tol:e})"
        );
    }
}

#[test]
fn group_norm_matches_the_composed_ops() {
    // (dims, groups): 4-D and 3-D inputs, one channel per group, one group, batch > 1.
    let cases: [(&[usize], usize); 5] = [
        (&[2, 8, 5, 3], 4),
        (&[1, 6, 7], 3),
        (&[3, 4, 2, 2, 2], 2),
        (&[1, 32, 4, 4], 32),
        (&[2, 6, 3, 5], 1),
    ];
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        for (i, &(dims, groups)) in cases.iter().enumerate() {
            for trainable in [false, true] {
                let case = Case::new(dims, dims[1], dtype, 10 + i as u64);
                let gn = GroupNorm::load(&case.weights(trainable), groups, dims[1], 1e-5).unwrap();
                check(
                    &format!("group norm {dtype:?} {dims:?}/{groups} trainable {trainable}"),
                    &case,
                    |x| gn.forward(x).unwrap(),
                    |x| gn.forward_composed(x).unwrap(),
                    tol,
                    trainable,
                );
            }
        }
    }
}

/// `forward_silu`: on untracked inputs the SiLU runs inside the fused norm's pass (its own code
/// path, with the polynomial `exp` for f32, about 1 ulp, well inside 1e-5); on tracked inputs it
/// composes norm and SiLU, whose value and gradients must match the composed ops.
#[test]
fn group_norm_silu_matches_the_composed_ops() {
    let cases: [(&[usize], usize); 3] = [(&[2, 8, 5, 3], 4), (&[1, 32, 4, 4], 32), (&[2, 6, 9], 1)];
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        for (i, &(dims, groups)) in cases.iter().enumerate() {
            let case = Case::new(dims, dims[1], dtype, 40 + i as u64);
            let gn = GroupNorm::load(&case.weights(false), groups, dims[1], 1e-5).unwrap();
            let composed =
                |x: &Tensor| candle_nn::ops::silu(&gn.forward_composed(x).unwrap()).unwrap();
            let x = case.x.as_tensor().detach();
            let fused = gn.forward_silu(&x).unwrap();
            let e = rel_err(&fused, &composed(&x));
            assert!(
                e <= tol,
                "untracked {dtype:?} {dims:?}: {e:.3e} (tolerance {tol:e})"
            );
            check(
                &format!("group norm + silu {dtype:?} {dims:?}/{groups}"),
                &case,
                |x| gn.forward_silu(x).unwrap(),
                composed,
                tol,
                false,
            );
        }
    }
}

#[test]
fn layer_norm_matches_the_composed_ops() {
    let cases: [&[usize]; 3] = [&[2, 5, 16], &[7, 3], &[1, 4, 2, 9]];
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        for (i, &dims) in cases.iter().enumerate() {
            for trainable in [false, true] {
                let d = *dims.last().unwrap();
                let case = Case::new(dims, d, dtype, 20 + i as u64);
                let ln = LayerNorm::load(&case.weights(trainable), d, 1e-5).unwrap();
                check(
                    &format!("layer norm {dtype:?} {dims:?} trainable {trainable}"),
                    &case,
                    |x| ln.forward(x).unwrap(),
                    |x| ln.forward_composed(x).unwrap(),
                    tol,
                    trainable,
                );
            }
        }
    }
}

#[test]
fn group_norm_gradient_matches_finite_differences() {
    let case = Case::new(&[2, 4, 3, 3], 4, DType::F64, 7);
    let gn = GroupNorm::load(&case.weights(true), 2, 4, 1e-5).unwrap();
    let (_, dx, dw, _) = case.run(|x| gn.forward(x).unwrap(), true);
    let loss = |x: &Tensor, w: &Tensor| -> f64 {
        let map = HashMap::from([
            ("weight".to_string(), w.clone()),
            ("bias".to_string(), case.bias.as_tensor().detach()),
        ]);
        let gn = GroupNorm::load(
            &Weights::from_map(map, DType::F64, &Device::Cpu),
            2,
            4,
            1e-5,
        )
        .unwrap();
        (gn.forward(x).unwrap() * &case.r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let x0 = case.x.as_tensor().detach().flatten_all().unwrap();
    let w0 = case.weight.as_tensor().detach();
    let dx = dx.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-5;
    let mut worst = 0f64;
    for i in (0..x0.elem_count()).step_by(5) {
        let bump = |s: f64| {
            let mut v = x0.to_vec1::<f64>().unwrap();
            v[i] += s;
            Tensor::from_vec(v, case.x.shape(), &Device::Cpu).unwrap()
        };
        let fd = (loss(&bump(h), &w0) - loss(&bump(-h), &w0)) / (2.0 * h);
        let e = (fd - dx[i]).abs() / fd.abs().max(1.0);
        worst = worst.max(e);
        assert!(
            e <= 1e-6,
            "dx[{i}]: analytic {} vs finite difference {fd}",
            dx[i]
        );
    }
    let dw = dw.unwrap().to_vec1::<f64>().unwrap();
    for c in 0..4 {
        let bump = |s: f64| {
            let mut v = w0.to_vec1::<f64>().unwrap();
            v[c] += s;
            Tensor::from_vec(v, 4, &Device::Cpu).unwrap()
        };
        let x = case.x.as_tensor().detach();
        let fd = (loss(&x, &bump(h)) - loss(&x, &bump(-h))) / (2.0 * h);
        let e = (fd - dw[c]).abs() / fd.abs().max(1.0);
        worst = worst.max(e);
        assert!(
            e <= 1e-6,
            "dweight[{c}]: analytic {} vs finite difference {fd}",
            dw[c]
        );
    }
    println!("group norm vs finite differences: worst {worst:.1e}");
}
