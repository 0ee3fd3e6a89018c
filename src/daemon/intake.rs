//! Taking a ready pair from the watch folder: validation, a content-derived id, and an atomic
//! move into the daemon's staging area; bad input goes to `watch/failed/<name>/` with an
//! `error.txt` saying why. Nothing is ever deleted: every dropped file ends up in staging, in
//! `staging/duplicates/`, or in `failed/`.
//!
//! A pair's id is the sha256 of both images' bytes, its effective training settings, its prompt
//! wording (subject, style description) and the base model's id, so the same pair dropped again
//! with the same settings is recognised and not retrained, whatever its file names.
//!
//! Staging is crash-safe: files are first moved into `staging/<id>.<n>.partial/` together with an
//! `intake.json` record, then that folder is renamed to `staging/<id>/`. A `.partial` folder left by
//! a crash is put back into the watch folder by [`Intake::recover`], to be taken again.
//!
//! `pair.toml` (all keys optional):
//! ```toml
//! name = "watercolor"          # style name (default: the folder or flat name)
//! subject = "dog"              # "a photo of a sbu dog" (default: [daemon] default_subject)
//! style_desc = "watercolor"    # " in watercolor style" (default: the name, '-'/'_' as spaces)
//! [train]                      # any [train] key, overriding the config for this pair
//! iterations = 500
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::dropfolder::{Candidate, DroppedFile, PairForm, PAIR_TOML, READY_MARKER};
use super::{format_utc, unix_now, DaemonError, DaemonResult};
use crate::trainer::TrainConfig;

/// Name of the record written into each staged pair folder.
pub const INTAKE_RECORD: &str = "intake.json";
/// Name of the explanation written into each failed pair folder.
pub const ERROR_FILE: &str = "error.txt";
/// Folder inside staging for pairs whose id was already known.
pub const DUPLICATES_DIR: &str = "duplicates";
/// Suffix of staging folders still being filled.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// The optional per-pair settings file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairToml {
    /// Style name in the library.
    pub name: Option<String>,
    /// What the images show.
    pub subject: Option<String>,
    /// The style in words.
    pub style_desc: Option<String>,
    /// `[train]` keys overriding the configuration for this pair.
    pub train: Option<toml::Table>,
}

/// What intake needs to know besides the dropped files.
#[derive(Debug, Clone, PartialEq)]
pub struct IntakeSettings {
    /// Training settings before the pair's own overrides (`[train]`).
    pub train: TrainConfig,
    /// Identifies the base model the style will be trained on (part of the pair id).
    pub base_model: String,
    /// Largest accepted image side.
    pub max_side: u32,
    /// Subject of a pair without one in `pair.toml`.
    pub default_subject: String,
}

/// The record of a staged pair (`staging/<id>/intake.json`): everything a training job needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedPair {
    /// The pair id (64 hex digits).
    pub id: String,
    /// Style name to register.
    pub name: String,
    /// What the images show.
    pub subject: String,
    /// The style in words.
    pub style_desc: String,
    /// Effective training settings (config plus the pair's overrides).
    pub train: TrainConfig,
    /// The base model's id.
    pub base_model: String,
    /// File name of the content image inside the staged folder.
    pub content_file: String,
    /// File name of the style image inside the staged folder.
    pub style_file: String,
    /// Where it was dropped, relative to the watch folder (`fox/` or `dog.content.png`...).
    pub origin: String,
    /// Unix time of intake.
    pub staged_unix: u64,
}

impl StagedPair {
    /// Read `intake.json` of a staged pair folder.
    pub fn load(dir: &Path) -> DaemonResult<Self> {
        let p = dir.join(INTAKE_RECORD);
        let text = std::fs::read_to_string(&p).map_err(|e| DaemonError::io(&p, e))?;
        serde_json::from_str(&text)
            .map_err(|e| DaemonError::Lib(crate::Error::config(&p, e.to_string())))
    }
}

