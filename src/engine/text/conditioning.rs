//! Prompts → the UNet's text conditioning, following diffusers' `encode_prompt` per family.
//!
//! - SD1.x and SD2.x: one tokenizer + text encoder; the context is `last_hidden_state` (diffusers'
//!   SD2 text encoders already have OpenCLIP's last layer removed, so no skipping is needed).
//! - SDXL: `hidden_states[-2]` of both encoders concatenated along the feature axis
//!   (768 + 1280 = 2048 for SDXL base), and the projected pooled output (`text_embeds`) of the
//!   second encoder as the pooled vector. A refiner-style folder with only `text_encoder_2` uses
//!   that one alone. The unconditional branch with no negative prompt is all zeros when
//!   `model_index.json` says `force_zeros_for_empty_prompt` (the SDXL default).
//!
//! Each encoder runs once per call on the whole batch of prompts.

use candle_core::{DType, Device, Tensor};

use super::clip::ClipTextEncoder;
use super::tokenizer::ClipTokenizer;
use crate::engine::model_dir::{read_json, ModelDir, ModelFamily, Variant};
use crate::error::{Error, Result};

/// The text conditioning of a batch: what the UNet's cross-attention (and, for SDXL, its added
/// embeddings) consume.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[B, T, C]` token states (`encoder_hidden_states`; T = 77, C = 768 / 1024 / 2048).
    pub context: Tensor,
    /// `[B, P]` pooled text embedding (SDXL's `text_embeds`, P = 1280); `None` for SD1.x/SD2.x.
    pub pooled: Option<Tensor>,
}

impl Conditioning {
    /// Number of prompts in the batch.
    pub fn batch_size(&self) -> Result<usize> {
        Ok(self.context.dim(0)?)
    }

    /// Each prompt's conditioning repeated `n` times in a row (diffusers' `num_images_per_prompt`).
    pub fn repeat_each(&self, n: usize) -> Result<Self> {
        let rep = |t: &Tensor| -> Result<Tensor> {
            let b = t.dim(0)?;
            let idx: Vec<u32> = (0..b as u32)
                .flat_map(|i| std::iter::repeat_n(i, n))
                .collect();
            let idx = Tensor::from_vec(idx, b * n, t.device())?;
            Ok(t.index_select(&idx, 0)?)
        };
        Ok(Self {
            context: rep(&self.context)?,
            pooled: self.pooled.as_ref().map(rep).transpose()?,
        })
    }

    /// Concatenate batches along the batch axis (e.g. unconditional then conditional for
    /// classifier-free guidance). All parts must agree on whether they have a pooled vector.
    pub fn cat(parts: &[&Conditioning]) -> Result<Self> {
        if parts.is_empty() {
            return Err(Error::InvalidArgument(
                "no conditioning to concatenate".into(),
            ));
        }
        let ctx: Vec<&Tensor> = parts.iter().map(|p| &p.context).collect();
        let pooled = if parts.iter().all(|p| p.pooled.is_some()) {
            let ps: Vec<&Tensor> = parts.iter().filter_map(|p| p.pooled.as_ref()).collect();
            Some(Tensor::cat(&ps, 0)?)
        } else if parts.iter().all(|p| p.pooled.is_none()) {
            None
        } else {
            return Err(Error::InvalidArgument(
                "cannot concatenate conditioning with and without pooled embeddings".into(),
            ));
        };
        Ok(Self {
            context: Tensor::cat(&ctx, 0)?,
            pooled,
        })
    }

    /// The same conditioning in another dtype.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            context: self.context.to_dtype(dtype)?,
            pooled: self
                .pooled
                .as_ref()
                .map(|p| p.to_dtype(dtype))
                .transpose()?,
        })
    }
}

/// One tokenizer with its text encoder (`tokenizer` + `text_encoder`, or the `_2` pair).
#[derive(Debug, Clone)]
pub struct TextBranch {
    /// The tokenizer of this branch.
    pub tokenizer: ClipTokenizer,
    /// The text encoder of this branch.
    pub encoder: ClipTextEncoder,
}

