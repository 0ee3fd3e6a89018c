//! The training workflow through the real binary on the tiny SD1.5 fixture: train a style from a
//! generated pair, find it in the library, generate with it, export it, and resume a training run
//! that was killed mid-way to the same result as an uninterrupted run.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use image::{Rgb, RgbImage};

fn bin() -> Command {
    common::pairstyle_cmd("configs/tiny-train.toml")
}

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("train", name)
}

/// A 24×20 content image (a disc on a gradient) and its "stylised" version (inverted, posterised).
fn make_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let (w, h) = (24u32, 20u32);
    let content = RgbImage::from_fn(w, h, |x, y| {
        let inside = (x as i32 - 12).pow(2) + (y as i32 - 10).pow(2) < 36;
        if inside {
            Rgb([220, 40, 40])
        } else {
            Rgb([(x * 10) as u8, (y * 12) as u8, 128])
        }
    });
    let style = RgbImage::from_fn(w, h, |x, y| {
        let p = content.get_pixel(x, y).0;
        Rgb(p.map(|v| (255 - v) / 64 * 64))
    });
    let (c, s) = (dir.join("disc.content.png"), dir.join("disc.style.png"));
    content.save(&c).unwrap();
    style.save(&s).unwrap();
    (c, s)
}

fn train_cmd(model: &Path, c: &Path, s: &Path, lib: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["train", "--model"])
        .arg(model)
        .arg("--content")
        .arg(c)
        .arg("--style")
        .arg(s)
        .args([
            "--subject",
            "disc",
            "--style-desc",
            "inverted poster",
            "--name",
            "inv",
            "--out",
        ])
        .arg(lib);
    cmd
}

fn style_tensors(lib: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(lib.join("inv/style.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
}

#[test]
fn train_register_generate_export() {
    let dir = tmp("flow");
    let (c, s) = make_pair(&dir);
    let lib = dir.join("lib");
    let model = common::fixture("tiny-sd15");
    let o = train_cmd(&model, &c, &s, &lib).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("iter    6/6") && stdout.contains("it/s"),
        "{stdout}"
    );
    assert!(lib.join("inv/style.toml").is_file() && lib.join("inv/pair/disc.style.png").is_file());
    // The StyleLoRA learned something (B started at zero).
    let t = style_tensors(&lib);
    let b_norm: f32 = t
        .iter()
        .filter(|(k, _)| k.ends_with("lora_B.weight"))
        .map(|(_, v)| {
            v.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(b_norm > 0.0, "style B is still zero");
    assert_eq!(t.len(), 2 * 48, "A and B for every attention projection");
    // Training again under the same name is refused before any work.
    let o = train_cmd(&model, &c, &s, &lib).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already exists"));

    let o = bin()
        .args(["styles", "list", "--json", "--library"])
        .arg(&lib)
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["name"], "inv");
    assert_eq!(list[0]["prompt_suffix"], " in inverted poster style");

    let png = dir.join("styled.png");
    let o = bin()
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--prompt",
            "a photo of a cat",
            "--steps",
            "2",
            "--cfg",
            "4",
            "--seed",
            "3",
        ])
        .args([
            "--width",
            "16",
            "--height",
            "16",
            "--style",
            "inv=1.5",
            "--library",
        ])
        .arg(&lib)
        .arg("-o")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = pairstyle::engine::image_io::read_png_text(&png).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("\"lambda\":1.5"), "{params}");
    // An unknown style fails clearly.
    let o = bin()
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--prompt", "x", "--steps", "1", "--width", "16", "--height", "16", "--style", "nope",
        ])
        .args(["--library"])
        .arg(&lib)
        .arg("-o")
        .arg(dir.join("x.png"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nope"));

    for format in ["kohya", "peft"] {
        let out = dir.join(format!("inv.{format}.safetensors"));
        let o = bin()
            .args(["export", "inv", "--format", format, "--library"])
            .arg(&lib)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
        if format == "kohya" {
            assert!(t
                .keys()
                .any(|k| k.starts_with("lora_unet_") && k.ends_with(".alpha")));
        } else {
            assert!(t.keys().all(|k| k.starts_with("unet.")));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn killed_training_resumes_to_the_same_result() {
    let dir = tmp("resume");
    let (c, s) = make_pair(&dir);
    let model = common::fixture("tiny-sd15");

    // 30 iterations: long enough that the kill below lands well before the run could finish.
    let run = |lib: &Path| {
        let mut cmd = train_cmd(&model, &c, &s, lib);
        cmd.args(["--steps", "30"]);
        cmd
    };
    let straight = dir.join("straight");
    let o = run(&straight).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Start the same run, kill -9 it as soon as iteration 3 is reported (a checkpoint was written
    // after iteration 2), then run the same command again.
    let resumed = dir.join("resumed");
    let mut child = run(&resumed)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().contains("iter    3/30") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !resumed.join("inv").exists(),
        "a killed run must not register a style"
    );
    let o = run(&resumed).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("resuming from iteration"), "{out}");

    let (a, b) = (style_tensors(&straight), style_tensors(&resumed));
    assert_eq!(a.len(), b.len());
    for (k, ta) in &a {
        common::assert_close(&format!("resumed {k}"), &b[k], ta, 0.0);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn multi_pair_style_from_the_command_line() {
    let dir = tmp("multi");
    let (c1, s1) = make_pair(&dir);
    let sub = dir.join("second");
    std::fs::create_dir_all(&sub).unwrap();
    let (c2, s2) = make_pair(&sub);
    // A second, different pair: mirror it.
    for p in [&c2, &s2] {
        let img = image::open(p).unwrap().fliph();
        img.save(p).unwrap();
    }
    let lib = dir.join("lib");
    let model = common::fixture("tiny-sd15");
    // Mismatched counts fail before any work.
    let o = bin()
        .args(["train", "--model"])
        .arg(&model)
        .arg("--content")
        .arg(&c1)
        .arg("--content")
        .arg(&c2)
        .arg("--style")
        .arg(&s1)
        .args([
            "--subject",
            "disc",
            "--style-desc",
            "inverted poster",
            "--out",
        ])
        .arg(&lib)
        .output()
        .unwrap();
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("one style image per content image")
    );
    let o = bin()
        .args(["train", "--model"])
        .arg(&model)
        .arg("--content")
        .arg(&c1)
        .arg("--content")
        .arg(&c2)
        .arg("--style")
        .arg(&s1)
        .arg("--style")
        .arg(&s2)
        .args([
            "--subject",
            "disc",
            "--style-desc",
            "inverted poster",
            "--name",
            "duo",
            "--steps",
            "4",
            "--out",
        ])
        .arg(&lib)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta: toml::Value =
        toml::from_str(&std::fs::read_to_string(lib.join("duo/style.toml")).unwrap()).unwrap();
    assert_eq!(meta["content_sha256"].as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read_dir(lib.join("duo/pair")).unwrap().count(), 4);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn corrupt_or_missing_images_fail_clearly_and_register_nothing() {
    let dir = tmp("bad");
    let (c, s) = make_pair(&dir);
    let lib = dir.join("lib");
    let model = common::fixture("tiny-sd15");
    // Truncate the content PNG to half its bytes.
    let bytes = std::fs::read(&c).unwrap();
    let broken = dir.join("broken.png");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let o = train_cmd(&model, &broken, &s, &lib).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("broken.png"), "{err}");
    let o = train_cmd(&model, &dir.join("missing.png"), &s, &lib)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("missing.png"), "{err}");
    assert!(!lib.join("inv").exists());
    std::fs::remove_dir_all(&dir).ok();
}
