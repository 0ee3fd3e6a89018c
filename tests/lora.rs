//! LoRA adapters: orthonormal down-projections, adapters on the tiny fixture UNets (scale 0,
//! per-sample scales, the hand formula), style files (save/load in every key spelling, metadata),
//! kohya/PEFT export, and clear errors for bad files.
//!
//! Tolerances: orthonormality is computed in f64 (1e-12); A_c·A_sᵀ in f32 (1e-6, a few f32 ulps of
//! sums of ≤ 64 products of unit-norm rows); batched vs separate UNet calls 1e-5 relative (same
//! f32 ops, different GEMM batch shapes); the adapted layer vs an f64 hand formula 1e-5 relative.
//! Save → load and export → load round trips are exact (f32 in, f32 out).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{get, refs, rel_err};
use pairstyle::engine::model_dir::{ModelDir, ModelFamily, Variant};
use pairstyle::engine::nn::AdapterScales;
use pairstyle::engine::noise::NoiseSource;
use pairstyle::engine::unet::{AddedCond, UNet};
use pairstyle::lora::export::{kohya_metadata, kohya_tensors};
use pairstyle::lora::file::{write_safetensors, PEFT_METADATA_KEY};
use pairstyle::lora::names::sgm_name;
use pairstyle::lora::orthogonal::path_seed;
use pairstyle::lora::{
    export_kohya, export_peft, kaiming_down, load, orthonormal_rows, read_metadata, save_peft,
    AdapterSet, ExportInfo, KeySpelling, LayerAdapter, LoadOptions, ModuleCatalog, OrthogonalBasis,
};

const MODELS: [&str; 2] = ["tiny-sd15", "tiny-sdxl"];

fn unet(model: &str) -> UNet {
    let dir = ModelDir::open(common::fixture(model)).unwrap();
    UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap()
}

/// A scratch folder unique to one test, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("pairstyle-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// A set on every projection of `u` with Kaiming A and random (nonzero) B.
fn random_set(u: &UNet, rank: usize, alpha: f64, seed: u64) -> AdapterSet {
    let mut set = AdapterSet::zeros_like_unet(u, rank, alpha, |path, n| {
        kaiming_down(rank, n, path_seed(seed, path), DType::F32, &Device::Cpu)
    })
    .unwrap();
    let mut noise = NoiseSource::new(seed ^ 0xb);
    for (_, l) in set.iter_mut() {
        let dims = l.up.dims().to_vec();
        l.up = (noise.randn(&dims, DType::F32, &Device::Cpu).unwrap() * 0.2).unwrap();
    }
    set
}

fn assert_sets_equal(a: &AdapterSet, b: &AdapterSet, what: &str) {
    let pa: Vec<&str> = a.iter().map(|(p, _)| p).collect();
    let pb: Vec<&str> = b.iter().map(|(p, _)| p).collect();
    assert_eq!(pa, pb, "{what}: layer paths differ");
    for (p, la) in a.iter() {
        let lb = b.get(p).unwrap();
        assert_eq!(max_abs_diff(&la.down, &lb.down), 0.0, "{what}: A of {p}");
        assert_eq!(max_abs_diff(&la.up, &lb.up), 0.0, "{what}: B of {p}");
        assert!(
            (la.alpha - lb.alpha).abs() < 1e-6,
            "{what}: alpha of {p}: {} vs {}",
            la.alpha,
            lb.alpha
        );
    }
}

/// UNet inputs of the fixture references (batch 3, one timestep per sample).
struct Inputs {
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    added: Option<AddedCond>,
}

fn inputs(model: &str) -> Inputs {
    let r = refs(model);
    Inputs {
        sample: get(&r, "unet.sample").clone(),
        timesteps: get(&r, "unet.timesteps").to_dtype(DType::F32).unwrap(),
        context: get(&r, "unet.encoder_hidden_states").clone(),
        added: r.get("unet.text_embeds").map(|te| AddedCond {
            text_embeds: te.clone(),
            time_ids: get(&r, "unet.time_ids").to_dtype(DType::F32).unwrap(),
        }),
    }
}

