//! UNet conformance: our UNet2DConditionModel loaded from the tiny diffusers fixtures gives the
//! same output as diffusers for a batch with a different timestep per sample.
//!
//! Tolerance: max relative error 1e-4 in f32. Both sides compute in f32 with different summation
//! orders (GEMM blocking, conv algorithms), which leaves ~1e-6 relative differences per layer;
//! 1e-4 leaves room for their growth through ~40 layers while still catching any real mistake
//! (a wrong norm eps, head split or skip order gives errors ≥ 1e-2).

mod common;

use candle_core::{DType, Device};
use common::{assert_close, get, refs};
use pairstyle::engine::model_dir::{ModelDir, Variant};
use pairstyle::engine::nn::AdapterScales;
use pairstyle::engine::unet::{AddedCond, UNet};

fn check(model: &str) {
    let dir = ModelDir::open(common::fixture(model)).unwrap();
    let unet = UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let r = refs(model);
    let ts = get(&r, "unet.timesteps").to_dtype(DType::F32).unwrap();
    let added = r.get("unet.text_embeds").map(|te| AddedCond {
        text_embeds: te.clone(),
        time_ids: get(&r, "unet.time_ids").to_dtype(DType::F32).unwrap(),
    });
    let out = unet
        .forward(
            get(&r, "unet.sample"),
            &ts,
            get(&r, "unet.encoder_hidden_states"),
            added.as_ref(),
            &AdapterScales::none(),
        )
        .unwrap();
    assert_close(&format!("{model} unet"), &out, get(&r, "unet.out"), 1e-4);
}

#[test]
fn unet_matches_diffusers_sd15() {
    check("tiny-sd15");
}

#[test]
fn unet_matches_diffusers_sd21() {
    check("tiny-sd21");
}

#[test]
fn unet_matches_diffusers_sdxl() {
    check("tiny-sdxl");
}

#[test]
fn per_sample_timesteps_equal_separate_calls() {
    let model = "tiny-sd15";
    let dir = ModelDir::open(common::fixture(model)).unwrap();
    let unet = UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu).unwrap();
    let r = refs(model);
    let x = get(&r, "unet.sample");
    let ctx = get(&r, "unet.encoder_hidden_states");
    let ts = get(&r, "unet.timesteps").to_dtype(DType::F32).unwrap();
    let batched = unet
        .forward(x, &ts, ctx, None, &AdapterScales::none())
        .unwrap();
    for i in 0..3 {
        let one = unet
            .forward(
                &x.narrow(0, i, 1).unwrap(),
                &ts.narrow(0, i, 1).unwrap(),
                &ctx.narrow(0, i, 1).unwrap(),
                None,
                &AdapterScales::none(),
            )
            .unwrap();
        assert_close(
            &format!("sample {i} alone vs in batch"),
            &one,
            &batched.narrow(0, i, 1).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    // A config claiming a wider first block than the weights have must fail at load, naming the
    // first tensor whose shape differs.
    let src = common::fixture("tiny-sd15");
    let tmp = std::env::temp_dir().join(format!("pairstyle-unet-shape-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("unet")).unwrap();
    std::fs::copy(src.join("model_index.json"), tmp.join("model_index.json")).unwrap();
    std::fs::copy(
        src.join("unet/diffusion_pytorch_model.safetensors"),
        tmp.join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("unet/config.json")).unwrap())
            .unwrap();
    let c0 = cfg["block_out_channels"][0].as_u64().unwrap() as usize;
    let c1 = cfg["block_out_channels"][1].as_u64().unwrap() as usize;
    cfg["block_out_channels"] = serde_json::json!([2 * c0, c1]);
    std::fs::write(tmp.join("unet/config.json"), cfg.to_string()).unwrap();
    let dir = ModelDir::open(&tmp).unwrap();
    let err = UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("conv_in.weight"), "{err}");
    let (want, found) = (format!("[{}, 4, 3, 3]", 2 * c0), format!("[{c0}, 4, 3, 3]"));
    assert!(err.contains(&want) && err.contains(&found), "{err}");
    // Missing weights file: error names the file.
    std::fs::remove_file(tmp.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let err = UNet::load(&dir, Variant::Auto, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}
