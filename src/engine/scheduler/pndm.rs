//! PNDM (Liu et al. 2022, pseudo numerical methods), as diffusers' `PNDMScheduler`: with
//! `skip_prk_steps` the PLMS sampler (SD 1.x's default; a Heun-like second step, then Adams–
//! Bashforth of growing order), otherwise three Runge–Kutta warm-up steps before PLMS.

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerClass, SchedulerConfig};
use super::{
    check_steps, check_timestep_range, integer_timesteps, lincomb, timestep_index, Sampler,
};
use crate::error::{Error, Result};

/// PNDM sampler with its multistep history.
#[derive(Debug, Clone)]
pub struct PndmSampler {
    /// ᾱ_t (diffusers' float32 values).
    alphas_cumprod: Vec<f64>,
    /// ᾱ used past the last step: 1 with `set_alpha_to_one`, else ᾱ_0.
    final_alpha_cumprod: f64,
    /// Runge–Kutta timesteps (empty with `skip_prk_steps`) followed by the PLMS ones.
    timesteps: Vec<usize>,
    /// The same as f64, for the UNet.
    model_timesteps: Vec<f64>,
    /// How many leading entries of `timesteps` are Runge–Kutta steps.
    num_prk: usize,
    /// `num_train_timesteps / steps` (integer).
    step_ratio: i64,
    /// Whether the PLMS path starts directly (`skip_prk_steps`).
    skip_prk: bool,
    /// What the model predicts (epsilon or v).
    prediction_type: PredictionType,
    /// Number of `step` calls so far (diffusers `counter`).
    counter: usize,
    /// Past model outputs kept for the multistep formulas (at most four).
    ets: Vec<Tensor>,
    /// The sample the current multi-evaluation step started from.
    cur_sample: Option<Tensor>,
    /// Runge–Kutta running sum of weighted model outputs.
    cur_model_output: Option<Tensor>,
}

