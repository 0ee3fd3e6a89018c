//! Adapters and style guidance against references computed with diffusers + PEFT
//! (`tools/fixtures/make_method_fixtures.py`): the adapted UNet with content/style adapters and
//! per-adapter scales, and 4-step DDIM sampling with two styles (every step and from step 2), and
//! the LoRA-scale baseline. Tolerance: max relative error 1e-4 in f32, as for the base engine.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, get, refs, refs_json};
use pairstyle::engine::model_dir::{ModelDir, Variant};
use pairstyle::engine::nn::{AdapterScales, LowRankAdapter};
use pairstyle::engine::pipeline::{GenerateRequest, Guidance, Pipeline, StyleTerm};
use pairstyle::engine::scheduler::SchedulerKind;
use pairstyle::engine::unet::{AddedCond, UNet};

fn attach(unet: &mut UNet, r: &std::collections::HashMap<String, Tensor>, name: &str) {
    for lin in unet.adaptable_linears_mut() {
        let a = get(r, &format!("A.{name}.{}", lin.path())).clone();
        let b = get(r, &format!("B.{name}.{}", lin.path())).clone();
        let rank = a.dim(0).unwrap();
        lin.set_adapter(
            name,
            LowRankAdapter {
                down: a,
                up: b,
                alpha_over_rank: 4.0 / rank as f64,
            },
        )
        .unwrap();
    }
}

fn adapted_unet(model: &str) {
    let dir = ModelDir::open(common::fixture(model)).unwrap();
    let mut unet = UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let m = refs(&format!("method-{model}"));
    for name in ["content", "style"] {
        attach(&mut unet, &m, name);
    }
    let r = refs(model);
    let ts = get(&r, "unet.timesteps").to_dtype(DType::F32).unwrap();
    let added = r.get("unet.text_embeds").map(|te| AddedCond {
        text_embeds: te.clone(),
        time_ids: get(&r, "unet.time_ids").to_dtype(DType::F32).unwrap(),
    });
    let run = |scales: &[(&str, f32)]| {
        let mut s = AdapterScales::none();
        for (n, v) in scales {
            s.set(n, Tensor::new(&[*v, *v, *v], &Device::Cpu).unwrap());
        }
        unet.forward(
            get(&r, "unet.sample"),
            &ts,
            get(&r, "unet.encoder_hidden_states"),
            added.as_ref(),
            &s,
        )
        .unwrap()
    };
    assert_close(
        &format!("{model} content adapter"),
        &run(&[("content", 1.0)]),
        get(&m, "lora.out.content"),
        1e-4,
    );
    assert_close(
        &format!("{model} content+style adapters"),
        &run(&[("content", 1.0), ("style", 1.0)]),
        get(&m, "lora.out.both"),
        1e-4,
    );
    assert_close(
        &format!("{model} style at 0.5"),
        &run(&[("style", 0.5)]),
        get(&m, "lora.out.style_half"),
        1e-4,
    );
    // Scale 0 reproduces the base model exactly.
    let zero = run(&[("content", 0.0), ("style", 0.0)]);
    assert_close(
        &format!("{model} adapters at scale 0"),
        &zero,
        get(&r, "unet.out"),
        1e-4,
    );
    let base = run(&[]);
    assert_close(&format!("{model} scale 0 vs no adapter"), &zero, &base, 0.0);
}

#[test]
fn adapted_unet_matches_peft_sd15() {
    adapted_unet("tiny-sd15");
}

#[test]
fn adapted_unet_matches_peft_sdxl() {
    adapted_unet("tiny-sdxl");
}