/// What became of a candidate handed to intake.
#[derive(Debug, Clone, PartialEq)]
pub enum IntakeOutcome {
    /// Valid and new: moved to `dir` (`staging/<id>/`).
    Staged {
        /// The record.
        pair: Box<StagedPair>,
        /// The staged folder.
        dir: PathBuf,
    },
    /// Valid but its id is known already: its files were set aside in `staging/duplicates/`.
    Duplicate {
        /// The known pair id.
        id: String,
        /// Where the dropped files went.
        dir: PathBuf,
    },
    /// Bad input: moved to `watch/failed/<name>/` with an `error.txt`.
    Rejected {
        /// The failed folder.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The id of a pair: sha256 over both images, the effective settings, the wording and the model.
pub fn pair_id(
    content: &[u8],
    style: &[u8],
    train: &TrainConfig,
    subject: &str,
    style_desc: &str,
    base_model: &str,
) -> String {
    let mut h = sha2::Sha256::new();
    h.update(b"pairstyle-pair-1\0");
    for bytes in [content, style] {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    // Serialising a plain struct of numbers, strings and booleans cannot fail.
    let settings = serde_json::to_vec(train).unwrap_or_default();
    for part in [
        settings.as_slice(),
        subject.as_bytes(),
        style_desc.as_bytes(),
        base_model.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    format!("{:x}", h.finalize())
}

/// `base` with the `[train]` keys of a `pair.toml` applied; unknown keys and bad values are errors.
pub fn apply_train_overrides(
    base: &TrainConfig,
    overrides: &toml::Table,
) -> Result<TrainConfig, String> {
    let mut table = match toml::Value::try_from(base) {
        Ok(toml::Value::Table(t)) => t,
        _ => return Err("cannot represent the training settings as TOML".into()),
    };
    for (k, v) in overrides {
        table.insert(k.clone(), v.clone());
    }
    let cfg: TrainConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| format!("[train]: {}", e.message()))?;
    cfg.validate().map_err(|e| format!("[train]: {e}"))?;
    Ok(cfg)
}

/// Default wording of a style from its name: `oil-paint_v2` → `oil paint v2`.
pub fn desc_from_name(name: &str) -> String {
    name.replace(['-', '_'], " ").trim().to_string()
}

/// A permanent problem with the dropped files (as opposed to an I/O hiccup).
struct BadInput(String);

/// Takes candidates from the watch folder into staging (or `failed/`).
#[derive(Debug, Clone)]
pub struct Intake {
    watch: PathBuf,
    failed: PathBuf,
    staging: PathBuf,
    settings: IntakeSettings,
}

impl Intake {
    /// Intake between these folders (see [`super::paths::DaemonPaths`]).
    pub fn new(
        watch: PathBuf,
        failed: PathBuf,
        staging: PathBuf,
        settings: IntakeSettings,
    ) -> Self {
        Self {
            watch,
            failed,
            staging,
            settings,
        }
    }

    /// The staged folder of pair `id`.
    pub fn staged_dir(&self, id: &str) -> PathBuf {
        self.staging.join(id)
    }

    /// Validate a ready candidate and move it into staging, or into `failed/` if it is bad.
    /// `known` says whether a pair id was seen before (e.g. the journal has a job for it).
    /// An `Err` is an I/O problem worth retrying later; the files then stay where they are.
    pub fn take(&self, c: &Candidate, known: &dyn Fn(&str) -> bool) -> DaemonResult<IntakeOutcome> {
        let pair = match self.validate(c) {
            Ok(v) => v,
            Err(Ok(BadInput(reason))) => {
                let dir = self.reject(c, &reason)?;
                return Ok(IntakeOutcome::Rejected { dir, reason });
            }
            Err(Err(e)) => return Err(e),
        };
        if known(&pair.id) || self.staged_dir(&pair.id).exists() {
            let dir = self.set_aside(c, &pair)?;
            return Ok(IntakeOutcome::Duplicate { id: pair.id, dir });
        }
        let partial = unique_path(&self.staging, &format!("{}.", pair.id), PARTIAL_SUFFIX);
        std::fs::create_dir_all(&self.staging).map_err(|e| DaemonError::io(&self.staging, e))?;
        move_candidate(c, &partial, true)?;
        write_json(&partial.join(INTAKE_RECORD), &pair)?;
        let dir = self.staged_dir(&pair.id);
        match std::fs::rename(&partial, &dir) {
            Ok(()) => Ok(IntakeOutcome::Staged {
                pair: Box::new(pair),
                dir,
            }),
            Err(_) if dir.exists() => {
                // The same pair was staged meanwhile: keep this copy with the duplicates.
                let dup = self.duplicate_dir(&pair);
                rename(&partial, &dup)?;
                Ok(IntakeOutcome::Duplicate {
                    id: pair.id,
                    dir: dup,
                })
            }
            Err(e) => Err(DaemonError::io(&dir, e)),
        }
    }

    /// Check the candidate's files and settings; `Err(Ok(_))` is bad input, `Err(Err(_))` I/O.
    fn validate(&self, c: &Candidate) -> Result<StagedPair, Result<BadInput, DaemonError>> {
        let bad = |s: String| Err(Ok(BadInput(s)));
        let (Some(content), Some(style)) = (&c.content, &c.style) else {
            return bad(c.incompleteness());
        };
        if !c.problems.is_empty() {
            return bad(c.problems.join("; "));
        }
        let toml_cfg = match &c.pair_toml {
            None => PairToml::default(),
            Some(f) => {
                let text = match std::fs::read(&f.path) {
                    Ok(b) => match String::from_utf8(b) {
                        Ok(t) => t,
                        Err(_) => return bad("pair.toml is not UTF-8 text".into()),
                    },
                    Err(e) => return Err(Err(DaemonError::io(&f.path, e))),
                };
                match toml::from_str::<PairToml>(&text) {
                    Ok(t) => t,
                    Err(e) => return bad(format!("pair.toml: {}", e.message())),
                }
            }
        };
        let name = toml_cfg.name.clone().unwrap_or_else(|| c.name.clone());
        if let Err(e) = crate::library::validate_name(&name) {
            return bad(format!(
                "{e}; rename the pair or set name = \"...\" in pair.toml"
            ));
        }
        let subject = toml_cfg
            .subject
            .clone()
            .unwrap_or_else(|| self.settings.default_subject.clone());
        let style_desc = toml_cfg
            .style_desc
            .clone()
            .unwrap_or_else(|| desc_from_name(&name));
        for (key, v) in [("subject", &subject), ("style_desc", &style_desc)] {
            if v.trim().is_empty() || v.contains(['\n', '\r']) {
                return bad(format!("pair.toml: {key} must be a non-empty single line"));
            }
        }
        let train = match &toml_cfg.train {
            None => self.settings.train.clone(),
            Some(t) => match apply_train_overrides(&self.settings.train, t) {
                Ok(cfg) => cfg,
                Err(e) => return bad(format!("pair.toml: {e}")),
            },
        };
        let content_bytes = read_image(content, self.settings.max_side)?;
        let style_bytes = read_image(style, self.settings.max_side)?;
        let id = pair_id(
            &content_bytes,
            &style_bytes,
            &train,
            &subject,
            &style_desc,
            &self.settings.base_model,
        );
        Ok(StagedPair {
            id,
            name,
            subject,
            style_desc,
            train,
            base_model: self.settings.base_model.clone(),
            content_file: staged_name(content, "content"),
            style_file: staged_name(style, "style"),
            origin: self.origin(c),
            staged_unix: unix_now(),
        })
    }

    fn origin(&self, c: &Candidate) -> String {
        match c.form {
            PairForm::Folder => format!("{}/", c.name),
            PairForm::Flat => format!("{}.*", c.name),
            PairForm::Stray => c.name.clone(),
        }
    }

    fn duplicate_dir(&self, pair: &StagedPair) -> PathBuf {
        unique_path(
            &self.staging.join(DUPLICATES_DIR),
            &format!("{}-{}", &pair.id[..16], pair.name),
            "",
        )
    }

    /// Move a duplicate's files to `staging/duplicates/` with its record.
    fn set_aside(&self, c: &Candidate, pair: &StagedPair) -> DaemonResult<PathBuf> {
        let dir = self.duplicate_dir(pair);
        let parent = self.staging.join(DUPLICATES_DIR);
        std::fs::create_dir_all(&parent).map_err(|e| DaemonError::io(&parent, e))?;
        move_candidate(c, &dir, true)?;
        write_json(&dir.join(INTAKE_RECORD), pair)?;
        Ok(dir)
    }

    /// Move a candidate's files to `watch/failed/<name>/` (a new folder each time) and write its
    /// `error.txt`. Returns the folder.
    pub fn reject(&self, c: &Candidate, reason: &str) -> DaemonResult<PathBuf> {
        std::fs::create_dir_all(&self.failed).map_err(|e| DaemonError::io(&self.failed, e))?;
        let dir = unique_path(&self.failed, &c.name, "");
        move_candidate(c, &dir, false)?;
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| DaemonError::io(&dir, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        let text = error_text(&c.name, &self.origin(c), reason, &names, unix_now());
        let file = unique_path(&dir, "error", ".txt");
        crate::engine::image_io::write_file_atomic(&file, text.as_bytes())?;
        tracing::warn!("pair {} rejected ({}): {reason}", c.name, dir.display());
        Ok(dir)
    }

    /// Put `.partial` staging folders left by a crash back into the watch folder (as pair folders)
    /// so they are taken again. Returns where each went.
    pub fn recover(&self) -> DaemonResult<Vec<PathBuf>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.staging) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(DaemonError::io(&self.staging, e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.ends_with(PARTIAL_SUFFIX) || !entry.path().is_dir() {
                continue;
            }
            let record = StagedPair::load(&entry.path()).ok();
            let base = record
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_else(|| format!("recovered-{}", &name[..name.len().min(16)]));
            std::fs::create_dir_all(&self.watch).map_err(|e| DaemonError::io(&self.watch, e))?;
            let to = unique_path(&self.watch, &base, "");
            rename(&entry.path(), &to)?;
            // The record is ours, not the user's: keep it aside under a name the scan ignores.
            let rec = to.join(INTAKE_RECORD);
            if rec.exists() {
                rename(&rec, &to.join(format!(".{INTAKE_RECORD}")))?;
            }
            tracing::info!("put an interrupted intake back into {}", to.display());
            out.push(to);
        }
        Ok(out)
    }
}

/// Read and decode an image, turning decode problems into bad input and I/O into errors.
fn read_image(f: &DroppedFile, max_side: u32) -> Result<Vec<u8>, Result<BadInput, DaemonError>> {
    let bytes = std::fs::read(&f.path).map_err(|e| Err(DaemonError::io(&f.path, e)))?;
    let name = f
        .path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    match crate::engine::image_io::decode_rgb(&f.path, &bytes, max_side) {
        Ok(_) => Ok(bytes),
        Err(crate::Error::Image { message, .. }) => Err(Ok(BadInput(format!("{name}: {message}")))),
        Err(e) => Err(Ok(BadInput(format!("{name}: {e}")))),
    }
}

/// `content.<ext>` / `style.<ext>` with the original extension, lower-cased.
fn staged_name(f: &DroppedFile, role: &str) -> String {
    let ext = f
        .path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_else(|| "png".into());
    format!("{role}.{ext}")
}

/// The text of `error.txt`.
pub fn error_text(name: &str, origin: &str, reason: &str, files: &[String], unix: u64) -> String {
    let mut s = format!(
        "pairstyle could not use the pair \"{name}\" (dropped as {origin}).\n\
         Time: {}\n\n\
         Reason: {reason}\n\n",
        format_utc(unix)
    );
    if !files.is_empty() {
        s.push_str("The dropped files are kept here unchanged:\n");
        for f in files {
            s.push_str(&format!("  {f}\n"));
        }
        s.push('\n');
    }
    s.push_str(
        "To try again, fix the problem and drop the pair into the watch folder again: a folder\n\
         <name>/ holding content.png and style.png (or .jpg/.jpeg/.webp) and optionally\n\
         pair.toml, or two files <name>.content.png and <name>.style.png.\n",
    );
    s
}

/// `dir/<stem><suffix>`, or `dir/<stem>.2<suffix>`, `.3`, ... whichever does not exist yet.
fn unique_path(dir: &Path, stem: &str, suffix: &str) -> PathBuf {
    let first = dir.join(format!("{stem}{suffix}"));
    if !first.exists() {
        return first;
    }
    (2u32..)
        .map(|n| dir.join(format!("{stem}.{n}{suffix}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> DaemonResult<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| DaemonError::Config(format!("cannot serialise {}: {e}", path.display())))?;
    crate::engine::image_io::write_file_atomic(path, text.as_bytes())?;
    Ok(())
}

fn rename(from: &Path, to: &Path) -> DaemonResult<()> {
    std::fs::rename(from, to).map_err(|e| DaemonError::io(from, e))
}

/// Move the candidate's files into the new folder `dest`. A pair folder is renamed as a whole
/// (keeping extra files); flat files are moved one by one. With `normalise`, the images, settings
/// and marker get their folder-form names (`content.<ext>`, `style.<ext>`, `pair.toml`, `.ready`).
fn move_candidate(c: &Candidate, dest: &Path, normalise: bool) -> DaemonResult<()> {
    match (&c.form, &c.folder) {
        (PairForm::Folder, Some(folder)) => {
            move_dir(folder, dest)?;
            if normalise {
                for (f, name) in role_names(c) {
                    let now = dest.join(f.path.file_name().unwrap_or_default());
                    let want = dest.join(&name);
                    if now != want {
                        rename(&now, &want)?;
                    }
                }
            }
        }
        _ => {
            std::fs::create_dir(dest).map_err(|e| DaemonError::io(dest, e))?;
            let named = role_names(c);
            for f in c.files() {
                let name = match named.iter().find(|(g, _)| g.path == f.path) {
                    Some((_, n)) if normalise => n.clone(),
                    _ => f
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default(),
                };
                move_file(&f.path, &dest.join(name))?;
            }
        }
    }
    Ok(())
}

fn role_names(c: &Candidate) -> Vec<(&DroppedFile, String)> {
    let mut v = Vec::new();
    if let Some(f) = &c.content {
        v.push((f, staged_name(f, "content")));
    }
    if let Some(f) = &c.style {
        v.push((f, staged_name(f, "style")));
    }
    if let Some(f) = &c.pair_toml {
        v.push((f, PAIR_TOML.to_string()));
    }
    if let Some(f) = &c.ready {
        v.push((f, READY_MARKER.to_string()));
    }
    v
}

fn is_cross_device(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EXDEV)
}

/// Rename a file; across filesystems, copy it (fsynced) and remove the original only once the
/// copy is in place.
pub fn move_file(from: &Path, to: &Path) -> DaemonResult<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if is_cross_device(&e) => copy_then_remove(from, to),
        Err(e) => Err(DaemonError::io(from, e)),
    }
}

/// The cross-filesystem half of [`move_file`]: copy to a temporary name, fsync, rename into
/// place, then remove the source.
pub fn copy_then_remove(from: &Path, to: &Path) -> DaemonResult<()> {
    let bytes = std::fs::read(from).map_err(|e| DaemonError::io(from, e))?;
    crate::engine::image_io::write_file_atomic(to, &bytes)?;
    std::fs::remove_file(from).map_err(|e| DaemonError::io(from, e))
}

/// Rename a folder; across filesystems, move its files one by one and remove the emptied folders.
fn move_dir(from: &Path, to: &Path) -> DaemonResult<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if is_cross_device(&e) => {
            std::fs::create_dir(to).map_err(|e| DaemonError::io(to, e))?;
            for entry in std::fs::read_dir(from).map_err(|e| DaemonError::io(from, e))? {
                let entry = entry.map_err(|e| DaemonError::io(from, e))?;
                let target = to.join(entry.file_name());
                if entry.path().is_dir() {
                    move_dir(&entry.path(), &target)?;
                } else {
                    copy_then_remove(&entry.path(), &target)?;
                }
            }
            std::fs::remove_dir(from).map_err(|e| DaemonError::io(from, e))
        }
        Err(e) => Err(DaemonError::io(from, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_id_depends_on_every_input() {
        let t = TrainConfig::default();
        let base = pair_id(b"abc", b"def", &t, "dog", "watercolor", "sd15");
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            pair_id(b"abc", b"def", &t, "dog", "watercolor", "sd15")
        );
        let t2 = TrainConfig {
            iterations: 10,
            ..TrainConfig::default()
        };
        let variants = [
            pair_id(b"abd", b"def", &t, "dog", "watercolor", "sd15"),
            pair_id(b"abc", b"deg", &t, "dog", "watercolor", "sd15"),
            // Moving a byte from one image to the other must change the id (lengths are hashed).
            pair_id(b"ab", b"cdef", &t, "dog", "watercolor", "sd15"),
            pair_id(b"def", b"abc", &t, "dog", "watercolor", "sd15"),
            pair_id(b"abc", b"def", &t2, "dog", "watercolor", "sd15"),
            pair_id(b"abc", b"def", &t, "cat", "watercolor", "sd15"),
            pair_id(b"abc", b"def", &t, "dog", "oil", "sd15"),
            pair_id(b"abc", b"def", &t, "dog", "watercolor", "sdxl"),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(v, &base, "variant {i} has the same id");
        }
    }

    #[test]
    fn train_overrides_apply_and_typos_are_refused() {
        let base = TrainConfig::default();
        let t: toml::Table = toml::from_str("iterations = 20\nseed = 7").unwrap();
        let cfg = apply_train_overrides(&base, &t).unwrap();
        assert_eq!((cfg.iterations, cfg.seed, cfg.lr), (20, 7, base.lr));
        let t: toml::Table = toml::from_str("iteratons = 20").unwrap();
        let e = apply_train_overrides(&base, &t).unwrap_err();
        assert!(e.contains("iteratons"), "{e}");
        let t: toml::Table = toml::from_str("iterations = \"many\"").unwrap();
        assert!(apply_train_overrides(&base, &t).is_err());
    }

    #[test]
    fn names_become_descriptions() {
        assert_eq!(desc_from_name("oil-paint_v2"), "oil paint v2");
        assert_eq!(desc_from_name("watercolor"), "watercolor");
    }

    #[test]
    fn error_text_says_what_and_how_to_retry() {
        let t = error_text(
            "dog",
            "dog/",
            "style.png: file is empty (0 bytes)",
            &["content.png".into(), "style.png".into()],
            0,
        );
        assert!(t.contains("\"dog\" (dropped as dog/)"));
        assert!(t.contains("Reason: style.png: file is empty (0 bytes)"));
        assert!(t.contains("  content.png\n  style.png\n"));
        assert!(t.contains("1970-01-01 00:00:00 UTC"));
        assert!(t.contains("To try again"));
    }

    #[test]
    fn unique_paths_never_reuse_a_name() {
        let root = std::env::temp_dir().join(format!("ps-uniq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let a = unique_path(&root, "dog", "");
        assert_eq!(a, root.join("dog"));
        std::fs::create_dir(&a).unwrap();
        let b = unique_path(&root, "dog", "");
        assert_eq!(b, root.join("dog.2"));
        std::fs::create_dir(&b).unwrap();
        assert_eq!(unique_path(&root, "dog", ""), root.join("dog.3"));
        assert_eq!(unique_path(&root, "error", ".txt"), root.join("error.txt"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn copy_then_remove_moves_the_bytes() {
        let root = std::env::temp_dir().join(format!("ps-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a"), b"hello").unwrap();
        copy_then_remove(&root.join("a"), &root.join("b")).unwrap();
        assert!(!root.join("a").exists());
        assert_eq!(std::fs::read(root.join("b")).unwrap(), b"hello");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
