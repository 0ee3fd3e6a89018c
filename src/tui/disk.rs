//! What the terminal UI reads from disk itself, in the background: pictures (decoded to small
//! thumbnails), a style's pictures in its library folder, and the drop folder.
//!
//! The daemon's protocol reports paths (a style's folder, a generated PNG, the watch folder) and
//! the UI runs on the same machine (it reaches the daemon through a Unix socket), so reading the
//! files directly saves sending images over the socket. The drop-folder view uses the daemon's own
//! scanner ([`crate::daemon::dropfolder`]) so both agree on what a pair is; putting a failed pair
//! back is a rename inside the watch folder, which the daemon then sees like any new drop.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::state::{DropEntry, DropSnapshot, DropState, Picture, StyleAssets};
use super::TuiError;
use crate::daemon::dropfolder::{self, Role};

/// Largest side of a decoded picture kept in the UI's state.
pub const THUMBNAIL_SIDE: u32 = 160;
/// File extensions shown as pictures.
const PICTURE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Decode an image file into a thumbnail of at most [`THUMBNAIL_SIDE`] pixels a side.
pub fn load_picture(path: &Path) -> Result<Picture, TuiError> {
    let img = image::open(path).map_err(|e| TuiError::Picture {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let img = if img.width() > THUMBNAIL_SIDE || img.height() > THUMBNAIL_SIDE {
        img.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    } else {
        img
    };
    let rgb = img.to_rgb8();
    Ok(Picture {
        width: rgb.width(),
        height: rgb.height(),
        rgb: rgb.into_raw(),
    })
}

fn is_picture(p: &Path) -> bool {
    p.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| PICTURE_EXTENSIONS.contains(&e.as_str()))
}

fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// A style's pictures: the pair in `<dir>/pair/` (content first, then style), then images in the
/// style's folder itself and in `samples/` (a sample grid, a thumbnail).
pub fn find_style_assets(dir: &Path) -> StyleAssets {
    let mut pictures = Vec::new();
    let pair: Vec<PathBuf> = sorted_files(&dir.join("pair"))
        .into_iter()
        .filter(|p| is_picture(p))
        .collect();
    for role in ["content", "style"] {
        for p in pair
            .iter()
            .filter(|p| file_name(p).to_lowercase().contains(role))
        {
            pictures.push((role.to_string(), p.clone()));
        }
    }
    for p in &pair {
        if !pictures.iter().any(|(_, q)| q == p) {
            pictures.push((file_name(p), p.clone()));
        }
    }
    for folder in [dir.to_path_buf(), dir.join("samples")] {
        for p in sorted_files(&folder).into_iter().filter(|p| is_picture(p)) {
            let label = p
                .file_stem()
                .map(|s| s.to_string_lossy().replace(['_', '-'], " "))
                .unwrap_or_default();
            pictures.push((label, p));
        }
    }
    StyleAssets { pictures }
}

/// The `Reason:` of an `error.txt` written by the daemon (the first line of it).
pub fn failure_reason(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("Reason: "))
        .map(|r| r.trim().to_string())
}

fn is_error_file(name: &str) -> bool {
    name.starts_with("error") && name.ends_with(".txt")
}

/// Scan the watch folder as the daemon would: pending pairs with their state, then the pairs in
/// `failed/` with their reasons. `stability_secs` is the daemon's `[daemon] stability_secs`.
pub fn scan_drop_folder(watch: &Path, stability_secs: u64, now: SystemTime) -> DropSnapshot {
    let mut snap = DropSnapshot {
        watch: watch.to_path_buf(),
        ..Default::default()
    };
    match dropfolder::scan(watch) {
        Ok(scan) => {
            for c in scan.candidates.values() {
                let files: Vec<String> = c.files().iter().map(|f| file_name(&f.path)).collect();
                let state = if !c.is_complete() {
                    DropState::Incomplete {
                        reason: c.incompleteness(),
                    }
                } else if c.has_marker() {
                    DropState::Ready
                } else {
                    let newest = c.files().iter().filter_map(|f| f.stamp.mtime).max();
                    let age = newest
                        .and_then(|m| now.duration_since(m).ok())
                        .map_or(0, |d| d.as_secs());
                    if age >= stability_secs {
                        DropState::Ready
                    } else {
                        DropState::WaitingForStability {
                            secs_left: stability_secs - age,
                        }
                    }
                };
                snap.entries.push(DropEntry {
                    name: c.name.clone(),
                    state,
                    path: c.folder.clone().unwrap_or_else(|| watch.to_path_buf()),
                    files,
                });
            }
        }
        Err(e) => snap.error = Some(e.to_string()),
    }
    let failed = watch.join(crate::daemon::paths::FAILED_DIR);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&failed)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    for d in dirs {
        let files = sorted_files(&d);
        let reason = files
            .iter()
            .filter(|p| is_error_file(&file_name(p)))
            .find_map(|p| {
                std::fs::read_to_string(p)
                    .ok()
                    .as_deref()
                    .and_then(failure_reason)
            })
            .unwrap_or_else(|| "no error.txt".into());
        snap.entries.push(DropEntry {
            name: file_name(&d),
            state: DropState::Failed { reason },
            files: files
                .iter()
                .map(|p| file_name(p))
                .filter(|n| !is_error_file(n))
                .collect(),
            path: d,
        });
    }
    snap
}

/// The name a failed pair gets back: its folder name without the `.2`, `.3`... the daemon adds
/// when a name is taken in `failed/`.
pub fn base_name(folder: &str) -> &str {
    match folder.rsplit_once('.') {
        Some((base, n)) if !base.is_empty() && n.parse::<u32>().is_ok() => base,
        _ => folder,
    }
}