impl Inputs {
    fn narrow(&self, i: usize) -> Inputs {
        Inputs {
            sample: self.sample.narrow(0, i, 1).unwrap(),
            timesteps: self.timesteps.narrow(0, i, 1).unwrap(),
            context: self.context.narrow(0, i, 1).unwrap(),
            added: self.added.as_ref().map(|a| AddedCond {
                text_embeds: a.text_embeds.narrow(0, i, 1).unwrap(),
                time_ids: a.time_ids.narrow(0, i, 1).unwrap(),
            }),
        }
    }

    fn run(&self, u: &UNet, scales: &AdapterScales) -> Tensor {
        u.forward(
            &self.sample,
            &self.timesteps,
            &self.context,
            self.added.as_ref(),
            scales,
        )
        .unwrap()
    }
}

fn scales_of(pairs: &[(&str, &[f32])]) -> AdapterScales {
    let mut s = AdapterScales::none();
    for (name, v) in pairs {
        s.set(name, Tensor::new(*v, &Device::Cpu).unwrap());
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Orthogonality

#[test]
fn orthonormal_bases_are_orthonormal_in_f64() {
    let mut widths = BTreeSet::new();
    for m in MODELS {
        for l in unet(m).adaptable_linears() {
            widths.insert(l.dims().0);
        }
    }
    widths.insert(320);
    let mut worst = 0f64;
    for &n in &widths {
        let q = orthonormal_rows(n, 1234 + n as u64);
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..n).map(|c| q[i * n + c] * q[j * n + c]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                worst = worst.max((dot - want).abs());
            }
        }
    }
    println!("widths {widths:?}: max |Q·Qᵀ − I| = {worst:.3e}");
    assert!(worst <= 1e-12, "max |Q·Qᵀ − I| = {worst:e}");
}

