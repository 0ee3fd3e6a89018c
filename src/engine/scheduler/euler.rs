//! Euler discrete (Karras et al. 2022, Algorithm 2 with s_churn = 0), as diffusers'
//! `EulerDiscreteScheduler` (SDXL's default). Works in σ-space: latents start at σ_max scale and
//! the UNet input is divided by sqrt(σ² + 1).

use candle_core::{DType, Tensor};

use super::config::{
    sqrt_f32, FinalSigmasType, InterpolationType, PredictionType, SchedulerClass, SchedulerConfig,
    TimestepSpacing, TimestepType,
};
use super::{check_steps, np_arange_down, np_linspace, Sampler};
use crate::error::{Error, Result};

/// Deterministic Euler sampler.
#[derive(Debug, Clone)]
pub struct EulerSampler {
    /// Timesteps rounded to integers (exact for "leading"/"trailing" spacing).
    timesteps: Vec<usize>,
    /// The float32 timesteps diffusers feeds the UNet, widened to f64.
    model_timesteps: Vec<f64>,
    /// σ for each timestep followed by the final σ (float32 values widened to f64).
    sigmas: Vec<f64>,
    /// Scale of the initial noise.
    init_noise_sigma: f64,
    /// What the model predicts.
    prediction_type: PredictionType,
    /// Position in the schedule; set by the first `step` from its timestep.
    step_index: Option<usize>,
}

/// `numpy.interp(x, arange(len(fp)), fp)` for x inside or outside [0, len − 1].
fn interp_unit_grid(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log-sigma matches `sigma`.
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Last index with log_sigmas[i] <= log_sigma (0 if none), clipped to n − 2.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n.saturating_sub(2));
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

impl EulerSampler {
    /// `EulerDiscreteScheduler.from_config(cfg)` then `set_timesteps(num_inference_steps)`.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        check_steps(cfg, num_inference_steps)?;
        let class = SchedulerClass::Euler;
        let unsupported = |what: &str| {
            Err(Error::Unsupported(format!(
                "scheduler config key {what} (Euler)"
            )))
        };
        if cfg.interpolation_type == InterpolationType::LogLinear {
            return unsupported("`interpolation_type` = log_linear");
        }
        if cfg.use_exponential_sigmas {
            return unsupported("`use_exponential_sigmas` = true");
        }
        if cfg.use_beta_sigmas {
            return unsupported("`use_beta_sigmas` = true");
        }
        if cfg.timestep_type == TimestepType::Continuous
            && cfg.prediction_type == PredictionType::VPrediction
        {
            return unsupported("`timestep_type` = continuous");
        }
        let n = num_inference_steps;
        let n_train = cfg.num_train_timesteps;
        let ac = cfg.alphas_cumprod_f32(class);
        // Training sigmas sqrt((1 − ᾱ)/ᾱ) in float32.
        let train_sigmas: Vec<f32> = ac.iter().map(|&a| sqrt_f32((1.0 - a) / a)).collect();
        let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
        let spacing = cfg.timestep_spacing_for(class);
        let mut ts: Vec<f32> = match spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|x| x as f32)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f32 + cfg.steps_offset as f32)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / n as f64;
                np_arange_down(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .take(n)
                    .map(|x| x.round_ties_even() as f32 - 1.0)
                    .collect()
            }
        };
        let mut sig: Vec<f64> = ts
            .iter()
            .map(|&t| interp_unit_grid(t as f64, &fp))
            .collect();
        if cfg.use_karras_sigmas {
            let smin = cfg.sigma_min.unwrap_or(sig[sig.len() - 1]);
            let smax = cfg.sigma_max.unwrap_or(sig[0]);
            let rho = 7.0f64;
            let (min_inv, max_inv) = (smin.powf(1.0 / rho), smax.powf(1.0 / rho));
            sig = np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                .collect();
            // numpy takes the log of the float32 sigmas in float32.
            let log_sigmas: Vec<f64> = train_sigmas.iter().map(|&s| s.ln() as f64).collect();
            ts = sig
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let last = match cfg.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas[0] as f64,
        };
        sig.push(last);
        let sigmas: Vec<f64> = sig.into_iter().map(|s| s as f32 as f64).collect();
        let max_sigma = sigmas.iter().copied().fold(f64::MIN, f64::max) as f32;
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma as f64,
            TimestepSpacing::Leading => sqrt_f32(max_sigma * max_sigma + 1.0) as f64,
        };
        let timesteps = ts
            .iter()
            .map(|&t| {
                let r = (t as f64).round_ties_even();
                if r < 0.0 {
                    Err(Error::InvalidArgument(format!(
                        "Euler timestep {t} is negative"
                    )))
                } else {
                    Ok(r as usize)
                }
            })
            .collect::<Result<Vec<usize>>>()?;
        Ok(Self {
            timesteps,
            model_timesteps: ts.iter().map(|&t| t as f64).collect(),
            sigmas,
            init_noise_sigma,
            prediction_type: cfg.prediction_type,
            step_index: None,
        })
    }

    /// The sigmas of the schedule, with the final one (for tests and progress display).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// diffusers' `index_for_timestep`: the second match if the timestep repeats, else the first.
    fn index_for_timestep(&self, timestep: usize) -> Result<usize> {
        let hits: Vec<usize> = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == timestep)
            .map(|(i, _)| i)
            .take(2)
            .collect();
        match hits.as_slice() {
            [] => Err(Error::InvalidArgument(format!(
                "Euler: timestep {timestep} is not in the schedule {:?}",
                self.timesteps
            ))),
            [i] => Ok(*i),
            [_, j, ..] => Ok(*j),
        }
    }

    /// The position for `timestep`: the running index once stepping has started.
    fn current_index(&self, timestep: usize) -> Result<usize> {
        match self.step_index {
            Some(i) => Ok(i),
            None => self.index_for_timestep(timestep),
        }
    }
}

