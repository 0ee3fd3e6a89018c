//! Real-size architectures with random weights (no download): SD1.5-size and SDXL-size UNets load
//! from their published config.json values and run one step. Ignored by default because they take
//! minutes and several GiB on a CPU; run with
//! `cargo test --test real_shapes -- --ignored --nocapture --test-threads 1`.
//! Each prints its time and the process's peak resident memory.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pairstyle::bench::{peak_rss_mib, SD15_UNET_CONFIG, SDXL_UNET_CONFIG};
use pairstyle::engine::nn::AdapterScales;
use pairstyle::engine::unet::{AddedCond, UNet, UNetConfig, UNetConfigFile};
use pairstyle::engine::weights::Weights;

fn run(name: &str, json: &str, latent: usize, context_dim: usize, pooled: Option<usize>) {
    let file: UNetConfigFile = serde_json::from_str(json).unwrap();
    let cfg = UNetConfig::resolve(file, Path::new(name)).unwrap();
    let w = Weights::random(0, 0.02, DType::F32, &Device::Cpu);
    let t0 = Instant::now();
    let unet = UNet::new(cfg, &w).unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    let n_params: usize = unet.adaptable_linears().len();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 4, latent, latent), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 77, context_dim), &dev).unwrap();
    let ts = Tensor::new(&[500f32], &dev).unwrap();
    let added = pooled.map(|p| AddedCond {
        text_embeds: Tensor::randn(0f32, 1.0, (1, p), &dev).unwrap(),
        time_ids: Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.]], &dev).unwrap(),
    });
    let t1 = Instant::now();
    let out = unet
        .forward(&x, &ts, &ctx, added.as_ref(), &AdapterScales::none())
        .unwrap();
    let step_s = t1.elapsed().as_secs_f64();
    assert_eq!(out.dims(), &[1, 4, latent, latent]);
    let finite = out
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite());
    assert!(finite, "{name}: non-finite output");
    println!(
        "{name}: build {load_s:.1} s, one UNet step at {latent}x{latent} latent (batch 1, f32) {step_s:.1} s, \
         peak RSS {:.0} MiB, {n_params} attention projections",
        peak_rss_mib()
    );
}

#[test]
#[ignore = "SD1.5-size: minutes and ~4 GiB on a CPU"]
fn sd15_size_unet_runs_one_step() {
    run("sd15-size", SD15_UNET_CONFIG, 64, 768, None);
}

#[test]
#[ignore = "SDXL-size: minutes and ~12 GiB on a CPU"]
fn sdxl_size_unet_runs_one_step() {
    run("sdxl-size", SDXL_UNET_CONFIG, 64, 2048, Some(1280));
}
