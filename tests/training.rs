//! One Pair Customization training iteration (content step + style step, two AdamW optimizers)
//! from a fixed state, against the reference computed with diffusers + PEFT + torch.optim.AdamW
//! (`tools/fixtures/make_method_fixtures.py`).
//!
//! Tolerances: losses to 1e-4 relative. Updated B to 1e-4 relative to max|B|: with lr 1e-3 a
//! first AdamW step moves each entry by ≈ lr·sign(g), so a wrong or missing gradient on any layer
//! shows as an error ≥ 1e-2, while f32 reordering of correct gradients stays near 1e-6.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, get, refs, refs_json};
use pairstyle::engine::model_dir::{ModelDir, Variant};
use pairstyle::engine::scheduler::{NoiseSchedule, SchedulerConfig};
use pairstyle::engine::text::Conditioning;
use pairstyle::engine::unet::{AddedCond, UNet};
use pairstyle::trainer::optimizer::{AdamW, AdamWConfig};
use pairstyle::trainer::{
    detach_adapters, train_iteration, IterationInputs, LayerParams, LearnedAdapter,
};

fn adapter(
    unet: &UNet,
    m: &std::collections::HashMap<String, Tensor>,
    name: &str,
) -> LearnedAdapter {
    let layers = unet
        .adaptable_linears()
        .iter()
        .map(|lin| LayerParams {
            path: lin.path().to_string(),
            down: Var::from_tensor(get(m, &format!("A.{name}.{}", lin.path()))).unwrap(),
            up: Var::from_tensor(get(m, &format!("B.{name}.{}", lin.path()))).unwrap(),
        })
        .collect();
    LearnedAdapter {
        layers,
        rank: 4,
        alpha: 4.0,
    }
}

fn check(model: &str) {
    let dir = ModelDir::open(common::fixture(model)).unwrap();
    let mut unet = UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(&SchedulerConfig::from_model_dir(&dir).unwrap()).unwrap();
    let m = refs(&format!("method-{model}"));
    let j = refs_json(&format!("method-{model}"));
    let o = &j["train"]["optimizer"];
    let cfg = AdamWConfig {
        lr: o["lr"].as_f64().unwrap(),
        beta1: o["betas"][0].as_f64().unwrap(),
        beta2: o["betas"][1].as_f64().unwrap(),
        eps: o["eps"].as_f64().unwrap(),
        weight_decay: o["weight_decay"].as_f64().unwrap(),
    };
    let content = adapter(&unet, &m, "content");
    let style = adapter(&unet, &m, "style");
    let ups = |a: &LearnedAdapter| a.layers.iter().map(|l| l.up.clone()).collect::<Vec<_>>();
    let mut opt_c = AdamW::new(ups(&content), cfg).unwrap();
    let mut opt_s = AdamW::new(ups(&style), cfg).unwrap();
    let cond = |which: &str| Conditioning {
        context: get(&m, &format!("train.ctx_{which}")).clone(),
        pooled: m.get(&format!("train.pooled_{which}")).cloned(),
    };
    let added = |which: &str| {
        m.get(&format!("train.pooled_{which}")).map(|p| AddedCond {
            text_embeds: p.clone(),
            time_ids: get(&m, "train.time_ids").clone(),
        })
    };
    let t: Vec<i64> = get(&m, "train.t").to_vec1().unwrap();
    let inputs = IterationInputs {
        x0_content: get(&m, "train.x0_content").clone(),
        x0_style: get(&m, "train.x0_style").clone(),
        noise: get(&m, "train.noise").clone(),
        t: t[0] as usize,
        cond_content: cond("content"),
        cond_style: cond("style"),
        added_content: added("content"),
        added_style: added("style"),
        style_step: true,
    };
    let (lc, ls) = train_iteration(
        &mut unet,
        &schedule,
        (&content, &mut opt_c),
        (&style, &mut opt_s),
        &inputs,
    )
    .unwrap();
    detach_adapters(&mut unet);
    let scalar = |n: &str| {
        Tensor::new(
            &[get(&m, n).flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]],
            &Device::Cpu,
        )
        .unwrap()
    };
    assert_close(
        &format!("{model} content loss"),
        &Tensor::new(&[lc], &Device::Cpu).unwrap(),
        &scalar("train.loss_content"),
        1e-4,
    );
    assert_close(
        &format!("{model} style loss"),
        &Tensor::new(&[ls.unwrap()], &Device::Cpu).unwrap(),
        &scalar("train.loss_style"),
        1e-4,
    );
    for (name, a) in [("content", &content), ("style", &style)] {
        let mut worst = 0f64;
        for l in &a.layers {
            let e = common::rel_err(
                l.up.as_tensor(),
                get(&m, &format!("train.B1.{name}.{}", l.path)),
            );
            worst = worst.max(e);
        }
        println!("{model} {name} B after one AdamW step: worst layer max relative error {worst:.3e} over {} layers", a.layers.len());
        assert!(worst <= 1e-4, "{model} {name}: {worst:.3e}");
    }
}

#[test]
fn one_iteration_matches_reference_sd15() {
    check("tiny-sd15");
}

#[test]
fn one_iteration_matches_reference_sdxl() {
    check("tiny-sdxl");
}
