//! Tokenizers, CLIP text encoders and prompt conditioning against the diffusers/transformers
//! references in `tests/fixtures/refs` (run with `--nocapture` to see the measured errors).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, get, refs, refs_json};
use pairstyle::engine::model_dir::{ModelDir, ModelFamily, Variant};
use pairstyle::engine::text::{ClipTextEncoder, ClipTokenizer, PromptEncoder};
use pairstyle::Error;

/// Text-encoder outputs must match within this max relative error (f32).
const TOL: f64 = 1e-4;

fn prompts(model: &str) -> Vec<String> {
    let json = refs_json(model);
    json["prompts"]
        .as_array()
        .unwrap_or_else(|| panic!("refs/{model}.json has no prompts list"))
        .iter()
        .map(|p| p.as_str().expect("prompt is a string").to_string())
        .collect()
}

/// The reference ids `[P, 77]` as rows of u32.
fn ref_ids(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

fn check_tokenizer(model: &str, component: &str, refname: &str) {
    let tok = ClipTokenizer::from_dir(fixture(&format!("{model}/{component}"))).unwrap();
    let r = refs(model);
    let want = ref_ids(get(&r, refname));
    let ps = prompts(model);
    assert_eq!(want.len(), ps.len(), "{refname}: one row per prompt");
    for (p, w) in ps.iter().zip(&want) {
        let got = tok.encode(p).unwrap();
        assert_eq!(&got, w, "{model}/{component}: ids of {p:?}");
    }
    println!(
        "{model}/{component}: {} prompts tokenized exactly",
        ps.len()
    );
}

fn check_encoder(model: &str, component: &str, prefix: &str, tok_ref: &str) {
    let dir = ModelDir::open(fixture(model)).unwrap();
    let enc =
        ClipTextEncoder::load(&dir, component, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let r = refs(model);
    // Feed the reference ids, so the encoder is tested on its own.
    let ids = get(&r, tok_ref).clone();
    let out = enc.forward(&ids).unwrap();
    let what = |s: &str| format!("{model} {prefix}.{s}");
    assert_close(
        &what("last_hidden"),
        &out.last_hidden_state,
        get(&r, &format!("{prefix}.last_hidden")),
        TOL,
    );
    assert_close(
        &what("penultimate"),
        out.hidden_state(-2).unwrap(),
        get(&r, &format!("{prefix}.penultimate")),
        TOL,
    );
    assert_close(
        &what("pooled"),
        &out.pooled,
        get(&r, &format!("{prefix}.pooled")),
        TOL,
    );
    let te_name = format!("{prefix}.text_embeds");
    match (r.get(&te_name), &out.text_embeds) {
        (Some(want), Some(got)) => assert_close(&what("text_embeds"), got, want, TOL),
        (Some(_), None) => {
            panic!("{model}/{component}: reference has text_embeds, encoder has no projection")
        }
        _ => {}
    }
}

fn check_conditioning(model: &str, family: ModelFamily) {
    let dir = ModelDir::open(fixture(model)).unwrap();
    let pe = PromptEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(pe.family(), family);
    assert_eq!(dir.family().unwrap(), family);
    let r = refs(model);
    let ps = prompts(model);
    let cond = pe.encode(&ps).unwrap();
    assert_close(
        &format!("{model} cond.prompt_embeds"),
        &cond.context,
        get(&r, "cond.prompt_embeds"),
        TOL,
    );
    match (r.get("cond.pooled"), &cond.pooled) {
        (Some(want), Some(got)) => assert_close(&format!("{model} cond.pooled"), got, want, TOL),
        (None, None) => {}
        (w, g) => panic!(
            "{model}: pooled reference present {} but ours {}",
            w.is_some(),
            g.is_some()
        ),
    }
}

#[test]
fn sd15_tokenizer_matches_transformers() {
    check_tokenizer("tiny-sd15", "tokenizer", "tok.ids");
}

#[test]
fn sd21_tokenizer_matches_transformers() {
    check_tokenizer("tiny-sd21", "tokenizer", "tok.ids");
}

#[test]
fn sdxl_tokenizers_match_transformers() {
    check_tokenizer("tiny-sdxl", "tokenizer", "tok.ids");
    check_tokenizer("tiny-sdxl", "tokenizer_2", "tok2.ids");
}

#[test]
fn tokenizer_json_layout_equals_vocab_merges_layout() {
    let a = ClipTokenizer::from_dir(fixture("tokenizer-json")).unwrap();
    let b = ClipTokenizer::from_dir(fixture("tiny-sd15/tokenizer")).unwrap();
    let r = refs("tiny-sd15");
    let want = ref_ids(get(&r, "tok.ids"));
    let mut ps = prompts("tiny-sd15");
    ps.extend(
        [
            "",
            "  Mixed CASE,   spaces\tand\nnewlines!!",
            "digits 1234 and don't stop",
        ]
        .map(String::from),
    );
    for (i, p) in ps.iter().enumerate() {
        let ia = a.encode(p).unwrap();
        assert_eq!(ia, b.encode(p).unwrap(), "layouts differ on {p:?}");
        if let Some(w) = want.get(i) {
            assert_eq!(&ia, w, "tokenizer.json ids of {p:?}");
        }
    }
    assert_eq!(a.pad(), b.pad());
    assert_eq!(a.max_length(), b.max_length());
}

#[test]
fn sd15_text_encoder_matches_transformers() {
    check_encoder("tiny-sd15", "text_encoder", "te", "tok.ids");
}

#[test]
fn sd21_text_encoder_matches_transformers() {
    check_encoder("tiny-sd21", "text_encoder", "te", "tok.ids");
}

#[test]
fn sdxl_text_encoders_match_transformers() {
    check_encoder("tiny-sdxl", "text_encoder", "te", "tok.ids");
    check_encoder("tiny-sdxl", "text_encoder_2", "te2", "tok2.ids");
}

#[test]
fn sd15_conditioning_matches_diffusers() {
    check_conditioning("tiny-sd15", ModelFamily::Sd1);
}

#[test]
fn sd21_conditioning_matches_diffusers() {
    check_conditioning("tiny-sd21", ModelFamily::Sd2);
}

#[test]
fn sdxl_conditioning_matches_diffusers() {
    check_conditioning("tiny-sdxl", ModelFamily::Sdxl);
}

#[test]
fn sdxl_uncond_is_zeros_without_negative_prompt() {
    let dir = ModelDir::open(fixture("tiny-sdxl")).unwrap();
    let pe = PromptEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert!(pe.force_zeros_for_empty_prompt());
    let cond = pe.encode(&["a photo"]).unwrap();
    let un = pe.encode_uncond(None).unwrap();
    assert_eq!(un.context.dims(), cond.context.dims());
    assert_eq!(
        un.pooled.as_ref().unwrap().dims(),
        cond.pooled.as_ref().unwrap().dims()
    );
    let s = un
        .context
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(s, 0.0);
    // With a negative prompt (even an empty one) it is encoded like any prompt.
    let neg = pe.encode_uncond(Some("")).unwrap();
    let direct = pe.encode(&[""]).unwrap();
    assert_close(
        "sdxl uncond(\"\") vs encode(\"\")",
        &neg.context,
        &direct.context,
        0.0,
    );
}

#[test]
fn sd15_uncond_encodes_the_empty_prompt() {
    let dir = ModelDir::open(fixture("tiny-sd15")).unwrap();
    let pe = PromptEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert!(!pe.force_zeros_for_empty_prompt());
    let un = pe.encode_uncond(None).unwrap();
    let direct = pe.encode(&[""]).unwrap();
    assert_close(
        "sd15 uncond vs encode(\"\")",
        &un.context,
        &direct.context,
        0.0,
    );
    assert!(un.pooled.is_none());
}

#[test]
fn half_precision_conditioning_is_close() {
    let dir = ModelDir::open(fixture("tiny-sdxl")).unwrap();
    let r = refs("tiny-sdxl");
    let ps = prompts("tiny-sdxl");
    for dt in [DType::F16, DType::BF16] {
        let pe = PromptEncoder::load(&dir, dt, &Device::Cpu).unwrap();
        let cond = pe.encode(&ps).unwrap();
        assert_eq!(cond.context.dtype(), dt);
        let ctx = cond.context.to_dtype(DType::F32).unwrap();
        assert_close(
            &format!("sdxl cond.prompt_embeds in {dt:?}"),
            &ctx,
            get(&r, "cond.prompt_embeds"),
            5e-2,
        );
    }
}

/// A fresh empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pairstyle-text-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn missing_vocab_or_merges_is_named() {
    let d = temp_dir("missing-vocab");
    copy_dir(&fixture("tiny-sd15/tokenizer"), &d);
    std::fs::remove_file(d.join("vocab.json")).unwrap();
    let err = ClipTokenizer::from_dir(&d).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("vocab.json"), "{err}");

    copy_dir(&fixture("tiny-sd15/tokenizer"), &d);
    std::fs::remove_file(d.join("merges.txt")).unwrap();
    let err = ClipTokenizer::from_dir(&d).unwrap_err();
    assert!(err.to_string().contains("merges.txt"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn wrong_shaped_weight_names_the_tensor() {
    let d = temp_dir("wrong-shape");
    copy_dir(&fixture("tiny-sd15"), &d);
    let file = d.join("text_encoder/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let name = "encoder.layers.1.mlp.fc1.weight";
    let t = tensors.get(name).expect("fixture has the tensor").clone();
    let (o, i) = t.dims2().unwrap();
    tensors.insert(name.to_string(), t.narrow(0, 0, o - 1).unwrap());
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let dir = ModelDir::open(&d).unwrap();
    let err = PromptEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{msg}");
    assert!(msg.contains(name), "{msg}");
    assert!(
        msg.contains(&format!("[{o}, {i}]")) && msg.contains(&format!("[{}, {i}]", o - 1)),
        "{msg}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// Real-size text encoders (SD1.5 CLIP-L, SD2.x OpenCLIP-H as diffusers ships it, SDXL's
/// OpenCLIP-bigG) with random weights: prove the shapes work and print the time of one batch.
#[test]
#[ignore = "real-size random weights: several GB and tens of seconds"]
fn real_size_text_encoders_run() {
    use pairstyle::engine::text::ClipTextConfig;
    use pairstyle::engine::weights::Weights;
    let configs = [
        ("SD1.5 CLIP-L", 768, 3072, 12, 12, "quick_gelu", 768),
        ("SD2.x OpenCLIP-H", 1024, 4096, 16, 23, "gelu", 1024),
        ("SDXL OpenCLIP-bigG", 1280, 5120, 20, 32, "gelu", 1280),
    ];
    let mut ids = vec![49406u32, 320, 1125, 539, 320, 1929, 49407];
    ids.resize(77, 49407);
    let ids = Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap();
    for (name, hidden, inter, heads, layers, act, proj) in configs {
        let cfg: ClipTextConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 49408, "hidden_size": hidden, "intermediate_size": inter,
            "num_attention_heads": heads, "num_hidden_layers": layers,
            "max_position_embeddings": 77, "hidden_act": act, "projection_dim": proj,
            "eos_token_id": 2,
        }))
        .unwrap();
        let t0 = std::time::Instant::now();
        let w = Weights::random(0, 0.02, DType::F32, &Device::Cpu);
        let enc = ClipTextEncoder::new(&cfg, &w).unwrap();
        let load = t0.elapsed();
        let t1 = std::time::Instant::now();
        let out = enc.forward(&ids).unwrap();
        let run = t1.elapsed();
        assert_eq!(out.last_hidden_state.dims(), &[1, 77, hidden]);
        assert_eq!(out.hidden_state(-2).unwrap().dims(), &[1, 77, hidden]);
        assert_eq!(out.text_embeds.unwrap().dims(), &[1, proj]);
        println!("{name}: built in {load:.1?}, one forward (batch 1) in {run:.2?}");
    }
}
