//! Our CLIP text transformer: the text encoder of SD1.x (CLIP ViT-L), SD2.x (OpenCLIP ViT-H,
//! whose diffusers copy already lacks the last layer) and both SDXL encoders.
//!
//! Built from `text_encoder/config.json` (transformers' `CLIPTextConfig`) with transformers'
//! tensor names, so stock `model.safetensors` files load unchanged and a wrong shape names the
//! tensor. The forward pass follows transformers' `CLIPTextTransformer`: token + position
//! embeddings, pre-norm encoder layers with causal self-attention, a final layer norm, pooling at
//! the EOS position and (for `CLIPTextModelWithProjection`) a bias-free projection.
//!
//! Only ops whose backward candle computes correctly are used (composed softmax, the slow layer
//! norm; see CANDLE.md), so the encoder can be trained through later. With f16/bf16 weights,
//! layer norms and attention softmax run in f32.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Linear;
use serde::Deserialize;

use crate::engine::model_dir::{ModelDir, Variant};
use crate::engine::weights::Weights;
use crate::error::{Error, Result};

/// The activation of the MLP blocks (`hidden_act` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)`: OpenAI CLIP (SD1.x, SDXL's first encoder).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP (SD2.x, SDXL's second encoder).
    Gelu,
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// ReLU.
    Relu,
    /// SiLU / swish.
    Silu,
}

impl Activation {
    /// Parse transformers' `hidden_act` name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }

    /// Apply the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::Gelu => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::Relu => x.relu()?,
            Self::Silu => x.silu()?,
        })
    }
}

/// The fields of `text_encoder/config.json` the architecture needs (transformers' defaults
/// where a field is absent).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Number of token embeddings.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Width of the transformer (768 for CLIP-L, 1024 for OpenCLIP-H, 1280 for OpenCLIP-bigG).
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Attention heads per layer.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Number of encoder layers.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Number of position embeddings (the longest sequence, 77).
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// MLP activation name (`quick_gelu`, `gelu`, ...).
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every layer norm.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Output width of `text_projection` (used only when the checkpoint has one).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// EOS id used for pooling: 2 (legacy configs) means "position of the largest id", any
    /// other value the first position holding it. Null means the legacy rule too.
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: serde_json::Value,
}

mod defaults {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn eos_token_id() -> serde_json::Value {
        serde_json::Value::from(49407)
    }
}

/// How the pooled output picks its position in each sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingRule {
    /// The position of the largest id (first if several): transformers' rule when
    /// `eos_token_id == 2`, correct for OpenAI's vocabulary where EOS is the largest id.
    ArgmaxId,
    /// The first position holding this id (position 0 if none does).
    FirstEos(i64),
}

impl ClipTextConfig {
    /// The activation, or `Error::Unsupported` naming an unknown `hidden_act`.
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_name(&self.hidden_act).ok_or_else(|| {
            Error::Unsupported(format!("text encoder hidden_act {:?}", self.hidden_act))
        })
    }

    /// The pooling rule transformers derives from `eos_token_id`.
    pub fn pooling_rule(&self) -> PoolingRule {
        let id = match &self.eos_token_id {
            serde_json::Value::Array(a) => a.first().and_then(serde_json::Value::as_i64),
            v => v.as_i64(),
        };
        match id {
            Some(2) | None => PoolingRule::ArgmaxId,
            Some(id) => PoolingRule::FirstEos(id),
        }
    }

    /// Check the numbers are usable (heads divide the width, nothing is zero).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.vocab_size == 0 {
            return Err("hidden_size, num_attention_heads and vocab_size must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if Activation::from_name(&self.hidden_act).is_none() {
            return Err(format!("unsupported hidden_act {:?}", self.hidden_act));
        }
        Ok(())
    }
}

