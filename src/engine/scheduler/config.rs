//! `scheduler/config.json` as diffusers writes it, and the training noise schedule it implies.
//!
//! Parsing is lenient where diffusers is (unknown keys and `null` values are ignored) and strict
//! where a value would change the numbers (an unknown `beta_schedule` or `prediction_type` is an
//! error naming the key). Keys whose default differs between scheduler classes (for example
//! `timestep_spacing`: `leading` for PNDM/DDIM, `linspace` for Euler) stay `None` when absent and
//! are resolved the way `OtherScheduler.from_config(scheduler.config)` resolves them: the class
//! named in `_class_name` fills in its own defaults first, the target class the rest.

use std::str::FromStr;

use serde_json::{Map, Value};

use crate::engine::model_dir::{read_json, ModelDir};
use crate::error::{Error, Result};

/// How the training betas grow from `beta_start` to `beta_end` (diffusers `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linear`: betas evenly spaced.
    Linear,
    /// `scaled_linear`: square roots evenly spaced, then squared (Stable Diffusion).
    ScaledLinear,
    /// `squaredcos_cap_v2`: the Glide cosine schedule, betas capped at 0.999.
    SquaredcosCapV2,
}

/// What the denoising model predicts (diffusers `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// `epsilon`: the added noise.
    Epsilon,
    /// `v_prediction`: the velocity sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀ (SD 2.x 768 models).
    VPrediction,
    /// `sample` (alias `original_sample`): the clean sample x₀.
    Sample,
}

/// How inference timesteps are spread over the training range (diffusers `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `leading`: multiples of `num_train_timesteps / steps`, plus `steps_offset`.
    Leading,
    /// `trailing`: counted down from the last training timestep.
    Trailing,
    /// `linspace`: evenly spaced over [0, num_train_timesteps − 1].
    Linspace,
}

/// How Euler interpolates its sigmas between training timesteps (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationType {
    /// `linear`: linear interpolation of sigma in the timestep.
    Linear,
    /// `log_linear`: log-spaced sigmas (parsed, not supported by our Euler).
    LogLinear,
}

/// The sigma Euler ends on (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmasType {
    /// `zero`: the last step lands on a noise-free sample.
    Zero,
    /// `sigma_min`: the last sigma is the smallest training sigma.
    SigmaMin,
}

/// Whether Euler feeds the UNet discrete timesteps or `0.25·ln σ` (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    /// `discrete`: the (possibly fractional) training timestep.
    Discrete,
    /// `continuous`: `0.25·ln σ` when predicting v (parsed, not supported).
    Continuous,
}

/// The diffusers scheduler classes whose defaults we know, to resolve class-dependent keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SchedulerClass {
    /// `PNDMScheduler`.
    Pndm,
    /// `DDIMScheduler`.
    Ddim,
    /// `EulerDiscreteScheduler` (and the ancestral variant, same defaults for our keys).
    Euler,
    /// `DDPMScheduler` (training noise).
    Ddpm,
}

impl SchedulerClass {
    /// The class a diffusers `_class_name` denotes, if one of ours.
    fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "PNDMScheduler" => Some(Self::Pndm),
            "DDIMScheduler" => Some(Self::Ddim),
            "EulerDiscreteScheduler" | "EulerAncestralDiscreteScheduler" => Some(Self::Euler),
            "DDPMScheduler" => Some(Self::Ddpm),
            _ => None,
        }
    }

    /// Default `timestep_spacing` of the class (every one of ours has the key).
    fn default_spacing(self) -> Option<TimestepSpacing> {
        Some(match self {
            Self::Euler => TimestepSpacing::Linspace,
            Self::Pndm | Self::Ddim | Self::Ddpm => TimestepSpacing::Leading,
        })
    }

    /// Default `set_alpha_to_one`, for the classes that have the key.
    fn default_set_alpha_to_one(self) -> Option<bool> {
        match self {
            Self::Pndm => Some(false),
            Self::Ddim => Some(true),
            Self::Euler | Self::Ddpm => None,
        }
    }

    /// Default `skip_prk_steps`, for the classes that have the key.
    fn default_skip_prk_steps(self) -> Option<bool> {
        match self {
            Self::Pndm => Some(false),
            _ => None,
        }
    }

    /// Default `clip_sample`, for the classes that have the key.
    fn default_clip_sample(self) -> Option<bool> {
        match self {
            Self::Ddim | Self::Ddpm => Some(true),
            Self::Pndm | Self::Euler => None,
        }
    }

    /// Whether the class honours `rescale_betas_zero_snr` (PNDM has no such key).
    fn has_rescale_zero_snr(self) -> bool {
        !matches!(self, Self::Pndm)
    }
}

