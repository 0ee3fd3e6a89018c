//! The style library: one folder per learned style, `<root>/<name>/` holding
//! - `style.safetensors`: the StyleLoRA in PEFT/diffusers keys with `__metadata__`,
//! - `style.toml`: the same facts for people and tools (name, wording, default λ, provenance),
//! - `pair/`: copies of the content and style images it was learned from.
//!
//! Styles are written to a temporary folder and renamed into place, so a killed process never
//! leaves a half-registered style.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::engine::unet::UNet;
use crate::error::{Error, Result};
use crate::lora::{self, AdapterSet, LoadOptions, ModuleCatalog};

/// File name of a style's adapter.
pub const STYLE_FILE: &str = "style.safetensors";
/// File name of a style's description.
pub const STYLE_TOML: &str = "style.toml";

/// What `style.toml` records about a style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StyleMeta {
    /// The style's name (its folder name).
    pub name: String,
    /// What the training pair shows, e.g. `dog`.
    pub subject: String,
    /// The style in words, e.g. `watercolor`.
    pub style_desc: String,
    /// Appended to prompts in the style branch: ` in <style_desc> style`.
    pub prompt_suffix: String,
    /// Default style-guidance weight λ.
    pub default_lambda: f64,
    /// The base model folder it was trained on.
    pub base_model: String,
    /// StyleLoRA rank.
    pub rank: usize,
    /// StyleLoRA alpha.
    pub alpha: f64,
    /// ContentLoRA rank used during training.
    pub content_rank: usize,
    /// Training seed.
    pub seed: u64,
    /// Training iterations.
    pub steps: usize,
    /// Wall-clock training time in seconds.
    pub training_secs: f64,
    /// sha256 of the content image file(s).
    pub content_sha256: Vec<String>,
    /// sha256 of the style image file(s).
    pub style_sha256: Vec<String>,
    /// Unix time the style was registered.
    pub created_unix: u64,
}

impl StyleMeta {
    /// The metadata as safetensors `__metadata__` strings (prefixed `pairstyle.`).
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        if let Ok(serde_json::Value::Object(obj)) = serde_json::to_value(self) {
            for (k, v) in obj {
                let s = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                m.insert(format!("pairstyle.{k}"), s);
            }
        }
        m.insert("pairstyle.format".into(), "style-1".into());
        m
    }
}

/// A style folder's contents after loading.
pub struct LoadedStyle {
    /// Its description.
    pub meta: StyleMeta,
    /// Its StyleLoRA.
    pub adapter: AdapterSet,
}

/// The styles under one root folder.
#[derive(Debug, Clone)]
pub struct Library {
    root: PathBuf,
}

/// A style name is a folder name: letters, digits, `-`, `_`, `.`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "style name {name:?}: use letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

impl Library {
    /// The library at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of style `name`.
    pub fn style_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Folder for training checkpoints.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.root.join(".checkpoints")
    }

    /// Names of all registered styles (folders with a `style.toml`), sorted.
    pub fn list(&self) -> Result<Vec<StyleMeta>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&self.root, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !entry.path().join(STYLE_TOML).is_file() {
                continue;
            }
            out.push(self.meta(&name)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Whether style `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.style_dir(name).join(STYLE_TOML).is_file()
    }

    /// Read a style's `style.toml`.
    pub fn meta(&self, name: &str) -> Result<StyleMeta> {
        let p = self.style_dir(name).join(STYLE_TOML);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::InvalidArgument(format!(
                    "no style named {name:?} in {}",
                    self.root.display()
                ))
            } else {
                Error::io(&p, e)
            }
        })?;
        toml::from_str(&text).map_err(|e| Error::config(&p, e.to_string()))
    }

    /// Load style `name` for a UNet (its module catalog checks every key and width).
    pub fn load(
        &self,
        name: &str,
        unet: &UNet,
        dtype: DType,
        device: &Device,
    ) -> Result<LoadedStyle> {
        let meta = self.meta(name)?;
        let catalog = ModuleCatalog::from_unet(unet);
        let opts = LoadOptions {
            strict: true,
            dtype,
            device: device.clone(),
        };
        let loaded = lora::load(&self.style_dir(name).join(STYLE_FILE), &catalog, &opts)?;
        Ok(LoadedStyle {
            meta,
            adapter: loaded.set,
        })
    }

    /// Register a style: writes adapter, description and pair copies into a temporary folder,
    /// then renames it to `<root>/<name>`. Fails if the name is taken.
    pub fn register(
        &self,
        meta: &StyleMeta,
        adapter: &AdapterSet,
        pair_files: &[PathBuf],
    ) -> Result<PathBuf> {
        validate_name(&meta.name)?;
        let dest = self.style_dir(&meta.name);
        if dest.exists() {
            return Err(Error::InvalidArgument(format!(
                "a style named {:?} already exists in {}",
                meta.name,
                self.root.display()
            )));
        }
        std::fs::create_dir_all(&self.root).map_err(|e| Error::io(&self.root, e))?;
        let tmp = self
            .root
            .join(format!(".{}.{}.tmp", meta.name, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = (|| -> Result<()> {
            std::fs::create_dir_all(tmp.join("pair")).map_err(|e| Error::io(&tmp, e))?;
            lora::save_peft(adapter, &tmp.join(STYLE_FILE), &meta.to_metadata())?;
            let text = toml::to_string_pretty(meta)
                .map_err(|e| Error::InvalidArgument(format!("style.toml: {e}")))?;
            crate::engine::image_io::write_file_atomic(&tmp.join(STYLE_TOML), text.as_bytes())?;
            for (i, f) in pair_files.iter().enumerate() {
                if let Some(name) = f.file_name() {
                    let mut to = tmp.join("pair").join(name);
                    if to.exists() {
                        // Pairs from different folders may share file names: keep both.
                        to = tmp
                            .join("pair")
                            .join(format!("{i}_{}", name.to_string_lossy()));
                    }
                    std::fs::copy(f, &to).map_err(|e| Error::io(f, e))?;
                }
            }
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.map(|_| dest)
    }
}

/// Hex sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}
