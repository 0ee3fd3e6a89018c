//! The style library: one folder per learned style, `<root>/<name>/` holding
//! - `style.safetensors`: the StyleLoRA in PEFT/diffusers keys with `__metadata__`,
//! - `style.toml`: the same facts for people and tools (name, wording, default λ, provenance),
//! - `pair/`: copies of the content and style images it was learned from,
//! - optionally `thumbnail.png` and `samples.png` (a grid of a few prompts rendered with the style
//!   after training; `style.toml` names them).
//!
//! Styles are written to a temporary folder and renamed into place, so a killed process never
//! leaves a half-registered style; [`Library::remove_stale_temps`] clears the temporary folders of
//! processes that died. The folder name is the style's name: renaming is one folder rename, and a
//! `style.toml` whose `name` disagrees (a rename interrupted before it rewrote the file) is read
//! under the folder's name. Removing moves the folder to a trash folder; nothing is deleted.

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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// The style's preview picture, a file in its folder (`thumbnail.png`), if one was rendered.
    /// Absent in styles registered before previews existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<String>,
    /// The sample grid rendered after training, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<SampleGrid>,
}

/// The sample grid stored with a style: what it shows and how it was rendered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleGrid {
    /// The grid's file in the style's folder (`samples.png`).
    pub file: String,
    /// The prompts of its cells, row-major.
    pub prompts: Vec<String>,
    /// The seed of every cell.
    pub seed: u64,
    /// Denoising steps per cell.
    pub steps: usize,
    /// The style-guidance weight λ used.
    pub lambda: f64,
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

/// File name of a style's thumbnail.
pub const THUMBNAIL_FILE: &str = "thumbnail.png";
/// File name of a style's sample grid.
pub const SAMPLES_FILE: &str = "samples.png";

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
        let mut meta: StyleMeta =
            toml::from_str(&text).map_err(|e| Error::config(&p, e.to_string()))?;
        // The folder name wins (see the module documentation).
        meta.name = name.to_string();
        Ok(meta)
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
        self.register_with(meta, adapter, pair_files, &[], &mut |_| {})
    }

    /// [`Library::register`] with further files written into the style folder (`extra`: file
    /// name and bytes, e.g. the thumbnail), and `before_commit` called with the complete temporary
    /// folder just before it is renamed into place (the daemon's crash tests pause there).
    pub fn register_with(
        &self,
        meta: &StyleMeta,
        adapter: &AdapterSet,
        pair_files: &[PathBuf],
        extra: &[(&str, &[u8])],
        before_commit: &mut dyn FnMut(&Path),
    ) -> Result<PathBuf> {
        validate_name(&meta.name)?;
        for (name, _) in extra {
            let plain = Path::new(name).file_name().is_some_and(|f| f == *name);
            if !plain || name.starts_with('.') || [STYLE_FILE, STYLE_TOML].contains(name) {
                return Err(Error::InvalidArgument(format!(
                    "extra style file {name:?} must be a plain file name of its own"
                )));
            }
        }
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
            for (name, bytes) in extra {
                crate::engine::image_io::write_file_atomic(&tmp.join(name), bytes)?;
            }
            before_commit(&tmp);
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.map(|_| dest)
    }
}

impl Library {
    /// Rename style `from` to `to`: one folder rename (atomic), then `style.toml` and the
    /// adapter's `pairstyle.name` metadata are rewritten (atomically each) to the new name.
    /// Fails if `from` does not exist or `to` is taken or not a valid name. Returns the new folder.
    pub fn rename(&self, from: &str, to: &str) -> Result<PathBuf> {
        validate_name(from)?;
        validate_name(to)?;
        let mut meta = self.meta(from)?;
        let dest = self.style_dir(to);
        if dest.exists() {
            return Err(Error::InvalidArgument(format!(
                "a style named {to:?} already exists in {}",
                self.root.display()
            )));
        }
        let src = self.style_dir(from);
        std::fs::rename(&src, &dest).map_err(|e| Error::io(&src, e))?;
        meta.name = to.to_string();
        let text = toml::to_string_pretty(&meta)
            .map_err(|e| Error::InvalidArgument(format!("style.toml: {e}")))?;
        crate::engine::image_io::write_file_atomic(&dest.join(STYLE_TOML), text.as_bytes())?;
        let adapter = dest.join(STYLE_FILE);
        if adapter.is_file() {
            rewrite_safetensors_metadata(&adapter, &mut |m| {
                if let Some(serde_json::Value::String(n)) = m.get_mut("pairstyle.name") {
                    *n = to.to_string();
                }
            })?;
        }
        Ok(dest)
    }

