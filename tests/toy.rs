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

/// With no model configured, every command uses the embedded toy model: it is installed once in
/// the cache dir and loaded from there through the ordinary model-folder code.
#[test]
fn embedded_model_is_the_default() {
    let dir = tmp("embedded");
    let cache = dir.join("cache");
    let o = bin()
        .env("PAIRSTYLE_CACHE_DIR", &cache)
        .arg("info")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("family:    Sd1"), "{stdout}");
    let installed = cache.join(format!(
        "toy-model-{}",
        pairstyle::toy::embedded::fingerprint()
    ));
    assert!(
        stdout.contains(&installed.display().to_string()),
        "{stdout}"
    );

    let png = dir.join("out.png");
    let o = bin()
        .env("PAIRSTYLE_CACHE_DIR", &cache)
        .args([
            "generate",
            "--prompt",
            "a small blue circle in the center, on a white background",
        ])
        .args(["--steps", "2", "--seed", "3", "-o"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64), "the model's native size");
    // `cfg = "auto"` (the default) takes the toy model's recommended scale from its
    // pairstyle.json, not Stable Diffusion's 7.5 (at which this model's colours collapse).
    let text = read_png_text(&png).unwrap();
    let cfg = text
        .iter()
        .find(|(k, _)| k == "cfg")
        .map(|(_, v)| v.as_str());
    assert_eq!(cfg, Some("2"), "{text:?}");

    // `toy model` writes the same folder anywhere, and refuses to overwrite.
    let copy = dir.join("copy");
    let o = bin()
        .args(["toy", "model", "-o"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (rel, bytes) in pairstyle::toy::embedded::FILES {
        assert_eq!(&std::fs::read(copy.join(rel)).unwrap(), bytes, "{rel}");
    }
    let o = bin()
        .args(["toy", "model", "-o"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `toy dataset` writes N renders and N captions of training scenes (no held-out combination).
#[test]
fn dataset_has_matching_images_and_captions() {
    let dir = tmp("dataset");
    let out = dir.join("data");
    let o = bin()
        .args(["toy", "dataset", "--count", "5", "--seed", "9", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t =
        candle_core::safetensors::load(out.join("images.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let images = &t["images"];
    assert_eq!(images.dims(), &[5, 64, 64, 3]);
    assert_eq!(images.dtype(), candle_core::DType::U8);
    let captions = std::fs::read_to_string(out.join("captions.txt")).unwrap();
    let captions: Vec<&str> = captions.lines().collect();
    assert_eq!(captions.len(), 5);
    for (i, c) in captions.iter().enumerate() {
        let scene = Scene::parse(c).unwrap();
        assert!(!scene.is_held_out(), "{c}");
        let img = images
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(
            img,
            scene.render(64).unwrap().into_raw(),
            "image {i} is the render of {c}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench method` runs end to end on a tiny setting with the embedded model and its table has
/// every method, for both prompt categories; the CSV has one row per (method, style, category).
#[test]
fn bench_method_quick_has_every_method() {
    let dir = tmp("bench-method");
    let out = dir.join("out");
    let o = bin()
        .env("PAIRSTYLE_CACHE_DIR", dir.join("cache"))
        .args([
            "bench", "method", "--quick", "--styles", "invert", "--steps", "2",
        ])
        .args(["--iterations", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    for m in pairstyle::bench::quality::Method::ALL {
        for cat in ["same", "different"] {
            assert!(
                md.contains(&format!("| {} | {cat} |", m.label())),
                "{} / {cat} missing:\n{md}",
                m.label()
            );
        }
    }
    let csv = std::fs::read_to_string(out.join("table.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + pairstyle::bench::quality::Method::ALL.len() * 2
    );
    let sheet = image::open(out.join("sheet.png")).unwrap();
    // columns: the pair + one prompt per category; rows: base, ground truth, the VAE floor,
    // 5 methods
    assert_eq!((sheet.width(), sheet.height()), (3 * 64, 8 * 64 + 4));
    assert!(md.contains("| gap base − floor (points) |"), "{md}");
    for m in ["single-image LoRA, LoRA scale", "pair, style guidance"] {
        assert!(
            md.lines()
                .filter(|l| l.starts_with(&format!("| {m} |")))
                .count()
                == 4,
            "{m}: two category rows, a per-style row and a gap row:\n{md}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
