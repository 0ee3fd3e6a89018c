//! Text-to-image generation as one library call, shared by `pairstyle generate` and the daemon.
//!
//! 1. A [`GenerationRequest`] (serde, every setting optional but the prompt) is checked against the
//!    `[generate]` defaults with [`GenerationRequest::check`], before any model is loaded.
//! 2. [`prepare`] resolves the size against the loaded model, loads the named styles from a
//!    [`StyleSource`] (the [`Library`], or a style still in memory), attaches them and builds the
//!    [`Guidance`]: plain CFG, style guidance with one λ per style (METHOD.md Eq. 10/11), or the
//!    LoRA-scale baseline.
//! 3. [`Prepared::run`] samples, detaches the styles again (the pipeline is reusable) and returns a
//!    [`Generated`] image with its [`GenerationMeta`], which [`Generated::save`] writes as a PNG with
//!    the settings in text chunks.
//!
//! [`render_samples`] uses the same steps to render the sample grid and thumbnail stored with a
//! freshly trained style.

use std::path::Path;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::config::{Config, GenerateConfig};
use crate::engine::image_io::{self, GenerationMeta};
use crate::engine::pipeline::{
    GenerateRequest, Guidance, Pipeline, StepFlow, StepProgress, StyleTerm,
};
use crate::engine::scheduler::SchedulerKind;
use crate::library::{Library, LoadedStyle, StyleMeta};
use crate::lora::AdapterSet;

/// Most denoising steps a request may ask for.
pub const MAX_STEPS: usize = 1000;
/// Largest image side a request may ask for, in pixels (a guard against requests that would
/// exhaust memory; SDXL's native size is 1024).
pub const MAX_SIDE: usize = 8192;
/// Largest side of a style's thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 256;

/// A style and its weight in a generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StyleWeight {
    /// Style name in the library.
    pub name: String,
    /// Style-guidance weight λ; `None` uses the style's default.
    pub lambda: Option<f64>,
}

/// What to generate; unset fields take the `[generate]` and `[style]` defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// The prompt.
    pub prompt: String,
    /// Negative prompt; `None` uses `[generate] negative` (empty: the unconditional branch).
    #[serde(default)]
    pub negative: Option<String>,
    /// Styles to apply with style guidance, each with its λ.
    #[serde(default)]
    pub styles: Vec<StyleWeight>,
    /// Noise seed; `None` picks one from the clock (recorded in the PNG).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Denoising steps.
    #[serde(default)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale.
    #[serde(default)]
    pub cfg: Option<f64>,
    /// Image width in pixels (`[generate] width`, else the model's native size).
    #[serde(default)]
    pub width: Option<usize>,
    /// Image height in pixels (`[generate] height`, else the model's native size).
    #[serde(default)]
    pub height: Option<usize>,
    /// Sampler: `default` (the model's own), `euler`, `ddim` or `pndm`.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// First step (0-based) with style guidance (`[style] from_step`).
    #[serde(default)]
    pub style_from: Option<usize>,
    /// The LoRA-scale baseline instead of style guidance: ordinary CFG with the single style's
    /// LoRA at this scale.
    #[serde(default)]
    pub lora_scale: Option<f64>,
}

/// What can go wrong while generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A setting is outside what generation supports. `field` is the setting's name as the
    /// command line spells it without dashes (`steps`, `cfg`, `scheduler`, `lora-scale`...).
    #[error("{field} {detail}")]
    Setting {
        /// The setting.
        field: &'static str,
        /// What is wrong with it, e.g. `must be between 1 and 1000 (got 0)`.
        detail: String,
    },

    /// A style named in the request could not be loaded or attached.
    #[error("loading style {name:?} from {origin}: {cause}")]
    Style {
        /// The style's name.
        name: String,
        /// Where it was looked for (the library folder).
        origin: String,
        /// Why it failed.
        cause: Box<crate::Error>,
    },

    /// The engine failed (model, sizes, tensors, writing the PNG).
    #[error(transparent)]
    Lib(#[from] crate::Error),
}