/// A parsed `scheduler/config.json` (diffusers keys and defaults; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub struct SchedulerConfig {
    /// `_class_name`: the diffusers class that wrote the file (decides the default sampler).
    pub class_name: Option<String>,
    /// `num_train_timesteps` (1000): length of the training noise schedule.
    pub num_train_timesteps: usize,
    /// `beta_start` (0.0001): first training beta.
    pub beta_start: f64,
    /// `beta_end` (0.02): last training beta.
    pub beta_end: f64,
    /// `beta_schedule` (linear): how betas go from start to end.
    pub beta_schedule: BetaSchedule,
    /// `trained_betas` (none): explicit betas that replace the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// `prediction_type` (epsilon): what the UNet predicts.
    pub prediction_type: PredictionType,
    /// `timestep_spacing`; `None` = the class default (see [`SchedulerConfig::timestep_spacing_for`]).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// `steps_offset` (0): added to "leading" timesteps (SD ships 1).
    pub steps_offset: usize,
    /// `set_alpha_to_one`; `None` = class default (PNDM false, DDIM true).
    pub set_alpha_to_one: Option<bool>,
    /// `skip_prk_steps`; `None` = class default (PNDM false).
    pub skip_prk_steps: Option<bool>,
    /// `clip_sample`; `None` = class default (DDIM true).
    pub clip_sample: Option<bool>,
    /// `clip_sample_range` (1.0): DDIM clamps predicted x₀ to ±this when clipping.
    pub clip_sample_range: f64,
    /// `thresholding` (false): DDIM dynamic thresholding (not supported when true).
    pub thresholding: bool,
    /// `interpolation_type` (linear): Euler sigma interpolation.
    pub interpolation_type: InterpolationType,
    /// `use_karras_sigmas` (false): Euler with the Karras et al. sigma ramp.
    pub use_karras_sigmas: bool,
    /// `use_exponential_sigmas` (false): not supported when true.
    pub use_exponential_sigmas: bool,
    /// `use_beta_sigmas` (false): not supported when true.
    pub use_beta_sigmas: bool,
    /// `sigma_min` (none): lower end of the Karras ramp, default the smallest sigma.
    pub sigma_min: Option<f64>,
    /// `sigma_max` (none): upper end of the Karras ramp, default the largest sigma.
    pub sigma_max: Option<f64>,
    /// `timestep_type` (discrete): what Euler feeds the UNet.
    pub timestep_type: TimestepType,
    /// `final_sigmas_type` (zero): Euler's last sigma.
    pub final_sigmas_type: FinalSigmasType,
    /// `rescale_betas_zero_snr` (false): rescale betas to zero terminal SNR (DDIM, Euler, DDPM).
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    /// The defaults of a diffusers scheduler constructed with no arguments (no `_class_name`).
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: None,
            skip_prk_steps: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            thresholding: false,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_type: TimestepType::Discrete,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Message for a key whose value is not one of the accepted ones.
fn bad_value(key: &str, value: &Value, expected: &str) -> String {
    format!("scheduler config key `{key}`: unsupported value {value} (expected {expected})")
}

/// The value of `key`, treating JSON `null` as absent.
fn field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

/// A float key (integers accepted).
fn get_f64(map: &Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match field(map, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| bad_value(key, v, "a finite number")),
    }
}

/// A non-negative integer key.
fn get_usize(map: &Map<String, Value>, key: &str) -> Result<Option<usize>, String> {
    match field(map, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| bad_value(key, v, "a non-negative integer")),
    }
}

/// A boolean key.
fn get_bool(map: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match field(map, key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad_value(key, v, "true or false")),
    }
}

/// A string key parsed into one of a fixed set of values.
fn get_enum<T>(
    map: &Map<String, Value>,
    key: &str,
    expected: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, String> {
    match field(map, key) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .and_then(parse)
            .map(Some)
            .ok_or_else(|| bad_value(key, v, expected)),
    }
}