impl PndmSampler {
    /// `PNDMScheduler.from_config(cfg)` then `set_timesteps(num_inference_steps)`.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        check_steps(cfg, num_inference_steps)?;
        let class = SchedulerClass::Pndm;
        if cfg.prediction_type == PredictionType::Sample {
            return Err(Error::Unsupported(
                "scheduler config key `prediction_type` = sample with PNDM (diffusers supports \
                 only epsilon and v_prediction)"
                    .into(),
            ));
        }
        let n = num_inference_steps;
        let n_train = cfg.num_train_timesteps;
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
        // diffusers' `_timesteps`, ascending.
        let mut asc = integer_timesteps(
            cfg.timestep_spacing_for(class),
            n_train,
            n,
            cfg.steps_offset,
        );
        asc.reverse();
        let skip_prk = cfg.skip_prk_steps_for(class);
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk {
            // [t_0 … t_{n−2}, t_{n−2}, t_{n−1}] reversed: the second-to-last repeats.
            let mut plms: Vec<i64> = asc[..asc.len() - 1].to_vec();
            if asc.len() >= 2 {
                plms.push(asc[asc.len() - 2]);
            }
            plms.push(asc[asc.len() - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            const ORDER: usize = 4;
            if asc.len() < ORDER {
                return Err(Error::InvalidArgument(format!(
                    "PNDM with skip_prk_steps = false needs at least {ORDER} inference steps, got {n}"
                )));
            }
            let half = (n_train / n / 2) as i64;
            // The last four timesteps, each followed by its midpoint t + ratio/2.
            let pairs: Vec<i64> = asc[asc.len() - ORDER..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            // Drop the last, repeat each, drop the first and last, reverse.
            let doubled: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = asc[..asc.len() - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let num_prk = prk.len();
        let all: Vec<i64> = prk.into_iter().chain(plms).collect();
        check_timestep_range(&all, n_train, cfg)?;
        let timesteps: Vec<usize> = all.iter().map(|&t| t as usize).collect();
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            model_timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            num_prk,
            step_ratio: (n_train / n) as i64,
            skip_prk,
            prediction_type: cfg.prediction_type,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// ᾱ at `t`, or the final ᾱ for negative `t`.
    fn alpha(&self, t: i64) -> Result<f64> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        Ok(self.alphas_cumprod[timestep_index(t, self.alphas_cumprod.len(), "PNDM")?])
    }

    /// Formula (9) of the PNDM paper: x_{t−δ} from x_t and the (combined) model output.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, output: &Tensor) -> Result<Tensor> {
        let a = self.alpha(t)?;
        let a_prev = self.alpha(prev_t)?;
        let (b, b_prev) = (1.0 - a, 1.0 - a_prev);
        let sample_coeff = (a_prev / a).sqrt();
        let denom = a * b_prev.sqrt() + (a * b * a_prev).sqrt();
        let out_coeff = -(a_prev - a) / denom;
        match self.prediction_type {
            // ε = sqrt(ᾱ)·v + sqrt(1 − ᾱ)·x_t
            PredictionType::VPrediction => lincomb(
                sample,
                sample_coeff + out_coeff * b.sqrt(),
                output,
                out_coeff * a.sqrt(),
            ),
            _ => lincomb(sample, sample_coeff, output, out_coeff),
        }
    }

    /// One Runge–Kutta sub-step (diffusers `step_prk`).
    fn step_prk(&mut self, output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        let half = if self.counter % 2 == 1 {
            0
        } else {
            self.step_ratio / 2
        };
        let prev_t = timestep - half;
        let t = self.timesteps[self.counter / 4 * 4] as i64;
        let weighted = |w: f64, acc: &Option<Tensor>| -> Result<Tensor> {
            let term = output.affine(w, 0.0)?;
            Ok(match acc {
                Some(acc) => (acc + term)?,
                None => term,
            })
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(weighted(1.0 / 6.0, &self.cur_model_output)?);
                self.ets.push(output.clone());
                self.cur_sample = Some(sample.clone());
                output.clone()
            }
            1 | 2 => {
                self.cur_model_output = Some(weighted(1.0 / 3.0, &self.cur_model_output)?);
                output.clone()
            }
            _ => {
                let combined = weighted(1.0 / 6.0, &self.cur_model_output)?;
                self.cur_model_output = None;
                combined
            }
        };
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// One linear multistep step (diffusers `step_plms`).
    fn step_plms(&mut self, output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        if !self.skip_prk && self.ets.len() < 3 {
            return Err(Error::InvalidArgument(
                "PNDM: PLMS steps need the Runge-Kutta warm-up first".into(),
            ));
        }
        let mut t = timestep;
        let mut prev_t = timestep - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(output.clone());
        } else {
            prev_t = timestep;
            t = timestep + self.step_ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut x = sample.clone();
        let combined = match (k, self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.clone());
                output.clone()
            }
            (1, 1) => {
                // Second evaluation at the same timestep: average, restart from the saved sample.
                if let Some(s) = self.cur_sample.take() {
                    x = s;
                }
                lincomb(output, 0.5, &e[0], 0.5)?
            }
            (2, _) => lincomb(&e[1], 1.5, &e[0], -0.5)?,
            (3, _) => {
                (lincomb(&e[2], 23.0 / 12.0, &e[1], -16.0 / 12.0)?
                    + e[0].affine(5.0 / 12.0, 0.0)?)?
            }
            (4, _) => {
                let a = lincomb(&e[3], 55.0 / 24.0, &e[2], -59.0 / 24.0)?;
                let b = lincomb(&e[1], 37.0 / 24.0, &e[0], -9.0 / 24.0)?;
                (a + b)?
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "PNDM: inconsistent history ({k} outputs at step {})",
                    self.counter
                )))
            }
        };
        let prev = self.prev_sample(&x, t, prev_t, &combined)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Sampler for PndmSampler {
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
        let t = timestep as i64;
        if self.counter < self.num_prk && !self.skip_prk {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15(skip_prk: bool) -> SchedulerConfig {
        SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: super::super::BetaSchedule::ScaledLinear,
            steps_offset: 1,
            skip_prk_steps: Some(skip_prk),
            ..Default::default()
        }
    }

    #[test]
    fn plms_timesteps_repeat_second() {
        let s = PndmSampler::new(&sd15(true), 10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
    }

    #[test]
    fn prk_timesteps_match_diffusers() {
        // PNDMScheduler(steps_offset=1, skip_prk_steps=False).set_timesteps(10)
        let s = PndmSampler::new(&sd15(false), 10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[
                901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301,
                201, 101, 1
            ]
        );
        assert_eq!(s.num_prk, 12);
    }
}
