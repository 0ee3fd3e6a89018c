//! Pair Customization training: ContentLoRA and StyleLoRA learned jointly from one image pair
//! (or several pairs of one style: one ContentLoRA per pair, a shared StyleLoRA).
//!
//! Each iteration (METHOD.md "Training"): both images are encoded with a fresh VAE posterior
//! sample; one noise ε and one timestep t are shared by both; a content step trains ContentLoRA on
//! the content image with the content prompt; from `style_start` on, a style step trains StyleLoRA
//! on the style image with the style prompt while ContentLoRA is active as a constant. Two AdamW
//! optimizers, one per adapter. Down-projections are rows of one orthonormal basis per input width
//! (content rows first, style rows next) and stay frozen; only the up-projections learn.
//!
//! Every random draw of iteration `i` comes from a generator seeded by `(seed, i)`, so a run
//! resumed from a checkpoint continues exactly as the uninterrupted run would have.

pub mod checkpoint;
pub mod config;
pub mod optimizer;
pub mod pair;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};

pub use self::config::TrainConfig;
use self::optimizer::AdamW;
pub use self::pair::{Augment, PairSpec, PreparedPair};
use crate::engine::model_dir::ModelFamily;
use crate::engine::nn::{AdapterScales, LowRankAdapter};
use crate::engine::noise::NoiseSource;
use crate::engine::pipeline::Pipeline;
use crate::engine::scheduler::NoiseSchedule;
use crate::engine::text::Conditioning;
use crate::engine::unet::{AddedCond, UNet};
use crate::engine::vae::Posterior;
use crate::error::{Error, Result};
use crate::lora::orthogonal::{kaiming_down, OrthogonalBasis};
use crate::lora::{AdapterSet, LayerAdapter};

/// Adapter name of the content adapter while training.
pub const CONTENT: &str = "content";
/// Adapter name of the style adapter while training.
pub const STYLE: &str = "style";

/// One adapted layer of one adapter: frozen or trainable A, trainable B.
#[derive(Debug, Clone)]
pub struct LayerParams {
    /// Module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    /// Down-projection A [r, in] (a `Var` only in the no-orthogonality ablation).
    pub down: Var,
    /// Up-projection B [out, r].
    pub up: Var,
}

/// The learned StyleLoRA: A and B per layer, with rank and alpha.
#[derive(Debug, Clone)]
pub struct LearnedAdapter {
    /// Per-layer weights, in the UNet's module order.
    pub layers: Vec<LayerParams>,
    /// Rank r.
    pub rank: usize,
    /// Alpha (scale = alpha / rank).
    pub alpha: f64,
    /// Whether A trains too (the no-orthogonality ablation). When false, A is attached as a
    /// constant so that backward spends no GEMM and no memory on its gradient.
    pub train_down: bool,
}

impl LearnedAdapter {
    /// A detached copy as an [`AdapterSet`] (f32, CPU), ready to save or attach elsewhere.
    pub fn to_adapter_set(&self) -> Result<AdapterSet> {
        let mut set = AdapterSet::new(self.rank, self.alpha);
        for l in &self.layers {
            let to = |t: &Tensor| -> Result<Tensor> {
                Ok(t.detach()
                    .to_dtype(DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?)
            };
            set.insert(
                l.path.clone(),
                LayerAdapter::new(to(l.down.as_tensor())?, to(l.up.as_tensor())?, self.alpha)?,
            )?;
        }
        Ok(set)
    }
}

/// Progress of one iteration, for printing and for the daemon's events.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// 1-based iteration just finished.
    pub iteration: usize,
    /// Total iterations.
    pub total: usize,
    /// Content-step loss.
    pub loss_content: f32,
    /// Style-step loss, from `style_start` on.
    pub loss_style: Option<f32>,
    /// Iterations per second over this session (excluding resumed iterations).
    pub it_per_s: f64,
}

/// One training pair with its own prompts and its own ContentLoRA.
struct PairState {
    pair: PreparedPair,
    cond_content: Conditioning,
    cond_style: Conditioning,
    content: LearnedAdapter,
    opt_content: AdamW,
}