impl TextBranch {
    /// Load `tokenizer{suffix}` and `text_encoder{suffix}` from a model folder.
    pub fn load(
        model: &ModelDir,
        suffix: &str,
        variant: Variant,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer =
            ClipTokenizer::from_dir(model.component_dir(&format!("tokenizer{suffix}"))?)?;
        let encoder = ClipTextEncoder::load(
            model,
            &format!("text_encoder{suffix}"),
            variant,
            dtype,
            device,
        )?;
        if tokenizer.max_length() > encoder.config().max_position_embeddings {
            return Err(Error::config(
                model.config_path(&format!("text_encoder{suffix}")),
                format!(
                    "max_position_embeddings {} is shorter than the tokenizer's model_max_length {}",
                    encoder.config().max_position_embeddings,
                    tokenizer.max_length()
                ),
            ));
        }
        Ok(Self { tokenizer, encoder })
    }

    /// Tokenize and encode a batch in one forward pass.
    pub fn run<S: AsRef<str>>(&self, prompts: &[S]) -> Result<super::clip::ClipTextOutput> {
        let ids = self
            .tokenizer
            .encode_batch(prompts, self.encoder.device())?;
        self.encoder.forward(&ids)
    }
}

/// All text conditioning of a model folder: its tokenizers and text encoders and the family's
/// rule for combining them.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    family: ModelFamily,
    /// SD1/SD2: `[text_encoder]`; SDXL: `[text_encoder, text_encoder_2]` or `[text_encoder_2]`.
    branches: Vec<TextBranch>,
    force_zeros_for_empty_prompt: bool,
    clip_skip: Option<usize>,
}

impl PromptEncoder {
    /// Load the tokenizers and text encoders of a model folder as `dtype` on `device`
    /// (fp16 weight files preferred for half dtypes).
    pub fn load(model: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_variant(model, Variant::Auto, dtype, device)
    }

