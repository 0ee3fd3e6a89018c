//! The TOML configuration shared by every command.
//!
//! Sources, later ones winning: built-in defaults, the config file (`--config FILE`, else
//! `$PAIRSTYLE_CONFIG`, else `<user config dir>/pairstyle/pairstyle.toml` if it exists), then
//! command-line flags (applied by the binary). `config/pairstyle.toml` in the repository documents
//! every key with its default; unknown keys are an error so that typos do not pass silently.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::model_dir::Variant;
use crate::error::{Error, Result};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which model to load and how.
    pub model: ModelConfig,
    /// Where and in what precision to compute.
    pub runtime: RuntimeConfig,
    /// Defaults of `pairstyle generate`.
    pub generate: GenerateConfig,
    /// Logging.
    pub log: LogConfig,
    /// Where learned styles live.
    pub library: LibraryConfig,
    /// Pair Customization training defaults (per-pair overrides come from the command line).
    pub train: crate::trainer::TrainConfig,
    /// Style-guidance defaults.
    pub style: StyleConfig,
    /// The daemon: state and socket locations, drop-folder rules, input limits.
    pub daemon: crate::daemon::DaemonConfig,
    /// The terminal UI.
    pub tui: TuiConfig,
}

/// `[tui]`: the terminal UI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuiConfig {
    /// How pictures are drawn: `auto` (ask the terminal), `halfblocks`, `kitty`, `sixel` or
    /// `iterm2`.
    pub graphics: crate::tui::graphics::GraphicsSetting,
}

/// `[library]`: the style library.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibraryConfig {
    /// Library folder; empty means `<user data dir>/pairstyle/styles`.
    pub path: String,
}

impl LibraryConfig {
    /// The library folder to use.
    pub fn resolve(&self) -> PathBuf {
        if !self.path.is_empty() {
            return PathBuf::from(&self.path);
        }
        directories::ProjectDirs::from("", "", "pairstyle")
            .map(|d| d.data_dir().join("styles"))
            .unwrap_or_else(|| PathBuf::from("styles"))
    }
}

/// `[style]`: style guidance at sampling time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StyleConfig {
    /// Default λ of a style given without `=λ` (the paper: 3 for the training category, 4 for others).
    pub lambda: f64,
    /// First step (0-based) with style guidance; 0 = every step (the reference code), 10 of 50 =
    /// the paper's schedule.
    pub from_step: usize,
}

impl Default for StyleConfig {
    fn default() -> Self {
        Self {
            lambda: 3.0,
            from_step: 0,
        }
    }
}

/// `[model]`: the diffusers folder to use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Path of a diffusers model folder; empty means the embedded toy model.
    pub path: String,
    /// Which weight files to prefer: `auto`, `fp32` or `fp16`.
    pub variant: Variant,
}

/// `[runtime]`: device, precision and threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// `cpu`, `auto`, `cuda`, `cuda:N`, `metal` or `metal:N`.
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// CPU threads for candle's kernels; 0 lets candle use every core.
    pub threads: usize,
    /// Keep large freed CPU buffers for reuse instead of returning each to the system at once
    /// ([`crate::engine::device::keep_freed_host_memory`]): fresh pages cost a page fault and
    /// zeroing on every tensor above glibc's mmap threshold.
    pub reuse_host_memory: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            dtype: "f32".into(),
            threads: 0,
            reuse_host_memory: true,
        }
    }
}

/// `[generate]`: default sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale, or `"auto"`: the model folder's recommendation
    /// (`pairstyle.json`), else [`FALLBACK_CFG`].
    pub cfg: CfgSetting,
    /// `default` (the model's own scheduler), `euler`, `ddim` or `pndm`.
    pub scheduler: String,
    /// Image width in pixels; 0 means the model's native size.
    pub width: usize,
    /// Image height in pixels; 0 means the model's native size.
    pub height: usize,
    /// Default negative prompt.
    pub negative: String,
    /// Folder for generated images (relative paths are relative to the working directory).
    pub output_dir: String,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            steps: 30,
            cfg: CfgSetting::Auto,
            scheduler: "default".into(),
            width: 0,
            height: 0,
            negative: String::new(),
            output_dir: "outputs".into(),
        }
    }
}

/// The guidance scale `"auto"` falls back to when the model recommends none: Stable Diffusion's
/// usual value.
pub const FALLBACK_CFG: f64 = 7.5;

