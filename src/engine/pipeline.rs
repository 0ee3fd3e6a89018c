//! Text-to-image sampling with classifier-free guidance: prompt → conditioning → denoising loop
//! → VAE decode. The same loop drives SD 1.x, 2.x and SDXL; what differs (conditioning, SDXL's
//! size conditioning, the scheduler) comes from the model folder.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::model_dir::{ModelDefaults, ModelDir, ModelFamily, Variant};
use super::nn::AdapterScales;
use super::noise::NoiseSource;
use super::scheduler::{make_sampler, SchedulerConfig, SchedulerKind};
use super::text::{Conditioning, PromptEncoder};
use super::unet::{AddedCond, UNet};
use super::vae::Vae;
use crate::error::{Error, Result};

/// One style term of style guidance: `λ·(ε_S(x, c + suffix) − ε0(x, c))`.
#[derive(Debug, Clone, PartialEq)]
pub struct StyleTerm {
    /// Name of the adapter (already attached to the UNet) that holds this style.
    pub adapter: String,
    /// Guidance weight λ of this style.
    pub lambda: f64,
    /// Appended to the prompt for this style's branch, e.g. ` in watercolor style`.
    pub suffix: String,
    /// Adapter scale α inside the style branch (1 in the paper).
    pub scale: f64,
}

/// How each step's model output is formed.
#[derive(Debug, Clone, PartialEq)]
pub enum Guidance {
    /// Plain classifier-free guidance on the base model.
    Cfg,
    /// Pair Customization's style guidance (METHOD.md Eq. 10/11): CFG on the base model plus one
    /// term per style; plain CFG before step index `from_step` (0 = every step).
    Styles {
        /// The styles blended, each with its own λ and prompt suffix.
        styles: Vec<StyleTerm>,
        /// First step (0-based) with style terms.
        from_step: usize,
    },
    /// The "LoRA scale" baseline: ordinary CFG with the prompt + suffix and the adapter at scale
    /// α on both branches.
    LoraScale {
        /// The adapter.
        adapter: String,
        /// Its scale α.
        alpha: f64,
        /// Appended to the prompt.
        suffix: String,
    },
}

impl Guidance {
    /// Check that every adapter named is attached to the UNet.
    fn check(&self, unet: &UNet) -> Result<()> {
        let names: Vec<&str> = match self {
            Guidance::Cfg => vec![],
            Guidance::Styles { styles, .. } => styles.iter().map(|s| s.adapter.as_str()).collect(),
            Guidance::LoraScale { adapter, .. } => vec![adapter.as_str()],
        };
        let linears = unet.adaptable_linears();
        for name in names {
            let attached = linears
                .first()
                .is_some_and(|l| l.adapters().any(|(n, _)| n == name));
            if !attached {
                return Err(Error::InvalidArgument(format!(
                    "style adapter {name:?} is not attached to the UNet"
                )));
            }
        }
        Ok(())
    }
}

/// The batch of one guidance mode: conditioning of every branch and per-sample adapter scales.
struct Branches {
    text: Conditioning,
    added: Option<AddedCond>,
    scales: AdapterScales,
    with_uncond: bool,
}

/// A loaded model: text encoders, UNet, VAE and the scheduler config.
pub struct Pipeline {
    model: ModelDir,
    defaults: ModelDefaults,
    family: ModelFamily,
    text: PromptEncoder,
    unet: UNet,
    vae: Vae,
    scheduler: SchedulerConfig,
    dtype: DType,
    device: Device,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; `None` is the unconditional branch (zeroed for SDXL).
    pub negative: Option<String>,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub cfg: f64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Sampler; `None` uses the model's own scheduler class.
    pub scheduler: Option<SchedulerKind>,
}

/// What a step callback tells the denoising loop. A callback that returns `()` always continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepFlow {
    /// Go on with the next step.
    Continue,
    /// Stop now: the loop returns [`Error::Stopped`].
    Stop,
}

impl From<()> for StepFlow {
    fn from(_: ()) -> Self {
        StepFlow::Continue
    }
}

/// Progress of one denoising step, passed to the caller's callback.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    /// 1-based step number.
    pub step: usize,
    /// Total steps.
    pub total: usize,
    /// The model timestep of this step.
    pub timestep: usize,
    /// Seconds spent so far in the loop.
    pub elapsed_s: f64,
}

impl Pipeline {
    /// Load every component of a diffusers folder.
    pub fn load(model: ModelDir, variant: Variant, dtype: DType, device: &Device) -> Result<Self> {
        let family = model.family()?;
        let defaults = model.defaults()?;
        let scheduler = SchedulerConfig::from_model_dir(&model)?;
        let text = PromptEncoder::load(&model, dtype, device)?;
        let unet = UNet::load(&model, variant, dtype, device)?;
        let vae = Vae::load(&model, variant, dtype, device)?;
        Ok(Self {
            model,
            defaults,
            family,
            text,
            unet,
            vae,
            scheduler,
            dtype,
            device: device.clone(),
        })
    }

