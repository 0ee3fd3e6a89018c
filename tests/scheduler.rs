//! Schedulers against diffusers 0.42.1: timesteps, sigmas, 10-step runs fed with recorded model
//! outputs, DDPM forward noising (fixtures from `tools/fixtures/make_fixtures.py`), plus small
//! diffusers-computed cases for the paths the fixtures do not cover, and config errors.
//!
//! Run with `--nocapture` to see the measured errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, get, refs, refs_json};
use pairstyle::engine::model_dir::ModelDir;
use pairstyle::engine::scheduler::{
    make_sampler, EulerSampler, NoiseSchedule, SchedulerConfig, SchedulerKind,
};
use pairstyle::Error;

const MODELS: [&str; 3] = ["tiny-sd15", "tiny-sd21", "tiny-sdxl"];
const KINDS: [SchedulerKind; 3] = [
    SchedulerKind::Euler,
    SchedulerKind::Ddim,
    SchedulerKind::Pndm,
];

/// The scheduler config of a fixture model, through the normal loading path.
fn model_config(model: &str) -> SchedulerConfig {
    let dir = ModelDir::open(fixture(model)).expect("open fixture model");
    SchedulerConfig::from_model_dir(&dir).expect("parse scheduler config")
}

/// An i64 timestep tensor as usizes.
fn timesteps_of(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

#[test]
fn default_kind_follows_class_name() {
    assert_eq!(
        SchedulerKind::default_for(&model_config("tiny-sd15")),
        SchedulerKind::Pndm
    );
    assert_eq!(
        SchedulerKind::default_for(&model_config("tiny-sd21")),
        SchedulerKind::Ddim
    );
    assert_eq!(
        SchedulerKind::default_for(&model_config("tiny-sdxl")),
        SchedulerKind::Euler
    );
}

#[test]
fn timesteps_equal_diffusers() {
    for model in MODELS {
        let cfg = model_config(model);
        let r = refs(model);
        for kind in KINDS {
            for steps in [4, 10] {
                let s = make_sampler(kind, &cfg, steps).unwrap();
                let want = timesteps_of(get(&r, &format!("sched.{kind}.t{steps}")));
                assert_eq!(
                    s.timesteps(),
                    want.as_slice(),
                    "{model} {kind} {steps} steps"
                );
                let as_f64: Vec<f64> = want.iter().map(|&t| t as f64).collect();
                assert_eq!(s.model_timesteps(), as_f64.as_slice(), "{model} {kind}");
            }
        }
    }
}

#[test]
fn euler_sigmas_and_init_noise_sigma_equal_diffusers() {
    for model in MODELS {
        let cfg = model_config(model);
        let r = refs(model);
        let meta = refs_json(model);
        for steps in [4, 10] {
            let s = EulerSampler::new(&cfg, steps).unwrap();
            let ours = Tensor::new(s.sigmas(), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let want = get(&r, &format!("sched.euler.sigmas{steps}"));
            assert_close(&format!("{model} euler sigmas{steps}"), &ours, want, 1e-6);
        }
        let s = make_sampler(SchedulerKind::Euler, &cfg, 10).unwrap();
        let want = meta["scheduler_configs"]["euler"]["init_noise_sigma_10_steps"]
            .as_f64()
            .unwrap();
        let rel = (s.init_noise_sigma() - want).abs() / want;
        println!(
            "{model} euler init_noise_sigma {} vs {want}: rel {rel:.3e}",
            s.init_noise_sigma()
        );
        assert!(rel <= 1e-6);
        for kind in [SchedulerKind::Ddim, SchedulerKind::Pndm] {
            let s = make_sampler(kind, &cfg, 10).unwrap();
            let want = meta["scheduler_configs"][kind.name()]["init_noise_sigma_10_steps"]
                .as_f64()
                .unwrap();
            assert_eq!(s.init_noise_sigma(), want, "{model} {kind}");
        }
    }
}

#[test]
fn ten_step_runs_match_diffusers() {
    for model in MODELS {
        let cfg = model_config(model);
        let r = refs(model);
        for kind in KINDS {
            let mut s = make_sampler(kind, &cfg, 10).unwrap();
            let eps = get(&r, &format!("sched.{kind}.eps"));
            let xs = get(&r, &format!("sched.{kind}.xs"));
            let ts = s.timesteps().to_vec();
            assert_eq!(
                eps.dim(0).unwrap(),
                ts.len(),
                "{model} {kind}: one output per timestep"
            );
            let mut x = get(&r, &format!("sched.{kind}.x0")).clone();
            let mut worst = 0.0f64;
            for (i, &t) in ts.iter().enumerate() {
                let scaled = s.scale_model_input(&x, t).unwrap();
                if kind == SchedulerKind::Euler {
                    let want = get(&r, "sched.euler.scaled").get(i).unwrap();
                    assert_close(&format!("{model} euler scaled[{i}]"), &scaled, &want, 1e-6);
                } else {
                    assert_eq!(
                        common::rel_err(&scaled, &x),
                        0.0,
                        "{kind} input is unscaled"
                    );
                }
                x = s.step(&eps.get(i).unwrap(), t, &x).unwrap();
                let want = xs.get(i).unwrap();
                assert_close(&format!("{model} {kind} xs[{i}] (t={t})"), &x, &want, 1e-5);
                worst = worst.max(common::rel_err(&x, &want));
            }
            println!("{model} {kind}: worst step error {worst:.3e}");
        }
    }
}

#[test]
fn ddpm_forward_matches_diffusers() {
    for model in MODELS {
        let cfg = model_config(model);
        let r = refs(model);
        let ns = NoiseSchedule::new(&cfg).unwrap();
        let t = timesteps_of(get(&r, "ddpm.t"));
        let (x0, noise) = (get(&r, "ddpm.x0"), get(&r, "ddpm.noise"));
        let noisy = ns.add_noise(x0, noise, &t).unwrap();
        assert_close(
            &format!("{model} ddpm.noisy"),
            &noisy,
            get(&r, "ddpm.noisy"),
            1e-6,
        );
        let v = ns.velocity(x0, noise, &t).unwrap();
        assert_close(
            &format!("{model} ddpm.velocity"),
            &v,
            get(&r, "ddpm.velocity"),
            1e-6,
        );
    }
}

/// A small run computed with diffusers 0.42.1 (`tools/fixtures`-style, printed by a script):
/// `Cls(**config).set_timesteps(steps)`, x = [0.5, −1.25, 2] · init_noise_sigma, and at step i the
/// model output is `((7i + 3j) mod 11)/5 − 1` for element j. Zero-terminal-SNR Euler starts at
/// σ ≈ 4096, where diffusers' own float32 arithmetic cancels ~1e-4 of the result away, so that
/// case is held to 1e-4.
struct Case {
    name: &'static str,
    kind: SchedulerKind,
    config: &'static str,
    steps: usize,
    timesteps: &'static [f64],
    init_noise_sigma: f64,
    x: &'static [f64],
    /// Relative tolerance on the final sample.
    tol: f64,
}

const CASES: &[Case] = &[
    Case {
        name: "pndm_prk_eps",
        kind: SchedulerKind::Pndm,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": false, "_class_name": "PNDMScheduler"}"#,
        steps: 6,
        timesteps: &[
            831.0, 748.0, 748.0, 665.0, 665.0, 582.0, 582.0, 499.0, 499.0, 416.0, 416.0, 333.0,
            333.0, 167.0, 1.0,
        ],
        init_noise_sigma: 1.0,
        x: &[2.8207478523254395, -8.575006484985352, 11.413933753967285],
        tol: 1e-5,
    },
    Case {
        name: "pndm_prk_v",
        kind: SchedulerKind::Pndm,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": false, "prediction_type": "v_prediction", "_class_name": "PNDMScheduler"}"#,
        steps: 5,
        timesteps: &[
            801.0, 701.0, 701.0, 601.0, 601.0, 501.0, 501.0, 401.0, 401.0, 301.0, 301.0, 201.0,
            201.0, 1.0,
        ],
        init_noise_sigma: 1.0,
        x: &[-1.192258358001709, -2.810018301010132, 3.1357245445251465],
        tol: 1e-5,
    },
    Case {
        name: "pndm_plms_linspace",
        kind: SchedulerKind::Pndm,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": true, "timestep_spacing": "linspace", "set_alpha_to_one": true, "_class_name": "PNDMScheduler"}"#,
        steps: 7,
        timesteps: &[999.0, 832.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0],
        init_noise_sigma: 1.0,
        x: &[5.140139102935791, -14.74569320678711, 20.281858444213867],
        tol: 1e-5,
    },
    Case {
        name: "euler_linspace",
        kind: SchedulerKind::Euler,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "_class_name": "EulerDiscreteScheduler"}"#,
        steps: 7,
        timesteps: &[999.0, 832.5, 666.0, 499.5, 333.0, 166.5, 0.0],
        init_noise_sigma: 14.614646911621094,
        x: &[14.76620864868164, -18.01094627380371, 28.350576400756836],
        tol: 1e-5,
    },
    Case {
        name: "euler_karras",
        kind: SchedulerKind::Euler,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": true, "_class_name": "EulerDiscreteScheduler"}"#,
        steps: 6,
        timesteps: &[
            831.0,
            654.2946166992188,
            410.485595703125,
            153.51214599609375,
            24.649324417114258,
            1.0000001192092896,
        ],
        init_noise_sigma: 5.990506172180176,
        x: &[5.465022563934326, -7.879384994506836, 11.781475067138672],
        tol: 1e-5,
    },
    Case {
        name: "euler_trailing_v",
        kind: SchedulerKind::Euler,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "trailing", "prediction_type": "v_prediction", "_class_name": "EulerDiscreteScheduler"}"#,
        steps: 6,
        timesteps: &[999.0, 832.0, 666.0, 499.0, 332.0, 166.0],
        init_noise_sigma: 14.614646911621094,
        x: &[0.4824571907520294, -1.1962730884552002, 1.4393316507339478],
        tol: 1e-5,
    },
    Case {
        name: "euler_sample_sigmamin",
        kind: SchedulerKind::Euler,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "prediction_type": "sample", "final_sigmas_type": "sigma_min", "_class_name": "EulerDiscreteScheduler"}"#,
        steps: 5,
        timesteps: &[800.0, 600.0, 400.0, 200.0, 0.0],
        init_noise_sigma: 5.207939147949219,
        x: &[0.9513025283813477, -0.5918843150138855, 0.07426142692565918],
        tol: 1e-5,
    },
    Case {
        name: "euler_zsnr_v",
        kind: SchedulerKind::Euler,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": true, "_class_name": "EulerDiscreteScheduler"}"#,
        steps: 5,
        timesteps: &[999.0, 799.0, 599.0, 399.0, 199.0],
        init_noise_sigma: 4096.0,
        x: &[0.09557725489139557, -1.3396308422088623, 1.7763993740081787],
        tol: 1e-4,
    },
    Case {
        name: "ddim_clip_sample",
        kind: SchedulerKind::Ddim,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "trailing", "prediction_type": "sample", "clip_sample": true, "clip_sample_range": 1.5, "_class_name": "DDIMScheduler"}"#,
        steps: 6,
        timesteps: &[999.0, 832.0, 666.0, 499.0, 332.0, 166.0],
        init_noise_sigma: 1.0,
        x: &[
            -0.5348665118217468,
            -0.016758089885115623,
            0.6045311093330383,
        ],
        tol: 1e-5,
    },
    Case {
        name: "ddim_cos_linspace_clip",
        kind: SchedulerKind::Ddim,
        config: r#"{"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace", "_class_name": "DDIMScheduler"}"#,
        steps: 6,
        timesteps: &[999.0, 799.0, 599.0, 400.0, 200.0, 0.0],
        init_noise_sigma: 1.0,
        x: &[
            -0.4995536208152771,
            0.3635599911212921,
            -0.10813017934560776,
        ],
        tol: 1e-5,
    },
    Case {
        name: "ddim_zsnr_v",
        kind: SchedulerKind::Ddim,
        config: r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": true, "clip_sample": false, "_class_name": "DDIMScheduler"}"#,
        steps: 5,
        timesteps: &[999.0, 799.0, 599.0, 399.0, 199.0],
        init_noise_sigma: 1.0,
        x: &[0.09575089067220688, -1.3395435810089111, 1.776285171508789],
        tol: 1e-5,
    },
];