/// Everything one forward pass gives, as transformers' `output_hidden_states=True` does.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `[B, T, D]` output of the last layer after the final layer norm (SD1.x/SD2.x context).
    pub last_hidden_state: Tensor,
    /// `num_hidden_layers + 1` states `[B, T, D]`: the embeddings, then each layer's output,
    /// without the final layer norm (transformers' `hidden_states`).
    pub hidden_states: Vec<Tensor>,
    /// `[B, D]` final-normed state at each sequence's EOS position (`pooler_output`).
    pub pooled: Tensor,
    /// `[B, P]` projected pooled output when the checkpoint has `text_projection`
    /// (SDXL's second encoder: its `text_embeds`).
    pub text_embeds: Option<Tensor>,
}

impl ClipTextOutput {
    /// A hidden state by Python-style index: `0` the embeddings, `-1` the last layer's output
    /// (before the final norm), `-2` the penultimate layer's output (what SDXL uses).
    pub fn hidden_state(&self, index: isize) -> Result<&Tensor> {
        let n = self.hidden_states.len() as isize;
        let i = if index < 0 { n + index } else { index };
        if i < 0 || i >= n {
            return Err(Error::InvalidArgument(format!(
                "hidden state index {index} out of range for {n} hidden states"
            )));
        }
        Ok(&self.hidden_states[i as usize])
    }
}

/// A layer norm whose statistics run in f32 for half-precision inputs, with a correct backward.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[dim], "weight")?,
            bias: w.get(&[dim], "bias")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm_slow(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// A linear layer `[out, in]` with bias, loaded with shape checks.
fn linear(w: &Weights, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Ok(Linear::new(
        w.get(&[out_dim, in_dim], "weight")?,
        Some(w.get(&[out_dim], "bias")?),
    ))
}

/// Causal multi-head self-attention (`self_attn`).
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: linear(&w.pp("q_proj"), d, d)?,
            k_proj: linear(&w.pp("k_proj"), d, d)?,
            v_proj: linear(&w.pp("v_proj"), d, d)?,
            out_proj: linear(&w.pp("out_proj"), d, d)?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
        })
    }

    /// `x` `[B, T, D]`, `mask` `[T, T]` f32 additive (0 or −∞).
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        // Scores [B, H, T, T]; softmax in f32 (composed, so its backward is right).
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = scores.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, d))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

/// One pre-norm encoder layer (`text_model.encoder.layers.N`).
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn load(w: &Weights, c: &ClipTextConfig, act: Activation) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), d, c.layer_norm_eps)?,
            self_attn: Attention::load(&w.pp("self_attn"), c)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: linear(&w.pp("mlp").pp("fc1"), d, c.intermediate_size)?,
            fc2: linear(&w.pp("mlp").pp("fc2"), c.intermediate_size, d)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = self.fc2.forward(&self.act.forward(&h)?)?;
        Ok((x + h)?)
    }
}

/// The CLIP text encoder (`CLIPTextModel`, or `CLIPTextModelWithProjection` when the weights
/// hold `text_projection.weight`).
#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Tensor>,
    pooling: PoolingRule,
    dtype: DType,
    device: Device,
}

impl ClipTextEncoder {
    /// Load `<component>/config.json` and `<component>/model[.fp16].safetensors` of a model folder
    /// (`component` is `text_encoder` or `text_encoder_2`).
    pub fn load(
        model: &ModelDir,
        component: &str,
        variant: Variant,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config: ClipTextConfig = model.config(component)?;
        config
            .validate()
            .map_err(|m| Error::config(model.config_path(component), m))?;
        let w = model.weights(component, variant, dtype, device)?;
        Self::new(&config, &w)
    }

