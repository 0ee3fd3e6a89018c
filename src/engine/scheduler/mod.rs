//! Noise schedulers, numerically equal to diffusers 0.42: the DDPM forward process used in
//! training ([`NoiseSchedule`]) and three samplers for generation ([`Sampler`]): Euler discrete
//! (SDXL's default), DDIM (SD 2.x) and PNDM (SD 1.x, the paper's sampler).
//!
//! Usage in a sampling loop, as diffusers' pipelines do it:
//! ```text
//! let mut s = make_sampler(kind, &cfg, steps)?;
//! let mut x = noise * s.init_noise_sigma();
//! for (i, &t) in s.timesteps().to_vec().iter().enumerate() {
//!     let inp = s.scale_model_input(&x, t)?;          // identity except for Euler
//!     let eps = unet(inp, s.model_timesteps()[i])?;   // + classifier-free guidance
//!     x = s.step(&eps, t, &x)?;
//! }
//! ```
//! Scalar coefficients are computed in f64 from diffusers' float32 schedule values and applied
//! to tensors of any shape in their own dtype.

mod config;
mod ddim;
mod ddpm;
mod euler;
mod pndm;

use std::str::FromStr;

use candle_core::Tensor;

pub use config::{
    BetaSchedule, FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig,
    TimestepSpacing, TimestepType,
};
pub use ddim::DdimSampler;
pub use ddpm::NoiseSchedule;
pub use euler::EulerSampler;
pub use pndm::PndmSampler;

use crate::error::{Error, Result};

/// The samplers this engine implements (`--scheduler euler|ddim|pndm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// diffusers `EulerDiscreteScheduler` (deterministic, `s_churn` = 0).
    Euler,
    /// diffusers `DDIMScheduler` with eta = 0.
    Ddim,
    /// diffusers `PNDMScheduler` (PLMS when `skip_prk_steps`, else Runge–Kutta warm-up).
    Pndm,
}

impl SchedulerKind {
    /// The sampler a model folder ships with, from its config's `_class_name`
    /// (Euler for Euler-family and unknown classes such as DPM-Solver, which we do not implement).
    pub fn default_for(cfg: &SchedulerConfig) -> Self {
        match cfg.class_name.as_deref() {
            Some("PNDMScheduler") => Self::Pndm,
            Some("DDIMScheduler") => Self::Ddim,
            Some("EulerDiscreteScheduler") | Some("EulerAncestralDiscreteScheduler") => Self::Euler,
            other => {
                tracing::warn!(
                    "scheduler class {:?} is not implemented; using Euler discrete",
                    other.unwrap_or("(none)")
                );
                Self::Euler
            }
        }
    }

    /// The lower-case name used on the command line and in config files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
        }
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Parse `euler`, `ddim` or `pndm` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "euler" => Ok(Self::Euler),
            "ddim" => Ok(Self::Ddim),
            "pndm" => Ok(Self::Pndm),
            _ => Err(Error::InvalidArgument(format!(
                "unknown scheduler {s:?} (expected euler, ddim or pndm)"
            ))),
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    /// Writes the command-line name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A sampler walking the reverse diffusion for a fixed number of inference steps.
pub trait Sampler: Send {
    /// The timesteps to visit, in order (PNDM repeats one, so its list may be longer than the
    /// step count); pass each to [`Sampler::scale_model_input`] and [`Sampler::step`].
    fn timesteps(&self) -> &[usize];

    /// The timestep value to give the UNet at each position of [`Sampler::timesteps`]; equal to
    /// it except for Euler's fractional timesteps (linspace spacing, Karras sigmas).
    fn model_timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise: multiply unit Gaussian latents by this.
    fn init_noise_sigma(&self) -> f64;

    /// The UNet input for `sample` at `timestep` (Euler divides by sqrt(σ²+1); others: identity).
    fn scale_model_input(&self, sample: &Tensor, timestep: usize) -> Result<Tensor>;