impl GenerateError {
    fn setting(field: &'static str, detail: impl Into<String>) -> Self {
        GenerateError::Setting {
            field,
            detail: detail.into(),
        }
    }
}

/// The settings of a request after checking, before a model is involved.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedSettings {
    /// Denoising steps.
    pub steps: usize,
    /// CFG scale.
    pub cfg: f64,
    /// The sampler, `None` for the model's own.
    pub scheduler: Option<SchedulerKind>,
    /// The sampler as asked (`default` when unset), recorded in the PNG.
    pub scheduler_name: String,
    /// The negative prompt after defaults.
    pub negative: Option<String>,
    /// The noise seed (picked now when the request has none).
    pub seed: u64,
}

/// A seed from the clock, for requests without one.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl GenerationRequest {
    /// Check every setting that needs no model (steps, cfg, scheduler, λ, the LoRA-scale rules,
    /// size limits) and fill in the defaults of `g`; picks a seed when none is set.
    /// `model_cfg` is the model folder's recommended guidance scale ([`ModelDefaults`]), used
    /// when neither the request nor `g` fixes one (`cfg = "auto"`).
    ///
    /// [`ModelDefaults`]: crate::engine::model_dir::ModelDefaults
    pub fn check(
        &self,
        g: &GenerateConfig,
        model_cfg: Option<f64>,
    ) -> Result<CheckedSettings, GenerateError> {
        let steps = self.steps.unwrap_or(g.steps);
        if steps == 0 || steps > MAX_STEPS {
            return Err(GenerateError::setting(
                "steps",
                format!("must be between 1 and {MAX_STEPS} (got {steps})"),
            ));
        }
        let cfg = self.cfg.unwrap_or_else(|| g.cfg.resolve(model_cfg));
        if !cfg.is_finite() || cfg < 0.0 {
            return Err(GenerateError::setting(
                "cfg",
                format!("must be a finite number ≥ 0 (got {cfg})"),
            ));
        }
        let scheduler_name = self
            .scheduler
            .clone()
            .unwrap_or_else(|| g.scheduler.clone());
        let scheduler = match scheduler_name.as_str() {
            "default" | "" => None,
            s => Some(s.parse::<SchedulerKind>().map_err(|_| {
                GenerateError::setting(
                    "scheduler",
                    format!("must be default, euler, ddim or pndm (got {s:?})"),
                )
            })?),
        };
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v.filter(|&v| v == 0 || v > MAX_SIDE) {
                return Err(GenerateError::setting(
                    field,
                    format!("must be between 1 and {MAX_SIDE} pixels (got {v})"),
                ));
            }
        }
        for s in &self.styles {
            if s.name.is_empty() {
                return Err(GenerateError::setting("style", "needs a name"));
            }
            if let Some(l) = s.lambda.filter(|l| !l.is_finite()) {
                return Err(GenerateError::setting(
                    "style",
                    format!("{}: λ must be finite (got {l})", s.name),
                ));
            }
        }
        if let Some(from) = self
            .style_from
            .filter(|&f| f >= steps && !self.styles.is_empty())
        {
            return Err(GenerateError::setting(
                "style-from",
                format!(
                    "must be below the number of steps ({steps}), or the styles would never be \
                     applied (got {from})"
                ),
            ));
        }
        if let Some(alpha) = self.lora_scale {
            if self.styles.len() != 1 {
                return Err(GenerateError::setting(
                    "lora-scale",
                    format!(
                        "takes exactly one style (got {}): it is the single-LoRA baseline",
                        self.styles.len()
                    ),
                ));
            }
            if !alpha.is_finite() {
                return Err(GenerateError::setting(
                    "lora-scale",
                    format!("must be finite (got {alpha})"),
                ));
            }
        }
        let negative = self
            .negative
            .clone()
            .or_else(|| (!g.negative.is_empty()).then(|| g.negative.clone()));
        Ok(CheckedSettings {
            steps,
            cfg,
            scheduler,
            scheduler_name,
            negative,
            seed: self.seed.unwrap_or_else(clock_seed),
        })
    }
}

