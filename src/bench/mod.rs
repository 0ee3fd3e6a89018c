//! Benchmarks that print numbers (never timed assertions in tests):
//! - [`quality`]: Pair Customization against its baselines on the synthetic world with exact
//!   ground truth, and the toy model's own quality bars;
//! - here (`pairstyle bench perf`, formerly `bench cost`): the cost of Pair Customization's
//!   training iteration and of style-guided sampling steps, on the tiny fixture UNet or a
//!   real-size UNet with random weights, with the FLOPs each needs ([`flops`]) and the fraction of
//!   the machine's measured f32 GEMM peak that achieves;
//! - [`compare`]: the same cases run by the PyTorch reference (`tools/reference/`), side by side.

pub mod compare;
pub mod device_mem;
pub mod flops;
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
    status_field_mib("VmHWM:")
}

/// Resident memory of this process now in MiB (VmRSS), or NaN where /proc is unavailable.
pub fn rss_mib() -> f64 {
    status_field_mib("VmRSS:")
}

/// A `/proc/self/status` field given in kB (`field` with its colon), in MiB; NaN if unreadable.
fn status_field_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
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

/// Resolve a UNet `config.json` given as text (e.g. [`SD15_UNET_CONFIG`]).
pub fn config_from_json(config_json: &str) -> Result<UNetConfig> {
    let file: UNetConfigFile =
        serde_json::from_str(config_json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    UNetConfig::resolve(file, std::path::Path::new("<built-in config>"))
}

/// A UNet built from a published config with seeded random weights.
pub fn random_unet(config_json: &str, seed: u64, dtype: DType, device: &Device) -> Result<UNet> {
    UNet::new(
        config_from_json(config_json)?,
        &Weights::random(seed, 0.02, dtype, device),
    )
}

/// The machine's matmul throughput in `dtype` as this process sees it: the best of `tries` timed
/// `n × n × n` candle matmuls (after one warm-up) on `device`, with the current thread count, in
/// GFLOP/s (`2·n³` FLOPs each). `bench perf` divides achieved GFLOP/s by this.
pub fn measure_gemm_peak(n: usize, tries: usize, dtype: DType, device: &Device) -> Result<f64> {
    if n == 0 {
        return Err(Error::InvalidArgument("GEMM size must be positive".into()));
    }
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    a.matmul(&b)?; // warm-up: thread pools, packing buffers
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..tries.max(1) {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct PerfBench {
    /// Latent side of the training iteration (e.g. 32 for 256 px with an 8× VAE).
    pub latent: usize,
    /// Latent side of the sampling steps (the issue times sampling at 64 = 512 px).
    pub sample_latent: usize,
    /// LoRA rank of both adapters.
    pub rank: usize,
    /// Timed repetitions per case (after one warm-up).
    pub reps: usize,
    /// Style counts to time sampling steps for (0 = plain CFG).
    pub styles: Vec<usize>,
    /// Whether to time the training iteration.
    pub train: bool,
    /// Precision of the UNet's frozen weights and activations (the UNet must be loaded in it);
    /// LoRA parameters, their gradients and AdamW state are f32 whatever this is.
    pub dtype: DType,
    /// On a GPU: device memory in use (MiB) when the device was opened, before the model; peak
    /// device memory is reported above it. `None` on the CPU (peak RSS is reported).
    pub device_baseline_mib: Option<f64>,
}

/// One measured row.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// What was run.
    pub case: String,
    /// Median seconds per repetition.
    pub median_s: f64,
    /// Peak RSS in MiB while running it (on a GPU: peak device memory above the baseline).
    pub peak_mib: f64,
    /// RSS in MiB when the case started (weights, adapters and optimiser state already held;
    /// on a GPU: device memory in use above the baseline), so that the peak's own share shows.
    pub start_mib: f64,
    /// Latent side it ran at.
    pub latent: usize,
    /// FLOPs one repetition needs ([`flops`] convention).
    pub flops: u64,
}

impl BenchRow {
    /// Achieved GFLOP/s (FLOPs needed / median time).
    pub fn gflops_per_s(&self) -> f64 {
        self.flops as f64 / self.median_s / 1e9
    }
}

/// The `bench perf` table (header [`compare::TABLE_HEADER`], or [`compare::TABLE_HEADER_DEVICE`]
/// when `on_device`): median seconds, ratio to the plain CFG step for sampling rows, peak RSS (or
/// peak device memory), latent side, GFLOP needed, achieved GFLOP/s and its percentage of
/// `peak_gflops` (the measured GEMM peak).
pub fn perf_table(rows: &[BenchRow], peak_gflops: f64, on_device: bool) -> String {
    let plain = rows
        .iter()
        .find(|r| r.case.contains("plain CFG"))
        .map(|r| r.median_s);
    let mut out = format!(
        "{}
|---|---|---|---|---|---|---|---|
",
        if on_device {
            compare::TABLE_HEADER_DEVICE
        } else {
            compare::TABLE_HEADER
        }
    );
    for r in rows {
        let ratio = match plain {
            Some(p) if r.case.starts_with("sampling") => format!("{:.2}", r.median_s / p),
            _ => String::new(),
        };
        let achieved = r.gflops_per_s();
        out.push_str(&format!(
            "| {} | {:.3} | {} | {:.0} | {} | {:.3} | {:.1} | {:.1} |\n",
            r.case,
            r.median_s,
            ratio,
            r.peak_mib,
            r.latent,
            r.flops as f64 / 1e9,
            achieved,
            100.0 * achieved / peak_gflops
        ));
    }
    out
}

/// The memory detail of each row, as the reference script prints it: what was in use when the
/// case started and the peak above it (the case's own share). Kept apart from [`perf_table`],
/// whose rows [`compare::parse_report`] reads.
pub fn memory_table(rows: &[BenchRow], on_device: bool) -> String {
    let unit = if on_device { "device " } else { "" };
    let mut out = format!(
        "| case (memory detail) | {unit}in use before case MiB | peak since reset MiB | \
         peak above start MiB |\n|---|---|---|---|\n"
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} |\n",
            r.case,
            r.start_mib,
            r.peak_mib,
            r.peak_mib - r.start_mib
        ));
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (median seconds, peak MiB, MiB in use at the start) of `f` after one warm-up. The device is
/// synchronised after each call, so GPU work is inside the time. Memory: peak RSS on the CPU;
/// on a GPU, peak device memory in use above `device_baseline_mib` ([`device_mem`]).
fn timed(
    device: &Device,
    device_baseline_mib: Option<f64>,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, f64, f64)> {
    let start = in_use_mib(device, device_baseline_mib);
    reset_peak_rss();
    let sampler = device_baseline_mib.and_then(|_| device_mem::PeakSampler::start(device));
    f()?; // warm-up
    device.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((median(times), peak_mib(sampler, device_baseline_mib), start))
}

/// Memory in use now: RSS on the CPU; on a GPU, device memory above `device_baseline_mib`.
fn in_use_mib(device: &Device, device_baseline_mib: Option<f64>) -> f64 {
    match device_baseline_mib {
        Some(base) => device_mem::in_use_mib(device).map_or(f64::NAN, |m| m - base),
        None => rss_mib(),
    }
}

/// Peak since the last [`reset_peak_rss`] (CPU) or since `sampler` started (GPU, above
/// `device_baseline_mib`).
fn peak_mib(sampler: Option<device_mem::PeakSampler>, device_baseline_mib: Option<f64>) -> f64 {
    match (sampler, device_baseline_mib) {
        (Some(s), Some(base)) => s.finish() - base,
        _ => peak_rss_mib(),
    }
}

/// [`timed`] for several cases at once, their repetitions interleaved (one warm-up each, then
/// rounds of one call per case): a machine whose speed drifts over minutes (a shared VM) then
/// slows every case alike, so ratios between cases (the N-style cost) stay fair. Before every
/// call the allocator's free memory is handed back (as the daemon does between jobs), so each
/// case's peak is its own; returned per case: (median seconds, peak MiB, MiB in use at the
/// start of its first timed call).
fn timed_interleaved(
    device: &Device,
    device_baseline_mib: Option<f64>,
    reps: usize,
    cases: &mut [impl FnMut() -> Result<()>],
) -> Result<Vec<(f64, f64, f64)>> {
    let mut times = vec![Vec::with_capacity(reps.max(1)); cases.len()];
    let mut peaks = vec![0f64; cases.len()];
    let mut starts = vec![f64::NAN; cases.len()];
    for round in 0..=reps.max(1) {
        for (i, f) in cases.iter_mut().enumerate() {
            crate::engine::device::release_free_host_memory();
            let start = in_use_mib(device, device_baseline_mib);
            reset_peak_rss();
            let sampler = device_baseline_mib.and_then(|_| device_mem::PeakSampler::start(device));
            let t = Instant::now();
            f()?;
            device.synchronize()?;
            let elapsed = t.elapsed().as_secs_f64();
            let peak = peak_mib(sampler, device_baseline_mib);
            if round == 0 {
                continue; // warm-up: neither timed nor counted in the peak
            }
            if round == 1 {
                starts[i] = start;
            }
            times[i].push(elapsed);
            peaks[i] = peaks[i].max(peak);
        }
    }
    Ok(times
        .into_iter()
        .zip(peaks)
        .zip(starts)
        .map(|((t, p), s)| (median(t), p, s))
        .collect())
}

/// Time one training iteration (content + style step with backward and AdamW; unless
/// `b.train` is false) and one sampling step for each style count, on `unet` with random inputs.
pub fn run_perf_bench(unet: &mut UNet, b: &PerfBench, device: &Device) -> Result<Vec<BenchRow>> {
    if b.latent == 0 || b.sample_latent == 0 || b.rank == 0 {
        return Err(Error::InvalidArgument(
            "--latent, --sample-latent and --rank must be positive".into(),
        ));
    }
    let dtype = b.dtype;
    // LoRA parameters stay f32 on a bf16/f16 UNet (mixed precision, as PEFT keeps them).
    let lora_dtype = DType::F32;
    let cross = unet.config().down[0].cross_attention_dim;
    let pooled_dim = unet.config().text_time.map(|(a, p)| p - 6 * a);
    let mut noise = NoiseSource::new(0);
    let in_ch = unet.config().file.in_channels;
    let latent_at = |n: &mut NoiseSource, batch: usize, side: usize| {
        n.randn(&[batch, in_ch, side, side], dtype, device)
    };
    let latent = |n: &mut NoiseSource, batch: usize| latent_at(n, batch, b.latent);
    let cond = |n: &mut NoiseSource, batch: usize| -> Result<Conditioning> {
        Ok(Conditioning {
            context: n.randn(&[batch, flops::CONTEXT_TOKENS, cross], dtype, device)?,
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
                    .to_dtype(dtype)?
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
                        &basis.rows(n_in, start, b.rank, lora_dtype, device)?,
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
            train_down: false,
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
    if b.train {
        let needed = flops::training_iteration(unet.config(), b.latent, b.rank)?.total();
        let (s, m, start) = timed(device, b.device_baseline_mib, b.reps, || {
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
            start_mib: start,
            latent: b.latent,
            flops: needed,
        });
    }
    crate::trainer::detach_adapters(unet);

    // Sampling: attach up to max(styles) style adapters, each a copy of the learned style.
    let max_styles = b.styles.iter().copied().max().unwrap_or(0);
    let set: AdapterSet = style.to_adapter_set()?;
    for i in 0..max_styles {
        set.attach(unet, &format!("style{i}"))?;
    }
    // The sampling cases' inputs, then their timings interleaved (see `timed_interleaved`).
    let mut cases = Vec::with_capacity(b.styles.len());
    for &n in &b.styles {
        let batch = 2 + n;
        let c = cond(&mut noise, batch)?;
        let a = added(&c, batch)?;
        // One latent for every branch, as in generation (`forward_shared_latent`).
        let x = latent_at(&mut noise, 1, b.sample_latent)?;
        let mut scales = AdapterScales::none();
        for i in 0..n {
            let mut v = vec![0f32; batch];
            v[2 + i] = 1.0;
            scales.set(&format!("style{i}"), Tensor::new(v, device)?);
        }
        cases.push((n, x, c, a, scales));
    }
    let unet_ref: &UNet = unet;
    let mut steps: Vec<_> = cases
        .iter()
        .map(|(n, x, c, a, scales)| {
            move || {
                unet_ref
                    .forward_shared_latent(x, 2 + n, 500.0, &c.context, a.as_ref(), scales)
                    .map(|_| ())
            }
        })
        .collect();
    let measured = timed_interleaved(device, b.device_baseline_mib, b.reps, &mut steps)?;
    drop(steps);
    for ((n, ..), (s, m, start)) in cases.iter().zip(measured) {
        let (n, batch) = (*n, 2 + *n);
        let needed = flops::sampling_step(unet.config(), b.sample_latent, n, b.rank)?.total();
        let case = if n == 0 {
            "sampling step, plain CFG (batch 2)".to_string()
        } else {
            format!("sampling step, {n} style(s) (batch {batch})")
        };
        rows.push(BenchRow {
            case,
            median_s: s,
            peak_mib: m,
            start_mib: start,
            latent: b.sample_latent,
            flops: needed,
        });
    }
    for i in 0..max_styles {
        AdapterSet::detach(unet, &format!("style{i}"));
    }
    Ok(rows)
}
