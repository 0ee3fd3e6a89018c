//! `unet/config.json` of a diffusers `UNet2DConditionModel`, resolved into per-block settings.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// A config value that diffusers accepts either once for all blocks or per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One value for every block.
    One(T),
    /// One value per down block.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// Expand to one value per block, checking the list length.
    fn per_block(&self, n: usize, key: &str, path: &Path) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(Error::config(
                path,
                format!(
                    "{key} has {} entries but there are {n} down blocks",
                    v.len()
                ),
            )),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Read `null` as the type's default (released configs write `null` for "unset").
fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
fn default_channels() -> usize {
    4
}
fn default_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn default_one() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn default_head_dim() -> Option<OneOrMany<usize>> {
    Some(OneOrMany::One(8))
}
fn default_cross() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_eps() -> f64 {
    1e-5
}
fn default_padding() -> usize {
    1
}
fn default_scale() -> f64 {
    1.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_kernel() -> usize {
    3
}
fn default_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

/// The raw config file; field names and defaults follow diffusers' `UNet2DConditionModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfigFile {
    /// Latent channels in.
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    /// Whether `2x − 1` is applied to the input (not supported).
    #[serde(default, deserialize_with = "null_as_default")]
    pub center_input_sample: bool,
    /// Order of the sinusoidal timestep features.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep features.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block class names.
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    /// Mid block class name (or none).
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    /// Up block class names.
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    /// Cross-attention only in the transformer blocks (not supported when true).
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    /// Output channels of each down block.
    #[serde(default = "default_block_out")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "default_layers")]
    pub layers_per_block: OneOrMany<usize>,
    /// Padding of the stride-2 downsampling convolution.
    #[serde(default = "default_padding")]
    pub downsample_padding: usize,
    /// Output scale of the mid block resnets.
    #[serde(default = "default_scale")]
    pub mid_block_scale_factor: f64,
    /// Activation function.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Groups of every group norm.
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the resnet group norms.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Width of the text conditioning.
    #[serde(default = "default_cross")]
    pub cross_attention_dim: OneOrMany<usize>,
    /// Transformer blocks per attention (per down block).
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    /// Per-up-block transformer depths (not supported).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Legacy name: in SD1/SD2 configs this is the number of heads.
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: Option<OneOrMany<usize>>,
    /// Number of heads (when set, takes precedence over `attention_head_dim`).
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    /// Linear instead of 1×1 conv projections around the transformer (SD2, SDXL).
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_linear_projection: bool,
    /// Compute attention scores in f32.
    #[serde(default, deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    /// Extra embedding type: none or `text_time` (SDXL).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each sinusoidal feature of the SDXL time ids.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of SDXL's `add_embedding` (pooled text + 6 time-id features).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Class embedding type (not supported).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Number of class embeddings (not supported).
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Encoder hidden-state projection (not supported).
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Dual cross attention (not supported).
    #[serde(default, deserialize_with = "null_as_default")]
    pub dual_cross_attention: bool,
    /// `default` or `scale_shift` resnet time conditioning (only `default` supported).
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// `positional` (supported) or `fourier`.
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    /// Width of the time embedding (default 4 × first block width).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Conditioning projection of the timestep (LCM; not supported).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Activation after the time embedding (not supported).
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Kernel of `conv_in`.
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    /// Attention type (only `default`).
    #[serde(default)]
    pub attention_type: Option<String>,
    /// Default latent side (informational).
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

/// Settings of one down or up block.
#[derive(Debug, Clone)]
pub struct BlockSpec {
    /// Whether the block has attentions (CrossAttn*Block2D).
    pub cross_attention: bool,
    /// Number of resnets.
    pub layers: usize,
    /// Heads per attention.
    pub heads: usize,
    /// Transformer blocks per attention.
    pub transformer_layers: usize,
    /// Text conditioning width.
    pub cross_attention_dim: usize,
}

/// A validated UNet configuration with every per-block value resolved.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    /// The raw file, for values used as they are.
    pub file: UNetConfigFile,
    /// One spec per down block (index order).
    pub down: Vec<BlockSpec>,
    /// One spec per up block (index order, i.e. deepest first).
    pub up: Vec<BlockSpec>,
    /// The mid block spec (cross attention true), or none.
    pub mid: Option<BlockSpec>,
    /// Group norm groups.
    pub groups: usize,
    /// Width of the time embedding.
    pub time_embed_dim: usize,
    /// SDXL `text_time` addition: (time-id feature width, add_embedding input width).
    pub text_time: Option<(usize, usize)>,
}

