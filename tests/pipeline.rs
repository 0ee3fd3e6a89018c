//! End-to-end conformance: a 4-step classifier-free-guided sampling run, for each scheduler and
//! each tiny model, starting from diffusers' initial latents, gives diffusers' final latents and
//! decoded image (max relative error ≤ 1e-4 in f32; the run chains text encoder, 4 or 5 UNet
//! evaluations, the scheduler and the VAE, each measured near 1e-6 on its own).

mod common;

use candle_core::{DType, Device};
use common::{assert_close, get, refs, refs_json};
use pairstyle::engine::model_dir::{ModelDir, Variant};
use pairstyle::engine::pipeline::{GenerateRequest, Pipeline};
use pairstyle::engine::scheduler::SchedulerKind;

fn check(model: &str) {
    let dir = ModelDir::open(common::fixture(model)).unwrap();
    let pipe = Pipeline::load(dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let r = refs(model);
    let j = refs_json(model);
    let runs = j["pipeline_runs"].as_object().unwrap();
    assert!(
        runs.len() >= 4,
        "expected euler, ddim, pndm and ddim_neg runs"
    );
    for (name, run) in runs {
        let kind: SchedulerKind = match run["scheduler"].as_str().unwrap() {
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "DDIMScheduler" => SchedulerKind::Ddim,
            "PNDMScheduler" => SchedulerKind::Pndm,
            other => panic!("unexpected scheduler {other}"),
        };
        let req = GenerateRequest {
            prompt: run["prompt"].as_str().unwrap().to_string(),
            negative: run["negative_prompt"].as_str().map(String::from),
            seed: 0,
            steps: j["steps"].as_u64().unwrap() as usize,
            cfg: j["guidance_scale"].as_f64().unwrap(),
            width: j["width"].as_u64().unwrap() as usize,
            height: j["height"].as_u64().unwrap() as usize,
            scheduler: Some(kind),
        };
        let init = get(&r, &format!("pipe.{name}.latents_init")).clone();
        let mut seen = 0;
        let latents = pipe.denoise(&req, init, |p| seen = p.step).unwrap();
        assert!(seen >= req.steps, "progress callback saw {seen} steps");
        assert_close(
            &format!("{model} {name} final latents"),
            &latents,
            get(&r, &format!("pipe.{name}.latents_final")),
            1e-4,
        );
        let image = pipe.vae().decode_scaled(&latents).unwrap();
        assert_close(
            &format!("{model} {name} decoded image"),
            &image,
            get(&r, &format!("pipe.{name}.image")),
            1e-4,
        );
    }
}

#[test]
fn sampling_matches_diffusers_sd15() {
    check("tiny-sd15");
}

#[test]
fn sampling_matches_diffusers_sd21() {
    check("tiny-sd21");
}

#[test]
fn sampling_matches_diffusers_sdxl() {
    check("tiny-sdxl");
}

#[test]
fn bad_sizes_and_steps_are_rejected() {
    let dir = ModelDir::open(common::fixture("tiny-sd15")).unwrap();
    let pipe = Pipeline::load(dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let mut req = GenerateRequest {
        prompt: "a dog".into(),
        negative: None,
        seed: 1,
        steps: 2,
        cfg: 3.0,
        width: 17,
        height: 16,
        scheduler: None,
    };
    let err = pipe.generate(&req, |_| {}).unwrap_err().to_string();
    assert!(err.contains("17"), "{err}");
    req.width = 16;
    req.steps = 0;
    assert!(pipe.generate(&req, |_| {}).is_err());
    req.steps = 2;
    let a = pipe.generate(&req, |_| {}).unwrap();
    let b = pipe.generate(&req, |_| {}).unwrap();
    assert_close("same seed twice", &a, &b, 0.0);
    assert_eq!(a.dims(), &[1, 3, 16, 16]);
}
