//! Helpers shared by the integration tests: fixture paths and numeric comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(rel)
}

/// Reference tensors of a tiny model: `tests/fixtures/refs/<model>.safetensors`.
pub fn refs(model: &str) -> HashMap<String, Tensor> {
    let p = fixture(&format!("refs/{model}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", p.display()))
}

/// Reference metadata of a tiny model: `tests/fixtures/refs/<model>.json`.
pub fn refs_json(model: &str) -> serde_json::Value {
    let p = fixture(&format!("refs/{model}.json"));
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

/// One reference tensor, panicking with its name if absent.
pub fn get<'a>(refs: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    refs.get(name)
        .unwrap_or_else(|| panic!("reference tensor {name} missing from fixtures"))
}

/// Max-norm relative error: max|ours − ref| / max(max|ref|, 1e-12), computed in f64.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(
        ours.dims(),
        reference.dims(),
        "shape differs from reference"
    );
    let a = ours.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = reference
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    diff / scale.max(1e-12)
}

/// Assert `rel_err(ours, reference) <= tol`, printing the measured value either way
/// (run tests with `--nocapture` to see it).
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let e = rel_err(ours, reference);
    println!("{what}: max relative error {e:.3e} (tolerance {tol:.0e})");
    assert!(
        e <= tol,
        "{what}: max relative error {e:.3e} exceeds {tol:.0e}"
    );
}

/// The `pairstyle` binary with `$PAIRSTYLE_CONFIG` set to `config` (relative to `tests/fixtures`),
/// so a developer's own config file never leaks into a test.
pub fn pairstyle_cmd(config: &str) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pairstyle"));
    c.env("PAIRSTYLE_CONFIG", fixture(config));
    c
}

/// An empty scratch folder `<tmp>/pairstyle-<suite>-<pid>-<name>`.
pub fn scratch_dir(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pairstyle-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