/// Put a failed pair back into the watch folder as `watch/<name>/` (a free name): the daemon's
/// `error.txt` is dropped and flat-form names become folder-form names (`x.content.png` →
/// `content.png`). The folder is prepared under a hidden name the scanner ignores, then renamed
/// into place, so the daemon never sees half of it. Returns the new folder.
pub fn retry_failed_pair(failed_dir: &Path, watch: &Path) -> Result<PathBuf, TuiError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TuiError::Io { path: p, source }
    };
    let folder = file_name(failed_dir);
    let name = base_name(&folder).to_string();
    let tmp = watch.join(format!(".retry-{folder}-{}", std::process::id()));
    std::fs::rename(failed_dir, &tmp).map_err(io(failed_dir))?;
    let result = (|| {
        for f in sorted_files(&tmp) {
            let n = file_name(&f);
            if is_error_file(&n) {
                std::fs::remove_file(&f).map_err(io(&f))?;
                continue;
            }
            let new = match dropfolder::flat_role(&n) {
                Some((_, Ok(Role::Content(ext)))) => format!("content.{ext}"),
                Some((_, Ok(Role::Style(ext)))) => format!("style.{ext}"),
                Some((_, Ok(Role::PairToml))) => dropfolder::PAIR_TOML.to_string(),
                Some((_, Ok(Role::Ready))) => dropfolder::READY_MARKER.to_string(),
                _ => continue,
            };
            let to = tmp.join(&new);
            if !to.exists() {
                std::fs::rename(&f, &to).map_err(io(&f))?;
            }
        }
        let mut dest = watch.join(&name);
        let mut n = 2;
        while dest.exists() {
            dest = watch.join(format!("{name}-{n}"));
            n += 1;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&tmp))?;
        Ok(dest)
    })();
    if result.is_err() {
        // Leave nothing hidden in the watch folder: the pair goes back where it was.
        let _ = std::fs::rename(&tmp, failed_dir);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ps-tui-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn png(path: &Path, w: u32, h: u32) {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 25) as u8 * 10, (y % 25) as u8 * 10, 99])
        })
        .save(path)
        .unwrap();
    }

    #[test]
    fn pictures_are_decoded_and_shrunk() {
        let d = scratch("pic");
        png(&d.join("a.png"), 400, 200);
        let p = load_picture(&d.join("a.png")).unwrap();
        assert_eq!((p.width, p.height), (160, 80));
        assert_eq!(p.rgb.len(), 160 * 80 * 3);
        std::fs::write(d.join("bad.png"), b"not a png").unwrap();
        assert!(load_picture(&d.join("bad.png")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn style_assets_list_pair_then_grid() {
        let d = scratch("assets");
        std::fs::create_dir_all(d.join("pair")).unwrap();
        png(&d.join("pair/style.png"), 4, 4);
        png(&d.join("pair/content.png"), 4, 4);
        png(&d.join("samples_grid.png"), 4, 4);
        std::fs::write(d.join("style.toml"), "x").unwrap();
        let a = find_style_assets(&d);
        let labels: Vec<&str> = a.pictures.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["content", "style", "samples grid"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn drop_folder_states_and_retry() {
        let w = scratch("drop");
        // Complete and old enough, complete and fresh, incomplete, failed (flat form).
        for n in ["old", "fresh"] {
            std::fs::create_dir_all(w.join(n)).unwrap();
            png(&w.join(n).join("content.png"), 4, 4);
            png(&w.join(n).join("style.png"), 4, 4);
        }
        png(&w.join("lone.style.png"), 4, 4);
        let f = w.join("failed/cut.2");
        std::fs::create_dir_all(&f).unwrap();
        png(&f.join("cut.content.png"), 4, 4);
        png(&f.join("cut.style.png"), 4, 4);
        std::fs::write(
            f.join("error.txt"),
            "pairstyle could not\n\nReason: content.png: truncated\n",
        )
        .unwrap();
        let now = SystemTime::now();
        // Pretend "old" was written a minute ago by scanning from the future for it.
        let snap = scan_drop_folder(&w, 5, now);
        let by_name = |n: &str| {
            snap.entries
                .iter()
                .find(|e| e.name == n)
                .unwrap()
                .state
                .clone()
        };
        assert!(
            matches!(by_name("fresh"), DropState::WaitingForStability { secs_left } if secs_left <= 5)
        );
        assert!(matches!(by_name("lone"), DropState::Incomplete { .. }));
        assert_eq!(
            by_name("cut.2"),
            DropState::Failed {
                reason: "content.png: truncated".into()
            }
        );
        let later = scan_drop_folder(&w, 5, now + Duration::from_secs(60));
        assert!(later
            .entries
            .iter()
            .any(|e| e.name == "old" && e.state == DropState::Ready));
        // Failed entries come last.
        assert_eq!(snap.entries.last().unwrap().name, "cut.2");

        let back = retry_failed_pair(&f, &w).unwrap();
        assert_eq!(back, w.join("cut"));
        assert!(!f.exists());
        let mut names: Vec<String> = sorted_files(&back).iter().map(|p| file_name(p)).collect();
        names.sort();
        assert_eq!(names, ["content.png", "style.png"]);
        let snap = scan_drop_folder(&w, 0, now + Duration::from_secs(60));
        assert!(snap
            .entries
            .iter()
            .any(|e| e.name == "cut" && e.state == DropState::Ready));
        std::fs::remove_dir_all(&w).unwrap();
    }

    #[test]
    fn base_names_drop_the_counter() {
        assert_eq!(base_name("cut.2"), "cut");
        assert_eq!(base_name("cut"), "cut");
        assert_eq!(base_name("v1.5"), "v1");
        assert_eq!(base_name("a.b"), "a.b");
    }
}