    /// Advance `sample` from `timestep` to the next timestep given the (guided) model output.
    fn step(&mut self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> Result<Tensor>;
}

/// Build a sampler of `kind` from a model's scheduler config, as diffusers'
/// `<Kind>Scheduler.from_config(config)` followed by `set_timesteps(num_inference_steps)`.
pub fn make_sampler(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Sampler>> {
    cfg.check()?;
    Ok(match kind {
        SchedulerKind::Euler => Box::new(EulerSampler::new(cfg, num_inference_steps)?),
        SchedulerKind::Ddim => Box::new(DdimSampler::new(cfg, num_inference_steps)?),
        SchedulerKind::Pndm => Box::new(PndmSampler::new(cfg, num_inference_steps)?),
    })
}

/// Reject step counts diffusers cannot schedule (0, or more than the training timesteps).
fn check_steps(cfg: &SchedulerConfig, n: usize) -> Result<()> {
    if n == 0 || n > cfg.num_train_timesteps {
        return Err(Error::InvalidArgument(format!(
            "number of inference steps must be between 1 and {} (num_train_timesteps), got {n}",
            cfg.num_train_timesteps
        )));
    }
    Ok(())
}

/// `numpy.linspace(start, stop, num)` (endpoint included), element by element as numpy does.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// `numpy.arange(start, stop, step)` for a negative float step, as numpy fills it
/// (length from a ceiling division; element i = start + i·(fl(start + step) − start)).
fn np_arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The descending integer timesteps of DDIM and PNDM (`set_timesteps`), before PNDM reorders.
///
/// "trailing" with step counts for which numpy's `arange` yields one element too many (e.g. 61
/// of 1000) makes diffusers end on timestep −1; we keep the first `n` instead.
fn integer_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange_down(num_train as f64, 0.0, -ratio)
                .into_iter()
                .take(n)
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

/// Check that every timestep indexes the training schedule; the error names `steps_offset`.
fn check_timestep_range(ts: &[i64], num_train: usize, cfg: &SchedulerConfig) -> Result<()> {
    if let Some(&bad) = ts.iter().find(|&&t| t < 0 || t >= num_train as i64) {
        return Err(Error::InvalidArgument(format!(
            "timestep {bad} is outside [0, {num_train}) (scheduler config key `steps_offset` = {} \
             with {} inference steps)",
            cfg.steps_offset,
            ts.len()
        )));
    }
    Ok(())
}

/// A timestep converted to `usize` for indexing, or an error naming the sampler.
fn timestep_index(t: i64, len: usize, who: &str) -> Result<usize> {
    if t < 0 || t as usize >= len {
        return Err(Error::InvalidArgument(format!(
            "{who}: timestep {t} is outside the training schedule [0, {len})"
        )));
    }
    Ok(t as usize)
}

/// `a·x + b·y` for two tensors of the same shape and dtype.
fn lincomb(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_default_from_class_name() {
        assert_eq!(
            "Euler".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::Euler
        );
        assert_eq!(
            "ddim".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::Ddim
        );
        assert_eq!(
            "pndm".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::Pndm
        );
        let e = "lms".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(e.contains("lms"), "{e}");
        let mut cfg = SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            ..Default::default()
        };
        assert_eq!(SchedulerKind::default_for(&cfg), SchedulerKind::Pndm);
        cfg.class_name = Some("DDIMScheduler".into());
        assert_eq!(SchedulerKind::default_for(&cfg), SchedulerKind::Ddim);
        cfg.class_name = Some("EulerDiscreteScheduler".into());
        assert_eq!(SchedulerKind::default_for(&cfg), SchedulerKind::Euler);
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(
            np_arange_down(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        // numpy.arange(1000, 0, -1000/61) has 62 elements (float rounding).
        assert_eq!(np_arange_down(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(
            integer_timesteps(TimestepSpacing::Trailing, 1000, 61, 0).len(),
            61
        );
    }

    #[test]
    fn timestep_spacings_match_diffusers() {
        // DDIMScheduler(steps_offset=1).set_timesteps(10) etc., values from diffusers 0.42.1.
        assert_eq!(
            integer_timesteps(TimestepSpacing::Leading, 1000, 10, 1),
            vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        assert_eq!(
            integer_timesteps(TimestepSpacing::Trailing, 1000, 10, 1),
            vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(
            integer_timesteps(TimestepSpacing::Linspace, 1000, 10, 1),
            vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
        );
        assert_eq!(
            integer_timesteps(TimestepSpacing::Trailing, 1000, 3, 0),
            vec![999, 666, 332]
        );
        assert_eq!(
            integer_timesteps(TimestepSpacing::Linspace, 1000, 7, 0),
            vec![999, 832, 666, 500, 333, 166, 0]
        );
    }
}