impl TryFrom<Value> for SchedulerConfig {
    type Error = String;

    /// Read the diffusers keys out of a parsed `config.json`; the error names the offending key.
    fn try_from(value: Value) -> std::result::Result<Self, String> {
        let map = value
            .as_object()
            .ok_or_else(|| "scheduler config must be a JSON object".to_string())?;
        let d = Self::default();
        let trained_betas = match field(map, "trained_betas") {
            None => None,
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| bad_value("trained_betas", v, "a list of numbers"))?;
                let betas = arr
                    .iter()
                    .map(|x| x.as_f64().filter(|b| b.is_finite()))
                    .collect::<Option<Vec<f64>>>()
                    .ok_or_else(|| {
                        "scheduler config key `trained_betas`: every entry must be a finite number"
                            .to_string()
                    })?;
                Some(betas)
            }
        };
        let cfg = Self {
            class_name: field(map, "_class_name")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            num_train_timesteps: get_usize(map, "num_train_timesteps")?
                .unwrap_or(d.num_train_timesteps),
            beta_start: get_f64(map, "beta_start")?.unwrap_or(d.beta_start),
            beta_end: get_f64(map, "beta_end")?.unwrap_or(d.beta_end),
            beta_schedule: get_enum(
                map,
                "beta_schedule",
                "linear, scaled_linear or squaredcos_cap_v2",
                |s| s.parse().ok(),
            )?
            .unwrap_or(d.beta_schedule),
            trained_betas,
            prediction_type: get_enum(
                map,
                "prediction_type",
                "epsilon, v_prediction or sample",
                |s| s.parse().ok(),
            )?
            .unwrap_or(d.prediction_type),
            timestep_spacing: get_enum(
                map,
                "timestep_spacing",
                "leading, trailing or linspace",
                |s| s.parse().ok(),
            )?,
            steps_offset: get_usize(map, "steps_offset")?.unwrap_or(d.steps_offset),
            set_alpha_to_one: get_bool(map, "set_alpha_to_one")?,
            skip_prk_steps: get_bool(map, "skip_prk_steps")?,
            clip_sample: get_bool(map, "clip_sample")?,
            clip_sample_range: get_f64(map, "clip_sample_range")?.unwrap_or(d.clip_sample_range),
            thresholding: get_bool(map, "thresholding")?.unwrap_or(d.thresholding),
            interpolation_type: get_enum(map, "interpolation_type", "linear or log_linear", |s| {
                match s {
                    "linear" => Some(InterpolationType::Linear),
                    "log_linear" => Some(InterpolationType::LogLinear),
                    _ => None,
                }
            })?
            .unwrap_or(d.interpolation_type),
            use_karras_sigmas: get_bool(map, "use_karras_sigmas")?.unwrap_or(false),
            use_exponential_sigmas: get_bool(map, "use_exponential_sigmas")?.unwrap_or(false),
            use_beta_sigmas: get_bool(map, "use_beta_sigmas")?.unwrap_or(false),
            sigma_min: get_f64(map, "sigma_min")?,
            sigma_max: get_f64(map, "sigma_max")?,
            timestep_type: get_enum(
                map,
                "timestep_type",
                "discrete or continuous",
                |s| match s {
                    "discrete" => Some(TimestepType::Discrete),
                    "continuous" => Some(TimestepType::Continuous),
                    _ => None,
                },
            )?
            .unwrap_or(d.timestep_type),
            final_sigmas_type: get_enum(
                map,
                "final_sigmas_type",
                "zero or sigma_min",
                |s| match s {
                    "zero" => Some(FinalSigmasType::Zero),
                    "sigma_min" => Some(FinalSigmasType::SigmaMin),
                    _ => None,
                },
            )?
            .unwrap_or(d.final_sigmas_type),
            rescale_betas_zero_snr: get_bool(map, "rescale_betas_zero_snr")?.unwrap_or(false),
        };
        cfg.check().map_err(|e| match e {
            Error::InvalidArgument(m) => m,
            other => other.to_string(),
        })?;
        Ok(cfg)
    }
}

impl FromStr for BetaSchedule {
    type Err = Error;