/// Where the styles named in a request come from.
pub trait StyleSource {
    /// Load style `name` (its description and StyleLoRA) for `pipe`'s UNet.
    fn load_style(&mut self, name: &str, pipe: &Pipeline) -> Result<LoadedStyle, GenerateError>;
}

impl StyleSource for Library {
    fn load_style(&mut self, name: &str, pipe: &Pipeline) -> Result<LoadedStyle, GenerateError> {
        self.load(name, pipe.unet(), pipe.dtype(), pipe.device())
            .map_err(|cause| GenerateError::Style {
                name: name.to_string(),
                origin: self.root().display().to_string(),
                cause: Box::new(cause),
            })
    }
}

/// One style still in memory (a style just trained, before it is registered).
pub struct InMemoryStyle<'a> {
    /// Its description.
    pub meta: &'a StyleMeta,
    /// Its StyleLoRA.
    pub adapter: &'a AdapterSet,
}

impl StyleSource for InMemoryStyle<'_> {
    fn load_style(&mut self, name: &str, pipe: &Pipeline) -> Result<LoadedStyle, GenerateError> {
        let style_err = |cause| GenerateError::Style {
            name: name.to_string(),
            origin: "memory".into(),
            cause: Box::new(cause),
        };
        if name != self.meta.name {
            return Err(style_err(crate::Error::InvalidArgument(format!(
                "only style {:?} is available here",
                self.meta.name
            ))));
        }
        let adapter = self
            .adapter
            .to_dtype_device(pipe.dtype(), pipe.device())
            .map_err(style_err)?;
        Ok(LoadedStyle {
            meta: self.meta.clone(),
            adapter,
        })
    }
}

/// A style as applied to one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedStyle {
    /// Its name.
    pub name: String,
    /// Its λ (the request's, else the style's default).
    pub lambda: f64,
    /// The suffix of its prompt branch.
    pub suffix: String,
}

/// A generation ready to sample: size and seed resolved, styles attached to the pipeline.
#[derive(Debug)]
pub struct Prepared {
    /// The engine's request.
    pub request: GenerateRequest,
    /// How each step's output is formed.
    pub guidance: Guidance,
    /// The styles, in request order.
    pub styles: Vec<AppliedStyle>,
    /// The sampler as asked (`default` when unset).
    pub scheduler_name: String,
    model: String,
    dtype: String,
}