#[test]
fn paths_without_fixtures_match_diffusers() {
    let dev = Device::Cpu;
    for c in CASES {
        let cfg = SchedulerConfig::from_json_str(c.config).unwrap();
        let mut s = make_sampler(c.kind, &cfg, c.steps).unwrap();
        let ts = s.model_timesteps().to_vec();
        assert_eq!(ts.len(), c.timesteps.len(), "{}: timestep count", c.name);
        for (a, b) in ts.iter().zip(c.timesteps) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{}: timesteps {ts:?}",
                c.name
            );
        }
        let rel = (s.init_noise_sigma() - c.init_noise_sigma).abs() / c.init_noise_sigma;
        assert!(
            rel <= 1e-6,
            "{}: init_noise_sigma {}",
            c.name,
            s.init_noise_sigma()
        );
        let init = [0.5f32, -1.25, 2.0].map(|v| (v as f64 * s.init_noise_sigma()) as f32);
        let mut x = Tensor::new(&init, &dev).unwrap();
        for (i, t) in s.timesteps().to_vec().into_iter().enumerate() {
            let out: Vec<f32> = (0..3)
                .map(|j| ((7 * i + 3 * j) % 11) as f32 / 5.0 - 1.0)
                .collect();
            let out = Tensor::new(out.as_slice(), &dev).unwrap();
            let inp = s.scale_model_input(&x, t).unwrap();
            assert_eq!(inp.dims(), x.dims());
            x = s.step(&out, t, &x).unwrap();
        }
        let want = Tensor::new(c.x, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_close(c.name, &x, &want, c.tol);
    }
}

