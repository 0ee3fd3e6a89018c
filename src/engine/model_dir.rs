//! A diffusers model folder on disk: which components it has, where their configs and weights are.
//!
//! Layout: `model_index.json`; `unet/`, `vae/`, `text_encoder/` (+ `text_encoder_2/` for SDXL),
//! `tokenizer/` (+ `tokenizer_2/`), `scheduler/`; each with `config.json` (tokenizers: vocab and
//! merges or `tokenizer.json`) and weights as `diffusion_pytorch_model[.fp16].safetensors` or
//! `model[.fp16].safetensors`, possibly sharded with a `*.safetensors.index.json`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::de::DeserializeOwned;

use super::weights::Weights;
use crate::error::{Error, Result};

/// Which weight file variant to prefer when a component ships several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The full-precision file if the requested dtype is f32, else the fp16 file, else any.
    #[default]
    Auto,
    /// Only the plain (usually fp32) files.
    Fp32,
    /// Only the `.fp16.safetensors` files.
    Fp16,
}

/// The family of a model, which decides text conditioning and a few defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Stable Diffusion 1.x: one CLIP text encoder, last hidden state.
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP-H text encoder, penultimate layer.
    Sd2,
    /// SDXL: two text encoders, penultimate states concatenated, pooled vector and size conditioning.
    Sdxl,
}

/// Name of the optional file in a model folder's root with pairstyle's sampling defaults for it.
pub const DEFAULTS_FILE: &str = "pairstyle.json";

/// Sampling settings a model folder recommends (its optional [`DEFAULTS_FILE`]), used where the
/// configuration says `"auto"`. Diffusers folders have no such file; the embedded toy model has
/// one because its best guidance scale (2) is far from Stable Diffusion's usual 7.5.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct ModelDefaults {
    /// Classifier-free guidance scale.
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    /// How the values were chosen (free text, for people).
    #[serde(default)]
    pub note: Option<String>,
}

/// A diffusers-layout model folder.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    index: serde_json::Value,
}