/// Resolve the size against the model (`[generate]` defaults), load and attach the request's
/// styles, and build the guidance (`[style] from_step` by default). `model` names the model in
/// the PNG (its folder); `[runtime] dtype` is recorded too.
pub fn prepare(
    pipe: &mut Pipeline,
    request: &GenerationRequest,
    settings: &CheckedSettings,
    config: &Config,
    model: &str,
    source: &mut dyn StyleSource,
) -> Result<Prepared, GenerateError> {
    let g = &config.generate;
    let native = pipe.native_size().unwrap_or(512);
    let pick =
        |asked: Option<usize>, conf: usize| asked.unwrap_or(if conf == 0 { native } else { conf });
    let width = pick(request.width, g.width);
    let height = pick(request.height, g.height);
    pipe.check_size(width, height)?;
    let mut applied = Vec::with_capacity(request.styles.len());
    for s in &request.styles {
        let loaded = match source.load_style(&s.name, pipe) {
            Ok(l) => l,
            Err(e) => {
                detach(pipe, &applied);
                return Err(e);
            }
        };
        if let Err(cause) = loaded.adapter.attach(pipe.unet_mut(), &s.name) {
            detach(pipe, &applied);
            return Err(GenerateError::Style {
                name: s.name.clone(),
                origin: "the loaded model".into(),
                cause: Box::new(cause),
            });
        }
        applied.push(AppliedStyle {
            name: s.name.clone(),
            lambda: s.lambda.unwrap_or(loaded.meta.default_lambda),
            suffix: loaded.meta.prompt_suffix.clone(),
        });
    }
    let guidance = match (request.lora_scale, applied.as_slice()) {
        (_, []) => Guidance::Cfg,
        (Some(alpha), [only]) => Guidance::LoraScale {
            adapter: only.name.clone(),
            alpha,
            suffix: only.suffix.clone(),
        },
        _ => Guidance::Styles {
            styles: applied
                .iter()
                .map(|s| StyleTerm {
                    adapter: s.name.clone(),
                    lambda: s.lambda,
                    suffix: s.suffix.clone(),
                    scale: 1.0,
                })
                .collect(),
            from_step: request.style_from.unwrap_or(config.style.from_step),
        },
    };
    Ok(Prepared {
        request: GenerateRequest {
            prompt: request.prompt.clone(),
            negative: settings.negative.clone(),
            seed: settings.seed,
            steps: settings.steps,
            cfg: settings.cfg,
            width,
            height,
            scheduler: settings.scheduler,
        },
        guidance,
        styles: applied,
        scheduler_name: settings.scheduler_name.clone(),
        model: model.to_string(),
        dtype: config.runtime.dtype.clone(),
    })
}

fn detach(pipe: &mut Pipeline, styles: &[AppliedStyle]) {
    for s in styles {
        AdapterSet::detach(pipe.unet_mut(), &s.name);
    }
}

/// The guidance as recorded in the PNG's `parameters`: `"cfg"`, or the mode with its styles.
pub fn guidance_json(g: &Guidance) -> serde_json::Value {
    match g {
        Guidance::Cfg => serde_json::json!("cfg"),
        Guidance::Styles { styles, from_step } => serde_json::json!({
            "mode": "style",
            "from_step": from_step,
            "styles": styles
                .iter()
                .map(|s| serde_json::json!({"name": s.adapter, "lambda": s.lambda, "suffix": s.suffix}))
                .collect::<Vec<_>>(),
        }),
        Guidance::LoraScale {
            adapter,
            alpha,
            suffix,
        } => serde_json::json!({
            "mode": "lora-scale", "style": adapter, "alpha": alpha, "suffix": suffix,
        }),
    }
}

/// A generated image and the settings it was made with.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The pixels.
    pub rgb: RgbImage,
    /// The settings (the PNG's text chunks).
    pub meta: GenerationMeta,
}

impl Generated {
    /// Write the image as a PNG carrying its settings, atomically.
    pub fn save(&self, path: &Path) -> crate::Result<()> {
        image_io::save_png_with_text(
            path,
            self.rgb.as_raw(),
            self.rgb.width(),
            self.rgb.height(),
            &self.meta.text_chunks(),
        )
    }
}

impl Prepared {
    /// The settings recorded in the PNG.
    pub fn meta(&self) -> GenerationMeta {
        let r = &self.request;
        GenerationMeta {
            prompt: r.prompt.clone(),
            negative: r.negative.clone(),
            seed: r.seed,
            steps: r.steps,
            cfg: r.cfg,
            scheduler: self.scheduler_name.clone(),
            model: self.model.clone(),
            width: r.width as u32,
            height: r.height as u32,
            extra: [
                ("dtype".to_string(), serde_json::json!(self.dtype)),
                ("guidance".to_string(), guidance_json(&self.guidance)),
            ]
            .into(),
        }
    }

