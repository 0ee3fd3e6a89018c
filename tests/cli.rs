//! The `pairstyle` binary: `generate` writes a PNG carrying its settings, and bad arguments fail
//! with a clear message and a non-zero status, before any output is written.

mod common;

use std::path::PathBuf;
use std::process::Command;

use pairstyle::engine::image_io::read_png_text;

fn bin() -> Command {
    common::pairstyle_cmd("../../config/pairstyle.toml")
}

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("cli", name)
}

#[test]
fn generate_writes_png_with_settings() {
    let dir = tmp("gen");
    let out = dir.join("dog.png");
    let model = common::fixture("tiny-sdxl");
    let o = bin()
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--prompt",
            "a red star",
            "--negative",
            "blurry",
            "--seed",
            "7",
            "--steps",
            "3",
        ])
        .args([
            "--cfg",
            "4",
            "--width",
            "24",
            "--height",
            "16",
            "--scheduler",
            "ddim",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("step   3/3"),
        "progress not printed: {stderr}"
    );
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (24, 16));
    let text = read_png_text(&out).unwrap();
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("prompt").as_deref(), Some("a red star"));
    assert_eq!(get("seed").as_deref(), Some("7"));
    assert_eq!(get("steps").as_deref(), Some("3"));
    assert_eq!(get("scheduler").as_deref(), Some("ddim"));
    let params: serde_json::Value = serde_json::from_str(&get("parameters").unwrap()).unwrap();
    assert_eq!(params["negative"], "blurry");

    // Same seed, same image.
    let out2 = dir.join("dog2.png");
    let o = bin()
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--prompt",
            "a red star",
            "--negative",
            "blurry",
            "--seed",
            "7",
            "--steps",
            "3",
        ])
        .args([
            "--cfg",
            "4",
            "--width",
            "24",
            "--height",
            "16",
            "--scheduler",
            "ddim",
            "-o",
        ])
        .arg(&out2)
        .output()
        .unwrap();
    assert!(o.status.success());
    let a = image::open(&out).unwrap().to_rgb8();
    let b = image::open(&out2).unwrap().to_rgb8();
    assert_eq!(a.as_raw(), b.as_raw());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_arguments_fail_clearly_and_write_nothing() {
    let dir = tmp("bad");
    let out = dir.join("x.png");
    let model = common::fixture("tiny-sd15");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--steps".into(), "0".into()], "--steps"),
        (
            vec![
                "--width".into(),
                "17".into(),
                "--height".into(),
                "16".into(),
            ],
            "17",
        ),
        (vec!["--scheduler".into(), "dpm".into()], "dpm"),
        (vec!["--cfg".into(), "nan".into()], "--cfg"),
    ];
    for (extra, needle) in cases {
        let o = bin()
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--prompt", "x", "-o"])
            .arg(&out)
            .args(&extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should fail");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!out.exists());
    }
    // A model folder that does not exist: the error names it.
    let o = bin()
        .args([
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt",
            "x",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("/nonexistent/model"),
        "{stderr}"
    );
    // Output that is not a PNG.
    let o = bin()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "x", "-o"])
        .arg(dir.join("x.jpg"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains(".png"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn info_and_config_commands() {
    let o = bin()
        .args(["info", "--model"])
        .arg(common::fixture("tiny-sdxl"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("Sdxl") && stdout.contains("EulerDiscreteScheduler"),
        "{stdout}"
    );
    let o = bin().args(["--dtype", "bf16", "config"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("dtype = \"bf16\""),
        "flag must override the file: {stdout}"
    );
}

#[test]
fn bench_cost_runs_on_a_tiny_setting() {
    let o = bin()
        .args(["bench", "cost", "--model"])
        .arg(common::fixture("tiny-sd15"))
        .args([
            "--latent", "8", "--rank", "2", "--reps", "1", "--styles", "0,2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for case in [
        "training iteration",
        "plain CFG (batch 2)",
        "2 style(s) (batch 4)",
    ] {
        assert!(stdout.contains(case), "{case} missing: {stdout}");
    }
}