#[test]
fn content_and_style_rows_are_orthogonal_on_every_layer() {
    let (rc, rs) = (8, 8);
    for m in MODELS {
        let u = unet(m);
        let basis = OrthogonalBasis::new(7);
        let (mut cross, mut self_err) = (0f64, 0f64);
        for l in u.adaptable_linears() {
            let n = l.dims().0;
            let ac = basis.content_rows(n, rc, DType::F32, &Device::Cpu).unwrap();
            let as_ = basis
                .style_rows(n, rc, rs, DType::F32, &Device::Cpu)
                .unwrap();
            assert_eq!(ac.dims(), [rc, n]);
            assert_eq!(as_.dims(), [rs, n]);
            cross = cross.max(max_abs(&ac.matmul(&as_.t().unwrap()).unwrap()));
            let eye = Tensor::eye(rc, DType::F32, &Device::Cpu).unwrap();
            let g = ac.matmul(&ac.t().unwrap()).unwrap();
            self_err = self_err.max(max_abs_diff(&g, &eye));
        }
        println!(
            "{m}: {} layers, max |A_c·A_sᵀ| = {cross:.3e}, max |A_c·A_cᵀ − I| = {self_err:.3e}",
            u.adaptable_linears().len()
        );
        assert!(cross <= 1e-6, "{m}: max |A_c·A_sᵀ| = {cross:e}");
        assert!(self_err <= 1e-6, "{m}: max |A_c·A_cᵀ − I| = {self_err:e}");
        // Same seed, same basis; rows beyond the width are refused.
        let again = OrthogonalBasis::new(7)
            .style_rows(16, rc, rs, DType::F32, &Device::Cpu)
            .unwrap();
        let first = basis
            .style_rows(16, rc, rs, DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(max_abs_diff(&again, &first), 0.0);
        assert!(basis
            .style_rows(16, rc, 9, DType::F32, &Device::Cpu)
            .is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Adapters on the UNet

#[test]
fn catalog_from_config_lists_the_unet_layers() {
    for m in MODELS {
        let u = unet(m);
        let from_unet: Vec<String> = u
            .adaptable_linears()
            .iter()
            .map(|l| l.path().to_string())
            .collect();
        let cat = ModuleCatalog::from_config(u.config());
        let from_cfg: Vec<String> = cat.entries().iter().map(|e| e.path.clone()).collect();
        assert_eq!(from_cfg, from_unet, "{m}");
        assert!(
            cat.entries().iter().all(|e| e.sgm.is_some()),
            "{m}: every layer has an SGM name"
        );
    }
}

#[test]
fn scale_zero_reproduces_the_base_model_exactly() {
    for m in MODELS {
        let mut u = unet(m);
        let x = inputs(m);
        let base = x.run(&u, &AdapterScales::none());
        let set = random_set(&u, 4, 4.0, 1);
        set.attach(&mut u, "style").unwrap();
        let zero = x.run(&u, &scales_of(&[("style", &[0.0, 0.0, 0.0])]));
        let inactive = x.run(&u, &AdapterScales::none());
        let one = x.run(&u, &scales_of(&[("style", &[1.0, 1.0, 1.0])]));
        assert_eq!(max_abs_diff(&zero, &base), 0.0, "{m}: scale 0");
        assert_eq!(max_abs_diff(&inactive, &base), 0.0, "{m}: inactive adapter");
        let moved = rel_err(&one, &base);
        println!("{m}: scale 1 moves the output by {moved:.3e} (relative)");
        assert!(moved > 1e-3, "{m}: the adapter has no effect ({moved:e})");
        AdapterSet::detach(&mut u, "style");
        let detached = x.run(&u, &scales_of(&[("style", &[1.0, 1.0, 1.0])]));
        assert_eq!(max_abs_diff(&detached, &base), 0.0, "{m}: detached");
        // A fresh set (B = 0) changes nothing at any scale.
        let fresh = AdapterSet::zeros_like_unet(&u, 4, 4.0, |path, n| {
            kaiming_down(4, n, path_seed(3, path), DType::F32, &Device::Cpu)
        })
        .unwrap();
        assert_eq!(fresh.len(), u.adaptable_linears().len());
        fresh.attach(&mut u, "fresh").unwrap();
        let f = x.run(&u, &scales_of(&[("fresh", &[1.0, 2.0, 3.0])]));
        assert_eq!(max_abs_diff(&f, &base), 0.0, "{m}: zero B");
    }
}

#[test]
fn per_sample_scales_in_one_batch_equal_separate_calls() {
    for m in MODELS {
        let mut u = unet(m);
        let x = inputs(m);
        random_set(&u, 4, 4.0, 1).attach(&mut u, "content").unwrap();
        random_set(&u, 8, 4.0, 2).attach(&mut u, "style").unwrap();
        let sc: [f32; 3] = [1.0, 0.0, 0.5];
        let ss: [f32; 3] = [0.0, 1.0, 1.5];
        let batched = x.run(&u, &scales_of(&[("content", &sc), ("style", &ss)]));
        let mut worst = 0f64;
        for i in 0..3 {
            let one = x.narrow(i).run(
                &u,
                &scales_of(&[("content", &[sc[i]]), ("style", &[ss[i]])]),
            );
            worst = worst.max(rel_err(&batched.narrow(0, i, 1).unwrap(), &one));
        }
        println!("{m}: batched vs separate, max relative error {worst:.3e}");
        assert!(worst <= 1e-5, "{m}: {worst:e}");
    }
}

#[test]
fn adapted_layer_equals_the_hand_formula() {
    let model = "tiny-sd15";
    let mut u = unet(model);
    let weights = candle_core::safetensors::load(
        common::fixture(model).join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (rank, alpha) = (4, 6.0);
    let set = random_set(&u, rank, alpha, 5);
    set.attach(&mut u, "style").unwrap();
    let scales = [0.3f32, -1.2];
    let targets = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    ];
    let mut noise = NoiseSource::new(9);
    for path in targets {
        let lin = u
            .adaptable_linears()
            .into_iter()
            .find(|l| l.path() == path)
            .unwrap();
        let (n_in, n_out) = lin.dims();
        let x = noise
            .randn(&[2, 5, n_in], DType::F32, &Device::Cpu)
            .unwrap();
        let y = lin.forward(&x, &scales_of(&[("style", &scales)])).unwrap();
        // Hand formula in f64: W0·x + b + s·(α/r)·B(A·x).
        let f = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let w0 = f(&weights[&format!("{path}.weight")]);
        let b0 = weights.get(&format!("{path}.bias")).map(f);
        let l = set.get(path).unwrap();
        let (a, bm) = (f(&l.down), f(&l.up));
        let xs = f(&x);
        let mut want = Vec::with_capacity(2 * 5 * n_out);
        for s in 0..2 {
            for t in 0..5 {
                let xv = &xs[(s * 5 + t) * n_in..(s * 5 + t + 1) * n_in];
                let h: Vec<f64> = (0..rank)
                    .map(|k| (0..n_in).map(|c| a[k * n_in + c] * xv[c]).sum())
                    .collect();
                for o in 0..n_out {
                    let base: f64 = (0..n_in).map(|c| w0[o * n_in + c] * xv[c]).sum::<f64>()
                        + b0.as_ref().map_or(0.0, |b| b[o]);
                    let delta: f64 = (0..rank).map(|k| bm[o * rank + k] * h[k]).sum();
                    want.push(base + scales[s] as f64 * (alpha / rank as f64) * delta);
                }
            }
        }
        let want = Tensor::from_vec(want, (2, 5, n_out), &Device::Cpu).unwrap();
        let err = rel_err(&y, &want);
        println!("{path}: adapted layer vs hand formula, relative error {err:.3e}");
        assert!(err <= 1e-5, "{path}: {err:e}");
    }
}

#[test]
fn attach_names_missing_layers_and_attaches_nothing_then() {
    let mut u = unet("tiny-sd15");
    let x = inputs("tiny-sd15");
    let base = x.run(&u, &AdapterScales::none());
    let mut set = random_set(&u, 4, 4.0, 1);
    let a = Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((16, 4), DType::F32, &Device::Cpu).unwrap();
    let bogus = "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q";
    set.insert(bogus, LayerAdapter::new(a, b, 4.0).unwrap())
        .unwrap();
    let err = set.attach(&mut u, "style").unwrap_err().to_string();
    assert!(err.contains(bogus), "{err}");
    let after = x.run(&u, &scales_of(&[("style", &[1.0, 1.0, 1.0])]));
    assert_eq!(
        max_abs_diff(&after, &base),
        0.0,
        "nothing attached after an error"
    );
    // Wrong width.
    let mut set = AdapterSet::new(4, 4.0);
    let path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
    let a = Tensor::zeros((4, 99), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((16, 4), DType::F32, &Device::Cpu).unwrap();
    set.insert(path, LayerAdapter::new(a, b, 4.0).unwrap())
        .unwrap();
    let err = set.attach(&mut u, "style").unwrap_err().to_string();
    assert!(err.contains(path), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Files

#[test]
fn peft_save_load_round_trip_with_metadata() {
    let dir = scratch("peft");
    for m in MODELS {
        let u = unet(m);
        let cat = ModuleCatalog::from_unet(&u);
        let set = random_set(&u, 4, 4.0, 11);
        let mut meta = BTreeMap::new();
        meta.insert(
            "pairstyle.style_description".to_string(),
            "ink wash, « sumi-e » 水墨".to_string(),
        );
        meta.insert("pairstyle.lambda".to_string(), "3.5".to_string());
        meta.insert("pairstyle.pair_sha256".to_string(), "ab".repeat(32));
        let file = dir.join(format!("{m}-style.safetensors"));
        save_peft(&set, &file, &meta).unwrap();
        assert_eq!(
            read_metadata(&file).unwrap(),
            meta,
            "{m}: header-only metadata read"
        );
        let loaded = load(&file, &cat, &LoadOptions::default()).unwrap();
        assert_eq!(
            loaded.metadata, meta,
            "{m}: metadata (alpha = rank adds no key)"
        );
        assert_eq!(loaded.spellings, BTreeSet::from([KeySpelling::Peft]));
        assert!(loaded.ignored_keys.is_empty());
        assert_eq!((loaded.set.rank(), loaded.set.alpha()), (4, 4.0));
        assert_sets_equal(&set, &loaded.set, m);
        let names: Vec<String> = candle_core::safetensors::load(&file, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        assert!(names.iter().all(|k| k.starts_with("unet.")
            && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))));

        // alpha ≠ rank: the PEFT config goes into the metadata and the scale survives.
        let mut set2 = random_set(&u, 4, 2.0, 12);
        let first = set2.iter().next().unwrap().0.to_string();
        set2.get_mut(&first).unwrap().alpha = 8.0;
        let file2 = dir.join(format!("{m}-alpha.safetensors"));
        save_peft(&set2, &file2, &BTreeMap::new()).unwrap();
        let loaded2 = load(&file2, &cat, &LoadOptions::default()).unwrap();
        assert!(loaded2.metadata.contains_key(PEFT_METADATA_KEY));
        assert_eq!(loaded2.set.alpha(), 2.0);
        assert_sets_equal(&set2, &loaded2.set, &format!("{m} alpha"));
    }
}

/// Write `set` under keys made by `key(path, sgm, role)` (role: "down", "up", "alpha"), alphas only
/// when `with_alpha`.
fn write_spelling(
    file: &Path,
    set: &AdapterSet,
    cat: &ModuleCatalog,
    with_alpha: bool,
    key: impl Fn(&str, &str, &str) -> String,
) {
    let mut tensors = Vec::new();
    for (p, l) in set.iter() {
        let sgm = cat.get(p).unwrap().sgm.clone().unwrap();
        tensors.push((key(p, &sgm, "down"), l.down.clone()));
        tensors.push((key(p, &sgm, "up"), l.up.clone()));
        if with_alpha {
            tensors.push((
                key(p, &sgm, "alpha"),
                Tensor::new(l.alpha as f32, &Device::Cpu).unwrap(),
            ));
        }
    }
    write_safetensors(file, tensors, &BTreeMap::new()).unwrap();
}

fn processor_form(p: &str) -> String {
    // `…attn1.to_q` → `…attn1.processor.to_q`, `…attn1.to_out.0` → `…attn1.processor.to_out`.
    let p = p.strip_suffix(".0").unwrap_or(p);
    let (head, proj) = p.rsplit_once('.').unwrap();
    format!("{head}.processor.{proj}")
}

#[test]
fn every_key_spelling_loads_to_the_same_layers() {
    let dir = scratch("spellings");
    for m in MODELS {
        let u = unet(m);
        let cat = ModuleCatalog::from_unet(&u);
        let set = random_set(&u, 4, 4.0, 21);
        let mut with_alpha = set.clone();
        for (_, l) in with_alpha.iter_mut() {
            l.alpha = 2.5;
        }
        type KeyFn = Box<dyn Fn(&str, &str, &str) -> String>;
        let pick = |role: &str, d: &'static str, u: &'static str, a: &'static str| match role {
            "down" => d,
            "up" => u,
            _ => a,
        };
        let cases: Vec<(&str, bool, KeySpelling, KeyFn)> = vec![
            (
                "peft-bare",
                false,
                KeySpelling::Peft,
                Box::new(move |p, _, r| {
                    format!("{p}.{}", pick(r, "lora_A.weight", "lora_B.weight", "alpha"))
                }),
            ),
            (
                "peft-base-model",
                false,
                KeySpelling::Peft,
                Box::new(move |p, _, r| {
                    format!(
                        "base_model.model.{p}.{}",
                        pick(r, "lora_A.weight", "lora_B.weight", "alpha")
                    )
                }),
            ),
            (
                "peft-default",
                false,
                KeySpelling::Peft,
                Box::new(move |p, _, r| {
                    format!(
                        "unet.{p}.{}",
                        pick(r, "lora_A.default.weight", "lora_B.default.weight", "alpha")
                    )
                }),
            ),
            (
                "diffusers-lora",
                true,
                KeySpelling::DiffusersLora,
                Box::new(move |p, _, r| {
                    format!(
                        "unet.{p}.{}",
                        pick(r, "lora.down.weight", "lora.up.weight", "alpha")
                    )
                }),
            ),
            (
                "attn-processor",
                true,
                KeySpelling::AttnProcessor,
                Box::new(move |p, _, r| {
                    format!(
                        "unet.{}{}",
                        processor_form(p),
                        pick(r, "_lora.down.weight", "_lora.up.weight", "_lora.alpha")
                    )
                }),
            ),
            (
                "lora-linear-layer",
                false,
                KeySpelling::LoraLinearLayer,
                Box::new(move |p, _, r| {
                    format!(
                        "{p}.{}",
                        pick(
                            r,
                            "lora_linear_layer.down.weight",
                            "lora_linear_layer.up.weight",
                            "alpha"
                        )
                    )
                }),
            ),
            (
                "kohya-diffusers",
                true,
                KeySpelling::Kohya,
                Box::new(move |p, _, r| {
                    format!(
                        "lora_unet_{}.{}",
                        p.replace('.', "_"),
                        pick(r, "lora_down.weight", "lora_up.weight", "alpha")
                    )
                }),
            ),
            (
                "kohya-sgm",
                true,
                KeySpelling::Kohya,
                Box::new(move |_, s, r| {
                    format!(
                        "lora_unet_{}.{}",
                        s.replace('.', "_"),
                        pick(r, "lora_down.weight", "lora_up.weight", "alpha")
                    )
                }),
            ),
            (
                "kohya-no-alpha",
                false,
                KeySpelling::Kohya,
                Box::new(move |p, _, r| {
                    format!(
                        "lora_unet_{}.{}",
                        p.replace('.', "_"),
                        pick(r, "lora_down.weight", "lora_up.weight", "alpha")
                    )
                }),
            ),
        ];
        for (name, alpha, spelling, key) in cases {
            let file = dir.join(format!("{m}-{name}.safetensors"));
            let src = if alpha { &with_alpha } else { &set };
            write_spelling(&file, src, &cat, alpha, key);
            let loaded = load(&file, &cat, &LoadOptions::default())
                .unwrap_or_else(|e| panic!("{m} {name}: {e}"));
            assert_eq!(loaded.spellings, BTreeSet::from([spelling]), "{m} {name}");
            // Without alpha the scale is 1 (alpha = rank), like the reference and kohya.
            assert_sets_equal(src, &loaded.set, &format!("{m} {name}"));
        }
    }
}

#[test]
fn kohya_sdxl_export_maps_back_to_the_same_layers() {
    let dir = scratch("kohya");
    let u = unet("tiny-sdxl");
    let cat = ModuleCatalog::from_unet(&u);
    let set = random_set(&u, 4, 4.0, 31);
    let mut info = ExportInfo::new(ModelFamily::Sdxl, "ink-wash");
    info.trigger_phrase = Some("in ink wash style".into());
    info.train_resolution = Some(512);
    info.steps = Some(750);
    info.seed = Some(42);
    info.training_started_at = Some(1_714_521_000.5);
    info.training_finished_at = Some(1_714_521_600.0);
    info.extra.insert("pairstyle.subject".into(), "dog".into());
    let file = dir.join("ink-wash.safetensors");
    export_kohya(&set, &cat, &info, &file).unwrap();

    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    assert_eq!(tensors.len(), 3 * set.len());
    for k in tensors.keys() {
        assert!(
            [
                "lora_unet_input_blocks_",
                "lora_unet_middle_block_1_",
                "lora_unet_output_blocks_"
            ]
            .iter()
            .any(|p| k.starts_with(p)),
            "{k}: SDXL kohya keys use SGM names"
        );
    }
    // tiny-sdxl has 2 resnets per down block: down_blocks.1.attentions.j = input_blocks.(4 + j).1,
    // up_blocks.0.attentions.j = output_blocks.j.1.
    for (d, s) in [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        ),
        (
            "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_out.0",
            "input_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
        ),
        (
            "mid_block.attentions.0.transformer_blocks.1.attn2.to_v",
            "middle_block_1_transformer_blocks_1_attn2_to_v",
        ),
        (
            "up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_k",
            "output_blocks_2_1_transformer_blocks_1_attn1_to_k",
        ),
    ] {
        assert_eq!(sgm_name(d, u.config()).unwrap().replace('.', "_"), s);
        let l = set.get(d).unwrap();
        assert_eq!(
            max_abs_diff(
                &tensors[&format!("lora_unet_{s}.lora_down.weight")],
                &l.down
            ),
            0.0
        );
        assert_eq!(
            max_abs_diff(&tensors[&format!("lora_unet_{s}.lora_up.weight")], &l.up),
            0.0
        );
        assert_eq!(
            tensors[&format!("lora_unet_{s}.alpha")].dims(),
            [] as [usize; 0]
        );
    }

    let meta = read_metadata(&file).unwrap();
    assert_eq!(meta, kohya_metadata(&set, &info));
    for (k, v) in [
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "4.0"),
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("ss_output_name", "ink-wash"),
        ("ss_resolution", "(512, 512)"),
        ("ss_steps", "750"),
        ("ss_seed", "42"),
        ("ss_training_finished_at", "1714521600.0"),
        ("modelspec.sai_model_spec", "1.0.1"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        (
            "modelspec.implementation",
            "https://github.com/Stability-AI/generative-models",
        ),
        ("modelspec.title", "ink-wash"),
        ("modelspec.resolution", "1024x1024"),
        ("modelspec.date", "2024-05-01T00:00:00"),
        ("modelspec.trigger_phrase", "in ink wash style"),
        ("pairstyle.subject", "dog"),
    ] {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(meta["modelspec.usage_hint"].contains("style guidance"));
    assert!(meta["modelspec.usage_hint"].contains("approximates"));

    let loaded = load(&file, &cat, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.spellings, BTreeSet::from([KeySpelling::Kohya]));
    assert_eq!(loaded.metadata, meta);
    assert_sets_equal(&set, &loaded.set, "kohya sdxl");
    // The catalog from the config alone (no weights) resolves the same names.
    let loaded = load(
        &file,
        &ModuleCatalog::from_config(u.config()),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_sets_equal(&set, &loaded.set, "kohya sdxl, config-only catalog");
}

#[test]
fn kohya_sd15_export_and_peft_export() {
    let dir = scratch("sd15-export");
    let u = unet("tiny-sd15");
    let cat = ModuleCatalog::from_unet(&u);
    let set = random_set(&u, 4, 2.0, 41);
    let info = ExportInfo::new(ModelFamily::Sd1, "sd15-style");
    let names: Vec<String> = kohya_tensors(&set, &cat, ModelFamily::Sd1)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(names.contains(
        &"lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0.alpha"
            .to_string()
    ));
    assert!(names.iter().all(|k| k.starts_with("lora_unet_down_blocks_")
        || k.starts_with("lora_unet_mid_block_")
        || k.starts_with("lora_unet_up_blocks_")));
    let file = dir.join("kohya.safetensors");
    export_kohya(&set, &cat, &info, &file).unwrap();
    let loaded = load(&file, &cat, &LoadOptions::default()).unwrap();
    assert_sets_equal(&set, &loaded.set, "kohya sd15");
    assert_eq!(loaded.metadata["ss_base_model_version"], "sd_v1");
    assert_eq!(
        loaded.metadata["modelspec.architecture"],
        "stable-diffusion-v1/lora"
    );
    assert_eq!(loaded.metadata["modelspec.implementation"], "diffusers");
    assert_eq!(loaded.metadata["ss_network_alpha"], "2.0");

    let file = dir.join("peft.safetensors");
    export_peft(&set, &info, &file).unwrap();
    let loaded = load(&file, &cat, &LoadOptions::default()).unwrap();
    assert_sets_equal(&set, &loaded.set, "peft export");
    let cfg: serde_json::Value = serde_json::from_str(&loaded.metadata[PEFT_METADATA_KEY]).unwrap();
    assert_eq!(cfg["unet.r"], 4);
    assert_eq!(cfg["unet.lora_alpha"], 2);
    assert_eq!(
        cfg["unet.target_modules"].as_array().unwrap().len(),
        set.len()
    );
    assert_eq!(loaded.metadata["format"], "pt");
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn corrupt_truncated_and_missing_files_name_the_file() {
    let dir = scratch("corrupt");
    let u = unet("tiny-sd15");
    let cat = ModuleCatalog::from_unet(&u);
    let set = random_set(&u, 4, 4.0, 51);
    let good = dir.join("good.safetensors");
    save_peft(&set, &good, &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated.safetensors", bytes[..bytes.len() / 2].to_vec()),
        ("header-cut.safetensors", bytes[..20].to_vec()),
        ("empty.safetensors", Vec::new()),
        (
            "garbage.safetensors",
            b"this is not a safetensors file at all".to_vec(),
        ),
    ];
    for (name, data) in cases {
        let f = dir.join(name);
        std::fs::write(&f, data).unwrap();
        let err = load(&f, &cat, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        println!("{name}: {err}");
        assert!(err.contains(&f.display().to_string()), "{name}: {err}");
        let err = read_metadata(&f);
        if let Err(e) = err {
            assert!(e.to_string().contains(name), "{name}: {e}");
        }
    }
    let missing = dir.join("missing.safetensors");
    let err = load(&missing, &cat, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
    // No leftover temporary files from the atomic writes.
    let leftovers: Vec<_> = std::fs::read_dir(&*dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn unmatched_and_incomplete_keys_are_named() {
    let dir = scratch("unmatched");
    let u = unet("tiny-sd15");
    let cat = ModuleCatalog::from_unet(&u);
    let set = random_set(&u, 4, 4.0, 61);
    let mut tensors = pairstyle::lora::file::peft_tensors(&set).unwrap();
    let stray = "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight";
    tensors.push((
        stray.into(),
        Tensor::zeros((4, 16, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    ));
    let te = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight";
    tensors.push((
        te.into(),
        Tensor::zeros((64, 4), DType::F32, &Device::Cpu).unwrap(),
    ));
    let f = dir.join("stray.safetensors");
    write_safetensors(&f, tensors, &BTreeMap::new()).unwrap();
    let err = load(&f, &cat, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(
        err.contains(stray) && err.contains(te) && err.contains("stray.safetensors"),
        "{err}"
    );
    let lenient = LoadOptions {
        strict: false,
        ..LoadOptions::default()
    };
    let loaded = load(&f, &cat, &lenient).unwrap();
    assert_eq!(
        loaded.ignored_keys,
        vec![te.to_string(), stray.to_string()],
        "sorted"
    );
    assert_sets_equal(&set, &loaded.set, "lenient");

    // A down-projection without its up-projection.
    let mut tensors = pairstyle::lora::file::peft_tensors(&set).unwrap();
    let (path, _) = set.iter().next().unwrap();
    let b_key = format!("unet.{path}.lora_B.weight");
    tensors.retain(|(k, _)| *k != b_key);
    let f = dir.join("half.safetensors");
    write_safetensors(&f, tensors, &BTreeMap::new()).unwrap();
    let err = load(&f, &cat, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("unet.{path}.lora_A.weight")), "{err}");

    // Widths of another model.
    let other = unet("tiny-sdxl");
    let f = dir.join("sd15-on-sdxl.safetensors");
    let sd15 = ModuleCatalog::from_unet(&unet("tiny-sd15"));
    let mut shifted = AdapterSet::new(4, 4.0);
    let p = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k";
    let l = set.get(p).unwrap().clone();
    shifted.insert(p, l).unwrap();
    export_kohya(&shifted, &sd15, &ExportInfo::new(ModelFamily::Sd1, "x"), &f).unwrap();
    let err = load(
        &f,
        &ModuleCatalog::from_unet(&other),
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(p) || err.contains("to_k"), "{err}");
}

#[test]
fn half_precision_kohya_files_load_as_f32() {
    let dir = scratch("f16");
    let u = unet("tiny-sdxl");
    let cat = ModuleCatalog::from_unet(&u);
    let set = random_set(&u, 4, 4.0, 71);
    let tensors: Vec<(String, Tensor)> = kohya_tensors(&set, &cat, ModelFamily::Sdxl)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = if k.ends_with(".alpha") {
                Tensor::new(&[3.0f32], &Device::Cpu).unwrap()
            } else {
                t
            };
            (k, t.to_dtype(DType::F16).unwrap())
        })
        .collect();
    let f = dir.join("f16.safetensors");
    write_safetensors(&f, tensors, &BTreeMap::new()).unwrap();
    let loaded = load(&f, &cat, &LoadOptions::default()).unwrap();
    for (p, l) in set.iter() {
        let got = loaded.set.get(p).unwrap();
        assert_eq!(got.down.dtype(), DType::F32);
        let want = l.up.to_dtype(DType::F16).unwrap();
        assert_eq!(max_abs_diff(&got.up, &want), 0.0, "{p}");
        assert_eq!(got.alpha, 3.0, "alpha stored as a [1] f16 tensor");
    }
}