/// `[generate] cfg`: a fixed classifier-free guidance scale, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CfgSetting {
    /// The model folder's recommended scale, else [`FALLBACK_CFG`].
    #[default]
    Auto,
    /// This scale.
    Scale(f64),
}

impl CfgSetting {
    /// The scale to use with a model recommending `recommended` (its `pairstyle.json`).
    pub fn resolve(self, recommended: Option<f64>) -> f64 {
        match self {
            CfgSetting::Scale(s) => s,
            CfgSetting::Auto => recommended.unwrap_or(FALLBACK_CFG),
        }
    }

    /// The fixed scale, `None` for `"auto"`.
    pub fn scale(self) -> Option<f64> {
        match self {
            CfgSetting::Scale(s) => Some(s),
            CfgSetting::Auto => None,
        }
    }
}

impl Serialize for CfgSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            CfgSetting::Auto => s.serialize_str("auto"),
            CfgSetting::Scale(v) => s.serialize_f64(*v),
        }
    }
}

impl<'de> Deserialize<'de> for CfgSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CfgSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a finite number ≥ 0 or \"auto\"")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<CfgSetting, E> {
                if v.is_finite() && v >= 0.0 {
                    Ok(CfgSetting::Scale(v))
                } else {
                    Err(E::custom(format!(
                        "cfg must be a finite number ≥ 0 or \"auto\" (got {v})"
                    )))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<CfgSetting, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<CfgSetting, E> {
                self.visit_f64(v as f64)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<CfgSetting, E> {
                if v == "auto" {
                    Ok(CfgSetting::Auto)
                } else {
                    Err(E::custom(format!(
                        "cfg must be a finite number ≥ 0 or \"auto\" (got {v:?})"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `[log]`: logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `pairstyle=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

impl Config {
    /// Parse a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::error::read_to_string(path)?;
        toml::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
    }

    /// The user's config file location: `<config dir>/pairstyle/pairstyle.toml`.
    pub fn user_path() -> Option<PathBuf> {
        directories::ProjectDirs::from("", "", "pairstyle")
            .map(|d| d.config_dir().join("pairstyle.toml"))
    }

    /// Load the configuration: `explicit` (must exist), else `$PAIRSTYLE_CONFIG` (must exist),
    /// else the user file if present, else defaults. Returns the config and the file it came from.
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Option<PathBuf>)> {
        if let Some(p) = explicit {
            return Ok((Self::from_file(p)?, Some(p.to_path_buf())));
        }
        if let Some(p) = std::env::var_os("PAIRSTYLE_CONFIG").filter(|v| !v.is_empty()) {
            let p = PathBuf::from(p);
            return Ok((Self::from_file(&p)?, Some(p)));
        }
        match Self::user_path() {
            Some(p) if p.is_file() => Ok((Self::from_file(&p)?, Some(p))),
            _ => Ok((Self::default(), None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented file in the repository must parse and state exactly the built-in defaults,
    /// so the documentation cannot drift from the code.
    #[test]
    fn shipped_config_documents_the_defaults() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pairstyle.toml");
        let cfg = Config::from_file(&p).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("pairstyle-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(&p, "[runtime]\ndevcie = \"cpu\"\n").unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("devcie"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn cfg_is_a_number_or_auto_and_anything_else_is_a_clear_error() {
        let parse = |v: &str| toml::from_str::<Config>(&format!("[generate]\ncfg = {v}\n"));
        assert_eq!(parse("\"auto\"").unwrap().generate.cfg, CfgSetting::Auto);
        assert_eq!(parse("6").unwrap().generate.cfg, CfgSetting::Scale(6.0));
        assert_eq!(parse("2.5").unwrap().generate.cfg, CfgSetting::Scale(2.5));
        for bad in ["\"high\"", "-1.0", "nan", "true"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("\"auto\""), "{bad}: {e}");
        }
        // What a config written back from the defaults says round-trips.
        let text = toml::to_string(&Config::default()).unwrap();
        assert!(text.contains("cfg = \"auto\""), "{text}");
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), Config::default());
        assert_eq!(CfgSetting::Auto.resolve(Some(2.0)), 2.0);
        assert_eq!(CfgSetting::Auto.resolve(None), FALLBACK_CFG);
        assert_eq!(CfgSetting::Scale(9.0).resolve(Some(2.0)), 9.0);
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/pairstyle.toml"))).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }));
    }
}