    /// [`PromptEncoder::load`] with an explicit weight-file variant.
    pub fn load_with_variant(
        model: &ModelDir,
        variant: Variant,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let family = model.family()?;
        let mut branches = Vec::new();
        match family {
            ModelFamily::Sd1 | ModelFamily::Sd2 => {
                branches.push(TextBranch::load(model, "", variant, dtype, device)?);
            }
            ModelFamily::Sdxl => {
                if model.has_component("text_encoder") {
                    branches.push(TextBranch::load(model, "", variant, dtype, device)?);
                }
                branches.push(TextBranch::load(model, "_2", variant, dtype, device)?);
            }
        }
        let index: serde_json::Value = read_json(&model.root().join("model_index.json"))?;
        let force_zeros_for_empty_prompt = family == ModelFamily::Sdxl
            && index
                .get("force_zeros_for_empty_prompt")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true);
        Ok(Self {
            family,
            branches,
            force_zeros_for_empty_prompt,
            clip_skip: None,
        })
    }

    /// The model family whose rule this encoder applies.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The tokenizer/encoder pairs, in diffusers' order.
    pub fn branches(&self) -> &[TextBranch] {
        &self.branches
    }

    /// Whether an absent negative prompt gives zero conditioning (SDXL's
    /// `force_zeros_for_empty_prompt`).
    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    /// Skip the last `k` layers as diffusers' `clip_skip` does (`None` or 0: no skipping).
    /// SD1.x/SD2.x then use the final-normed `hidden_states[-(k+1)]`, SDXL `hidden_states[-(k+2)]`.
    pub fn with_clip_skip(mut self, clip_skip: Option<usize>) -> Self {
        self.clip_skip = clip_skip.filter(|&k| k > 0);
        self
    }

    /// Width of the context (`cross_attention_dim` the UNet must have).
    pub fn context_dim(&self) -> usize {
        self.branches.iter().map(|b| b.encoder.hidden_size()).sum()
    }

    /// Width of the pooled vector (SDXL), if any.
    pub fn pooled_dim(&self) -> Option<usize> {
        match self.family {
            ModelFamily::Sdxl => self
                .branches
                .last()
                .and_then(|b| b.encoder.projection_dim()),
            _ => None,
        }
    }

    /// Sequence length of the context (the tokenizers' `model_max_length`, 77).
    pub fn seq_len(&self) -> usize {
        self.branches
            .first()
            .map(|b| b.tokenizer.max_length())
            .unwrap_or(super::tokenizer::DEFAULT_MAX_LENGTH)
    }

    /// The conditioning of a batch of prompts (diffusers' `prompt_embeds`, and for SDXL
    /// `pooled_prompt_embeds`). SDXL's second encoder gets the same prompts.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Conditioning> {
        self.encode_pair(prompts, None)
    }

    /// Like [`PromptEncoder::encode`], with other prompts for SDXL's second encoder
    /// (diffusers' `prompt_2`; ignored for SD1.x/SD2.x).
    pub fn encode_pair<S: AsRef<str>>(
        &self,
        prompts: &[S],
        prompts_2: Option<&[S]>,
    ) -> Result<Conditioning> {
        self.encode_with_skip(prompts, prompts_2, self.clip_skip)
    }

    fn encode_with_skip<S: AsRef<str>>(
        &self,
        prompts: &[S],
        prompts_2: Option<&[S]>,
        clip_skip: Option<usize>,
    ) -> Result<Conditioning> {
        if prompts.is_empty() {
            return Err(Error::InvalidArgument("no prompts to encode".into()));
        }
        if let Some(p2) = prompts_2 {
            if p2.len() != prompts.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} prompts but {} second prompts",
                    prompts.len(),
                    p2.len()
                )));
            }
        }
        match self.family {
            ModelFamily::Sd1 | ModelFamily::Sd2 => {
                let branch = &self.branches[0];
                let out = branch.run(prompts)?;
                let context = match clip_skip {
                    None => out.last_hidden_state,
                    Some(k) => branch
                        .encoder
                        .final_layer_norm(out.hidden_state(-(k as isize) - 1)?)?,
                };
                Ok(Conditioning {
                    context,
                    pooled: None,
                })
            }
            ModelFamily::Sdxl => {
                let index = -(clip_skip.unwrap_or(0) as isize) - 2;
                let n = self.branches.len();
                let mut states = Vec::with_capacity(n);
                let mut pooled = None;
                for (i, branch) in self.branches.iter().enumerate() {
                    // With both encoders, the second gets `prompts_2`; a lone encoder_2 gets `prompts`.
                    let out = match (i, n, prompts_2) {
                        (1, 2, Some(p2)) => branch.run(p2)?,
                        _ => branch.run(prompts)?,
                    };
                    if pooled.is_none() {
                        pooled = out.text_embeds.clone();
                    }
                    states.push(out.hidden_state(index)?.clone());
                }
                let context = if states.len() == 1 {
                    states.remove(0)
                } else {
                    Tensor::cat(&states, 2)?
                };
                Ok(Conditioning { context, pooled })
            }
        }
    }

    /// The unconditional (negative) branch for one sample: the encoded negative prompt, or
    /// `""` when there is none (never with clip skip, as in diffusers) — except for SDXL with `force_zeros_for_empty_prompt`, where an
    /// absent negative prompt gives zeros of the conditioning's shape.
    pub fn encode_uncond(&self, negative: Option<&str>) -> Result<Conditioning> {
        if negative.is_none() && self.force_zeros_for_empty_prompt {
            let first = &self.branches[0].encoder;
            let (dtype, device) = (first.dtype(), first.device());
            let context = Tensor::zeros((1, self.seq_len(), self.context_dim()), dtype, device)?;
            let pooled = self
                .pooled_dim()
                .map(|p| Tensor::zeros((1, p), dtype, device))
                .transpose()?;
            return Ok(Conditioning { context, pooled });
        }
        // diffusers encodes the negative branch without clip_skip in every pipeline.
        self.encode_with_skip(&[negative.unwrap_or("")], None, None)
    }
}
