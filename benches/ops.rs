//! Per-op timings at the shapes of one SD1.5-size sampling step (batch 2, 64×64 latent): the
//! profile behind `docs/perf.md`. `tools/reference/bench_ops.py` times the same ops in PyTorch.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench ops [-- --reps N] [-- --only TEXT] [-- --quick]
//! [-- --glibc-defaults]`.
//! `--glibc-defaults` leaves the host allocator as glibc sets it (by default the bench keeps large
//! freed buffers for reuse, as the `pairstyle` binary does: `[runtime] reuse_host_memory`).
//! `--quick` shrinks every shape; it is implied when the binary is not given `--bench` (which
//! `cargo bench` passes and `cargo test` does not), so `cargo test` checks that the bench runs.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pairstyle::engine::{attention, conv, norm};

/// One case: a name, its matmul-class GFLOP and a closure that runs it once.
struct Case {
    name: String,
    gflop: f64,
    run: Box<dyn Fn() -> candle_core::Result<Tensor>>,
}

fn randn(shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
}

fn conv_case(
    b: usize,
    c_in: usize,
    c_out: usize,
    side: usize,
    k: usize,
) -> candle_core::Result<Case> {
    let x = randn(&[b, c_in, side, side])?;
    let w = (randn(&[c_out, c_in, k, k])? * 0.02)?;
    let bias = randn(&[c_out])?;
    let gflop = 2.0 * (b * c_out * c_in * k * k * side * side) as f64 / 1e9;
    Ok(Case {
        name: format!("conv{k}x{k} {c_in}->{c_out} @{side} b{b}"),
        gflop,
        run: Box::new(move || conv::conv2d(&x, &w, Some(&bias), k / 2, 1)),
    })
}

fn linear_case(rows: usize, d_in: usize, d_out: usize) -> candle_core::Result<Case> {
    let x = randn(&[rows, d_in])?;
    let w = (randn(&[d_out, d_in])? * 0.02)?;
    let bias = randn(&[d_out])?;
    Ok(Case {
        name: format!("linear {rows}x{d_in}->{d_out}"),
        gflop: 2.0 * (rows * d_in * d_out) as f64 / 1e9,
        run: Box::new(move || x.matmul(&w.t()?)?.broadcast_add(&bias)),
    })
}

fn attention_case(
    b: usize,
    n: usize,
    m: usize,
    c: usize,
    heads: usize,
) -> candle_core::Result<Case> {
    let q = randn(&[b, n, c])?;
    let k = randn(&[b, m, c])?;
    let v = randn(&[b, m, c])?;
    Ok(Case {
        name: format!("attention b{b} n{n} m{m} {heads}x{}", c / heads),
        gflop: 4.0 * (b * n * m * c) as f64 / 1e9,
        run: Box::new(move || {
            attention::fused_attention(&q, &k, &v, heads)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        }),
    })
}

fn group_norm_case(b: usize, c: usize, side: usize) -> candle_core::Result<Case> {
    let x = randn(&[b, c, side, side])?;
    let (w, bias) = (
        Tensor::ones(c, DType::F32, &Device::Cpu)?,
        Tensor::zeros(c, DType::F32, &Device::Cpu)?,
    );
    let seg = norm::Segments::group_norm(x.dims(), 32)?;
    Ok(Case {
        name: format!("group_norm+silu {c} @{side} b{b}"),
        gflop: 0.0,
        // As the UNet's resnets run it at inference: SiLU fused into the norm's pass.
        run: Box::new(move || norm::normalize_silu(&x, &w, &bias, seg, 1e-5)),
    })
}

fn gelu_case(rows: usize, d: usize) -> candle_core::Result<Case> {
    let x = randn(&[rows, 2 * d])?;
    Ok(Case {
        name: format!("geglu {rows}x{}", 2 * d),
        gflop: 0.0,
        run: Box::new(move || {
            let parts = x.chunk(2, 1)?;
            parts[0].mul(&parts[1].gelu_erf()?)
        }),
    })
}

fn add_case(b: usize, c: usize, side: usize) -> candle_core::Result<Case> {
    let x = randn(&[b, c, side, side])?;
    let y = randn(&[b, c, side, side])?;
    Ok(Case {
        name: format!("add {c} @{side} b{b}"),
        gflop: 0.0,
        run: Box::new(move || x.add(&y)),
    })
}

fn cases(quick: bool) -> candle_core::Result<Vec<Case>> {
    // (scale of the spatial side, channel divisor) for --quick. The divisor keeps channels a
    // multiple of the 32 norm groups and head widths above 16 (the wide attention kernel).
    let (s, cd) = if quick { (8, 2) } else { (1, 1) };
    let b = 2;
    Ok(vec![
        conv_case(b, 320 / cd, 320 / cd, 64 / s, 3)?,
        conv_case(b, 640 / cd, 320 / cd, 64 / s, 3)?,
        conv_case(b, 640 / cd, 640 / cd, 32 / s, 3)?,
        conv_case(b, 1280 / cd, 1280 / cd, 16 / s, 3)?,
        conv_case(b, 1280 / cd, 1280 / cd, 8.max(s) / s, 3)?,
        conv_case(b, 2560 / cd, 1280 / cd, 8.max(s) / s, 3)?,
        conv_case(b, 320 / cd, 320 / cd, 64 / s, 1)?,
        linear_case(b * 4096 / (s * s), 320 / cd, 320 / cd)?,
        linear_case(b * 4096 / (s * s), 320 / cd, 2560 / cd)?,
        linear_case(b * 4096 / (s * s), 1280 / cd, 320 / cd)?,
        linear_case(b * 256 / (s * s).min(256), 1280 / cd, 1280 / cd)?,
        attention_case(b, 4096 / (s * s), 4096 / (s * s), 320 / cd, 8)?,
        attention_case(b, 4096 / (s * s), 77, 320 / cd, 8)?,
        attention_case(b, 1024 / (s * s), 1024 / (s * s), 640 / cd, 8)?,
        attention_case(
            b,
            256 / (s * s).min(64),
            256 / (s * s).min(64),
            1280 / cd,
            8,
        )?,
        group_norm_case(b, 320 / cd, 64 / s)?,
        group_norm_case(b, 1280 / cd, 8.max(s) / s)?,
        gelu_case(b * 4096 / (s * s), 1280 / cd)?,
        add_case(b, 320 / cd, 64 / s)?,
    ])
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let glibc_defaults = args.iter().any(|a| a == "--glibc-defaults");
    if !glibc_defaults {
        pairstyle::engine::device::keep_freed_host_memory();
    }
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(if quick { 1 } else { 5 });
    // `--only TEXT` keeps the cases whose name contains TEXT (for profiling one op).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    println!(
        "# ours (candle 0.11): ops of an SD1.5-size sampling step, f32, {} threads, median of {reps} after 1 warm-up; large freed buffers {}",
        rayon::current_num_threads(),
        if glibc_defaults {
            "returned at once (glibc defaults)"
        } else {
            "kept for reuse"
        }
    );
    println!("| op | ms | GFLOP | GFLOP/s |");
    println!("|---|---:|---:|---:|");
    for case in cases(quick)? {
        if only
            .as_ref()
            .is_some_and(|o| !case.name.contains(o.as_str()))
        {
            continue;
        }
        (case.run)()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            let out = (case.run)()?;
            drop(out);
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let rate = if case.gflop > 0.0 {
            format!("{:.1}", case.gflop / median)
        } else {
            String::new()
        };
        println!(
            "| {} | {:.2} | {:.3} | {rate} |",
            case.name,
            median * 1e3,
            case.gflop
        );
    }
    Ok(())
}
