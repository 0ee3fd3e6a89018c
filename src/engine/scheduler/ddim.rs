//! DDIM (Song et al. 2020) with eta = 0, as diffusers' `DDIMScheduler` (SD 2.x's default).

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerClass, SchedulerConfig, TimestepSpacing};
use super::{
    check_steps, check_timestep_range, integer_timesteps, lincomb, timestep_index, Sampler,
};
use crate::error::{Error, Result};

/// Deterministic DDIM sampler (eta = 0).
#[derive(Debug, Clone)]
pub struct DdimSampler {
    /// ᾱ_t (diffusers' float32 values).
    alphas_cumprod: Vec<f64>,
    /// ᾱ used after the last step: 1 with `set_alpha_to_one`, else ᾱ_0.
    final_alpha_cumprod: f64,
    /// Descending timesteps to visit.
    timesteps: Vec<usize>,
    /// The same as f64, for the UNet.
    model_timesteps: Vec<f64>,
    /// `num_train_timesteps / steps` (integer): the distance to the previous timestep.
    step_ratio: i64,
    /// What the model predicts.
    prediction_type: PredictionType,
    /// Clamp predicted x₀ to ±`clip_range` when set.
    clip_sample: bool,
    /// `clip_sample_range`.
    clip_range: f64,
}

impl DdimSampler {
    /// `DDIMScheduler.from_config(cfg)` then `set_timesteps(num_inference_steps)`.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        check_steps(cfg, num_inference_steps)?;
        let class = SchedulerClass::Ddim;
        if cfg.thresholding {
            return Err(Error::Unsupported(
                "scheduler config key `thresholding` = true (DDIM dynamic thresholding)".into(),
            ));
        }
        let alphas_cumprod: Vec<f64> = cfg
            .alphas_cumprod_f32(class)
            .into_iter()
            .map(f64::from)
            .collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one_for(class) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing: TimestepSpacing = cfg.timestep_spacing_for(class);
        let n_train = cfg.num_train_timesteps;
        let ts = integer_timesteps(spacing, n_train, num_inference_steps, cfg.steps_offset);
        check_timestep_range(&ts, n_train, cfg)?;
        let timesteps: Vec<usize> = ts.iter().map(|&t| t as usize).collect();
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            model_timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            step_ratio: (n_train / num_inference_steps) as i64,
            prediction_type: cfg.prediction_type,
            clip_sample: cfg.clip_sample_for(class),
            clip_range: cfg.clip_sample_range,
        })
    }
}

impl Sampler for DdimSampler {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn model_timesteps(&self) -> &[f64] {
        &self.model_timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _timestep: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(&mut self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> Result<Tensor> {
        let n = self.alphas_cumprod.len();
        let t = timestep_index(timestep as i64, n, "DDIM")?;
        let prev = timestep as i64 - self.step_ratio;
        let a = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[timestep_index(prev, n, "DDIM")?]
        } else {
            self.final_alpha_cumprod
        };
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        // x0 = c1·sample + c2·output, ε = c3·sample + c4·output.
        let (c1, c2, c3, c4) = match self.prediction_type {
            PredictionType::Epsilon => (1.0 / sa, -sb / sa, 0.0, 1.0),
            PredictionType::Sample => (0.0, 1.0, 1.0 / sb, -sa / sb),
            PredictionType::VPrediction => (sa, -sb, sb, sa),
        };
        // eta = 0: no variance term; direction pointing to x_t uses sqrt(1 − ᾱ_prev).
        let (pa, pd) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        if self.clip_sample {
            let x0 =
                lincomb(sample, c1, model_output, c2)?.clamp(-self.clip_range, self.clip_range)?;
            let eps = lincomb(sample, c3, model_output, c4)?;
            lincomb(&x0, pa, &eps, pd)
        } else {
            lincomb(sample, pa * c1 + pd * c3, model_output, pa * c2 + pd * c4)
        }
    }
}