    /// Move style `name` into `trash` (created if needed) as `<name>-<unix time>` (with `.2`,
    /// `.3`... if taken); nothing is deleted. Across filesystems the folder is copied, then the
    /// original removed. Returns where it went.
    pub fn remove_to_trash(&self, name: &str, trash: &Path) -> Result<PathBuf> {
        validate_name(name)?;
        if !self.contains(name) {
            return Err(Error::InvalidArgument(format!(
                "no style named {name:?} in {}",
                self.root.display()
            )));
        }
        std::fs::create_dir_all(trash).map_err(|e| Error::io(trash, e))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = trash.join(format!("{name}-{stamp}"));
        let mut dest = base.clone();
        let mut n = 2u32;
        while dest.exists() {
            dest = PathBuf::from(format!("{}.{n}", base.display()));
            n += 1;
        }
        move_dir(&self.style_dir(name), &dest)?;
        Ok(dest)
    }

    /// Remove the temporary folders (`.<name>.<pid>.tmp`) that processes which died while
    /// registering a style left behind; folders of living processes are kept. Returns what was
    /// removed.
    pub fn remove_stale_temps(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(Error::io(&self.root, e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(pid) = temp_owner(&name) else {
                continue;
            };
            if process_alive(pid) || !entry.path().is_dir() {
                continue;
            }
            std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            removed.push(entry.path());
        }
        Ok(removed)
    }

    /// Export style `name` as a LoRA file other tools load (`kohya` for A1111/ComfyUI/Forge,
    /// `peft` for diffusers) at `out`. `model` names the base model folder whose UNet config names
    /// the layers (default: the model the style was trained on).
    pub fn export(
        &self,
        name: &str,
        format: lora::ExportFormat,
        model: Option<&Path>,
        out: &Path,
    ) -> Result<()> {
        use crate::engine::model_dir::ModelDir;
        use crate::engine::unet::{UNetConfig, UNetConfigFile};
        validate_name(name)?;
        let meta = self.meta(name)?;
        let model_path = model
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&meta.base_model));
        let model_dir = ModelDir::open(&model_path)?;
        let unet_file: UNetConfigFile = model_dir.config("unet")?;
        let unet_cfg = UNetConfig::resolve(unet_file, &model_dir.config_path("unet"))?;
        let catalog = ModuleCatalog::from_config(&unet_cfg);
        let loaded = lora::load(
            &self.style_dir(name).join(STYLE_FILE),
            &catalog,
            &LoadOptions::default(),
        )?;
        let mut info = lora::ExportInfo::new(model_dir.family()?, name);
        info.description = Some(format!(
            "Pair Customization style \"{}\" learned from one {} image pair",
            meta.style_desc, meta.subject
        ));
        info.trigger_phrase = Some(meta.prompt_suffix.trim().to_string());
        info.steps = Some(meta.steps as u64);
        info.seed = Some(meta.seed);
        match format {
            lora::ExportFormat::Kohya => lora::export_kohya(&loaded.set, &catalog, &info, out),
            lora::ExportFormat::Peft => lora::export_peft(&loaded.set, &info, out),
        }
    }
}

/// The pid in a registration temporary folder's name `.<name>.<pid>.tmp`.
fn temp_owner(folder: &str) -> Option<u32> {
    let inner = folder.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, pid) = inner.rsplit_once('.')?;
    pid.parse().ok()
}

/// Whether a process with this pid exists (signal 0 probes without sending anything); used to
/// tell the temporary files of a dead writer from those of a running one.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Rename a folder; across filesystems, copy it recursively and then remove the original.
fn move_dir(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let partial = PathBuf::from(format!("{}.partial", to.display()));
            copy_dir(from, &partial)?;
            std::fs::rename(&partial, to).map_err(|e| Error::io(to, e))?;
            std::fs::remove_dir_all(from).map_err(|e| Error::io(from, e))
        }
        Err(e) => Err(Error::io(from, e)),
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Rewrite the `__metadata__` of a safetensors file in place (atomically): the header is
/// re-serialised and padded to 8 bytes, the tensor bytes are kept as they are (their offsets
/// count from the end of the header).
pub fn rewrite_safetensors_metadata(
    path: &Path,
    edit: &mut dyn FnMut(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::from_io(path, e))?;
    let bad = |m: &str| Error::Safetensors {
        path: path.to_path_buf(),
        message: m.to_string(),
    };
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| bad("file too short for a safetensors header"))?;
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("header length does not fit the file"))?;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..end]).map_err(|e| bad(&format!("header: {e}")))?;
    let meta = header
        .entry("__metadata__")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if let serde_json::Value::Object(m) = meta {
        edit(m);
    }
    let mut text = serde_json::to_vec(&header).map_err(|e| bad(&format!("header: {e}")))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[end..]);
    crate::engine::image_io::write_file_atomic(path, &out)
}

