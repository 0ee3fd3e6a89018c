//! The embedded default model: the toy text-to-image model (Stable Diffusion 1.x architecture,
//! trained on the synthetic world by `tools/toy/pretrain.py`) compiled into the program, so that
//! every command works out of the box on a CPU with no download.
//!
//! The bytes of its diffusers folder (`src/toy/model/`) are part of the binary. To be loaded
//! through exactly the same code as a real model, the folder is written out once to a cache
//! directory named after the content's hash (`<cache>/pairstyle/toy-model-<hash>/`), atomically
//! (a temporary folder renamed into place), and opened from there like any other folder.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Declares the embedded files: each as its path inside the folder and its bytes.
#[cfg(feature = "embedded-model")]
macro_rules! embedded_files {
    ($($path:literal),+ $(,)?) => {
        &[$(($path, include_bytes!(concat!("model/", $path)) as &[u8])),+]
    };
}

/// Every file of the embedded model folder, as (relative path, bytes). Empty in a build without
/// the `embedded-model` feature (on by default; a GPU server build that always loads its own
/// model can leave the 18 MB out).
#[cfg(not(feature = "embedded-model"))]
pub const FILES: &[(&str, &[u8])] = &[];

/// Every file of the embedded model folder, as (relative path, bytes).
#[cfg(feature = "embedded-model")]
pub const FILES: &[(&str, &[u8])] = embedded_files!(
    "model_index.json",
    "pairstyle.json",
    "training.json",
    "learning_curve.csv",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// Name of the marker file written last into an installed folder: a folder without it is not
/// trusted (it cannot be, though, since folders are renamed into place complete).
const COMPLETE_MARKER: &str = ".complete";

/// The first 16 hex digits of a SHA-256 over every embedded file's path and bytes: it names the
/// installed folder, so a new build with a different model never reuses an old folder.
pub fn fingerprint() -> &'static str {
    static FP: OnceLock<String> = OnceLock::new();
    FP.get_or_init(|| {
        let mut h = Sha256::new();
        for (path, bytes) in FILES {
            h.update((path.len() as u64).to_le_bytes());
            h.update(path.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        let digest = h.finalize();
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    })
}

/// Total size in bytes of the embedded model folder.
pub fn total_bytes() -> usize {
    FILES.iter().map(|(_, b)| b.len()).sum()
}

/// The embedded model's `training.json` (settings, seeds, step count, measured quality).
pub fn training_info() -> Option<&'static str> {
    FILES
        .iter()
        .find(|(p, _)| *p == "training.json")
        .and_then(|(_, b)| std::str::from_utf8(b).ok())
}

/// The default parent folder for installed copies: `$PAIRSTYLE_CACHE_DIR` when set, else the
/// user cache dir (`$XDG_CACHE_HOME/pairstyle` on Linux), else the temp dir.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PAIRSTYLE_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    directories::ProjectDirs::from("", "", "pairstyle")
        .map(|d| d.cache_dir().to_path_buf())
        .unwrap_or_else(|| std::env::temp_dir().join("pairstyle-cache"))
}

/// Write the embedded folder to `dest` (which must not exist), atomically: the files go into a
/// sibling temporary folder that is renamed to `dest` when complete.
pub fn write_to(dest: &Path) -> Result<()> {
    if FILES.is_empty() {
        return Err(Error::Unsupported(
            "this build of pairstyle has no embedded model (built without the `embedded-model` \
             feature); set [model] path or pass --model"
                .into(),
        ));
    }
    if dest.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists; choose a new folder",
            dest.display()
        )));
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::from_io(parent, e))?;
    let name = dest
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a folder path", dest.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::from_io(&tmp, e))?;
    }
    let result = write_files(&tmp)
        .and_then(|()| fs::rename(&tmp, dest).map_err(|e| Error::from_io(dest, e)));
    if result.is_err() {
        // best effort: never leave a half-written temporary folder behind
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn write_files(dir: &Path) -> Result<()> {
    for (rel, bytes) in FILES {
        let path = dir.join(rel);
        if let Some(p) = path.parent() {
            fs::create_dir_all(p).map_err(|e| Error::from_io(p, e))?;
        }
        fs::write(&path, bytes).map_err(|e| Error::from_io(&path, e))?;
    }
    let marker = dir.join(COMPLETE_MARKER);
    fs::write(&marker, fingerprint()).map_err(|e| Error::from_io(&marker, e))?;
    Ok(())
}

/// The installed embedded model under `cache_dir` (`toy-model-<fingerprint>`), written first if
/// it is not there yet. Safe when several processes race: each writes its own temporary folder
/// and the loser of the rename uses the winner's folder.
pub fn install_in(cache_dir: &Path) -> Result<PathBuf> {
    let dest = cache_dir.join(format!("toy-model-{}", fingerprint()));
    if dest.join(COMPLETE_MARKER).is_file() {
        return Ok(dest);
    }
    match write_to(&dest) {
        Ok(()) => Ok(dest),
        Err(_) if dest.join(COMPLETE_MARKER).is_file() => Ok(dest),
        Err(e) => Err(e),
    }
}

/// The embedded model as a folder on disk, installed in [`default_cache_dir`] when needed.
pub fn ensure_installed() -> Result<PathBuf> {
    install_in(&default_cache_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_embedded_and_small() {
        assert!(FILES.iter().all(|(_, b)| !b.is_empty()));
        assert!(total_bytes() <= 25 << 20, "{} bytes", total_bytes());
        assert_eq!(fingerprint().len(), 16);
    }

    #[test]
    fn install_is_idempotent_and_complete() {
        let dir = std::env::temp_dir().join(format!("pairstyle-embed-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = install_in(&dir).unwrap();
        let b = install_in(&dir).unwrap();
        assert_eq!(a, b);
        for (rel, bytes) in FILES {
            assert_eq!(&fs::read(a.join(rel)).unwrap(), bytes, "{rel}");
        }
        assert!(
            write_to(&a).is_err(),
            "an existing folder is never overwritten"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
