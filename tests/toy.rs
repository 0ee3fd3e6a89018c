//! The `pairstyle toy render` command: writes a PNG carrying its caption, renders a random scene
//! from a seed, and fails naming an unknown caption word.

mod common;

use std::path::PathBuf;
use std::process::Command;

use pairstyle::engine::image_io::read_png_text;
use pairstyle::toy::Scene;

fn bin() -> Command {
    common::pairstyle_cmd("../../config/pairstyle.toml")
}

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("toy", name)
}

#[test]
fn render_writes_png_with_caption() {
    let dir = tmp("render");
    let out = dir.join("star.png");
    let caption = "a large red star on the left, on a grey background";
    let o = bin()
        .args(["toy", "render", "--prompt", caption, "--style", "sepia"])
        .args(["--resolution", "96", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = read_png_text(&out).unwrap();
    assert!(text.contains(&("caption".to_string(), caption.to_string())));
    assert!(text.contains(&("style".to_string(), "sepia".to_string())));
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (96, 96));

    // Random scene from a seed: the caption printed is the one stored, and parses.
    let out2 = dir.join("random.png");
    let o = bin()
        .args(["toy", "render", "--seed", "5", "-o"])
        .arg(&out2)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8_lossy(&o.stdout).trim().to_string();
    Scene::parse(&printed).unwrap();
    let text = read_png_text(&out2).unwrap();
    assert!(text.contains(&("caption".to_string(), printed)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_word_fails_naming_it() {
    let dir = tmp("bad");
    let out = dir.join("x.png");
    let o = bin()
        .args([
            "toy",
            "render",
            "--prompt",
            "a large mauve star on the left, on a grey background",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("mauve"), "{err}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