/// Hex sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LayerAdapter;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ps-library-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn adapter() -> AdapterSet {
        let dev = Device::Cpu;
        let mut set = AdapterSet::new(2, 2.0);
        let down = candle_core::Tensor::ones((2, 8), DType::F32, &dev).unwrap();
        let up = candle_core::Tensor::full(0.5f32, (8, 2), &dev).unwrap();
        set.insert(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            LayerAdapter::new(down, up, 2.0).unwrap(),
        )
        .unwrap();
        set
    }

    fn meta(name: &str) -> StyleMeta {
        StyleMeta {
            name: name.into(),
            subject: "dog".into(),
            style_desc: "ink".into(),
            prompt_suffix: " in ink style".into(),
            default_lambda: 3.0,
            base_model: "/models/sd15".into(),
            rank: 2,
            alpha: 2.0,
            content_rank: 2,
            seed: 7,
            steps: 10,
            content_sha256: vec!["aa".into()],
            style_sha256: vec!["bb".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_style_toml_without_preview_keys_still_loads() {
        let root = scratch("compat");
        let dir = root.join("old");
        std::fs::create_dir_all(&dir).unwrap();
        // A style.toml as registered before thumbnails and sample grids existed.
        std::fs::write(
            dir.join(STYLE_TOML),
            "name = \"old\"\nsubject = \"dog\"\nstyle_desc = \"ink\"\n\
             prompt_suffix = \" in ink style\"\ndefault_lambda = 3.0\nbase_model = \"/m\"\n\
             rank = 4\nalpha = 4.0\ncontent_rank = 4\nseed = 0\nsteps = 6\n\
             training_secs = 1.5\ncontent_sha256 = [\"a\"]\nstyle_sha256 = [\"b\"]\n\
             created_unix = 5\n",
        )
        .unwrap();
        let lib = Library::new(&root);
        let m = lib.meta("old").unwrap();
        assert_eq!((m.rank, m.thumbnail, m.samples), (4, None, None));
        assert_eq!(lib.list().unwrap().len(), 1);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn previews_round_trip_through_style_toml_and_metadata() {
        let mut m = meta("ink");
        m.thumbnail = Some(THUMBNAIL_FILE.into());
        m.samples = Some(SampleGrid {
            file: SAMPLES_FILE.into(),
            prompts: vec!["a cat".into(), "a dog".into()],
            seed: 1,
            steps: 20,
            lambda: 3.0,
        });
        let text = toml::to_string_pretty(&m).unwrap();
        assert_eq!(toml::from_str::<StyleMeta>(&text).unwrap(), m);
        let md = m.to_metadata();
        assert_eq!(md["pairstyle.thumbnail"], "thumbnail.png");
        assert!(md["pairstyle.samples"].contains("\"a cat\""));
        // Absent previews write no keys at all.
        let plain = meta("x").to_metadata();
        assert!(
            !plain.contains_key("pairstyle.thumbnail") && !plain.contains_key("pairstyle.samples")
        );
    }

    #[test]
    fn register_with_extras_then_rename_and_trash() {
        let root = scratch("manage");
        let lib = Library::new(root.join("lib"));
        let pair = root.join("content.png");
        std::fs::write(&pair, b"png").unwrap();
        let mut seen_tmp = None;
        let dir = lib
            .register_with(
                &meta("ink"),
                &adapter(),
                std::slice::from_ref(&pair),
                &[(THUMBNAIL_FILE, b"thumb".as_slice())],
                &mut |tmp| {
                    // Complete before the rename, and not visible as a style yet.
                    assert!(tmp.join(STYLE_TOML).is_file() && tmp.join(THUMBNAIL_FILE).is_file());
                    seen_tmp = Some(tmp.to_path_buf());
                },
            )
            .unwrap();
        assert!(!seen_tmp.unwrap().exists());
        assert_eq!(std::fs::read(dir.join(THUMBNAIL_FILE)).unwrap(), b"thumb");
        assert!(dir.join("pair/content.png").is_file());
        for bad in ["../x.png", "a/b.png", STYLE_TOML, ".hidden"] {
            let e = lib.register_with(&meta("other"), &adapter(), &[], &[(bad, b"")], &mut |_| {});
            assert!(e.is_err(), "{bad} accepted");
        }

        // Rename: folder, style.toml and the adapter's metadata follow; the tensors are intact.
        let before = std::fs::read(dir.join(STYLE_FILE)).unwrap();
        let new_dir = lib.rename("ink", "sumi").unwrap();
        assert!(!dir.exists() && new_dir.ends_with("sumi"));
        let text = std::fs::read_to_string(new_dir.join(STYLE_TOML)).unwrap();
        assert!(text.contains("name = \"sumi\""), "{text}");
        let md = crate::lora::read_metadata(&new_dir.join(STYLE_FILE)).unwrap();
        assert_eq!(md["pairstyle.name"], "sumi");
        let t_old = safetensors::SafeTensors::deserialize(&before).unwrap();
        let after = std::fs::read(new_dir.join(STYLE_FILE)).unwrap();
        let t_new = safetensors::SafeTensors::deserialize(&after).unwrap();
        for (name, view) in t_old.tensors() {
            assert_eq!(t_new.tensor(&name).unwrap().data(), view.data(), "{name}");
        }
        assert!(lib.rename("sumi", "bad/name").is_err());
        assert!(lib.rename("../lib/sumi", "x").is_err());
        assert!(lib.remove_to_trash("../lib/sumi", &root.join("t")).is_err());
        assert!(lib.rename("nope", "x").is_err());
        lib.register(&meta("oil"), &adapter(), &[]).unwrap();
        let e = lib.rename("sumi", "oil").unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");

        // Remove: into the trash, twice under distinct names, nothing deleted.
        let trash = root.join("state/trash");
        let t1 = lib.remove_to_trash("sumi", &trash).unwrap();
        assert!(t1.join(STYLE_FILE).is_file() && !lib.contains("sumi"));
        lib.register(&meta("sumi"), &adapter(), &[]).unwrap();
        let t2 = lib.remove_to_trash("sumi", &trash).unwrap();
        assert_ne!(t1, t2);
        assert!(t2.join(STYLE_TOML).is_file());
        assert!(lib.remove_to_trash("sumi", &trash).is_err());
        assert_eq!(
            lib.list()
                .unwrap()
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["oil"]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_rename_interrupted_before_style_toml_reads_under_the_folder_name() {
        let root = scratch("heal");
        let lib = Library::new(&root);
        lib.register(&meta("ink"), &adapter(), &[]).unwrap();
        // The folder was renamed, the crash came before style.toml was rewritten.
        std::fs::rename(root.join("ink"), root.join("sumi")).unwrap();
        assert_eq!(lib.meta("sumi").unwrap().name, "sumi");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn stale_temporary_folders_of_dead_processes_are_removed() {
        let root = scratch("stale");
        let lib = Library::new(&root);
        let dead = root.join(".ink.999999999.tmp");
        let mine = root.join(format!(".oil.{}.tmp", std::process::id()));
        for d in [&dead, &mine] {
            std::fs::create_dir_all(d.join("pair")).unwrap();
        }
        std::fs::create_dir_all(root.join(".checkpoints")).unwrap();
        assert_eq!(
            lib.remove_stale_temps().unwrap(),
            std::slice::from_ref(&dead)
        );
        assert!(!dead.exists() && mine.exists() && root.join(".checkpoints").exists());
        assert_eq!(temp_owner(".a.b.12.tmp"), Some(12));
        assert_eq!(temp_owner(".checkpoints"), None);
        assert!(!process_alive(0) && process_alive(std::process::id()));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn metadata_rewrites_refuse_files_that_are_not_safetensors() {
        let root = scratch("rewrite");
        let p = root.join("x.safetensors");
        for bytes in [&b"short"[..], &[255u8, 0, 0, 0, 0, 0, 0, 0, b'{'][..]] {
            std::fs::write(&p, bytes).unwrap();
            assert!(rewrite_safetensors_metadata(&p, &mut |_| {}).is_err());
            assert_eq!(std::fs::read(&p).unwrap(), bytes);
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