/// The error message of a config that must be rejected.
fn config_error(json: &str) -> String {
    match SchedulerConfig::from_json_str(json) {
        Ok(c) => panic!("accepted {json}: {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn invalid_config_values_name_the_key() {
    for (json, key) in [
        (r#"{"beta_schedule": "cosine"}"#, "beta_schedule"),
        (r#"{"prediction_type": "flow"}"#, "prediction_type"),
        (r#"{"timestep_spacing": "even"}"#, "timestep_spacing"),
        (r#"{"steps_offset": "1"}"#, "steps_offset"),
        (r#"{"steps_offset": -1}"#, "steps_offset"),
        (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
        (r#"{"beta_end": 1.5}"#, "beta_end"),
        (r#"{"clip_sample": "no"}"#, "clip_sample"),
        (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
        (r#"{"interpolation_type": "cubic"}"#, "interpolation_type"),
        (r#"{"final_sigmas_type": "one"}"#, "final_sigmas_type"),
    ] {
        let e = config_error(json);
        assert!(e.contains(key), "error for {json} does not name {key}: {e}");
    }
    // Unknown keys and nulls are ignored, as diffusers does.
    let c =
        SchedulerConfig::from_json_str(r#"{"foo": 1, "trained_betas": null, "sigma_min": null}"#)
            .unwrap();
    assert_eq!(c, SchedulerConfig::default());
}

#[test]
fn unsupported_features_name_the_key() {
    let cases = [
        (
            SchedulerKind::Ddim,
            r#"{"thresholding": true}"#,
            "thresholding",
        ),
        (
            SchedulerKind::Euler,
            r#"{"interpolation_type": "log_linear"}"#,
            "interpolation_type",
        ),
        (
            SchedulerKind::Euler,
            r#"{"use_exponential_sigmas": true}"#,
            "use_exponential_sigmas",
        ),
        (
            SchedulerKind::Euler,
            r#"{"use_beta_sigmas": true}"#,
            "use_beta_sigmas",
        ),
        (
            SchedulerKind::Pndm,
            r#"{"prediction_type": "sample"}"#,
            "prediction_type",
        ),
        (
            SchedulerKind::Ddim,
            r#"{"steps_offset": 200}"#,
            "steps_offset",
        ),
    ];
    for (kind, json, key) in cases {
        let cfg = SchedulerConfig::from_json_str(json).unwrap();
        let e = make_sampler(kind, &cfg, 10)
            .err()
            .expect("should fail")
            .to_string();
        assert!(e.contains(key), "{kind} {json}: {e}");
    }
    // The same features are fine for samplers that ignore them (as in diffusers).
    let cfg = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#).unwrap();
    assert!(make_sampler(SchedulerKind::Euler, &cfg, 10).is_ok());
}

#[test]
fn bad_step_counts_and_arguments_are_errors() {
    let cfg = model_config("tiny-sdxl");
    for kind in KINDS {
        assert!(matches!(
            make_sampler(kind, &cfg, 0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            make_sampler(kind, &cfg, 1001),
            Err(Error::InvalidArgument(_))
        ));
        assert!(make_sampler(kind, &cfg, 1).is_ok());
    }
    assert!("unipc".parse::<SchedulerKind>().is_err());
    // Euler refuses to step past the end of its schedule.
    let mut s = make_sampler(SchedulerKind::Euler, &cfg, 1).unwrap();
    let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let t = s.timesteps()[0];
    s.step(&x, t, &x).unwrap();
    assert!(s.step(&x, t, &x).is_err());
}

#[test]
fn half_precision_keeps_dtype() {
    let cfg = model_config("tiny-sdxl");
    for kind in KINDS {
        let mut s = make_sampler(kind, &cfg, 4).unwrap();
        let x = Tensor::ones((1, 4, 2, 2), DType::F16, &Device::Cpu).unwrap();
        let t = s.timesteps()[0];
        let inp = s.scale_model_input(&x, t).unwrap();
        assert_eq!(inp.dtype(), DType::F16);
        assert_eq!(s.step(&x, t, &x).unwrap().dtype(), DType::F16, "{kind}");
    }
}

#[test]
fn config_errors_through_model_dir_name_file_and_key() {
    let root = std::env::temp_dir().join(format!("pairstyle-sched-{}", std::process::id()));
    let sched = root.join("scheduler");
    std::fs::create_dir_all(&sched).unwrap();
    std::fs::write(root.join("model_index.json"), "{}").unwrap();
    std::fs::write(
        sched.join("scheduler_config.json"),
        r#"{"_class_name": "PNDMScheduler", "beta_schedule": "sigmoid"}"#,
    )
    .unwrap();
    let dir = ModelDir::open(&root).unwrap();
    let e = SchedulerConfig::from_model_dir(&dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scheduler_config.json") && e.contains("beta_schedule"),
        "{e}"
    );
    // A folder with only `config.json` is read too.
    std::fs::remove_file(sched.join("scheduler_config.json")).unwrap();
    std::fs::write(
        sched.join("config.json"),
        r#"{"_class_name": "DDIMScheduler"}"#,
    )
    .unwrap();
    let cfg = SchedulerConfig::from_model_dir(&dir).unwrap();
    assert_eq!(SchedulerKind::default_for(&cfg), SchedulerKind::Ddim);
    std::fs::remove_dir_all(&root).unwrap();
}