    /// Sample the image (calling `on_step` after every denoising step; it may return
    /// [`StepFlow::Stop`] to give up), then detach the styles.
    pub fn run<F: Into<StepFlow>>(
        self,
        pipe: &mut Pipeline,
        on_step: impl FnMut(StepProgress) -> F,
    ) -> Result<Generated, GenerateError> {
        let image = pipe.generate_guided(&self.request, &self.guidance, on_step);
        detach(pipe, &self.styles);
        let rgb = image_io::tensor_to_rgb8(&image?)?;
        Ok(Generated {
            rgb,
            meta: self.meta(),
        })
    }

    /// Give up on this generation: detach its styles.
    pub fn discard(self, pipe: &mut Pipeline) {
        detach(pipe, &self.styles);
    }
}

/// Check, prepare and run `request` in one call (styles from `source`).
pub fn generate<F: Into<StepFlow>>(
    pipe: &mut Pipeline,
    request: &GenerationRequest,
    config: &Config,
    model: &str,
    source: &mut dyn StyleSource,
    on_step: impl FnMut(StepProgress) -> F,
) -> Result<Generated, GenerateError> {
    let settings = request.check(&config.generate, pipe.defaults().guidance_scale)?;
    let prepared = prepare(pipe, request, &settings, config, model, source)?;
    prepared.run(pipe, on_step)
}

/// What the sample grid of a new style shows.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSettings {
    /// Prompts, one cell each; `{subject}` is replaced by the style's subject.
    pub prompts: Vec<String>,
    /// Denoising steps per cell.
    pub steps: usize,
    /// Image side of a cell; 0 for the model's native size.
    pub size: usize,
    /// Seed of every cell (one seed, so cells differ only by prompt).
    pub seed: u64,
}

/// A style's sample grid and thumbnail, rendered but not yet written.
#[derive(Debug, Clone)]
pub struct SampleSheet {
    /// The cells side by side (near-square grid, row-major in prompt order).
    pub grid: RgbImage,
    /// The first cell, at most [`THUMBNAIL_SIDE`] pixels per side.
    pub thumbnail: RgbImage,
    /// The prompts as rendered (`{subject}` replaced).
    pub prompts: Vec<String>,
    /// The λ used.
    pub lambda: f64,
}

impl SampleSheet {
    /// The grid as PNG bytes with its settings in text chunks.
    pub fn grid_png(&self, style: &str, settings: &SampleSettings) -> crate::Result<Vec<u8>> {
        let text = [
            ("style", style.to_string()),
            (
                "prompts",
                serde_json::to_string(&self.prompts).unwrap_or_default(),
            ),
            ("seed", settings.seed.to_string()),
            ("steps", settings.steps.to_string()),
            ("lambda", self.lambda.to_string()),
            (
                "Software",
                format!("pairstyle {}", env!("CARGO_PKG_VERSION")),
            ),
        ];
        image_io::encode_png_with_text(
            self.grid.as_raw(),
            self.grid.width(),
            self.grid.height(),
            &text,
        )
    }

    /// The thumbnail as PNG bytes.
    pub fn thumbnail_png(&self, style: &str) -> crate::Result<Vec<u8>> {
        image_io::encode_png_with_text(
            self.thumbnail.as_raw(),
            self.thumbnail.width(),
            self.thumbnail.height(),
            &[("style", style)],
        )
    }
}