impl UNetConfig {
    /// Validate a parsed `config.json`; `path` is named in errors.
    pub fn resolve(file: UNetConfigFile, path: &Path) -> Result<Self> {
        let unsupported =
            |what: String| Err(Error::Unsupported(format!("{what} in {}", path.display())));
        let n = file.block_out_channels.len();
        if n == 0 || file.down_block_types.len() != n || file.up_block_types.len() != n {
            return Err(Error::config(
                path,
                "block_out_channels, down_block_types and up_block_types must have the same non-zero length",
            ));
        }
        if file.center_input_sample {
            return unsupported("center_input_sample = true".into());
        }
        if file.dual_cross_attention {
            return unsupported("dual_cross_attention = true".into());
        }
        match &file.only_cross_attention {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Array(a)
                if a.iter().all(|v| v == &serde_json::Value::Bool(false)) => {}
            v => return unsupported(format!("only_cross_attention = {v}")),
        }
        if file
            .reverse_transformer_layers_per_block
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported("reverse_transformer_layers_per_block".into());
        }
        for (key, v) in [
            ("class_embed_type", file.class_embed_type.is_some()),
            ("num_class_embeds", file.num_class_embeds.is_some()),
            ("encoder_hid_dim", file.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", file.time_cond_proj_dim.is_some()),
            ("timestep_post_act", file.timestep_post_act.is_some()),
        ] {
            if v {
                return unsupported(key.to_string());
            }
        }
        if file.act_fn != "silu" {
            return unsupported(format!("act_fn = {}", file.act_fn));
        }
        if let Some(t) = file
            .resnet_time_scale_shift
            .as_deref()
            .filter(|t| *t != "default")
        {
            return unsupported(format!("resnet_time_scale_shift = {t}"));
        }
        if let Some(t) = file
            .time_embedding_type
            .as_deref()
            .filter(|t| *t != "positional")
        {
            return unsupported(format!("time_embedding_type = {t}"));
        }
        if let Some(t) = file.attention_type.as_deref().filter(|t| *t != "default") {
            return unsupported(format!("attention_type = {t}"));
        }
        if file.conv_in_kernel.is_multiple_of(2) || file.conv_out_kernel.is_multiple_of(2) {
            return unsupported("even conv_in_kernel/conv_out_kernel".into());
        }
        let groups = file.norm_num_groups.ok_or_else(|| {
            Error::Unsupported(format!("norm_num_groups = null in {}", path.display()))
        })?;

        let layers = file
            .layers_per_block
            .per_block(n, "layers_per_block", path)?;
        let tlayers =
            file.transformer_layers_per_block
                .per_block(n, "transformer_layers_per_block", path)?;
        let cross = file
            .cross_attention_dim
            .per_block(n, "cross_attention_dim", path)?;
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (the legacy
        // config key really meant the number of heads).
        let heads = match &file.num_attention_heads {
            Some(h) => h.per_block(n, "num_attention_heads", path)?,
            None => match &file.attention_head_dim {
                Some(h) => h.per_block(n, "attention_head_dim", path)?,
                None => {
                    return Err(Error::config(
                        path,
                        "neither num_attention_heads nor attention_head_dim is set",
                    ))
                }
            },
        };
        for (i, (h, ch)) in heads.iter().zip(&file.block_out_channels).enumerate() {
            if *h == 0 || ch % h != 0 {
                return Err(Error::config(
                    path,
                    format!("block {i}: {ch} channels do not divide into {h} attention heads"),
                ));
            }
            if ch % groups != 0 {
                return Err(Error::config(
                    path,
                    format!("block {i}: {ch} channels do not divide into {groups} norm groups"),
                ));
            }
        }
        let kind = |name: &str, cross_name: &str, plain_name: &str| -> Result<bool> {
            if name == cross_name {
                Ok(true)
            } else if name == plain_name {
                Ok(false)
            } else {
                Err(Error::Unsupported(format!(
                    "block type {name} in {}",
                    path.display()
                )))
            }
        };
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            down.push(BlockSpec {
                cross_attention: kind(
                    &file.down_block_types[i],
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                )?,
                layers: layers[i],
                heads: heads[i],
                transformer_layers: tlayers[i],
                cross_attention_dim: cross[i],
            });
        }
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let r = n - 1 - i;
            up.push(BlockSpec {
                cross_attention: kind(&file.up_block_types[i], "CrossAttnUpBlock2D", "UpBlock2D")?,
                layers: layers[r] + 1,
                heads: heads[r],
                transformer_layers: tlayers[r],
                cross_attention_dim: cross[r],
            });
        }
        let mid = match file.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => Some(BlockSpec {
                cross_attention: true,
                layers: 1,
                heads: heads[n - 1],
                transformer_layers: tlayers[n - 1],
                cross_attention_dim: cross[n - 1],
            }),
            Some(other) => return unsupported(format!("mid_block_type = {other}")),
        };
        let time_embed_dim = file
            .time_embedding_dim
            .unwrap_or(file.block_out_channels[0] * 4);
        let text_time = match file.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let (Some(a), Some(p)) = (
                    file.addition_time_embed_dim,
                    file.projection_class_embeddings_input_dim,
                ) else {
                    return Err(Error::config(
                        path,
                        "addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim",
                    ));
                };
                Some((a, p))
            }
            Some(other) => return unsupported(format!("addition_embed_type = {other}")),
        };
        Ok(Self {
            file,
            down,
            up,
            mid,
            groups,
            time_embed_dim,
            text_time,
        })
    }

    /// Factor by which the latent side shrinks at the deepest level; latent sides must divide by it.
    pub fn downscale(&self) -> usize {
        1 << (self.down.len() - 1)
    }
}
