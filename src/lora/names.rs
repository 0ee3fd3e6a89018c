//! Module names of the adapted layers and every spelling LoRA files use for them.
//!
//! Our layers are named by their diffusers module path, e.g.
//! `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0`. LoRA files spell the same
//! module in several ways:
//! - dotted diffusers paths, possibly behind `unet.` / `base_model.model.` prefixes, or with
//!   diffusers' old attention-processor form (`attn1.processor.to_q`, `to_out` for `to_out.0`);
//! - kohya's `lora_unet_<name with '.' → '_'>`, where the name is the diffusers path (SD1.x/2.x)
//!   or the SGM/LDM path (SDXL; ComfyUI and A1111 accept both everywhere);
//! - SGM/LDM dotted paths (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`).
//!
//! Flattening dots to underscores is ambiguous in general (`to_out_0`, `transformer_blocks`), so
//! names are never "unflattened": a [`ModuleCatalog`] lists the model's known paths and indexes
//! every spelling of each, and a file's key is resolved by lookup.
//!
//! SGM (Stability's generative-models, also LDM) block numbering, for `L_i` resnets in down block
//! `i` (`layers_per_block`) and `L_i + 1` in up block `i`:
//! - `down_blocks.i.attentions.j` ↔ `input_blocks.(1 + Σ_{k<i}(L_k + 1) + j).1` (SDXL: `3i + j + 1`;
//!   the `+ 1` per level is the downsampler, `input_blocks.0` is `conv_in`);
//! - `mid_block.attentions.0` ↔ `middle_block.1` (between `middle_block.0` and `.2`, the resnets);
//! - `up_blocks.i.attentions.j` ↔ `output_blocks.(Σ_{k<i}(L_k + 1) + j).1` (SDXL: `3i + j`);
//! - the rest (`transformer_blocks.t.attn1.to_q`, `to_out.0`) is the same in both.
//!
//! These are the facts of diffusers' `_maybe_map_sgm_blocks_to_diffusers` and ComfyUI's
//! `unet_to_diffusers`.

use std::collections::HashMap;

use crate::engine::unet::{UNet, UNetConfig};

/// The four projections of an attention that Pair Customization adapts, as module path suffixes.
pub const PROJECTIONS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// `name` with every `.` replaced by `_`, as kohya names modules (`lora_unet_<flat>`).
pub fn flatten(name: &str) -> String {
    name.replace('.', "_")
}

/// Split a leading `"<prefix><number>."` off `s`, returning the number and the rest.
fn take_index<'a>(s: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = s.strip_prefix(prefix)?;
    let (num, rest) = rest.split_once('.')?;
    Some((num.parse().ok()?, rest))
}

/// The SGM/LDM name of the diffusers module `path` for a UNet with configuration `cfg`, or `None`
/// when `path` is not inside a down, mid or up block's attentions (or its indices do not exist).
pub fn sgm_name(path: &str, cfg: &UNetConfig) -> Option<String> {
    if let Some((i, rest)) = take_index(path, "down_blocks.") {
        let (j, rest) = take_index(rest, "attentions.")?;
        let spec = cfg.down.get(i)?;
        if !spec.cross_attention || j >= spec.layers {
            return None;
        }
        let before: usize = cfg.down[..i].iter().map(|b| b.layers + 1).sum();
        Some(format!("input_blocks.{}.1.{rest}", 1 + before + j))
    } else if let Some(rest) = path.strip_prefix("mid_block.") {
        let (j, rest) = take_index(rest, "attentions.")?;
        let spec = cfg.mid.as_ref()?;
        if j >= spec.layers {
            return None;
        }
        Some(format!("middle_block.{}.{rest}", 2 * j + 1))
    } else if let Some((i, rest)) = take_index(path, "up_blocks.") {
        let (j, rest) = take_index(rest, "attentions.")?;
        let spec = cfg.up.get(i)?;
        if !spec.cross_attention || j >= spec.layers {
            return None;
        }
        let before: usize = cfg.up[..i].iter().map(|b| b.layers).sum();
        Some(format!("output_blocks.{}.1.{rest}", before + j))
    } else {
        None
    }
}