/// Render one image per prompt with `style` (at its default λ) and lay them out as a grid; the
/// first image, shrunk, is the thumbnail. `on_cell(done, total)` is called after each image.
pub fn render_samples(
    pipe: &mut Pipeline,
    style: InMemoryStyle<'_>,
    settings: &SampleSettings,
    config: &Config,
    model: &str,
    mut on_cell: impl FnMut(usize, usize),
) -> Result<SampleSheet, GenerateError> {
    if settings.prompts.is_empty() {
        return Err(GenerateError::setting(
            "sample prompts",
            "must not be empty",
        ));
    }
    let size = (settings.size > 0).then_some(settings.size);
    let name = style.meta.name.clone();
    let lambda = style.meta.default_lambda;
    let prompts: Vec<String> = settings
        .prompts
        .iter()
        .map(|p| p.replace("{subject}", &style.meta.subject))
        .collect();
    let mut source = style;
    let mut cells = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let request = GenerationRequest {
            prompt: prompt.clone(),
            styles: vec![StyleWeight {
                name: name.clone(),
                lambda: None,
            }],
            seed: Some(settings.seed),
            steps: Some(settings.steps),
            width: size,
            height: size,
            ..Default::default()
        };
        let image = generate(pipe, &request, config, model, &mut source, |_| {})?;
        cells.push(image.rgb);
        on_cell(i + 1, prompts.len());
    }
    let grid = grid_of(&cells)?;
    let first = &cells[0];
    let thumbnail = if first.width().max(first.height()) > THUMBNAIL_SIDE {
        image::imageops::thumbnail(first, THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    } else {
        first.clone()
    };
    Ok(SampleSheet {
        grid,
        thumbnail,
        prompts,
        lambda,
    })
}