    /// Parse a diffusers `beta_schedule` name.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "scaled_linear" => Ok(Self::ScaledLinear),
            "squaredcos_cap_v2" => Ok(Self::SquaredcosCapV2),
            _ => Err(Error::InvalidArgument(format!(
                "scheduler config key `beta_schedule`: unsupported value {s:?} \
                 (expected linear, scaled_linear or squaredcos_cap_v2)"
            ))),
        }
    }
}

impl FromStr for PredictionType {
    type Err = Error;

    /// Parse a diffusers `prediction_type` name (`original_sample` is an alias of `sample`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" | "original_sample" => Ok(Self::Sample),
            _ => Err(Error::InvalidArgument(format!(
                "scheduler config key `prediction_type`: unsupported value {s:?} \
                 (expected epsilon, v_prediction or sample)"
            ))),
        }
    }
}

impl FromStr for TimestepSpacing {
    type Err = Error;

    /// Parse a diffusers `timestep_spacing` name.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            "linspace" => Ok(Self::Linspace),
            _ => Err(Error::InvalidArgument(format!(
                "scheduler config key `timestep_spacing`: unsupported value {s:?} \
                 (expected leading, trailing or linspace)"
            ))),
        }
    }
}

impl SchedulerConfig {
    /// Parse the text of a `scheduler/config.json`; errors name the offending key.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("scheduler config is not JSON: {e}")))?;
        Self::from_json(value)
    }

    /// Build from an already parsed JSON value; errors name the offending key.
    pub fn from_json(value: Value) -> Result<Self> {
        Self::try_from(value).map_err(Error::InvalidArgument)
    }

    /// Load a model folder's scheduler config: `scheduler/scheduler_config.json` (the name
    /// diffusers writes) or else `scheduler/config.json`; errors name the file and the key.
    pub fn from_model_dir(dir: &ModelDir) -> Result<Self> {
        let folder = dir.component_dir("scheduler")?;
        let primary = folder.join("scheduler_config.json");
        let path = if primary.is_file() {
            primary
        } else {
            folder.join("config.json")
        };
        read_json(&path)
    }

    /// Check value ranges that parsing alone cannot (also for configs built in code).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.num_train_timesteps < 1 {
            return bad("scheduler config key `num_train_timesteps`: must be at least 1".into());
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return bad(format!(
                    "scheduler config key `trained_betas`: {} values but num_train_timesteps is {}",
                    b.len(),
                    self.num_train_timesteps
                ));
            }
            if b.iter().any(|x| !(0.0..1.0).contains(x)) {
                return bad(
                    "scheduler config key `trained_betas`: every beta must be in [0, 1)".into(),
                );
            }
        } else {
            for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                if !(0.0..1.0).contains(&v) {
                    return bad(format!(
                        "scheduler config key `{key}`: {v} is not in [0, 1)"
                    ));
                }
            }
        }
        if self.clip_sample_range.is_nan() || self.clip_sample_range <= 0.0 {
            return bad(format!(
                "scheduler config key `clip_sample_range`: {} must be positive",
                self.clip_sample_range
            ));
        }
        Ok(())
    }

    /// The class named by `_class_name`, when it is one whose defaults we know.
    pub(crate) fn source_class(&self) -> Option<SchedulerClass> {
        self.class_name
            .as_deref()
            .and_then(SchedulerClass::from_class_name)
    }

    /// Resolve a class-dependent key for a scheduler of class `target` made from this config.
    fn resolve<T: Copy>(
        &self,
        explicit: Option<T>,
        target: SchedulerClass,
        default_of: impl Fn(SchedulerClass) -> Option<T>,
        fallback: T,
    ) -> T {
        explicit
            .or_else(|| self.source_class().and_then(&default_of))
            .or_else(|| default_of(target))
            .unwrap_or(fallback)
    }

    /// `timestep_spacing` as a `target` scheduler built by `from_config` from this one sees it.
    pub(crate) fn timestep_spacing_for(&self, target: SchedulerClass) -> TimestepSpacing {
        self.resolve(
            self.timestep_spacing,
            target,
            SchedulerClass::default_spacing,
            TimestepSpacing::Leading,
        )
    }

    /// `set_alpha_to_one` as a `target` scheduler sees it.
    pub(crate) fn set_alpha_to_one_for(&self, target: SchedulerClass) -> bool {
        self.resolve(
            self.set_alpha_to_one,
            target,
            SchedulerClass::default_set_alpha_to_one,
            false,
        )
    }

    /// `skip_prk_steps` as a `target` scheduler sees it.
    pub(crate) fn skip_prk_steps_for(&self, target: SchedulerClass) -> bool {
        self.resolve(
            self.skip_prk_steps,
            target,
            SchedulerClass::default_skip_prk_steps,
            false,
        )
    }

    /// `clip_sample` as a `target` scheduler sees it.
    pub(crate) fn clip_sample_for(&self, target: SchedulerClass) -> bool {
        self.resolve(
            self.clip_sample,
            target,
            SchedulerClass::default_clip_sample,
            false,
        )
    }

    /// The training betas in float32, computed the way diffusers does in torch (CPU).
    ///
    /// `torch.linspace` in float32 evaluates `start + step·i` (first half) and `end − step·(n−1−i)`
    /// (second half) with a fused multiply-add, which `f32::mul_add` reproduces bit for bit.
    pub(crate) fn betas_f32(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        if let Some(b) = &self.trained_betas {
            return b.iter().map(|&x| x as f32).collect();
        }
        match self.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(self.beta_start, self.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|x| x * x)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        }
    }

    /// ᾱ_t (cumulative product of 1 − β) in float32 as a `class` scheduler computes it.
    ///
    /// torch's CPU `cumprod` of float32 accumulates in float64 and rounds each output to float32.
    pub(crate) fn alphas_cumprod_f32(&self, class: SchedulerClass) -> Vec<f32> {
        let mut betas = self.betas_f32();
        let rescale = self.rescale_betas_zero_snr && class.has_rescale_zero_snr();
        if rescale {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut out = cumprod_f32(&betas);
        if rescale && class == SchedulerClass::Euler {
            if let Some(last) = out.last_mut() {
                // Euler avoids an infinite sigma at the end of the schedule.
                *last = 2f32.powi(-24);
            }
        }
        out
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on CPU, bit for bit.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// ᾱ = cumprod(1 − β) with torch's CPU precision (float32 terms, float64 accumulator).
fn cumprod_f32(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// Square root rounded to float32 (torch's may differ by one ulp; this is the exact one).
pub(crate) fn sqrt_f32(x: f32) -> f32 {
    (x as f64).sqrt() as f32
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023) in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = cumprod_f32(betas);
    let sq: Vec<f32> = ac.iter().map(|&a| sqrt_f32(a)).collect();
    let (s0, st) = match (sq.first(), sq.last()) {
        (Some(&a), Some(&b)) => (a, b),
        _ => return betas.to_vec(),
    };
    let scale = s0 / (s0 - st);
    let bar: Vec<f32> = sq
        .iter()
        .map(|&s| {
            let v = (s - st) * scale;
            v * v
        })
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Indices at which the torch references below were taken.
    const IDX: [usize; 8] = [0, 1, 250, 499, 500, 501, 998, 999];

    /// Compare betas and ᾱ of `cfg` with float32 bit patterns printed by diffusers 0.42.1 /
    /// torch 2.15 (CPU, `DDPMScheduler(**cfg).betas / .alphas_cumprod`). With `tol` = 0 the bits
    /// must be equal; otherwise |Δβ| ≤ tol and |Δᾱ| ≤ tol·ᾱ (torch's float32 sqrt, used by the
    /// zero-SNR rescale, is not always correctly rounded).
    fn check_bits(cfg: &SchedulerConfig, betas: [u32; 8], ac: [u32; 8], tol: f64) {
        let b = cfg.betas_f32();
        let b = if cfg.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&b)
        } else {
            b
        };
        let a = cfg.alphas_cumprod_f32(SchedulerClass::Ddpm);
        for (k, &i) in IDX.iter().enumerate() {
            let (tb, ta) = (
                f32::from_bits(betas[k]) as f64,
                f32::from_bits(ac[k]) as f64,
            );
            if tol == 0.0 {
                assert_eq!(b[i].to_bits(), betas[k], "beta[{i}]");
                assert_eq!(a[i].to_bits(), ac[k], "alphas_cumprod[{i}]");
            } else {
                assert!(
                    (b[i] as f64 - tb).abs() <= tol,
                    "beta[{i}] {} vs {tb}",
                    b[i]
                );
                assert!(
                    (a[i] as f64 - ta).abs() <= tol * ta,
                    "ac[{i}] {} vs {ta}",
                    a[i]
                );
            }
        }
    }

    #[test]
    fn betas_and_alphas_cumprod_match_torch_bits() {
        let sd = SchedulerConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            ..Default::default()
        };
        check_bits(
            &sd,
            [
                0x3a5ed288, 0x3a600dda, 0x3b1f1b12, 0x3b9d6922, 0x3b9dc6c2, 0x3b9e247f, 0x3c4451b9,
                0x3c449ba5,
            ],
            [
                0x3f7fc84b, 0x3f7f9054, 0x3f2c7da7, 0x3e8e2ab0, 0x3e8d7b73, 0x3e8ccca6, 0x3b9a8e83,
                0x3b98b3b6,
            ],
            0.0,
        );
        check_bits(
            &SchedulerConfig::default(),
            [
                0x38d1b717, 0x38fb7d84, 0x3ba675f6, 0x3c247efb, 0x3c24d287, 0x3c252614, 0x3ca3ad44,
                0x3ca3d70a,
            ],
            [
                0x3f7ff972, 0x3f7ff196, 0x3f057bfa, 0x3da0f258, 0x3d9f53da, 0x3d9db8b7, 0x382cbac6,
                0x38294666,
            ],
            0.0,
        );
        let cos = SchedulerConfig {
            beta_schedule: BetaSchedule::SquaredcosCapV2,
            ..Default::default()
        };
        check_bits(
            &cos,
            [
                0x382d2899, 0x38418854, 0x3aadf63f, 0x3b4e2b36, 0x3b4ecfb8, 0x3b4f74bd, 0x3f3ffff6,
                0x3f7fbe77,
            ],
            [
                0x3f7ffd4b, 0x3f7ffa45, 0x3f588c1e, 0x3efcd90d, 0x3efc0cc9, 0x3efb4087, 0x3622fde3,
                0x3126e6c2,
            ],
            0.0,
        );
        let rescaled = SchedulerConfig {
            rescale_betas_zero_snr: true,
            ..sd
        };
        check_bits(
            &rescaled,
            [
                0x3a5ed400, 0x3a707400, 0x3b2d8500, 0x3bb4bb80, 0x3bb53900, 0x3bb5b780, 0x3f404a2c,
                0x3f800000,
            ],
            [
                0x3f7fc84b, 0x3f7f8c3b, 0x3f270768, 0x3e782cf5, 0x3e76cd97, 0x3e756f36, 0x34534ef7,
                0x0,
            ],
            1e-6,
        );
    }

    #[test]
    fn class_defaults_resolve_like_from_config() {
        let pndm = SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            ..Default::default()
        };
        // Euler made from a PNDM config inherits PNDM's "leading" default.
        assert_eq!(
            pndm.timestep_spacing_for(SchedulerClass::Euler),
            TimestepSpacing::Leading
        );
        // DDIM made from a PNDM config inherits set_alpha_to_one = false, but clip_sample
        // (not a PNDM key) takes DDIM's default.
        assert!(!pndm.set_alpha_to_one_for(SchedulerClass::Ddim));
        assert!(pndm.clip_sample_for(SchedulerClass::Ddim));
        let euler = SchedulerConfig {
            class_name: Some("EulerDiscreteScheduler".into()),
            ..Default::default()
        };
        assert_eq!(
            euler.timestep_spacing_for(SchedulerClass::Euler),
            TimestepSpacing::Linspace
        );
        assert_eq!(
            euler.timestep_spacing_for(SchedulerClass::Ddim),
            TimestepSpacing::Linspace
        );
        assert!(euler.set_alpha_to_one_for(SchedulerClass::Ddim));
        let none = SchedulerConfig::default();
        assert_eq!(
            none.timestep_spacing_for(SchedulerClass::Euler),
            TimestepSpacing::Linspace
        );
        assert_eq!(
            none.timestep_spacing_for(SchedulerClass::Pndm),
            TimestepSpacing::Leading
        );
    }
}