/// Every attention projection path of a UNet with configuration `cfg`, in module order (down,
/// mid, up; attn1 then attn2; q, k, v, out), the same list as [`UNet::adaptable_linears`] without
/// loading any weights.
pub fn attention_projection_paths(cfg: &UNetConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |prefix: String, transformer_layers: usize| {
        for t in 0..transformer_layers {
            for attn in ["attn1", "attn2"] {
                for p in PROJECTIONS {
                    out.push(format!("{prefix}.transformer_blocks.{t}.{attn}.{p}"));
                }
            }
        }
    };
    for (i, b) in cfg.down.iter().enumerate() {
        if b.cross_attention {
            for j in 0..b.layers {
                push(
                    format!("down_blocks.{i}.attentions.{j}"),
                    b.transformer_layers,
                );
            }
        }
    }
    if let Some(m) = &cfg.mid {
        for j in 0..m.layers {
            push(format!("mid_block.attentions.{j}"), m.transformer_layers);
        }
    }
    for (i, b) in cfg.up.iter().enumerate() {
        if b.cross_attention {
            for j in 0..b.layers {
                push(
                    format!("up_blocks.{i}.attentions.{j}"),
                    b.transformer_layers,
                );
            }
        }
    }
    out
}

/// One adaptable module of a model, with its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Diffusers module path (our canonical name).
    pub path: String,
    /// SGM/LDM module path, when the module lives in a block that has one.
    pub sgm: Option<String>,
    /// (in, out) widths, when known (from a loaded UNet).
    pub dims: Option<(usize, usize)>,
}

/// The adaptable modules of one model and an index of every spelling of their names, to map LoRA
/// file keys back to module paths (see the module documentation).
#[derive(Debug, Clone)]
pub struct ModuleCatalog {
    entries: Vec<ModuleEntry>,
    by_path: HashMap<String, usize>,
    /// Flattened spelling → entry; `None` marks a spelling shared by two modules (never resolved).
    by_flat: HashMap<String, Option<usize>>,
}

/// Prefixes that wrap a module name in LoRA files; stripped (repeatedly) before lookup.
const KEY_PREFIXES: [&str; 7] = [
    "lora_unet_",
    "lycoris_",
    "base_model.model.",
    "unet.",
    "model.diffusion_model.",
    "diffusion_model.",
    "model.",
];

impl ModuleCatalog {
    /// A catalog of `entries` (paths must be unique; later duplicates are dropped).
    pub fn new(entries: Vec<ModuleEntry>) -> Self {
        let mut cat = Self {
            entries: Vec::with_capacity(entries.len()),
            by_path: HashMap::new(),
            by_flat: HashMap::new(),
        };
        for e in entries {
            if cat.by_path.contains_key(&e.path) {
                continue;
            }
            let idx = cat.entries.len();
            cat.by_path.insert(e.path.clone(), idx);
            let mut names = vec![e.path.clone()];
            names.extend(e.sgm.clone());
            for name in names {
                let mut spellings = vec![flatten(&name)];
                // Old attention processors and some converters drop the `.0` of `to_out.0`.
                if let Some(short) = name.strip_suffix(".to_out.0") {
                    spellings.push(flatten(&format!("{short}.to_out")));
                }
                for s in spellings {
                    match cat.by_flat.get(&s) {
                        Some(Some(other)) if *other != idx => {
                            cat.by_flat.insert(s, None);
                        }
                        Some(_) => {}
                        None => {
                            cat.by_flat.insert(s, Some(idx));
                        }
                    }
                }
            }
            cat.entries.push(e);
        }
        cat
    }

    /// The attention projections of a UNet with configuration `cfg` (no weights needed; widths
    /// unknown), e.g. to export a style for a model whose weights are not loaded.
    pub fn from_config(cfg: &UNetConfig) -> Self {
        Self::new(
            attention_projection_paths(cfg)
                .into_iter()
                .map(|path| ModuleEntry {
                    sgm: sgm_name(&path, cfg),
                    path,
                    dims: None,
                })
                .collect(),
        )
    }

    /// The adaptable layers of a loaded UNet, with their widths.
    pub fn from_unet(unet: &UNet) -> Self {
        let cfg = unet.config();
        Self::new(
            unet.adaptable_linears()
                .into_iter()
                .map(|l| ModuleEntry {
                    path: l.path().to_string(),
                    sgm: sgm_name(l.path(), cfg),
                    dims: Some(l.dims()),
                })
                .collect(),
        )
    }