/// A training run in progress: one or several pairs of the same style. Each pair has its own
/// ContentLoRA (its content differs from the others'); the StyleLoRA is shared. Iteration `i`
/// trains pair `i mod n`.
pub struct PairTrainer<'p> {
    pipe: &'p mut Pipeline,
    cfg: TrainConfig,
    pairs: Vec<PairState>,
    schedule: NoiseSchedule,
    style: LearnedAdapter,
    opt_style: AdamW,
    next_iteration: usize,
    posteriors: HashMap<(usize, Augment), (Posterior, Posterior)>,
    checkpoint_path: Option<PathBuf>,
    fingerprint: String,
}

fn params(adapter: &LearnedAdapter, train_down: bool) -> Vec<Var> {
    adapter
        .layers
        .iter()
        .flat_map(|l| {
            let mut v = vec![l.up.clone()];
            if train_down {
                v.push(l.down.clone());
            }
            v
        })
        .collect()
}

impl<'p> PairTrainer<'p> {
    /// Prepare a run on one pair (see [`PairTrainer::new_multi`]).
    pub fn new(
        pipe: &'p mut Pipeline,
        spec: &PairSpec,
        cfg: TrainConfig,
        fingerprint: String,
    ) -> Result<Self> {
        Self::new_multi(pipe, std::slice::from_ref(spec), cfg, fingerprint)
    }

    /// Prepare a run: load and resize every pair, encode its two prompts once, build one
    /// ContentLoRA per pair and the shared StyleLoRA (orthonormal frozen A: pair k's content rows
    /// `[k·r_c, (k+1)·r_c)`, style rows after all content rows; zero B) and their optimizers.
    /// `fingerprint` identifies pairs, settings and base model; a checkpoint with another
    /// fingerprint is never resumed.
    pub fn new_multi(
        pipe: &'p mut Pipeline,
        specs: &[PairSpec],
        cfg: TrainConfig,
        fingerprint: String,
    ) -> Result<Self> {
        cfg.validate().map_err(Error::InvalidArgument)?;
        if specs.is_empty() {
            return Err(Error::InvalidArgument(
                "training needs at least one pair".into(),
            ));
        }
        let f = pipe.vae_scale() * pipe.unet().config().downscale();
        if !cfg.resolution.is_multiple_of(f) {
            return Err(Error::InvalidArgument(format!(
                "training resolution {} must be a multiple of {f} for this model",
                cfg.resolution
            )));
        }
        let n_pairs = specs.len();
        let (rc, rs) = (cfg.content_rank, cfg.style_rank);
        let narrowest = pipe
            .unet()
            .adaptable_linears()
            .iter()
            .map(|l| l.dims().0)
            .min()
            .unwrap_or(0);
        if cfg.orthogonal && n_pairs * rc + rs > narrowest {
            return Err(Error::InvalidArgument(format!(
                "{n_pairs} pair(s) × content rank {rc} + style rank {rs} exceed the narrowest \
                 attention width {narrowest}: lower content_rank or use fewer pairs"
            )));
        }
        let schedule = NoiseSchedule::new(pipe.scheduler_config())?;
        // LoRA parameters, their gradients and AdamW state are f32 whatever the model's dtype
        // (mixed precision on a bf16/f16 GPU model: the adapter math runs in f32 and its delta
        // is cast to the layer's dtype, see `AdaptableLinear::forward`).
        let dtype = DType::F32;
        let device = pipe.device().clone();
        let basis = OrthogonalBasis::new(cfg.seed);
        let widths: Vec<(String, usize, usize)> = pipe
            .unet()
            .adaptable_linears()
            .iter()
            .map(|l| (l.path().to_string(), l.dims().0, l.dims().1))
            .collect();
        // `which` = pair index for a ContentLoRA, n_pairs for the StyleLoRA.
        let build = |which: usize, rank: usize| -> Result<LearnedAdapter> {
            let mut layers = Vec::with_capacity(widths.len());
            for (i, (path, n_in, n_out)) in widths.iter().enumerate() {
                let down = if cfg.orthogonal {
                    basis.rows(*n_in, which * rc, rank, dtype, &device)?
                } else {
                    let s = cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
                    kaiming_down(
                        rank,
                        *n_in,
                        s ^ (which as u64).wrapping_mul(0x5eed),
                        dtype,
                        &device,
                    )?
                };
                layers.push(LayerParams {
                    path: path.clone(),
                    down: Var::from_tensor(&down)?,
                    up: Var::from_tensor(&Tensor::zeros((*n_out, rank), dtype, &device)?)?,
                });
            }
            Ok(LearnedAdapter {
                layers,
                rank,
                alpha: cfg.alpha_for(rank),
                train_down: !cfg.orthogonal,
            })
        };
        let train_down = !cfg.orthogonal;
        let mut pairs = Vec::with_capacity(n_pairs);
        for (k, spec) in specs.iter().enumerate() {
            let pair = PreparedPair::load(&spec.content, &spec.style, cfg.resolution)?;
            let cond_content = pipe.text().encode(&[cfg.content_prompt(&spec.subject)])?;
            let cond_style = pipe
                .text()
                .encode(&[cfg.style_prompt(&spec.subject, &spec.style_desc)])?;
            let content = build(k, rc)?;
            let opt_content = AdamW::new(params(&content, train_down), cfg.adamw())?;
            pairs.push(PairState {
                pair,
                cond_content,
                cond_style,
                content,
                opt_content,
            });
        }
        let style = build(n_pairs, rs)?;
        let opt_style = AdamW::new(params(&style, train_down), cfg.adamw())?;
        Ok(Self {
            pipe,
            cfg,
            pairs,
            schedule,
            style,
            opt_style,
            next_iteration: 0,
            posteriors: HashMap::new(),
            checkpoint_path: None,
            fingerprint,
        })
    }

