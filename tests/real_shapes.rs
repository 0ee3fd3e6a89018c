//! Real-size architectures with random weights (no download): SD1.5-size and SDXL-size UNets load
//! from their published config.json values and run one step. Ignored by default because they take
//! minutes and several GiB on a CPU; run with
//! `cargo test --test real_shapes -- --ignored --nocapture --test-threads 1`.
//! Each prints its time and the process's peak resident memory.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pairstyle::engine::nn::AdapterScales;
use pairstyle::engine::unet::{AddedCond, UNet, UNetConfig, UNetConfigFile};
use pairstyle::engine::weights::Weights;

/// SD1.5's `unet/config.json` (runwayml/stable-diffusion-v1-5), as published.
const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// SDXL base 1.0's `unet/config.json`, as published.
const SDXL_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
  "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
  "center_input_sample": false, "class_embed_type": null, "class_embeddings_concat": false,
  "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
  "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
  "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
  "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
  "time_embedding_act_fn": null, "time_embedding_dim": null, "time_embedding_type": "positional",
  "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": null, "use_linear_projection": true
}"#;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

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
    run("sd15-size", SD15_UNET, 64, 768, None);
}

#[test]
#[ignore = "SDXL-size: minutes and ~12 GiB on a CPU"]
fn sdxl_size_unet_runs_one_step() {
    run("sdxl-size", SDXL_UNET, 64, 2048, Some(1280));
}