    /// The model folder.
    pub fn model(&self) -> &ModelDir {
        &self.model
    }

    /// The model folder's recommended sampling settings (read and checked at load).
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The model family.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The UNet (to attach adapters).
    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    /// The UNet, mutably.
    pub fn unet_mut(&mut self) -> &mut UNet {
        &mut self.unet
    }

    /// The VAE.
    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// The prompt encoder.
    pub fn text(&self) -> &PromptEncoder {
        &self.text
    }

    /// The scheduler config of the model folder.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Pixels per latent cell along each side.
    pub fn vae_scale(&self) -> usize {
        self.vae.config().downscale_factor()
    }

    /// The image side the UNet was trained for (sample_size × VAE factor), if the config says.
    pub fn native_size(&self) -> Option<usize> {
        self.unet
            .config()
            .file
            .sample_size
            .as_ref()
            .and_then(|v| v.as_u64())
            .map(|s| s as usize * self.vae_scale())
    }

    /// Check that an image size works with this model: sides divide by the VAE factor times the
    /// UNet's downscale.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let m = self.vae_scale() * self.unet.config().downscale();
        if width == 0 || height == 0 || !width.is_multiple_of(m) || !height.is_multiple_of(m) {
            return Err(Error::InvalidArgument(format!(
                "image size {width}×{height}: both sides must be positive multiples of {m} for this model"
            )));
        }
        Ok(())
    }

    /// Seeded initial latents [1, C, H/f, W/f] (unit variance, before `init_noise_sigma`).
    pub fn initial_latents(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        self.check_size(width, height)?;
        let f = self.vae_scale();
        let c = self.unet.config().file.in_channels;
        NoiseSource::new(seed).randn(&[1, c, height / f, width / f], self.dtype, &self.device)
    }

    /// SDXL's added conditions for a batch: pooled embeddings and (H, W, 0, 0, H, W) size ids.
    fn added_cond(
        &self,
        pooled: Option<&Tensor>,
        width: usize,
        height: usize,
        batch: usize,
    ) -> Result<Option<AddedCond>> {
        if self.unet.config().text_time.is_none() {
            return Ok(None);
        }
        let pooled = pooled.ok_or_else(|| {
            Error::InvalidArgument("SDXL UNet needs pooled text embeddings".into())
        })?;
        let (h, w) = (height as f32, width as f32);
        let ids: Vec<f32> = (0..batch).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
        let time_ids = Tensor::from_vec(ids, (batch, 6), &self.device)?.to_dtype(self.dtype)?;
        Ok(Some(AddedCond {
            text_embeds: pooled.clone(),
            time_ids,
        }))
    }

    /// Run the denoising loop with plain classifier-free guidance from given initial `latents`
    /// (unit variance) and return the final latents. `on_step` is called after every step.
    pub fn denoise<F: Into<StepFlow>>(
        &self,
        req: &GenerateRequest,
        latents: Tensor,
        on_step: impl FnMut(StepProgress) -> F,
    ) -> Result<Tensor> {
        self.denoise_guided(req, &Guidance::Cfg, latents, on_step)
    }

    /// The conditioning, adapter scales and batch layout of one guidance mode.
    fn branches(&self, req: &GenerateRequest, guidance: &Guidance) -> Result<Branches> {
        // diffusers runs the unconditional branch only when guidance > 1.
        let with_uncond = req.cfg > 1.0;
        let mut prompts = vec![req.prompt.clone()];
        match guidance {
            Guidance::Cfg => {}
            Guidance::Styles { styles, .. } => {
                prompts.extend(styles.iter().map(|s| format!("{}{}", req.prompt, s.suffix)));
            }
            Guidance::LoraScale { suffix, .. } => prompts[0] = format!("{}{}", req.prompt, suffix),
        }
        let cond = self.text.encode(&prompts)?;
        let text = if with_uncond {
            let uncond = self.text.encode_uncond(req.negative.as_deref())?;
            Conditioning::cat(&[&uncond, &cond])?
        } else {
            cond
        };
        let batch = text.context.dim(0)?;
        let added = self.added_cond(text.pooled.as_ref(), req.width, req.height, batch)?;
        let first_cond = usize::from(with_uncond);
        let mut scales = AdapterScales::none();
        match guidance {
            Guidance::Cfg => {}
            Guidance::Styles { styles, .. } => {
                for (i, s) in styles.iter().enumerate() {
                    let mut v = vec![0f32; batch];
                    v[first_cond + 1 + i] = s.scale as f32;
                    let prev = scales
                        .get(&s.adapter)
                        .map(|t| t.to_vec1::<f32>())
                        .transpose()?;
                    if let Some(prev) = prev {
                        // The same adapter used twice (two λ for one style): both branches active.
                        v.iter_mut().zip(prev).for_each(|(a, b)| *a += b);
                    }
                    scales.set(
                        &s.adapter,
                        Tensor::new(v, &self.device)?.to_dtype(self.dtype)?,
                    );
                }
            }
            Guidance::LoraScale { adapter, alpha, .. } => {
                let v = vec![*alpha as f32; batch];
                scales.set(adapter, Tensor::new(v, &self.device)?.to_dtype(self.dtype)?);
            }
        }
        Ok(Branches {
            text,
            added,
            scales,
            with_uncond,
        })
    }

    /// Run the denoising loop with `guidance` (plain CFG, Pair Customization's style guidance with
    /// any number of styles, or the LoRA-scale baseline). Every branch of a step is evaluated in
    /// one batched UNet call, with per-sample adapter scales. `on_step` may return
    /// [`StepFlow::Stop`] to end the loop early with [`Error::Stopped`].
    pub fn denoise_guided<F: Into<StepFlow>>(
        &self,
        req: &GenerateRequest,
        guidance: &Guidance,
        latents: Tensor,
        mut on_step: impl FnMut(StepProgress) -> F,
    ) -> Result<Tensor> {
        self.check_size(req.width, req.height)?;
        if req.steps == 0 {
            return Err(Error::InvalidArgument("steps must be at least 1".into()));
        }
        guidance.check(&self.unet)?;
        let br = self.branches(req, guidance)?;
        let batch = br.text.context.dim(0)?;
        // The leading [uncond, cond] (or [cond]) part, used alone before style guidance starts.
        let n_base = 1 + usize::from(br.with_uncond);
        let base_text = Conditioning {
            context: br.text.context.narrow(0, 0, n_base)?,
            pooled: br
                .text
                .pooled
                .as_ref()
                .map(|p| p.narrow(0, 0, n_base))
                .transpose()?,
        };
        let base_added =
            self.added_cond(base_text.pooled.as_ref(), req.width, req.height, n_base)?;
        let kind = match req.scheduler {
            Some(k) => k,
            None => SchedulerKind::default_for(&self.scheduler),
        };
        let mut sampler = make_sampler(kind, &self.scheduler, req.steps)?;
        let mut latents = (latents * sampler.init_noise_sigma())?;
        let timesteps = sampler.timesteps().to_vec();
        let model_timesteps = sampler.model_timesteps().to_vec();
        let start = Instant::now();
        let none = AdapterScales::none();
        for (i, &t) in timesteps.iter().enumerate() {
            let styled = match guidance {
                Guidance::Styles { from_step, .. } => i >= *from_step,
                _ => false,
            };
            let (n, text, added, scales) =
                if styled || matches!(guidance, Guidance::LoraScale { .. }) {
                    (batch, &br.text, br.added.as_ref(), &br.scales)
                } else {
                    (n_base, &base_text, base_added.as_ref(), &none)
                };
            let x = sampler.scale_model_input(&latents, t)?;
            // Every branch starts from the same latent at the same timestep.
            let mt = model_timesteps[i] as f32;
            let out = self
                .unet
                .forward_shared_latent(&x, n, mt, &text.context, added, scales)?;
            let c = n_base - 1;
            let eps_c = out.narrow(0, c, 1)?;
            let mut eps = if br.with_uncond {
                let eps_u = out.narrow(0, 0, 1)?;
                (&eps_u + ((&eps_c - &eps_u)? * req.cfg)?)?
            } else {
                eps_c.clone()
            };
            if let (true, Guidance::Styles { styles, .. }) = (styled, guidance) {
                for (k, s) in styles.iter().enumerate() {
                    let eps_s = out.narrow(0, n_base + k, 1)?;
                    eps = (eps + ((eps_s - &eps_c)? * s.lambda)?)?;
                }
            }
            latents = sampler.step(&eps, t, &latents)?;
            let flow = on_step(StepProgress {
                step: i + 1,
                total: timesteps.len(),
                timestep: t,
                elapsed_s: start.elapsed().as_secs_f64(),
            })
            .into();
            if flow == StepFlow::Stop && i + 1 < timesteps.len() {
                return Err(Error::Stopped {
                    step: i + 1,
                    total: timesteps.len(),
                });
            }
        }
        Ok(latents)
    }

    /// Encode prompts with this model's text encoders.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Conditioning> {
        self.text.encode(prompts)
    }

    /// Generate one image with plain CFG: returns the decoded image [1, 3, H, W] in [-1, 1].
    pub fn generate<F: Into<StepFlow>>(
        &self,
        req: &GenerateRequest,
        on_step: impl FnMut(StepProgress) -> F,
    ) -> Result<Tensor> {
        self.generate_guided(req, &Guidance::Cfg, on_step)
    }

    /// Generate one image with `guidance` (styles must already be attached to the UNet).
    pub fn generate_guided<F: Into<StepFlow>>(
        &self,
        req: &GenerateRequest,
        guidance: &Guidance,
        on_step: impl FnMut(StepProgress) -> F,
    ) -> Result<Tensor> {
        let latents = self.initial_latents(req.seed, req.width, req.height)?;
        let latents = self.denoise_guided(req, guidance, latents, on_step)?;
        self.vae.decode_scaled(&latents)
    }
}
