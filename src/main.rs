//! The `pairstyle` command line: parses flags, merges them over the config file, and calls the
//! library. Errors are reported with `anyhow` context and a non-zero exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use pairstyle::config::Config;
use pairstyle::engine::device::{DTypeSpec, DeviceSpec};
use pairstyle::engine::image_io::{self, GenerationMeta};
use pairstyle::engine::model_dir::ModelDir;
use pairstyle::engine::pipeline::{GenerateRequest, Pipeline};
use pairstyle::engine::scheduler::{SchedulerConfig, SchedulerKind};

/// Learn an artistic style from one image pair and apply it to Stable Diffusion.
#[derive(Debug, Parser)]
#[command(name = "pairstyle", version, about)]
struct Cli {
    /// Config file (default: $PAIRSTYLE_CONFIG, else the user config dir's pairstyle/pairstyle.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Compute device (cpu, auto, cuda, cuda:N, metal); overrides [runtime] device.
    #[arg(long, global = true)]
    device: Option<String>,
    /// Precision (f32, f16, bf16); overrides [runtime] dtype.
    #[arg(long, global = true)]
    dtype: Option<String>,
    /// Log filter (e.g. debug); overrides [log] level.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Generate(GenerateArgs),
    /// Describe a diffusers model folder (family, sizes, scheduler).
    Info {
        /// Model folder (diffusers layout); default: [model] path.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Print the effective configuration (defaults, file and flags merged) as TOML.
    Config,
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// Model folder (diffusers layout); default: [model] path.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Negative prompt (default: [generate] negative; empty means unconditional).
    #[arg(long)]
    negative: Option<String>,
    /// Seed of the initial noise (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Denoising steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale.
    #[arg(long)]
    cfg: Option<f64>,
    /// Image width in pixels.
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels.
    #[arg(long)]
    height: Option<usize>,
    /// Sampler: euler, ddim, pndm (default: the model's own).
    #[arg(long)]
    scheduler: Option<String>,
    /// Output PNG path.
    #[arg(short, long)]
    output: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let (mut config, source) = Config::load(cli.config.as_deref())?;
    if let Some(d) = &cli.device {
        config.runtime.device = d.clone();
    }
    if let Some(d) = &cli.dtype {
        config.runtime.dtype = d.clone();
    }
    if let Some(l) = &cli.log {
        config.log.level = l.clone();
    }
    init_logging(&config.log.level);
    if let Some(src) = &source {
        tracing::debug!("config from {}", src.display());
    }
    if config.runtime.threads > 0 {
        // candle sizes its CPU thread pools from RAYON_NUM_THREADS; set it before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", config.runtime.threads.to_string());
    }
    match cli.command {
        Command::Generate(args) => generate(&config, args),
        Command::Info { model } => info(&config, model.as_deref()),
        Command::Config => {
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn model_path(config: &Config, flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if !config.model.path.is_empty() {
        return Ok(PathBuf::from(&config.model.path));
    }
    bail!("no model: pass --model DIR (a diffusers folder) or set [model] path in the config")
}

fn info(config: &Config, flag: Option<&Path>) -> Result<()> {
    let path = model_path(config, flag)?;
    let model =
        ModelDir::open(&path).with_context(|| format!("opening model {}", path.display()))?;
    println!("model:     {}", path.display());
    println!("pipeline:  {}", model.class_name().unwrap_or("?"));
    println!("family:    {:?}", model.family()?);
    let unet: pairstyle::engine::unet::UNetConfigFile = model.config("unet")?;
    println!(
        "unet:      block_out_channels {:?}, cross_attention_dim {:?}",
        unet.block_out_channels, unet.cross_attention_dim
    );
    let sched = SchedulerConfig::from_model_dir(&model)?;
    println!(
        "scheduler: {} (default sampler {})",
        sched.class_name.as_deref().unwrap_or("?"),
        SchedulerKind::default_for(&sched)
    );
    Ok(())
}

fn generate(config: &Config, args: GenerateArgs) -> Result<()> {
    let g = &config.generate;
    let steps = args.steps.unwrap_or(g.steps);
    let cfg = args.cfg.unwrap_or(g.cfg);
    if steps == 0 || steps > 1000 {
        bail!("--steps must be between 1 and 1000 (got {steps})");
    }
    if !cfg.is_finite() || cfg < 0.0 {
        bail!("--cfg must be a finite number ≥ 0 (got {cfg})");
    }
    let sched_name = args
        .scheduler
        .clone()
        .unwrap_or_else(|| g.scheduler.clone());
    let scheduler = match sched_name.as_str() {
        "default" | "" => None,
        s => Some(
            s.parse::<SchedulerKind>()
                .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?,
        ),
    };
    match args.output.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => {}
        _ => bail!("output {} must end in .png", args.output.display()),
    }
    let device = config.runtime.device.parse::<DeviceSpec>()?.resolve()?;
    let dtype = config.runtime.dtype.parse::<DTypeSpec>()?.dtype();
    let path = model_path(config, args.model.as_deref())?;
    let model =
        ModelDir::open(&path).with_context(|| format!("opening model {}", path.display()))?;
    let t0 = std::time::Instant::now();
    let pipe = Pipeline::load(model, config.model.variant, dtype, &device)
        .with_context(|| format!("loading model {}", path.display()))?;
    eprintln!(
        "loaded {} ({:?}) in {:.1} s",
        path.display(),
        pipe.family(),
        t0.elapsed().as_secs_f64()
    );
    let native = pipe.native_size().unwrap_or(512);
    let pick =
        |flag: Option<usize>, conf: usize| flag.unwrap_or(if conf == 0 { native } else { conf });
    let width = pick(args.width, g.width);
    let height = pick(args.height, g.height);
    pipe.check_size(width, height)?;
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let negative = args
        .negative
        .clone()
        .or_else(|| (!g.negative.is_empty()).then(|| g.negative.clone()));
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative: negative.clone(),
        seed,
        steps,
        cfg,
        width,
        height,
        scheduler,
    };
    eprintln!("seed {seed}, {steps} steps, cfg {cfg}, {width}×{height}, scheduler {sched_name}");
    let image = pipe.generate(&req, |p| {
        let per = p.elapsed_s / p.step as f64;
        let eta = per * (p.total - p.step) as f64;
        eprint!(
            "\rstep {:>3}/{} (t={:>3})  {:.2} s/step  ETA {:.0} s   ",
            p.step, p.total, p.timestep, per, eta
        );
        let _ = std::io::stderr().flush();
    })?;
    eprintln!();
    let meta = GenerationMeta {
        prompt: req.prompt.clone(),
        negative,
        seed,
        steps,
        cfg,
        scheduler: sched_name,
        model: path.display().to_string(),
        width: width as u32,
        height: height as u32,
        extra: [("dtype".to_string(), serde_json::json!(config.runtime.dtype))].into(),
    };
    let rgb = image_io::tensor_to_rgb8(&image)?;
    image_io::save_png_with_text(
        &args.output,
        rgb.as_raw(),
        rgb.width(),
        rgb.height(),
        &meta.text_chunks(),
    )
    .with_context(|| format!("writing {}", args.output.display()))?;
    println!("{}", args.output.display());
    Ok(())
}