/// Upcast half-precision tensors to f32 (diffusers steps Euler in float32).
fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(match t.dtype() {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32)?,
        _ => t.clone(),
    })
}

impl Sampler for EulerSampler {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn model_timesteps(&self) -> &[f64] {
        &self.model_timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: usize) -> Result<Tensor> {
        let i = self.current_index(timestep)?;
        let sigma = self.sigmas[i] as f32;
        let denom = sqrt_f32(sigma * sigma + 1.0);
        // Divide by a scalar tensor (not multiply by 1/denom) to round like torch.
        let d = Tensor::new(denom, sample.device())?.to_dtype(sample.dtype())?;
        Ok(sample.broadcast_div(&d)?)
    }

    fn step(&mut self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> Result<Tensor> {
        let i = self.current_index(timestep)?;
        let next = *self.sigmas.get(i + 1).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "Euler: step called {} times for a {}-step schedule",
                i + 1,
                self.timesteps.len()
            ))
        })?;
        // diffusers' float32 arithmetic, op for op (s_churn = 0, so σ̂ = σ): scalars are float32
        // values, so `affine` multiplies exactly and divisions go through a scalar tensor.
        let sigma = self.sigmas[i] as f32;
        let dt = next as f32 - sigma;
        let out_dtype = model_output.dtype();
        let x = upcast(sample)?;
        let m = upcast(model_output)?.to_dtype(x.dtype())?;
        let scalar =
            |v: f32| -> Result<Tensor> { Ok(Tensor::new(v, x.device())?.to_dtype(x.dtype())?) };
        let pred_x0 = match self.prediction_type {
            PredictionType::Epsilon => (&x - m.affine(sigma as f64, 0.0)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                let c_out = -sigma / sqrt_f32(s2);
                (m.affine(c_out as f64, 0.0)? + x.broadcast_div(&scalar(s2)?)?)?
            }
            PredictionType::Sample => m,
        };
        let derivative = (&x - pred_x0)?.broadcast_div(&scalar(sigma)?)?;
        let prev = (&x + derivative.affine(dt as f64, 0.0)?)?;
        self.step_index = Some(i + 1);
        Ok(prev.to_dtype(out_dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_matches_numpy_edges() {
        let fp = [1.0, 2.0, 4.0];
        assert_eq!(interp_unit_grid(-1.0, &fp), 1.0);
        assert_eq!(interp_unit_grid(1.0, &fp), 2.0);
        assert_eq!(interp_unit_grid(1.5, &fp), 3.0);
        assert_eq!(interp_unit_grid(7.0, &fp), 4.0);
    }

    #[test]
    fn sigma_to_t_inverts_grid() {
        let logs: Vec<f64> = [0.1f64, 0.2, 0.4, 0.8].iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(0.2, &logs) - 1.0).abs() < 1e-12);
        assert!((sigma_to_t(0.8, &logs) - 3.0).abs() < 1e-12);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
    }
}
