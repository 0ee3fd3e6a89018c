//! The drop-folder contract, and deciding when a dropped pair is ready.
//!
//! A pair is either
//! - a folder `watch/<name>/` with `content.<ext>` and `style.<ext>` (`ext`: png, jpg, jpeg,
//!   webp, any case), optionally `pair.toml` and a `.ready` marker; or
//! - flat files `watch/<name>.content.<ext>` and `watch/<name>.style.<ext>`, optionally
//!   `<name>.pair.toml` and `<name>.ready`.
//!
//! Temporary and sync files (`.*`, `*.tmp`, `*.part`, `*.filepart`, `*.crdownload`, `*~`,
//! `.syncthing.*`, `~syncthing~*`, `@eaDir`, `Thumbs.db`, `desktop.ini`) and the `failed/` folder
//! are ignored. A complete pair is ready once none of its files has changed (size and mtime) for
//! `stability_secs`, or at once when its `pair.toml` or `.ready` marker is present (rename it in
//! last). A pair with a naming problem (two content images, an unsupported extension) fails once it
//! is stable; an incomplete pair (a lone image) or an unrecognised file fails after
//! `lone_timeout_secs` without change.
//!
//! [`scan`] reads the folder; [`assemble`] and [`Tracker`] are pure, with time passed in, so tests
//! need neither files nor sleeping.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::paths::FAILED_DIR;
use super::{DaemonError, DaemonResult};

/// Extensions of the images a pair may use (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];
/// Per-pair settings file inside a pair folder (`<name>.pair.toml` in the flat form).
pub const PAIR_TOML: &str = "pair.toml";
/// Marker file that makes a pair ready at once (`<name>.ready` in the flat form).
pub const READY_MARKER: &str = ".ready";

/// Whether a file or folder name is a temporary, hidden or sync-tool file to leave alone.
pub fn is_ignored(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.is_empty()
        || name.starts_with('.')
        || name.starts_with("~syncthing~")
        || name.ends_with('~')
        || name == "@eaDir"
        || lower == "thumbs.db"
        || lower == "desktop.ini"
        || [".tmp", ".part", ".filepart", ".crdownload"]
            .iter()
            .any(|s| lower.ends_with(s))
}

/// Size and modification time of a file: a pair is stable while these stay the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, when the filesystem reports one.
    pub mtime: Option<SystemTime>,
}

/// A file seen in the watch folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedFile {
    /// Its path.
    pub path: PathBuf,
    /// Its size and mtime when scanned.
    pub stamp: FileStamp,
}

/// How a candidate was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairForm {
    /// A folder `watch/<name>/`.
    Folder,
    /// Flat files `watch/<name>.content.<ext>` and `watch/<name>.style.<ext>`.
    Flat,
    /// A top-level file that follows neither form.
    Stray,
}

/// The role of a file within a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The content image (with its extension, lower-cased).
    Content(String),
    /// The style image (with its extension, lower-cased).
    Style(String),
    /// The per-pair settings file.
    PairToml,
    /// The ready marker.
    Ready,
}

/// Everything found for one dropped pair (or one stray file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Unique within the watch folder: `dir:<name>`, `flat:<name>` or `file:<file name>`.
    pub key: String,
    /// The pair's name (folder name, flat prefix, or the stray file's name).
    pub name: String,
    /// How it was dropped.
    pub form: PairForm,
    /// The pair folder, for [`PairForm::Folder`].
    pub folder: Option<PathBuf>,
    /// The content image.
    pub content: Option<DroppedFile>,
    /// The style image.
    pub style: Option<DroppedFile>,
    /// The settings file.
    pub pair_toml: Option<DroppedFile>,
    /// The ready marker.
    pub ready: Option<DroppedFile>,
    /// Other files of the candidate (extra files in a pair folder, the stray file itself).
    pub others: Vec<DroppedFile>,
    /// Naming problems found while scanning (duplicates, unsupported image types).
    pub problems: Vec<String>,
}