    /// Write checkpoints to `path` (every `checkpoint_every` iterations) and resume from it now if
    /// it holds a checkpoint of this same run. Returns the iteration training continues from.
    pub fn with_checkpoint(&mut self, path: PathBuf) -> Result<usize> {
        if path.is_file() {
            let ck = checkpoint::load(&path)?;
            if ck.fingerprint == self.fingerprint {
                checkpoint::restore(self, ck)?;
                tracing::info!(
                    "resuming from {} at iteration {}",
                    path.display(),
                    self.next_iteration
                );
            } else {
                tracing::warn!(
                    "ignoring checkpoint {} of another run (pair, settings or model differ)",
                    path.display()
                );
            }
        }
        self.checkpoint_path = Some(path);
        Ok(self.next_iteration)
    }

    /// The iteration the next call to [`PairTrainer::step`] runs (0-based).
    pub fn next_iteration(&self) -> usize {
        self.next_iteration
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The adapters being trained: one ContentLoRA per pair, and the StyleLoRA.
    pub fn adapters(&self) -> (Vec<&LearnedAdapter>, &LearnedAdapter) {
        (self.pairs.iter().map(|p| &p.content).collect(), &self.style)
    }

    /// Remove both training adapters from the UNet (the pipeline is usable as a base model again).
    pub fn detach_all(&mut self) {
        detach_adapters(self.pipe.unet_mut());
    }

    fn added(&self, k: usize, cond: &Conditioning, image: usize) -> Result<Option<AddedCond>> {
        if self.pipe.family() != ModelFamily::Sdxl {
            return Ok(None);
        }
        let pooled = cond.pooled.clone().ok_or_else(|| {
            Error::InvalidArgument("SDXL conditioning without pooled embeddings".into())
        })?;
        let (h, w) = self.pairs[k].pair.original_sizes[image];
        let r = self.cfg.resolution as f32;
        let ids = Tensor::new(&[[h as f32, w as f32, 0.0, 0.0, r, r]], self.pipe.device())?
            .to_dtype(pooled.dtype())?;
        Ok(Some(AddedCond {
            text_embeds: pooled,
            time_ids: ids,
        }))
    }

    /// Posteriors of both crops for this augmentation (cached: the encoder is deterministic).
    fn posteriors(&mut self, k: usize, aug: Augment) -> Result<(Posterior, Posterior)> {
        if let Some(p) = self.posteriors.get(&(k, aug)) {
            return Ok(p.clone());
        }
        let (c, s) = self.pairs[k].pair.tensors(aug, self.pipe.device())?;
        let vae = self.pipe.vae();
        let p = (vae.encode(&c)?, vae.encode(&s)?);
        // Bound the cache: random crops of a non-square image could otherwise grow it.
        if self.posteriors.len() < 64 {
            self.posteriors.insert((k, aug), p.clone());
        }
        Ok(p)
    }

    /// Run iteration `next_iteration`; returns its losses.
    pub fn step(&mut self) -> Result<(f32, Option<f32>)> {
        let it = self.next_iteration;
        if it >= self.cfg.iterations {
            return Err(Error::InvalidArgument("training already finished".into()));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(iteration_seed(self.cfg.seed, it));
        let k = it % self.pairs.len();
        let aug = self.pairs[k].pair.draw_augment(&mut rng, self.cfg.flip_p)?;
        let t = rng.random_range(0..self.schedule.num_train_timesteps());
        let mut noise_src = NoiseSource::new(rng.random());
        let (pc, ps) = self.posteriors(k, aug)?;
        let vae = self.pipe.vae();
        let x0_c = vae.scale_latents(&pc.sample(&mut noise_src)?)?;
        let x0_s = vae.scale_latents(&ps.sample(&mut noise_src)?)?;
        let dtype = self.style.layers[0].up.dtype();
        let (x0_c, x0_s) = (x0_c.to_dtype(dtype)?, x0_s.to_dtype(dtype)?);
        let eps = noise_src.randn(x0_c.dims(), dtype, self.pipe.device())?;
        let inputs = IterationInputs {
            x0_content: x0_c,
            x0_style: x0_s,
            noise: eps,
            t,
            added_content: self.added(k, &self.pairs[k].cond_content, 0)?,
            added_style: self.added(k, &self.pairs[k].cond_style, 1)?,
            cond_content: self.pairs[k].cond_content.clone(),
            cond_style: self.pairs[k].cond_style.clone(),
            style_step: it >= self.cfg.style_start,
        };
        if self.cfg.single_image {
            let loss = train_single_image(
                self.pipe.unet_mut(),
                &self.schedule,
                (&self.style, &mut self.opt_style),
                &inputs,
            );
            detach_adapters(self.pipe.unet_mut());
            let loss = loss?;
            return self.finish_iteration((f32::NAN, Some(loss)));
        }
        let losses = train_iteration(
            self.pipe.unet_mut(),
            &self.schedule,
            {
                let p = &mut self.pairs[k];
                (&p.content, &mut p.opt_content)
            },
            (&self.style, &mut self.opt_style),
            &inputs,
        );
        detach_adapters(self.pipe.unet_mut());
        self.finish_iteration(losses?)
    }

    /// Count the iteration done and write a checkpoint when one is due.
    fn finish_iteration(&mut self, losses: (f32, Option<f32>)) -> Result<(f32, Option<f32>)> {
        let (loss_c, loss_s) = losses;
        self.next_iteration += 1;
        if let Some(path) = &self.checkpoint_path {
            let every = self.cfg.checkpoint_every;
            if every > 0
                && (self.next_iteration.is_multiple_of(every)
                    || self.next_iteration == self.cfg.iterations)
            {
                checkpoint::save(self, path)?;
            }
        }
        Ok((loss_c, loss_s))
    }

    /// Train to the end, calling `on_progress` after every iteration; `should_stop` is polled
    /// between iterations (a stopped run can be resumed from its checkpoint).
    pub fn run(
        &mut self,
        mut on_progress: impl FnMut(Progress),
        should_stop: impl Fn() -> bool,
    ) -> Result<bool> {
        let start = Instant::now();
        let first = self.next_iteration;
        while self.next_iteration < self.cfg.iterations {
            if should_stop() {
                return Ok(false);
            }
            let (lc, ls) = self.step()?;
            let done = self.next_iteration - first;
            on_progress(Progress {
                iteration: self.next_iteration,
                total: self.cfg.iterations,
                loss_content: lc,
                loss_style: ls,
                it_per_s: done as f64 / start.elapsed().as_secs_f64().max(1e-9),
            });
        }
        Ok(true)
    }

    /// The learned StyleLoRA (A and B), detached from the training graph.
    pub fn style_adapter(&self) -> &LearnedAdapter {
        &self.style
    }
}

/// The seed of iteration `it`'s generator (SplitMix64 of the run seed and the iteration).
fn iteration_seed(seed: u64, it: usize) -> u64 {
    let mut z = seed ^ (it as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Everything one training iteration consumes, already drawn: both clean latents (scaled), the
/// shared noise and timestep, and both conditionings.
#[derive(Debug, Clone)]
pub struct IterationInputs {
    /// Content latents x0 [1, C, h, w] (VAE sample × scaling factor).
    pub x0_content: Tensor,
    /// Style latents x0.
    pub x0_style: Tensor,
    /// The noise ε shared by both steps.
    pub noise: Tensor,
    /// The timestep shared by both steps.
    pub t: usize,
    /// Conditioning of the content prompt.
    pub cond_content: Conditioning,
    /// Conditioning of the style prompt.
    pub cond_style: Conditioning,
    /// SDXL added conditions of the content image.
    pub added_content: Option<AddedCond>,
    /// SDXL added conditions of the style image.
    pub added_style: Option<AddedCond>,
    /// Whether this iteration also takes the style step.
    pub style_step: bool,
}

/// Put the content adapter (trainable, or as a constant) and optionally the style adapter on every
/// attention projection.
pub fn attach_adapters(
    unet: &mut UNet,
    content: &LearnedAdapter,
    style: Option<&LearnedAdapter>,
    content_trainable: bool,
) -> Result<()> {
    let mut linears = unet.adaptable_linears_mut();
    if linears.len() != content.layers.len() {
        return Err(Error::InvalidArgument(format!(
            "adapter has {} layers, the UNet {}",
            content.layers.len(),
            linears.len()
        )));
    }
    for (i, lin) in linears.iter_mut().enumerate() {
        let c = &content.layers[i];
        let (down, up) = if content_trainable {
            (trained_down(content, c), c.up.as_tensor().clone())
        } else {
            (c.down.as_tensor().detach(), c.up.as_tensor().detach())
        };
        lin.set_adapter(
            CONTENT,
            LowRankAdapter {
                down,
                up,
                alpha_over_rank: content.alpha / content.rank as f64,
            },
        )?;
        match style {
            Some(style) => {
                let s = &style.layers[i];
                lin.set_adapter(
                    STYLE,
                    LowRankAdapter {
                        down: trained_down(style, s),
                        up: s.up.as_tensor().clone(),
                        alpha_over_rank: style.alpha / style.rank as f64,
                    },
                )?;
            }
            None => lin.remove_adapter(STYLE),
        }
    }
    Ok(())
}

/// A layer's down-projection as the graph should see it: the `Var` itself when A trains, else a
/// constant (a frozen orthogonal A needs no gradient).
fn trained_down(adapter: &LearnedAdapter, layer: &LayerParams) -> Tensor {
    if adapter.train_down {
        layer.down.as_tensor().clone()
    } else {
        layer.down.as_tensor().detach()
    }
}

/// Remove both training adapters.
pub fn detach_adapters(unet: &mut UNet) {
    for lin in unet.adaptable_linears_mut() {
        lin.remove_adapter(CONTENT);
        lin.remove_adapter(STYLE);
    }
}

/// MSE (mean, in f32) between the UNet's prediction and the training target.
fn mse_loss(
    unet: &UNet,
    x_t: &Tensor,
    t: usize,
    target: &Tensor,
    cond: &Conditioning,
    added: Option<&AddedCond>,
    scales: &AdapterScales,
) -> Result<Tensor> {
    let ts = Tensor::new(&[t as f32], x_t.device())?;
    let pred = unet.forward(x_t, &ts, &cond.context, added, scales)?;
    let diff = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
    Ok(diff.sqr()?.mean_all()?)
}

/// The denoising loss of one step: noise `x0` with the iteration's shared ε to its timestep and
/// compare the UNet's prediction with the training target.
fn step_loss(
    unet: &UNet,
    schedule: &NoiseSchedule,
    x0: &Tensor,
    inputs: &IterationInputs,
    cond: &Conditioning,
    added: Option<&AddedCond>,
    scales: &AdapterScales,
) -> Result<Tensor> {
    let t = inputs.t;
    let xt = schedule.add_noise(x0, &inputs.noise, &[t])?;
    let target = schedule.target(schedule.prediction_type(), x0, &inputs.noise, &[t])?;
    mse_loss(unet, &xt, t, &target, cond, added, scales)
}

/// One iteration of the single-image baseline: the LoRA `style` alone (trainable) learns to
/// denoise the style image under the style prompt; optimizer step. Returns the loss. Leaves the
/// adapter attached (the caller detaches).
pub fn train_single_image(
    unet: &mut UNet,
    schedule: &NoiseSchedule,
    style: (&LearnedAdapter, &mut AdamW),
    inputs: &IterationInputs,
) -> Result<f32> {
    let (style, opt) = style;
    let dtype = inputs.x0_style.dtype();
    let device = inputs.x0_style.device().clone();
    // The LoRA goes in the content slot: the only adapter attached, trainable.
    attach_adapters(unet, style, None, true)?;
    let mut scales = AdapterScales::none();
    scales.set(CONTENT, Tensor::ones(1, dtype, &device)?);
    let loss = step_loss(
        unet,
        schedule,
        &inputs.x0_style,
        inputs,
        &inputs.cond_style,
        inputs.added_style.as_ref(),
        &scales,
    )?;
    let grads = loss.backward()?;
    opt.step(&grads)?;
    loss.to_scalar::<f32>().map_err(Into::into)
}

/// One Pair Customization iteration from given inputs: the content step (ContentLoRA alone,
/// trainable; optimizer step), then, if `inputs.style_step`, the style step (ContentLoRA as a
/// constant plus StyleLoRA, trainable; optimizer step). Returns the two losses. Leaves the
/// adapters attached (the caller detaches).
pub fn train_iteration(
    unet: &mut UNet,
    schedule: &NoiseSchedule,
    content: (&LearnedAdapter, &mut AdamW),
    style: (&LearnedAdapter, &mut AdamW),
    inputs: &IterationInputs,
) -> Result<(f32, Option<f32>)> {
    let (content, opt_content) = content;
    let (style, opt_style) = style;
    let dtype = inputs.x0_content.dtype();
    let device = inputs.x0_content.device().clone();

    attach_adapters(unet, content, None, true)?;
    let mut scales = AdapterScales::none();
    scales.set(CONTENT, Tensor::ones(1, dtype, &device)?);
    let loss = step_loss(
        unet,
        schedule,
        &inputs.x0_content,
        inputs,
        &inputs.cond_content,
        inputs.added_content.as_ref(),
        &scales,
    )?;
    let grads = loss.backward()?;
    opt_content.step(&grads)?;
    drop(grads);
    let loss_c = loss.to_scalar::<f32>()?;
    // The loss holds the content step's whole graph (every saved activation): free it before the
    // style step builds its own, or both are alive at the style step's peak.
    drop(loss);

    if !inputs.style_step {
        return Ok((loss_c, None));
    }
    attach_adapters(unet, content, Some(style), false)?;
    scales.set(STYLE, Tensor::ones(1, dtype, &device)?);
    let loss = step_loss(
        unet,
        schedule,
        &inputs.x0_style,
        inputs,
        &inputs.cond_style,
        inputs.added_style.as_ref(),
        &scales,
    )?;
    let grads = loss.backward()?;
    opt_style.step(&grads)?;
    Ok((loss_c, Some(loss.to_scalar::<f32>()?)))
}
