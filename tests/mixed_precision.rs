//! Mixed precision (issue 7, GPU item): a bf16 attention projection with an f32 LoRA adapter,
//! the set-up GPU training uses (frozen weights in bf16; LoRA parameters, their gradients and the
//! AdamW state in f32).
//!
//! On one `AdaptableLinear` (a whole bf16 UNet cannot run on the CPU: candle has no CPU bf16
//! convolution), the bf16-base forward and the gradient of the adapter's B are compared with the
//! all-f32 layer:
//! - the output stays bf16 and the gradient f32 (the adapter math runs in the adapter's dtype);
//! - output within 2e-2 max-norm relative error (bf16 keeps 8 significant bits: 3.9e-3 relative
//!   rounding of inputs, weights and result), and the adapter's own effect is several times
//!   larger, so a dropped or mis-scaled adapter would fail;
//! - B's gradient within 2e-2 (it sees the bf16-rounded input and the f32 output gradient).

use candle_core::{DType, Device, Tensor, Var};
use pairstyle::engine::nn::{AdaptableLinear, AdapterScales, LowRankAdapter};
use pairstyle::engine::weights::Weights;

const TOL: f64 = 2e-2;

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap();
    let s = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    d.max(0).unwrap().to_scalar::<f64>().unwrap() / s.to_scalar::<f64>().unwrap()
}

fn layer(dtype: DType, down: &Tensor, up: &Var) -> AdaptableLinear {
    let w = Weights::random(3, 0.05, dtype, &Device::Cpu).pp("to_q");
    let mut lin = AdaptableLinear::load(&w, 64, 48, false).unwrap();
    lin.set_adapter(
        "style",
        LowRankAdapter {
            down: down.clone(),
            up: up.as_tensor().clone(),
            alpha_over_rank: 1.0,
        },
    )
    .unwrap();
    lin
}

#[test]
fn bf16_layer_with_f32_adapter_matches_f32() {
    let dev = Device::Cpu;
    let down = (Tensor::randn(0f32, 1.0, (4, 64), &dev).unwrap() / 8.0).unwrap();
    let up32 = Var::from_tensor(&Tensor::randn(0f32, 0.3, (48, 4), &dev).unwrap()).unwrap();
    let up16 = Var::from_tensor(up32.as_tensor()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 10, 64), &dev).unwrap();
    let mut on = AdapterScales::none();
    on.set("style", Tensor::ones(2, DType::F32, &dev).unwrap());

    let l32 = layer(DType::F32, &down, &up32);
    let l16 = layer(DType::BF16, &down, &up16);
    let y32 = l32.forward(&x, &on).unwrap();
    let y16 = l16.forward(&x.to_dtype(DType::BF16).unwrap(), &on).unwrap();
    assert_eq!(y16.dtype(), DType::BF16);
    let err = rel_err(&y16, &y32);
    let effect = rel_err(&l32.forward(&x, &AdapterScales::none()).unwrap(), &y32);
    println!("output rel err {err:.2e}; adapter effect {effect:.2e}");
    assert!(err <= TOL, "bf16 output off by {err:.2e}");
    assert!(effect >= 5.0 * TOL, "adapter effect only {effect:.2e}");

    let target = Tensor::randn(0f32, 1.0, y32.dims(), &dev).unwrap();
    let loss = |y: &Tensor| {
        (y.to_dtype(DType::F32).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let g32 = loss(&y32).backward().unwrap();
    let g16 = loss(&y16).backward().unwrap();
    let a = g32.get(up32.as_tensor()).expect("f32: B has no gradient");
    let b = g16.get(up16.as_tensor()).expect("bf16: B has no gradient");
    assert_eq!(b.dtype(), DType::F32);
    let e = rel_err(b, a);
    println!("B-gradient rel err {e:.2e}");
    assert!(e <= TOL, "B gradient off by {e:.2e}");
}