    /// All modules, in the order given.
    pub fn entries(&self) -> &[ModuleEntry] {
        &self.entries
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the catalog has no module.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The module with diffusers path `path`.
    pub fn get(&self, path: &str) -> Option<&ModuleEntry> {
        self.by_path.get(path).map(|&i| &self.entries[i])
    }

    /// The module a LoRA file names with `stem` (the key without its `.lora_down.weight`-like
    /// suffix), in any spelling: dotted or flattened, diffusers or SGM, with or without the
    /// `lora_unet_` / `unet.` / `base_model.model.` / `diffusion_model.` prefixes and the
    /// attention-processor form. `None` if it names no module of this model.
    pub fn resolve(&self, stem: &str) -> Option<&ModuleEntry> {
        let mut s = stem;
        'strip: loop {
            for p in KEY_PREFIXES {
                if let Some(rest) = s.strip_prefix(p) {
                    s = rest;
                    continue 'strip;
                }
            }
            break;
        }
        let dotted = s.replace(".processor.", ".");
        let flat = flatten(&dotted);
        match self.by_flat.get(&flat) {
            Some(Some(i)) => Some(&self.entries[*i]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::unet::UNetConfigFile;

    /// SDXL base 1.0's UNet block layout (values from its config.json).
    fn sdxl_config() -> UNetConfig {
        let json = serde_json::json!({
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "norm_num_groups": 32,
            "use_linear_projection": true,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "mid_block_type": "UNetMidBlock2DCrossAttn"
        });
        let file: UNetConfigFile = serde_json::from_value(json).unwrap();
        UNetConfig::resolve(file, std::path::Path::new("sdxl/config.json")).unwrap()
    }

    /// SD 1.5's UNet block layout.
    fn sd15_config() -> UNetConfig {
        let json = serde_json::json!({
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 768,
            "norm_num_groups": 32
        });
        let file: UNetConfigFile = serde_json::from_value(json).unwrap();
        UNetConfig::resolve(file, std::path::Path::new("sd15/config.json")).unwrap()
    }

    #[test]
    fn sdxl_sgm_names_match_known_kohya_keys() {
        let cfg = sdxl_config();
        let cases = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
                "input_blocks.5.1.transformer_blocks.1.attn2.to_k",
            ),
            (
                "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_v",
                "input_blocks.7.1.transformer_blocks.9.attn1.to_v",
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0",
                "input_blocks.8.1.transformer_blocks.0.attn2.to_out.0",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0",
                "middle_block.1.transformer_blocks.9.attn2.to_out.0",
            ),
            (
                "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "output_blocks.0.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_q",
                "output_blocks.2.1.transformer_blocks.9.attn1.to_q",
            ),
            (
                "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v",
                "output_blocks.3.1.transformer_blocks.1.attn2.to_v",
            ),
            (
                "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
                "output_blocks.5.1.transformer_blocks.0.attn2.to_k",
            ),
        ];
        for (d, s) in cases {
            assert_eq!(sgm_name(d, &cfg).as_deref(), Some(s), "{d}");
        }
        assert_eq!(
            sgm_name(
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                &cfg
            ),
            None
        );
        // SDXL base: 70 transformer blocks × 8 projections.
        let paths = attention_projection_paths(&cfg);
        assert_eq!(paths.len(), 70 * 8);
        let cat = ModuleCatalog::from_config(&cfg);
        assert_eq!(cat.len(), 560);
        let e = cat
            .resolve("lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_out_0")
            .unwrap();
        assert_eq!(
            e.path,
            "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"
        );
    }

    #[test]
    fn sd15_names_and_spellings() {
        let cfg = sd15_config();
        assert_eq!(
            sgm_name(
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
                &cfg
            )
            .as_deref(),
            Some("input_blocks.2.1.transformer_blocks.0.attn1.to_q")
        );
        assert_eq!(
            sgm_name(
                "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q",
                &cfg
            )
            .as_deref(),
            Some("input_blocks.7.1.transformer_blocks.0.attn1.to_q")
        );
        assert_eq!(
            sgm_name(
                "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                &cfg
            )
            .as_deref(),
            Some("output_blocks.3.1.transformer_blocks.0.attn1.to_q")
        );
        assert_eq!(
            sgm_name(
                "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q",
                &cfg
            )
            .as_deref(),
            Some("output_blocks.11.1.transformer_blocks.0.attn1.to_q")
        );
        let cat = ModuleCatalog::from_config(&cfg);
        assert_eq!(cat.len(), 16 * 8);
        let want = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0";
        for stem in [
            "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_input_blocks_2_1_transformer_blocks_0_attn2_to_out_0",
            "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
            "base_model.model.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
            "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_out",
            "diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_out.0",
        ] {
            assert_eq!(
                cat.resolve(stem).map(|e| e.path.as_str()),
                Some(want),
                "{stem}"
            );
        }
        assert!(cat
            .resolve("lora_unet_down_blocks_0_resnets_0_conv1")
            .is_none());
        assert!(cat
            .resolve("lora_te_text_model_encoder_layers_0_mlp_fc1")
            .is_none());
    }
}