    /// Build from a config and weights named like transformers' checkpoint (`text_model.*`, or the
    /// same names without `text_model.` as transformers 5.x saves `CLIPTextModel`; optional
    /// `text_projection.weight`); the dtype and device are the weights'.
    pub fn new(config: &ClipTextConfig, w: &Weights) -> Result<Self> {
        config
            .validate()
            .map_err(|m| Error::InvalidArgument(format!("text encoder config: {m}")))?;
        let act = config.activation()?;
        let d = config.hidden_size;
        // transformers ≤ 4 (and CLIPTextModelWithProjection in 5.x) store `text_model.*`;
        // transformers 5.x saves a plain CLIPTextModel without that prefix. Accept both.
        let tm = if !w.contains("text_model.embeddings.token_embedding.weight")
            && w.contains("embeddings.token_embedding.weight")
        {
            w.clone()
        } else {
            w.pp("text_model")
        };
        let emb = tm.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get(&[config.vocab_size, d], "weight")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get(&[config.max_position_embeddings, d], "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&tm.pp("encoder").pp("layers").pp(i), config, act))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            LayerNorm::load(&tm.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        let text_projection = if w.contains("text_projection.weight") {
            let p = config.projection_dim.ok_or_else(|| {
                Error::InvalidArgument(
                    "checkpoint has text_projection.weight but the config has no projection_dim"
                        .into(),
                )
            })?;
            Some(w.pp("text_projection").get(&[p, d], "weight")?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            pooling: config.pooling_rule(),
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Width of the hidden states (`hidden_size`).
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Width of `text_embeds` when the encoder has a projection.
    pub fn projection_dim(&self) -> Option<usize> {
        self.text_projection.as_ref().map(|p| p.dims()[0])
    }

    /// The dtype of weights and outputs.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The final layer norm, for callers that apply it to an earlier hidden state (clip skip).
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    /// Run the encoder on `input_ids` `[B, T]` (any integer dtype, `T ≤ max_position_embeddings`).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, t) = input_ids.dims2()?;
        if t == 0 || t > self.config.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "sequence length {t} must be in 1..={}",
                self.config.max_position_embeddings
            )));
        }
        let ids_host: Vec<Vec<i64>> = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = ids_host.iter().flatten().find(|&&i| i < 0 || i >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} outside the vocabulary of {vocab}"
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let d = self.config.hidden_size;
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;

        let mask = causal_mask(t, &self.device)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;

        // Pool at the EOS position of each row: gather rows of the flattened [B*T, D] states.
        let rows: Vec<u32> = ids_host
            .iter()
            .enumerate()
            .map(|(i, row)| (i * t + pool_position(row, self.pooling)) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, &self.device)?;
        let pooled = last_hidden_state
            .reshape((b * t, d))?
            .index_select(&rows, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(pooled.matmul(&p.t()?)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled,
            text_embeds,
        })
    }
}

/// The pooled position of one sequence under `rule` (torch's argmax: first maximum).
fn pool_position(row: &[i64], rule: PoolingRule) -> usize {
    match rule {
        PoolingRule::ArgmaxId => {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        }
        PoolingRule::FirstEos(eos) => row.iter().position(|&v| v == eos).unwrap_or(0),
    }
}