impl Candidate {
    fn new(key: String, name: &str, form: PairForm) -> Self {
        Self {
            key,
            name: name.to_string(),
            form,
            folder: None,
            content: None,
            style: None,
            pair_toml: None,
            ready: None,
            others: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// Both images are present and nothing is misnamed.
    pub fn is_complete(&self) -> bool {
        self.content.is_some() && self.style.is_some() && self.problems.is_empty()
    }

    /// A `pair.toml` or `.ready` marker says the pair is fully written.
    pub fn has_marker(&self) -> bool {
        self.pair_toml.is_some() || self.ready.is_some()
    }

    /// Every file of the candidate, in a stable order.
    pub fn files(&self) -> Vec<&DroppedFile> {
        let mut v: Vec<&DroppedFile> = [&self.content, &self.style, &self.pair_toml, &self.ready]
            .into_iter()
            .flatten()
            .chain(self.others.iter())
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    /// What must stay unchanged for the candidate to count as stable.
    fn signature(&self) -> Vec<(PathBuf, FileStamp)> {
        self.files()
            .into_iter()
            .map(|f| (f.path.clone(), f.stamp))
            .collect()
    }

    /// Why an incomplete candidate cannot be used, in words for `error.txt`.
    pub fn incompleteness(&self) -> String {
        if !self.problems.is_empty() {
            return self.problems.join("; ");
        }
        let how = match self.form {
            PairForm::Folder => format!(
                "a pair folder needs content.png and style.png (or .jpg/.jpeg/.webp) in {}/",
                self.name
            ),
            _ => format!(
                "a flat pair needs {0}.content.png and {0}.style.png (or .jpg/.jpeg/.webp)",
                self.name
            ),
        };
        match (&self.content, &self.style, self.form) {
            (_, _, PairForm::Stray) => format!(
                "{} is not part of a pair: drop a folder <name>/ with content.png and \
                 style.png, or two files <name>.content.png and <name>.style.png",
                self.name
            ),
            (Some(_), None, _) => format!("the style image never arrived: {how}"),
            (None, Some(_), _) => format!("the content image never arrived: {how}"),
            _ => format!("no content or style image: {how}"),
        }
    }
}

/// `<base>.<ext>` → the image role, for `base` = content/style (case-insensitive). An image role
/// with an unsupported extension comes back as `Err(problem)`.
fn image_role(base: &str, ext: &str) -> Option<Result<Role, String>> {
    let base = base.to_ascii_lowercase();
    let ext_l = ext.to_ascii_lowercase();
    let make = match base.as_str() {
        "content" => Role::Content,
        "style" => Role::Style,
        _ => return None,
    };
    if IMAGE_EXTENSIONS.contains(&ext_l.as_str()) {
        Some(Ok(make(ext_l)))
    } else {
        Some(Err(format!(
            "{base}.{ext}: unsupported image type .{ext}; use .png, .jpg, .jpeg or .webp"
        )))
    }
}

/// The role of a file inside a pair folder; `None` for files that play no role.
pub fn folder_role(file_name: &str) -> Option<Result<Role, String>> {
    if file_name == READY_MARKER {
        return Some(Ok(Role::Ready));
    }
    if file_name.eq_ignore_ascii_case(PAIR_TOML) {
        return Some(Ok(Role::PairToml));
    }
    let (base, ext) = file_name.rsplit_once('.')?;
    image_role(base, ext)
}

/// A top-level file name in the flat form: `(pair name, role)`; `None` if it follows no form.
pub fn flat_role(file_name: &str) -> Option<(String, Result<Role, String>)> {
    let lower = file_name.to_ascii_lowercase();
    if let Some(stem) = lower.strip_suffix(".ready") {
        return non_empty(&file_name[..stem.len()]).map(|n| (n, Ok(Role::Ready)));
    }
    if let Some(stem) = lower.strip_suffix(".pair.toml") {
        return non_empty(&file_name[..stem.len()]).map(|n| (n, Ok(Role::PairToml)));
    }
    let (rest, ext) = file_name.rsplit_once('.')?;
    let (name, base) = rest.rsplit_once('.')?;
    let role = image_role(base, ext)?;
    non_empty(name).map(|n| (n, role))
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// One file seen by a scan: where it is relative to the watch folder, and its stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The top-level entry's name (a file, or the pair folder).
    pub top: String,
    /// The file's name inside the pair folder; `None` for a top-level file.
    pub inner: Option<String>,
    /// The file's full path.
    pub path: PathBuf,
    /// Its size and mtime.
    pub stamp: FileStamp,
}

/// The candidates found by one scan, by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Candidates by key, in key order.
    pub candidates: BTreeMap<String, Candidate>,
}

fn place(c: &mut Candidate, role: Result<Role, String>, file: DroppedFile) {
    let slot_name = |r: &Role| match r {
        Role::Content(_) => "content image",
        Role::Style(_) => "style image",
        Role::PairToml => "pair.toml",
        Role::Ready => "ready marker",
    };
    match role {
        Err(problem) => {
            c.problems.push(problem);
            c.others.push(file);
        }
        Ok(r) => {
            let what = slot_name(&r);
            let slot = match r {
                Role::Content(_) => &mut c.content,
                Role::Style(_) => &mut c.style,
                Role::PairToml => &mut c.pair_toml,
                Role::Ready => &mut c.ready,
            };
            match slot {
                None => *slot = Some(file),
                Some(existing) => {
                    let mut names = [file_name(&existing.path), file_name(&file.path)];
                    names.sort();
                    c.problems.push(format!(
                        "more than one {what}: {} and {}; keep one",
                        names[0], names[1]
                    ));
                    c.others.push(file);
                }
            }
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// Group observed files into candidates (pure: no file access). Entries must already exclude
/// ignored names; folders that held no file are passed as `empty_folders`.
pub fn assemble(entries: &[Observed], empty_folders: &[(String, PathBuf)]) -> Scan {
    let mut scan = Scan::default();
    let mut sorted: Vec<&Observed> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for o in sorted {
        let file = DroppedFile {
            path: o.path.clone(),
            stamp: o.stamp,
        };
        match &o.inner {
            Some(inner) => {
                let key = format!("dir:{}", o.top);
                let c = scan
                    .candidates
                    .entry(key.clone())
                    .or_insert_with(|| Candidate::new(key, &o.top, PairForm::Folder));
                if c.folder.is_none() {
                    c.folder = o.path.parent().map(Path::to_path_buf);
                }
                match folder_role(inner) {
                    Some(role) => place(c, role, file),
                    None => c.others.push(file),
                }
            }
            None => match flat_role(&o.top) {
                Some((name, role)) => {
                    let key = format!("flat:{name}");
                    let c = scan
                        .candidates
                        .entry(key.clone())
                        .or_insert_with(|| Candidate::new(key, &name, PairForm::Flat));
                    place(c, role, file);
                }
                None => {
                    let key = format!("file:{}", o.top);
                    let mut c = Candidate::new(key.clone(), &o.top, PairForm::Stray);
                    c.others.push(file);
                    scan.candidates.insert(key, c);
                }
            },
        }
    }
    for (name, path) in empty_folders {
        let key = format!("dir:{name}");
        scan.candidates.entry(key.clone()).or_insert_with(|| {
            let mut c = Candidate::new(key, name, PairForm::Folder);
            c.folder = Some(path.clone());
            c
        });
    }
    scan
}

fn stamp_of(path: &Path, meta: &std::fs::Metadata) -> DroppedFile {
    DroppedFile {
        path: path.to_path_buf(),
        stamp: FileStamp {
            size: meta.len(),
            mtime: meta.modified().ok(),
        },
    }
}

/// Read the watch folder (one level of pair folders) and group what is there into candidates.
/// Files that vanish during the scan are skipped; they will be seen, or not, next time.
pub fn scan(watch: &Path) -> DaemonResult<Scan> {
    let mut entries = Vec::new();
    let mut empty = Vec::new();
    let dir = std::fs::read_dir(watch).map_err(|e| DaemonError::io(watch, e))?;
    for entry in dir {
        let entry = entry.map_err(|e| DaemonError::io(watch, e))?;
        let top = entry.file_name().to_string_lossy().to_string();
        if is_ignored(&top) || top == FAILED_DIR {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let Ok(inner_dir) = std::fs::read_dir(&path) else {
                continue;
            };
            let mut any = false;
            for inner in inner_dir.flatten() {
                let name = inner.file_name().to_string_lossy().to_string();
                if is_ignored(&name) && name != READY_MARKER {
                    continue;
                }
                let p = inner.path();
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_file() => {
                        any = true;
                        let f = stamp_of(&p, &m);
                        entries.push(Observed {
                            top: top.clone(),
                            inner: Some(name),
                            path: f.path,
                            stamp: f.stamp,
                        });
                    }
                    _ => {}
                }
            }
            if !any {
                empty.push((top, path));
            }
        } else if meta.is_file() {
            let f = stamp_of(&path, &meta);
            entries.push(Observed {
                top,
                inner: None,
                path: f.path,
                stamp: f.stamp,
            });
        }
    }
    Ok(assemble(&entries, &empty))
}

/// The waiting times of the readiness rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StabilityRules {
    /// How long a complete pair must stay unchanged.
    pub stability: Duration,
    /// How long an incomplete pair or stray file may stay unchanged before it has failed.
    pub lone_timeout: Duration,
}

impl StabilityRules {
    /// From `[daemon] stability_secs` and `lone_timeout_secs`.
    pub fn from_config(cfg: &super::DaemonConfig) -> Self {
        Self {
            stability: Duration::from_secs(cfg.stability_secs),
            lone_timeout: Duration::from_secs(cfg.lone_timeout_secs),
        }
    }
}

/// What the tracker decided about a candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Complete and stable (or marked ready): hand it to intake.
    Ready(Candidate),
    /// Incomplete or misnamed for too long: move it to `failed/` with this reason.
    Failed {
        /// The candidate.
        candidate: Candidate,
        /// Why, in words.
        reason: String,
    },
}

#[derive(Debug)]
struct Track {
    signature: Vec<(PathBuf, FileStamp)>,
    since: Instant,
    decided: bool,
    /// How long this candidate must stay unchanged before it is decided.
    wait: Duration,
    /// A retry after a transient failure is not made before this time.
    not_before: Option<Instant>,
}

/// Follows candidates across scans and decides when each is ready or has failed. Each candidate
/// is decided once; it is decided again only after it changes, or after [`Tracker::forget`].
#[derive(Debug)]
pub struct Tracker {
    rules: StabilityRules,
    tracks: HashMap<String, Track>,
}

impl Tracker {
    /// A tracker with nothing seen yet.
    pub fn new(rules: StabilityRules) -> Self {
        Self {
            rules,
            tracks: HashMap::new(),
        }
    }

    /// Take in a new scan made at `now`; returns the candidates decided by it.
    pub fn observe(&mut self, scan: &Scan, now: Instant) -> Vec<Decision> {
        self.tracks.retain(|k, _| scan.candidates.contains_key(k));
        let mut out = Vec::new();
        for (key, c) in &scan.candidates {
            let sig = c.signature();
            let incomplete = c.form == PairForm::Stray || c.content.is_none() || c.style.is_none();
            let wait = match (incomplete, c.has_marker()) {
                (true, _) => self.rules.lone_timeout,
                (false, true) => Duration::ZERO,
                (false, false) => self.rules.stability,
            };
            let track = self.tracks.entry(key.clone()).or_insert_with(|| Track {
                signature: sig.clone(),
                since: now,
                decided: false,
                wait,
                not_before: None,
            });
            if track.signature != sig {
                // Changed files wait for stability again; a pending retry keeps its time.
                *track = Track {
                    signature: sig,
                    since: now,
                    decided: false,
                    wait,
                    not_before: track.not_before,
                };
            }
            track.wait = wait;
            if track.decided
                || now.saturating_duration_since(track.since) < wait
                || track.not_before.is_some_and(|t| now < t)
            {
                continue;
            }
            let decision = if incomplete || !c.problems.is_empty() {
                Decision::Failed {
                    candidate: c.clone(),
                    reason: c.incompleteness(),
                }
            } else {
                Decision::Ready(c.clone())
            };
            track.decided = true;
            out.push(decision);
        }
        out
    }

    /// Let a decided candidate be decided again (after intake failed for a transient reason).
    pub fn forget(&mut self, key: &str) {
        self.tracks.remove(key);
    }

    /// Decide a decided candidate again, but not before `at` (a retry after a transient failure,
    /// see [`Backoff`]). The files still have to be unchanged for the stability time.
    pub fn retry_at(&mut self, key: &str, at: Instant) {
        if let Some(t) = self.tracks.get_mut(key) {
            t.decided = false;
            t.not_before = Some(at);
        }
    }

    /// How long from `now` until an undecided candidate may become decidable; `None` when
    /// nothing is waiting. A caller without filesystem events should rescan by then.
    pub fn next_deadline(&self, now: Instant) -> Option<Duration> {
        self.tracks
            .values()
            .filter(|t| !t.decided)
            .map(|t| {
                let stable = t
                    .wait
                    .saturating_sub(now.saturating_duration_since(t.since));
                let retry = t
                    .not_before
                    .map_or(Duration::ZERO, |nb| nb.saturating_duration_since(now));
                stable.max(retry)
            })
            .min()
    }
}

/// Exponential backoff per candidate for transient intake failures: the first retry waits
/// `initial`, each further failure doubles the wait, up to `max`. Success forgets the count.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: HashMap<String, u32>,
}

impl Backoff {
    /// A backoff with these waits.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: HashMap::new(),
        }
    }

    /// From `[daemon] retry_initial_secs` and `retry_max_secs`.
    pub fn from_config(cfg: &super::DaemonConfig) -> Self {
        Self::new(
            Duration::from_secs(cfg.retry_initial_secs),
            Duration::from_secs(cfg.retry_max_secs),
        )
    }

    /// Record a failure of `key`; returns how long to wait before its next attempt.
    pub fn failed(&mut self, key: &str) -> Duration {
        let n = self.failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let factor = 2u32.saturating_pow((*n - 1).min(30));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// How many times in a row `key` has failed.
    pub fn failures(&self, key: &str) -> u32 {
        self.failures.get(key).copied().unwrap_or(0)
    }

    /// `key` succeeded (or is gone): its next failure starts from `initial` again.
    pub fn succeeded(&mut self, key: &str) {
        self.failures.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = "/w";

    fn stamp(size: u64, t: u64) -> FileStamp {
        FileStamp {
            size,
            mtime: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(t)),
        }
    }

    fn top(name: &str, size: u64, t: u64) -> Observed {
        Observed {
            top: name.into(),
            inner: None,
            path: Path::new(W).join(name),
            stamp: stamp(size, t),
        }
    }

    fn inner(folder: &str, name: &str, size: u64, t: u64) -> Observed {
        Observed {
            top: folder.into(),
            inner: Some(name.into()),
            path: Path::new(W).join(folder).join(name),
            stamp: stamp(size, t),
        }
    }

    fn rules() -> StabilityRules {
        StabilityRules {
            stability: Duration::from_secs(5),
            lone_timeout: Duration::from_secs(60),
        }
    }

    fn ready_keys(d: &[Decision]) -> Vec<String> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Ready(c) => Some(c.key.clone()),
                _ => None,
            })
            .collect()
    }

    fn failed(d: &[Decision]) -> Vec<(String, String)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Failed { candidate, reason } => {
                    Some((candidate.key.clone(), reason.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ignored_names() {
        for n in [
            ".hidden",
            ".syncthing.content.png.tmp",
            "~syncthing~style.png",
            "content.png.tmp",
            "a.part",
            "a.PART",
            "style.png.filepart",
            "x.crdownload",
            "backup~",
            "@eaDir",
            "Thumbs.db",
            "thumbs.db",
            "desktop.ini",
            "Desktop.ini",
            "",
        ] {
            assert!(is_ignored(n), "{n} should be ignored");
        }
        for n in [
            "content.png",
            "dog.style.jpg",
            "pair.toml",
            "tmp",
            "partial.png",
        ] {
            assert!(!is_ignored(n), "{n} should not be ignored");
        }
    }

    #[test]
    fn folder_roles() {
        assert_eq!(
            folder_role("content.png"),
            Some(Ok(Role::Content("png".into())))
        );
        assert_eq!(
            folder_role("Style.JPEG"),
            Some(Ok(Role::Style("jpeg".into())))
        );
        assert_eq!(
            folder_role("style.webp"),
            Some(Ok(Role::Style("webp".into())))
        );
        assert_eq!(folder_role("pair.toml"), Some(Ok(Role::PairToml)));
        assert_eq!(folder_role(".ready"), Some(Ok(Role::Ready)));
        assert!(matches!(folder_role("content.gif"), Some(Err(e)) if e.contains(".gif")));
        assert_eq!(folder_role("notes.txt"), None);
        assert_eq!(folder_role("content"), None);
    }

    #[test]
    fn flat_roles() {
        assert_eq!(
            flat_role("dog.content.png"),
            Some(("dog".into(), Ok(Role::Content("png".into()))))
        );
        assert_eq!(
            flat_role("my.dog.Style.JPG"),
            Some(("my.dog".into(), Ok(Role::Style("jpg".into()))))
        );
        assert_eq!(
            flat_role("dog.pair.toml"),
            Some(("dog".into(), Ok(Role::PairToml)))
        );
        assert_eq!(
            flat_role("dog.ready"),
            Some(("dog".into(), Ok(Role::Ready)))
        );
        assert!(matches!(flat_role("dog.style.bmp"), Some((n, Err(_))) if n == "dog"));
        assert_eq!(flat_role("dog.png"), None);
        assert_eq!(flat_role(".content.png"), None);
        assert_eq!(flat_role("content.png"), None);
        assert_eq!(flat_role("pair.toml"), None);
    }

    #[test]
    fn assemble_groups_both_forms_and_strays() {
        let scan = assemble(
            &[
                inner("fox", "content.png", 10, 1),
                inner("fox", "style.jpg", 11, 1),
                inner("fox", "pair.toml", 12, 1),
                inner("fox", "notes.txt", 3, 1),
                top("dog.content.png", 5, 1),
                top("dog.style.webp", 6, 1),
                top("dog.ready", 0, 1),
                top("cat.png", 7, 1),
            ],
            &[("empty".into(), PathBuf::from("/w/empty"))],
        );
        let keys: Vec<&str> = scan.candidates.keys().map(String::as_str).collect();
        assert_eq!(keys, ["dir:empty", "dir:fox", "file:cat.png", "flat:dog"]);
        let fox = &scan.candidates["dir:fox"];
        assert_eq!(fox.form, PairForm::Folder);
        assert_eq!(fox.folder.as_deref(), Some(Path::new("/w/fox")));
        assert!(fox.is_complete() && fox.has_marker());
        assert_eq!(fox.others.len(), 1);
        assert_eq!(fox.files().len(), 4);
        let dog = &scan.candidates["flat:dog"];
        assert_eq!(dog.form, PairForm::Flat);
        assert!(dog.is_complete() && dog.ready.is_some() && dog.pair_toml.is_none());
        let cat = &scan.candidates["file:cat.png"];
        assert_eq!(cat.form, PairForm::Stray);
        assert!(!cat.is_complete());
        assert!(cat.incompleteness().contains("not part of a pair"));
        assert!(!scan.candidates["dir:empty"].is_complete());
    }

    #[test]
    fn duplicates_and_bad_types_are_problems() {
        let scan = assemble(
            &[
                inner("a", "content.png", 1, 1),
                inner("a", "content.jpg", 1, 1),
                inner("a", "style.png", 1, 1),
                inner("b", "content.png", 1, 1),
                inner("b", "style.gif", 1, 1),
            ],
            &[],
        );
        let a = &scan.candidates["dir:a"];
        assert!(!a.is_complete());
        assert!(
            a.problems[0].contains("more than one content image")
                && a.problems[0].contains("content.jpg and content.png"),
            "{:?}",
            a.problems
        );
        let b = &scan.candidates["dir:b"];
        assert!(b.style.is_none());
        assert!(b.problems[0].contains("style.gif"), "{:?}", b.problems);
    }

    #[test]
    fn a_complete_pair_is_ready_only_after_it_stops_changing() {
        let t0 = Instant::now();
        let s = |n: u64| Duration::from_secs(n);
        let mut tr = Tracker::new(rules());
        // Written in pieces: the style image grows at each scan.
        for (i, size) in [100u64, 200, 300].iter().enumerate() {
            let scan = assemble(
                &[
                    inner("p", "content.png", 50, 1),
                    inner("p", "style.png", *size, 1 + i as u64),
                ],
                &[],
            );
            let d = tr.observe(&scan, t0 + s(4 * i as u64));
            assert!(d.is_empty(), "decided while still changing at scan {i}");
        }
        // Last change seen at t0+8: not yet stable at t0+12, ready at t0+13.
        let scan = assemble(
            &[
                inner("p", "content.png", 50, 1),
                inner("p", "style.png", 300, 3),
            ],
            &[],
        );
        assert_eq!(tr.next_deadline(t0 + s(9)), Some(s(4)));
        assert!(tr.observe(&scan, t0 + s(12)).is_empty());
        assert_eq!(ready_keys(&tr.observe(&scan, t0 + s(13))), ["dir:p"]);
        // Decided once only.
        assert!(tr.observe(&scan, t0 + s(100)).is_empty());
        assert_eq!(tr.next_deadline(t0 + s(100)), None);
        // After a transient failure the caller forgets it, and it is decided again once stable.
        tr.forget("dir:p");
        assert!(tr.observe(&scan, t0 + s(101)).is_empty());
        assert_eq!(ready_keys(&tr.observe(&scan, t0 + s(106))), ["dir:p"]);
    }

    #[test]
    fn an_mtime_change_alone_resets_stability() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(rules());
        let a = assemble(&[top("x.content.png", 9, 1), top("x.style.png", 9, 1)], &[]);
        let b = assemble(&[top("x.content.png", 9, 2), top("x.style.png", 9, 1)], &[]);
        assert!(tr.observe(&a, t0).is_empty());
        assert!(tr.observe(&b, t0 + Duration::from_secs(4)).is_empty());
        assert!(tr.observe(&b, t0 + Duration::from_secs(8)).is_empty());
        assert_eq!(
            ready_keys(&tr.observe(&b, t0 + Duration::from_secs(9))),
            ["flat:x"]
        );
    }

    #[test]
    fn a_marker_makes_a_complete_pair_ready_at_once() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(rules());
        let scan = assemble(
            &[
                inner("p", "content.png", 1, 1),
                inner("p", "style.png", 1, 1),
                inner("p", ".ready", 0, 1),
                top("q.content.png", 1, 1),
                top("q.style.png", 1, 1),
                top("q.pair.toml", 1, 1),
                top("r.content.png", 1, 1),
                top("r.style.png", 1, 1),
            ],
            &[],
        );
        assert_eq!(ready_keys(&tr.observe(&scan, t0)), ["dir:p", "flat:q"]);
        // A marker does not make an incomplete pair ready.
        let lone = assemble(&[top("s.content.png", 1, 1), top("s.ready", 0, 1)], &[]);
        let mut tr = Tracker::new(rules());
        assert!(tr.observe(&lone, t0).is_empty());
    }

    #[test]
    fn a_lone_image_or_stray_file_fails_after_the_timeout() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(rules());
        let scan = assemble(
            &[
                top("solo.content.png", 1, 1),
                inner("half", "style.png", 1, 1),
                top("random.txt", 1, 1),
            ],
            &[("void".into(), PathBuf::from("/w/void"))],
        );
        assert!(tr.observe(&scan, t0).is_empty());
        assert!(tr.observe(&scan, t0 + Duration::from_secs(59)).is_empty());
        let f = failed(&tr.observe(&scan, t0 + Duration::from_secs(60)));
        let keys: Vec<&str> = f.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["dir:half", "dir:void", "file:random.txt", "flat:solo"]
        );
        let reason = |k: &str| f.iter().find(|(key, _)| key == k).unwrap().1.clone();
        assert!(reason("flat:solo").contains("style image never arrived"));
        assert!(reason("dir:half").contains("content image never arrived"));
        assert!(reason("dir:void").contains("no content or style image"));
        assert!(reason("file:random.txt").contains("not part of a pair"));
    }

    #[test]
    fn a_lone_image_joined_by_its_partner_becomes_ready() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(rules());
        let lone = assemble(&[top("d.content.png", 1, 1)], &[]);
        assert!(tr.observe(&lone, t0).is_empty());
        let both = assemble(&[top("d.content.png", 1, 1), top("d.style.png", 1, 1)], &[]);
        let t = t0 + Duration::from_secs(58);
        assert!(tr.observe(&both, t).is_empty());
        assert_eq!(
            ready_keys(&tr.observe(&both, t + Duration::from_secs(5))),
            ["flat:d"]
        );
    }

    #[test]
    fn a_misnamed_pair_fails_once_stable() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(rules());
        let scan = assemble(
            &[
                inner("a", "content.png", 1, 1),
                inner("a", "content.webp", 1, 1),
                inner("a", "style.png", 1, 1),
            ],
            &[],
        );
        assert!(tr.observe(&scan, t0).is_empty());
        let f = failed(&tr.observe(&scan, t0 + Duration::from_secs(5)));
        assert_eq!(f.len(), 1);
        assert!(f[0].1.contains("more than one content image"), "{}", f[0].1);
    }

    #[test]
    fn vanished_candidates_are_dropped_and_come_back_fresh() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(rules());
        let scan = assemble(&[top("z.content.png", 1, 1), top("z.style.png", 1, 1)], &[]);
        assert!(tr.observe(&scan, t0).is_empty());
        assert!(tr
            .observe(&Scan::default(), t0 + Duration::from_secs(3))
            .is_empty());
        // It reappears: stability counts from its return, not from its first sighting.
        assert!(tr.observe(&scan, t0 + Duration::from_secs(6)).is_empty());
        assert_eq!(
            ready_keys(&tr.observe(&scan, t0 + Duration::from_secs(11))),
            ["flat:z"]
        );
    }

    #[test]
    fn a_retry_waits_for_its_time_and_backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(30));
        let waits: Vec<u64> = (0..6).map(|_| b.failed("k").as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 30, 30, 30]);
        assert_eq!(b.failures("k"), 6);
        assert_eq!(b.failed("other").as_secs(), 5);
        b.succeeded("k");
        assert_eq!((b.failures("k"), b.failed("k").as_secs()), (0, 5));
        // Many failures do not overflow.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(600));
        for _ in 0..100 {
            assert!(b.failed("x") <= Duration::from_secs(600));
        }

        let t0 = Instant::now();
        let mut tr = Tracker::new(rules());
        let scan = assemble(&[top("p.content.png", 1, 1), top("p.style.png", 1, 1)], &[]);
        assert!(tr.observe(&scan, t0).is_empty());
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(ready_keys(&tr.observe(&scan, t1)), ["flat:p"]);
        // Intake failed for a transient reason: retry in 20 s, not at the next scan.
        tr.retry_at("flat:p", t1 + Duration::from_secs(20));
        assert_eq!(tr.next_deadline(t1), Some(Duration::from_secs(20)));
        assert!(tr.observe(&scan, t1 + Duration::from_secs(1)).is_empty());
        assert!(tr.observe(&scan, t1 + Duration::from_secs(19)).is_empty());
        assert_eq!(
            ready_keys(&tr.observe(&scan, t1 + Duration::from_secs(20))),
            ["flat:p"]
        );
        // Decided again: nothing more until the next retry or change.
        assert!(tr.observe(&scan, t1 + Duration::from_secs(40)).is_empty());
        // A change during the wait needs the stability time too.
        tr.retry_at("flat:p", t1 + Duration::from_secs(50));
        let changed = assemble(&[top("p.content.png", 2, 2), top("p.style.png", 1, 1)], &[]);
        assert!(tr
            .observe(&changed, t1 + Duration::from_secs(48))
            .is_empty());
        assert!(tr
            .observe(&changed, t1 + Duration::from_secs(50))
            .is_empty());
        assert_eq!(
            ready_keys(&tr.observe(&changed, t1 + Duration::from_secs(53))),
            ["flat:p"]
        );
    }

    #[test]
    fn scan_reads_the_folder_and_skips_ignored_files() {
        let root = std::env::temp_dir().join(format!("ps-drop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("fox")).unwrap();
        std::fs::create_dir_all(root.join("failed/old")).unwrap();
        std::fs::create_dir_all(root.join("@eaDir")).unwrap();
        std::fs::write(root.join("fox/content.png"), b"a").unwrap();
        std::fs::write(root.join("fox/style.png.part"), b"b").unwrap();
        std::fs::write(root.join("fox/.ready"), b"").unwrap();
        std::fs::write(root.join("failed/old/content.png"), b"c").unwrap();
        std::fs::write(root.join("dog.content.png"), b"dd").unwrap();
        std::fs::write(root.join(".syncthing.dog.style.png.tmp"), b"e").unwrap();
        std::fs::write(root.join("Thumbs.db"), b"f").unwrap();
        let scan = scan(&root).unwrap();
        let keys: Vec<&str> = scan.candidates.keys().map(String::as_str).collect();
        assert_eq!(keys, ["dir:fox", "flat:dog"]);
        let fox = &scan.candidates["dir:fox"];
        assert!(fox.content.is_some() && fox.style.is_none() && fox.ready.is_some());
        assert_eq!(
            scan.candidates["flat:dog"]
                .content
                .as_ref()
                .unwrap()
                .stamp
                .size,
            2
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