fn guided(model: &str) {
    let dir = ModelDir::open(common::fixture(model)).unwrap();
    let mut pipe = Pipeline::load(dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let m = refs(&format!("method-{model}"));
    let j = refs_json(&format!("method-{model}"));
    let g = &j["guide"];
    for name in ["style", "style2"] {
        attach(pipe.unet_mut(), &m, name);
    }
    let prompt = g["prompt"].as_str().unwrap().to_string();
    let suffix =
        |name: &str| g["style_prompts"][name].as_str().unwrap()[prompt.len()..].to_string();
    let req = GenerateRequest {
        prompt: prompt.clone(),
        negative: None,
        seed: 0,
        steps: g["steps"].as_u64().unwrap() as usize,
        cfg: g["lambda_cfg"].as_f64().unwrap(),
        width: j["width"].as_u64().unwrap() as usize,
        height: j["height"].as_u64().unwrap() as usize,
        scheduler: Some(SchedulerKind::Ddim),
    };
    let styles: Vec<StyleTerm> = ["style", "style2"]
        .iter()
        .map(|n| StyleTerm {
            adapter: n.to_string(),
            lambda: g["lambdas"][n].as_f64().unwrap(),
            suffix: suffix(n),
            scale: 1.0,
        })
        .collect();
    let init = get(&m, "guide.latents_init").clone();
    for (from_step, name) in [(0, "guide"), (2, "guide_from2")] {
        let guidance = Guidance::Styles {
            styles: styles.clone(),
            from_step,
        };
        let out = pipe
            .denoise_guided(&req, &guidance, init.clone(), |_| {})
            .unwrap();
        assert_close(
            &format!("{model} {name}"),
            &out,
            get(&m, &format!("{name}.latents_final")),
            1e-4,
        );
    }
    let ls = &g["lorascale"];
    let guidance = Guidance::LoraScale {
        adapter: "style".into(),
        alpha: ls["alpha"].as_f64().unwrap(),
        suffix: ls["prompt"].as_str().unwrap()[prompt.len()..].to_string(),
    };
    let out = pipe
        .denoise_guided(&req, &guidance, init.clone(), |_| {})
        .unwrap();
    // Style guidance must visibly change the result compared with plain CFG.
    let plain = pipe.denoise(&req, init, |_| {}).unwrap();
    let moved = common::rel_err(&plain, get(&m, "guide.latents_final"));
    println!("{model}: plain CFG differs from style guidance by {moved:.3e}");
    assert!(moved > 1e-2);
    assert_close(
        &format!("{model} lora-scale baseline"),
        &out,
        get(&m, "lorascale.latents_final"),
        1e-4,
    );
}

#[test]
fn two_style_guidance_matches_reference_sd15() {
    guided("tiny-sd15");
}

#[test]
fn two_style_guidance_matches_reference_sdxl() {
    guided("tiny-sdxl");
}

#[test]
fn per_sample_adapter_scales_equal_separate_calls() {
    let model = "tiny-sd15";
    let dir = ModelDir::open(common::fixture(model)).unwrap();
    let mut unet = UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let m = refs(&format!("method-{model}"));
    for name in ["style", "style2"] {
        attach(&mut unet, &m, name);
    }
    let r = refs(model);
    let x = get(&r, "unet.sample");
    let ctx = get(&r, "unet.encoder_hidden_states");
    let ts = get(&r, "unet.timesteps").to_dtype(DType::F32).unwrap();
    let mut s = AdapterScales::none();
    s.set(
        "style",
        Tensor::new(&[0f32, 1.0, 0.0], &Device::Cpu).unwrap(),
    );
    s.set(
        "style2",
        Tensor::new(&[0f32, 0.0, 1.0], &Device::Cpu).unwrap(),
    );
    let batched = unet.forward(x, &ts, ctx, None, &s).unwrap();
    for (i, active) in [None, Some("style"), Some("style2")]
        .into_iter()
        .enumerate()
    {
        let mut one = AdapterScales::none();
        if let Some(a) = active {
            one.set(a, Tensor::new(&[1f32], &Device::Cpu).unwrap());
        }
        let n = |t: &Tensor| t.narrow(0, i, 1).unwrap();
        let alone = unet.forward(&n(x), &n(&ts), &n(ctx), None, &one).unwrap();
        assert_close(
            &format!("sample {i} ({active:?}) alone vs batched"),
            &alone,
            &n(&batched),
            1e-5,
        );
    }
}

/// One latent shared by every branch (`forward_shared_latent`: the text- and adapter-free start
/// computed once) gives what the full forward gives on that latent repeated, with per-branch
/// context and adapters: on SD1.5 (conv_in and the first ResNet shared) and SDXL (conv_in only,
/// its time embedding differing by branch). 1e-5 relative: the same ops on fewer rows.
#[test]
fn shared_latent_forward_equals_the_repeated_latent() {
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let dir = ModelDir::open(common::fixture(model)).unwrap();
        let mut unet = UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
        let m = refs(&format!("method-{model}"));
        attach(&mut unet, &m, "style");
        let r = refs(model);
        let x1 = get(&r, "unet.sample").narrow(0, 0, 1).unwrap();
        let ctx = get(&r, "unet.encoder_hidden_states");
        let batch = ctx.dim(0).unwrap();
        let added = r.get("unet.text_embeds").map(|te| AddedCond {
            text_embeds: te.clone(),
            time_ids: get(&r, "unet.time_ids").to_dtype(DType::F32).unwrap(),
        });
        let mut s = AdapterScales::none();
        let mut v = vec![0f32; batch];
        v[batch - 1] = 1.0;
        s.set("style", Tensor::new(v, &Device::Cpu).unwrap());
        let t = 321f32;
        let shared = unet
            .forward_shared_latent(&x1, batch, t, ctx, added.as_ref(), &s)
            .unwrap();
        let repeated = x1.repeat((batch, 1, 1, 1)).unwrap();
        let ts = Tensor::new(vec![t; batch], &Device::Cpu).unwrap();
        let full = unet
            .forward(&repeated, &ts, ctx, added.as_ref(), &s)
            .unwrap();
        assert_close(&format!("{model} shared latent"), &shared, &full, 1e-5);
        assert!(unet
            .forward_shared_latent(&repeated, batch, t, ctx, added.as_ref(), &s)
            .is_err());
    }
}