/// `[T, T]` f32 additive causal mask: 0 on and below the diagonal, −∞ above.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (t, t), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config(projection: bool) -> ClipTextConfig {
        let json = serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
            "num_attention_heads": 4, "num_hidden_layers": 3, "max_position_embeddings": 10,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": if projection { 8 } else { 16 }, "eos_token_id": 49
        });
        serde_json::from_value(json).unwrap()
    }

    fn encoder(projection: bool, dtype: DType) -> ClipTextEncoder {
        let c = tiny_config(projection);
        let w = Weights::random(3, 0.2, dtype, &Device::Cpu);
        // Random weights exist under every name: drop the projection by building from a map
        // view when it is not wanted.
        let mut e = ClipTextEncoder::new(&c, &w).unwrap();
        if !projection {
            e.text_projection = None;
        }
        e
    }

    fn ids(rows: &[&[u32]]) -> Tensor {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn shapes_and_hidden_state_indexing() {
        let e = encoder(true, DType::F32);
        let out = e
            .forward(&ids(&[&[0, 5, 6, 49, 1, 1], &[0, 7, 49, 1, 1, 1]]))
            .unwrap();
        assert_eq!(out.last_hidden_state.dims(), &[2, 6, 16]);
        assert_eq!(out.hidden_states.len(), 4);
        assert_eq!(out.pooled.dims(), &[2, 16]);
        assert_eq!(out.text_embeds.as_ref().unwrap().dims(), &[2, 8]);
        let pen = out.hidden_state(-2).unwrap();
        assert_eq!(max_abs(&(pen - &out.hidden_states[2]).unwrap()), 0.0);
        assert!(out.hidden_state(4).is_err() && out.hidden_state(-5).is_err());
        // The pooled row is the final-normed state at the first EOS (49).
        let want = out.last_hidden_state.get(1).unwrap().get(2).unwrap();
        let got = out.pooled.get(1).unwrap();
        assert_eq!(max_abs(&(want - got).unwrap()), 0.0);
    }

    #[test]
    fn attention_is_causal() {
        let e = encoder(false, DType::F32);
        let a = e.forward(&ids(&[&[0, 5, 6, 7, 8]])).unwrap();
        let b = e.forward(&ids(&[&[0, 5, 6, 9, 10]])).unwrap();
        let pa = a.last_hidden_state.narrow(1, 0, 3).unwrap();
        let pb = b.last_hidden_state.narrow(1, 0, 3).unwrap();
        assert!(max_abs(&(pa - pb).unwrap()) < 1e-6);
        let la = a.last_hidden_state.narrow(1, 3, 1).unwrap();
        let lb = b.last_hidden_state.narrow(1, 3, 1).unwrap();
        assert!(max_abs(&(la - lb).unwrap()) > 1e-4);
    }

    #[test]
    fn pooling_rules_follow_transformers() {
        assert_eq!(
            pool_position(&[49406, 5, 49407, 49407], PoolingRule::ArgmaxId),
            2
        );
        assert_eq!(pool_position(&[3, 9, 1, 9], PoolingRule::ArgmaxId), 1);
        assert_eq!(pool_position(&[3, 9, 1, 1], PoolingRule::FirstEos(1)), 2);
        assert_eq!(pool_position(&[3, 9, 4], PoolingRule::FirstEos(1)), 0);
        let mut c = tiny_config(false);
        c.eos_token_id = serde_json::json!(2);
        assert_eq!(c.pooling_rule(), PoolingRule::ArgmaxId);
        c.eos_token_id = serde_json::json!(49407);
        assert_eq!(c.pooling_rule(), PoolingRule::FirstEos(49407));
    }

    #[test]
    fn half_precision_runs_close_to_f32() {
        let x = ids(&[&[0, 5, 6, 49, 1]]);
        let f = encoder(true, DType::F32).forward(&x).unwrap();
        for dt in [DType::F16, DType::BF16] {
            let h = encoder(true, dt).forward(&x).unwrap();
            assert_eq!(h.last_hidden_state.dtype(), dt);
            let hf = h.last_hidden_state.to_dtype(DType::F32).unwrap();
            let err = max_abs(&(hf - &f.last_hidden_state).unwrap());
            assert!(err < 0.1, "{dt:?}: {err}");
        }
    }

    #[test]
    fn wrong_shape_names_the_tensor() {
        let c = tiny_config(false);
        let mut m = std::collections::HashMap::new();
        m.insert(
            "text_model.embeddings.token_embedding.weight".to_string(),
            Tensor::zeros((51, 16), DType::F32, &Device::Cpu).unwrap(),
        );
        let w = Weights::from_map(m, DType::F32, &Device::Cpu);
        let msg = ClipTextEncoder::new(&c, &w).unwrap_err().to_string();
        assert!(
            msg.contains("text_model.embeddings.token_embedding.weight")
                && msg.contains("[51, 16]"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_bad_ids_and_lengths() {
        let e = encoder(false, DType::F32);
        assert!(e.forward(&ids(&[&[0, 50]])).is_err());
        assert!(e.forward(&ids(&[&[0; 11]])).is_err());
    }

    #[test]
    fn gradients_flow_to_the_embeddings() {
        let c = tiny_config(false);
        let w = Weights::random(5, 0.2, DType::F32, &Device::Cpu);
        let e = ClipTextEncoder::new(&c, &w).unwrap();
        let var = candle_core::Var::from_tensor(&e.token_embedding).unwrap();
        let mut e2 = e.clone();
        e2.token_embedding = var.as_tensor().clone();
        let out = e2.forward(&ids(&[&[0, 5, 6, 49]])).unwrap();
        let loss = out.pooled.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap();
        assert!(max_abs(g) > 0.0);
    }
}
