//! The DDPM forward process for training: noising clean latents at per-sample timesteps
//! (diffusers `DDPMScheduler.add_noise` / `get_velocity`) and the matching training target.

use candle_core::{DType, Tensor};

use super::config::{PredictionType, SchedulerClass, SchedulerConfig};
use crate::error::{Error, Result};

/// ᾱ_t of the training schedule, for noising and for the loss target.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// ᾱ_t (float32 values as diffusers computes them, widened to f64).
    alphas_cumprod: Vec<f64>,
    /// What the model is trained to predict (`prediction_type` of the config).
    prediction_type: PredictionType,
}

impl NoiseSchedule {
    /// The schedule of a `DDPMScheduler` built from `cfg` (betas, `rescale_betas_zero_snr`).
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        cfg.check()?;
        let alphas_cumprod = cfg
            .alphas_cumprod_f32(SchedulerClass::Ddpm)
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Self {
            alphas_cumprod,
            prediction_type: cfg.prediction_type,
        })
    }

    /// ᾱ_t for t = 0 … num_train_timesteps − 1.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Number of training timesteps (draw t uniformly from `0..len`).
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The config's `prediction_type`, i.e. the default target of [`NoiseSchedule::target`].
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// Per-sample coefficients `f(ᾱ_t)` shaped `[B, 1, …, 1]` to broadcast over `like`.
    fn coeffs(&self, like: &Tensor, timesteps: &[usize], f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let dims = like.dims();
        let batch = dims.first().copied().unwrap_or(1);
        if timesteps.len() != batch && timesteps.len() != 1 {
            return Err(Error::InvalidArgument(format!(
                "{} timesteps for a batch of {batch} samples",
                timesteps.len()
            )));
        }
        let values = timesteps
            .iter()
            .map(|&t| {
                self.alphas_cumprod.get(t).map(|&a| f(a)).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "timestep {t} is outside the training schedule [0, {})",
                        self.alphas_cumprod.len()
                    ))
                })
            })
            .collect::<Result<Vec<f64>>>()?;
        let mut shape = vec![values.len()];
        shape.extend(std::iter::repeat_n(1, dims.len().saturating_sub(1)));
        let t = Tensor::from_vec(values, shape, like.device())?;
        Ok(t.to_dtype(like.dtype())?)
    }

    /// Check that the two operands agree in shape and dtype.
    fn check_pair(a: &Tensor, b: &Tensor) -> Result<()> {
        if a.dims() != b.dims() || a.dtype() != b.dtype() {
            return Err(Error::InvalidArgument(format!(
                "sample {:?} {:?} and noise {:?} {:?} must have the same shape and dtype",
                a.dims(),
                a.dtype(),
                b.dims(),
                b.dtype()
            )));
        }
        Ok(())
    }

    /// x_t = sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε, with one timestep per sample (or one for all).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        Self::check_pair(x0, noise)?;
        let a = self.coeffs(x0, timesteps, f64::sqrt)?;
        let b = self.coeffs(x0, timesteps, |a| (1.0 - a).sqrt())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&b)?)?)
    }

    /// v_t = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x₀ (the v-prediction target, diffusers `get_velocity`).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        Self::check_pair(x0, noise)?;
        let a = self.coeffs(x0, timesteps, f64::sqrt)?;
        let b = self.coeffs(x0, timesteps, |a| (1.0 - a).sqrt())?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&b)?)?)
    }

    /// The regression target for `prediction_type`: ε, v, or x₀.
    pub fn target(
        &self,
        prediction_type: PredictionType,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        match prediction_type {
            PredictionType::Epsilon => {
                Self::check_pair(x0, noise)?;
                Ok(noise.clone())
            }
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => {
                Self::check_pair(x0, noise)?;
                Ok(x0.clone())
            }
        }
    }

    /// ᾱ_t as a 1-D f32 tensor on `device` (for code that gathers it on the device).
    pub fn alphas_cumprod_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Ok(Tensor::new(self.alphas_cumprod.as_slice(), device)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn sd_schedule() -> NoiseSchedule {
        NoiseSchedule::new(&SchedulerConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: super::super::BetaSchedule::ScaledLinear,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn add_noise_per_sample_and_velocity_identity() {
        let s = sd_schedule();
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let e = Tensor::new(&[[0.5f32, -0.5], [1.0, -1.0]], &dev).unwrap();
        let xt = s
            .add_noise(&x0, &e, &[0, 999])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let a0 = s.alphas_cumprod()[0];
        let a1 = s.alphas_cumprod()[999];
        let want0 = a0.sqrt() * 1.0 + (1.0 - a0).sqrt() * 0.5;
        let want1 = a1.sqrt() * 4.0 - (1.0 - a1).sqrt();
        assert!((xt[0][0] as f64 - want0).abs() < 1e-6);
        assert!((xt[1][1] as f64 - want1).abs() < 1e-6);
        // x0 = sqrt(a) x_t - sqrt(1-a) v
        let v = s
            .velocity(&x0, &e, &[0, 999])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let rec = a1.sqrt() * xt[1][1] as f64 - (1.0 - a1).sqrt() * v[1][1] as f64;
        assert!((rec - 4.0).abs() < 1e-5, "{rec}");
    }

    #[test]
    fn bad_timesteps_are_errors() {
        let s = sd_schedule();
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(s.add_noise(&x, &x, &[1000, 0]).is_err());
        assert!(s.add_noise(&x, &x, &[1, 2, 3]).is_err());
        assert!(s.add_noise(&x, &x, &[5]).is_ok());
    }
}