/// Lay equally sized images out in a near-square grid (columns = ⌈√n⌉), row-major.
pub fn grid_of(cells: &[RgbImage]) -> crate::Result<RgbImage> {
    let Some(first) = cells.first() else {
        return Err(crate::Error::InvalidArgument(
            "a grid needs at least one image".into(),
        ));
    };
    let (w, h) = first.dimensions();
    if cells.iter().any(|c| c.dimensions() != (w, h)) {
        return Err(crate::Error::InvalidArgument(
            "grid cells must all have the same size".into(),
        ));
    }
    let n = cells.len() as u32;
    let cols = (1..=n).find(|c| c * c >= n).unwrap_or(n);
    let rows = n.div_ceil(cols);
    let mut grid = RgbImage::new(w * cols, h * rows);
    for (i, cell) in cells.iter().enumerate() {
        let i = i as u32;
        image::imageops::replace(
            &mut grid,
            cell,
            i64::from((i % cols) * w),
            i64::from((i / cols) * h),
        );
    }
    Ok(grid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_fills_defaults_and_names_bad_settings() {
        let g = GenerateConfig {
            negative: "blurry".into(),
            ..GenerateConfig::default()
        };
        let ok = GenerationRequest {
            prompt: "a cat".into(),
            seed: Some(5),
            ..Default::default()
        }
        .check(&g, None)
        .unwrap();
        assert_eq!(
            (
                ok.steps,
                ok.cfg,
                ok.seed,
                ok.scheduler,
                ok.negative.as_deref()
            ),
            (
                g.steps,
                crate::config::FALLBACK_CFG,
                5,
                None,
                Some("blurry")
            )
        );
        assert_eq!(ok.scheduler_name, "default");
        let bad = |r: GenerationRequest| r.check(&g, None).unwrap_err().to_string();
        let base = GenerationRequest {
            prompt: "x".into(),
            ..Default::default()
        };
        let e = bad(GenerationRequest {
            steps: Some(0),
            ..base.clone()
        });
        assert_eq!(e, "steps must be between 1 and 1000 (got 0)");
        assert!(bad(GenerationRequest {
            cfg: Some(f64::NAN),
            ..base.clone()
        })
        .starts_with("cfg "));
        assert!(bad(GenerationRequest {
            scheduler: Some("dpm".into()),
            ..base.clone()
        })
        .contains("\"dpm\""));
        assert!(bad(GenerationRequest {
            width: Some(0),
            ..base.clone()
        })
        .starts_with("width "));
        let two = vec![
            StyleWeight {
                name: "a".into(),
                lambda: None,
            },
            StyleWeight {
                name: "b".into(),
                lambda: Some(f64::INFINITY),
            },
        ];
        assert!(bad(GenerationRequest {
            styles: two.clone(),
            ..base.clone()
        })
        .contains("b: λ must be finite"));
        let late = bad(GenerationRequest {
            styles: two[..1].to_vec(),
            steps: Some(10),
            style_from: Some(10),
            ..base.clone()
        });
        assert!(late.starts_with("style-from must be below"), "{late}");
        // Without styles the schedule does not matter.
        assert!(GenerationRequest {
            steps: Some(10),
            style_from: Some(10),
            ..base.clone()
        }
        .check(&GenerateConfig::default(), None)
        .is_ok());
        assert!(bad(GenerationRequest {
            styles: two[..1].to_vec(),
            lora_scale: Some(f64::NAN),
            ..base.clone()
        })
        .starts_with("lora-scale"));
        assert!(bad(GenerationRequest {
            lora_scale: Some(0.5),
            ..base
        })
        .contains("exactly one style (got 0)"));
    }

    #[test]
    fn cfg_comes_from_the_request_then_the_config_then_the_model() {
        use crate::config::CfgSetting;
        let req = GenerationRequest {
            prompt: "x".into(),
            seed: Some(1),
            ..Default::default()
        };
        let auto = GenerateConfig::default();
        let fixed = GenerateConfig {
            cfg: CfgSetting::Scale(6.0),
            ..GenerateConfig::default()
        };
        let cfg =
            |r: &GenerationRequest, g: &GenerateConfig, m: Option<f64>| r.check(g, m).unwrap().cfg;
        assert_eq!(cfg(&req, &auto, Some(2.0)), 2.0, "auto: the model's");
        assert_eq!(cfg(&req, &auto, None), 7.5, "auto without a recommendation");
        assert_eq!(
            cfg(&req, &fixed, Some(2.0)),
            6.0,
            "a fixed config value wins"
        );
        let asked = GenerationRequest {
            cfg: Some(3.0),
            ..req
        };
        assert_eq!(cfg(&asked, &fixed, Some(2.0)), 3.0, "the request wins");
    }

    #[test]
    fn requests_parse_with_only_a_prompt() {
        let r: GenerationRequest = serde_json::from_str(r#"{"prompt":"a fox"}"#).unwrap();
        assert_eq!(r.prompt, "a fox");
        assert!(r.styles.is_empty() && r.seed.is_none() && r.style_from.is_none());
    }

    #[test]
    fn grids_are_near_square_and_row_major() {
        let cell = |v: u8| RgbImage::from_pixel(2, 3, image::Rgb([v, v, v]));
        let g = grid_of(&[cell(10), cell(20), cell(30)]).unwrap();
        // 3 cells: 2 columns, 2 rows; the fourth place stays black.
        assert_eq!(g.dimensions(), (4, 6));
        assert_eq!(g.get_pixel(0, 0).0, [10; 3]);
        assert_eq!(g.get_pixel(2, 0).0, [20; 3]);
        assert_eq!(g.get_pixel(0, 3).0, [30; 3]);
        assert_eq!(g.get_pixel(2, 3).0, [0; 3]);
        assert_eq!(grid_of(&[cell(1)]).unwrap().dimensions(), (2, 3));
        assert!(grid_of(&[]).is_err());
        let odd = RgbImage::new(3, 3);
        assert!(grid_of(&[cell(1), odd]).is_err());
    }

    #[test]
    fn guidance_is_recorded_with_names_and_weights() {
        let g = Guidance::Styles {
            styles: vec![StyleTerm {
                adapter: "ink".into(),
                lambda: 2.5,
                suffix: " in ink style".into(),
                scale: 1.0,
            }],
            from_step: 3,
        };
        let v = guidance_json(&g);
        assert_eq!(v["mode"], "style");
        assert_eq!(v["from_step"], 3);
        assert_eq!(v["styles"][0]["name"], "ink");
        assert_eq!(v["styles"][0]["lambda"], 2.5);
        assert_eq!(guidance_json(&Guidance::Cfg), "cfg");
    }
}
