//! Benchmarks that print numbers (never timed assertions in tests):
//! - [`quality`]: Pair Customization against its baselines on the synthetic world with exact
//!   ground truth, and the toy model's own quality bars;
//! - here: the cost of Pair Customization's training iteration and of style-guided sampling
//!   steps, on the tiny fixture UNet or a real-size UNet with random weights.

pub mod quality;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::engine::nn::AdapterScales;
use crate::engine::noise::NoiseSource;
use crate::engine::scheduler::{NoiseSchedule, SchedulerConfig};
use crate::engine::text::Conditioning;
use crate::engine::unet::{AddedCond, UNet, UNetConfig, UNetConfigFile};
use crate::engine::weights::Weights;
use crate::error::{Error, Result};
use crate::lora::{AdapterSet, OrthogonalBasis};
use crate::trainer::optimizer::{AdamW, AdamWConfig};
use crate::trainer::{train_iteration, IterationInputs, LayerParams, LearnedAdapter};

/// SD1.5's published `unet/config.json` (runwayml/stable-diffusion-v1-5).
pub const SD15_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// SDXL base 1.0's published `unet/config.json`.
pub const SDXL_UNET_CONFIG: &str = r#"{
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

/// Peak resident memory of this process in MiB (VmHWM), or NaN where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
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

/// Reset the peak-RSS counter (Linux `clear_refs` 5), so the next reading covers what follows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A UNet built from a published config with seeded random weights.
pub fn random_unet(config_json: &str, seed: u64, dtype: DType, device: &Device) -> Result<UNet> {
    let file: UNetConfigFile =
        serde_json::from_str(config_json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let cfg = UNetConfig::resolve(file, std::path::Path::new("<built-in config>"))?;
    UNet::new(cfg, &Weights::random(seed, 0.02, dtype, device))
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct CostBench {
    /// Latent side (e.g. 32 for 256 px with an 8× VAE).
    pub latent: usize,
    /// LoRA rank of both adapters.
    pub rank: usize,
    /// Timed repetitions per case (after one warm-up).
    pub reps: usize,
    /// Style counts to time sampling steps for (0 = plain CFG).
    pub styles: Vec<usize>,
}

/// One measured row.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// What was run.
    pub case: String,
    /// Median seconds per repetition.
    pub median_s: f64,
    /// Peak RSS in MiB while running it.
    pub peak_mib: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn timed(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    reset_peak_rss();
    f()?; // warm-up
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((median(times), peak_rss_mib()))
}

/// Time one training iteration (content + style step with backward and AdamW) and one sampling
/// step for each style count, on `unet` with random inputs.
pub fn run_cost_bench(unet: &mut UNet, b: &CostBench, device: &Device) -> Result<Vec<BenchRow>> {
    let dtype = DType::F32;
    let cross = unet.config().down[0].cross_attention_dim;
    let pooled_dim = unet.config().text_time.map(|(a, p)| p - 6 * a);
    let mut noise = NoiseSource::new(0);
    let latent =
        |n: &mut NoiseSource, batch: usize| n.randn(&[batch, 4, b.latent, b.latent], dtype, device);
    let cond = |n: &mut NoiseSource, batch: usize| -> Result<Conditioning> {
        Ok(Conditioning {
            context: n.randn(&[batch, 77, cross], dtype, device)?,
            pooled: match pooled_dim {
                Some(p) => Some(n.randn(&[batch, p], dtype, device)?),
                None => None,
            },
        })
    };
    let added = |c: &Conditioning, batch: usize| -> Result<Option<AddedCond>> {
        Ok(match &c.pooled {
            Some(p) => Some(AddedCond {
                text_embeds: p.clone(),
                time_ids: Tensor::new(&[[512f32, 512., 0., 0., 512., 512.]], device)?
                    .repeat((batch, 1))?,
            }),
            None => None,
        })
    };
    let basis = OrthogonalBasis::new(0);
    let mk = |start: usize| -> Result<LearnedAdapter> {
        let layers = unet
            .adaptable_linears()
            .iter()
            .map(|l| {
                let (n_in, n_out) = l.dims();
                Ok(LayerParams {
                    path: l.path().to_string(),
                    down: candle_core::Var::from_tensor(
                        &basis.rows(n_in, start, b.rank, dtype, device)?,
                    )?,
                    up: candle_core::Var::from_tensor(
                        &(Tensor::randn(0f32, 0.01, (n_out, b.rank), device)?),
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LearnedAdapter {
            layers,
            rank: b.rank,
            alpha: b.rank as f64,
        })
    };
    let content = mk(0)?;
    let style = mk(b.rank)?;
    let ups = |a: &LearnedAdapter| a.layers.iter().map(|l| l.up.clone()).collect::<Vec<_>>();
    let mut opt_c = AdamW::new(ups(&content), AdamWConfig::default())?;
    let mut opt_s = AdamW::new(ups(&style), AdamWConfig::default())?;
    let schedule = NoiseSchedule::new(&SchedulerConfig::default())?;
    let (cc, cs) = (cond(&mut noise, 1)?, cond(&mut noise, 1)?);
    let inputs = IterationInputs {
        x0_content: latent(&mut noise, 1)?,
        x0_style: latent(&mut noise, 1)?,
        noise: latent(&mut noise, 1)?,
        t: 500,
        added_content: added(&cc, 1)?,
        added_style: added(&cs, 1)?,
        cond_content: cc,
        cond_style: cs,
        style_step: true,
    };
    let mut rows = Vec::new();
    let (s, m) = timed(b.reps, || {
        train_iteration(
            unet,
            &schedule,
            (&content, &mut opt_c),
            (&style, &mut opt_s),
            &inputs,
        )
        .map(|_| ())
    })?;
    rows.push(BenchRow {
        case: format!("training iteration (content + style step), rank {}", b.rank),
        median_s: s,
        peak_mib: m,
    });
    crate::trainer::detach_adapters(unet);

    // Sampling: attach up to max(styles) style adapters, each a copy of the learned style.
    let max_styles = b.styles.iter().copied().max().unwrap_or(0);
    let set: AdapterSet = style.to_adapter_set()?;
    for i in 0..max_styles {
        set.attach(unet, &format!("style{i}"))?;
    }
    for &n in &b.styles {
        let batch = 2 + n;
        let c = cond(&mut noise, batch)?;
        let a = added(&c, batch)?;
        let x = latent(&mut noise, batch)?;
        let ts = Tensor::new(vec![500f32; batch], device)?;
        let mut scales = AdapterScales::none();
        for i in 0..n {
            let mut v = vec![0f32; batch];
            v[2 + i] = 1.0;
            scales.set(&format!("style{i}"), Tensor::new(v, device)?);
        }
        let (s, m) = timed(b.reps, || {
            unet.forward(&x, &ts, &c.context, a.as_ref(), &scales)
                .map(|_| ())
        })?;
        let case = if n == 0 {
            "sampling step, plain CFG (batch 2)".to_string()
        } else {
            format!("sampling step, {n} style(s) (batch {batch})")
        };
        rows.push(BenchRow {
            case,
            median_s: s,
            peak_mib: m,
        });
    }
    for i in 0..max_styles {
        AdapterSet::detach(unet, &format!("style{i}"));
    }
    Ok(rows)
}