impl ModelDir {
    /// Open a folder; it must hold `model_index.json`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(Error::MissingFile { path: root });
        }
        let index: serde_json::Value = read_json(&root.join("model_index.json"))?;
        Ok(Self { root, index })
    }

    /// The folder this model lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder's recommended sampling settings: empty when it has no [`DEFAULTS_FILE`]; an
    /// error when the file is unreadable, not JSON, or holds a guidance scale that is not a
    /// finite number ≥ 0.
    pub fn defaults(&self) -> Result<ModelDefaults> {
        let path = self.root.join(DEFAULTS_FILE);
        if !path.exists() {
            return Ok(ModelDefaults::default());
        }
        let d: ModelDefaults = read_json(&path)?;
        if let Some(g) = d.guidance_scale.filter(|g| !g.is_finite() || *g < 0.0) {
            return Err(Error::config(
                &path,
                format!("guidance_scale must be a finite number ≥ 0 (got {g})"),
            ));
        }
        Ok(d)
    }

    /// The pipeline class named in `model_index.json` (e.g. `StableDiffusionXLPipeline`).
    pub fn class_name(&self) -> Option<&str> {
        self.index.get("_class_name").and_then(|v| v.as_str())
    }

    /// Whether `model_index.json` lists a component (and it is not null).
    pub fn has_component(&self, name: &str) -> bool {
        match self.index.get(name) {
            Some(serde_json::Value::Array(a)) => a.iter().all(|v| !v.is_null()),
            Some(v) => !v.is_null(),
            None => self.root.join(name).is_dir(),
        }
    }

    /// The family: SDXL when a second text encoder exists, SD2 when the text encoder uses
    /// OpenCLIP's gelu activation or the UNet uses linear projections, else SD1.
    pub fn family(&self) -> Result<ModelFamily> {
        if self.has_component("text_encoder_2") {
            return Ok(ModelFamily::Sdxl);
        }
        let te: serde_json::Value = self.config("text_encoder")?;
        let act = te.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("");
        if act == "gelu" {
            return Ok(ModelFamily::Sd2);
        }
        Ok(ModelFamily::Sd1)
    }

    /// The folder of a component, which must exist.
    pub fn component_dir(&self, component: &str) -> Result<PathBuf> {
        let dir = self.root.join(component);
        if !dir.is_dir() {
            return Err(Error::MissingFile { path: dir });
        }
        Ok(dir)
    }

    /// Parse `<component>/config.json` into `T`.
    pub fn config<T: DeserializeOwned>(&self, component: &str) -> Result<T> {
        read_json(&self.component_dir(component)?.join("config.json"))
    }

    /// Path of `<component>/config.json` (for error messages).
    pub fn config_path(&self, component: &str) -> PathBuf {
        self.root.join(component).join("config.json")
    }

    /// The safetensors files of a component, honouring the variant preference and sharding.
    pub fn weight_files(
        &self,
        component: &str,
        variant: Variant,
        dtype: DType,
    ) -> Result<Vec<PathBuf>> {
        let dir = self.component_dir(component)?;
        let stems = ["diffusion_pytorch_model", "model"];
        let want_fp16_first = match variant {
            Variant::Fp16 => true,
            Variant::Fp32 => false,
            Variant::Auto => dtype != DType::F32 && dtype != DType::F64,
        };
        let mut variants: Vec<&str> = match variant {
            Variant::Fp16 => vec![".fp16"],
            Variant::Fp32 => vec![""],
            Variant::Auto => vec!["", ".fp16"],
        };
        if want_fp16_first {
            variants.reverse();
        }
        for v in &variants {
            for stem in stems {
                let single = dir.join(format!("{stem}{v}.safetensors"));
                if single.is_file() {
                    return Ok(vec![single]);
                }
                let index = dir.join(format!("{stem}.safetensors{v}.index.json"));
                let index_alt = dir.join(format!("{stem}{v}.safetensors.index.json"));
                for idx in [index, index_alt] {
                    if idx.is_file() {
                        return shard_files(&dir, &idx);
                    }
                }
            }
        }
        let wanted = match variant {
            Variant::Fp16 => "fp16",
            _ => "",
        };
        Err(Error::MissingFile {
            path: dir.join(format!(
                "{}{}.safetensors",
                if component.starts_with("text_encoder") {
                    "model"
                } else {
                    "diffusion_pytorch_model"
                },
                if wanted.is_empty() {
                    String::new()
                } else {
                    format!(".{wanted}")
                }
            )),
        })
    }

    /// Memory-map a component's weights as `dtype` on `device`.
    pub fn weights(
        &self,
        component: &str,
        variant: Variant,
        dtype: DType,
        device: &Device,
    ) -> Result<Weights> {
        let files = self.weight_files(component, variant, dtype)?;
        Weights::from_safetensors(&files, dtype, device)
    }
}

/// Files listed in a sharded checkpoint's index (`weight_map` values), deduplicated, in order.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let v: serde_json::Value = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "no weight_map object"))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for f in map.values() {
        let name = f
            .as_str()
            .ok_or_else(|| Error::config(index, "weight_map values must be file names"))?;
        let p = dir.join(name);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    Ok(files)
}

/// Read and parse a JSON file; a missing file is `MissingFile`, a bad one is `Config`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = crate::error::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_optional_checked_and_name_the_file() {
        let dir = std::env::temp_dir().join(format!("pairstyle-defaults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model_index.json"), "{}").unwrap();
        let m = ModelDir::open(&dir).unwrap();
        assert_eq!(
            m.defaults().unwrap(),
            ModelDefaults::default(),
            "no file: none"
        );
        let file = dir.join(DEFAULTS_FILE);
        std::fs::write(&file, r#"{"guidance_scale": 2.0, "note": "chosen"}"#).unwrap();
        assert_eq!(m.defaults().unwrap().guidance_scale, Some(2.0));
        for bad in [
            r#"{"guidance_scale": -1}"#,
            r#"{"guidance_scale": "x"}"#,
            "{half",
        ] {
            std::fs::write(&file, bad).unwrap();
            let e = m.defaults().unwrap_err().to_string();
            assert!(e.contains(DEFAULTS_FILE), "{bad}: {e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
