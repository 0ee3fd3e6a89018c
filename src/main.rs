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
use pairstyle::engine::pipeline::{GenerateRequest, Guidance, Pipeline, StyleTerm};
use pairstyle::engine::scheduler::{SchedulerConfig, SchedulerKind};
use pairstyle::engine::unet::{UNetConfig, UNetConfigFile};
use pairstyle::library::{Library, StyleMeta};
use pairstyle::lora::{
    export_kohya, export_peft, ExportFormat, ExportInfo, LoadOptions, ModuleCatalog,
};
use pairstyle::trainer::{PairSpec, PairTrainer, TrainConfig};

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
    /// Learn a style from one content/style image pair and register it in the library.
    Train(TrainArgs),
    /// Export a style as a LoRA file other tools load (kohya for A1111/ComfyUI, PEFT for diffusers).
    Export(ExportArgs),
    /// Print benchmark numbers (time per training iteration and per sampling step, peak memory).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Work with the style library.
    Styles {
        #[command(subcommand)]
        command: StylesCommand,
    },
    /// The synthetic world: render captioned scenes and their exact stylisations.
    Toy {
        #[command(subcommand)]
        command: ToyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StylesCommand {
    /// List the learned styles.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Library folder (default: [library] path).
        #[arg(long)]
        library: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Pair Customization costs: one training iteration (content + style step) and a sampling step
    /// with 0 (plain CFG), 1, 2 and 4 styles, on a model folder's UNet or a real-size random one.
    Method {
        /// Model folder whose UNet to use (its real weights).
        #[arg(long, conflicts_with = "size")]
        model: Option<PathBuf>,
        /// Or a real-size architecture with random weights: sd15 or sdxl.
        #[arg(long)]
        size: Option<String>,
        /// Latent side (32 = 256 px for an 8× VAE).
        #[arg(long, default_value_t = 32)]
        latent: usize,
        /// LoRA rank of both adapters.
        #[arg(long, default_value_t = 64)]
        rank: usize,
        /// Timed repetitions per case (after one warm-up); the median is printed.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Style counts for the sampling cases.
        #[arg(long, value_delimiter = ',', default_value = "0,1,2,4")]
        styles: Vec<usize>,
    },
}

#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// The un-stylised image; repeat with --style for a multi-pair style (pairs match in order).
    #[arg(long, required = true)]
    content: Vec<PathBuf>,
    /// The same image, stylised (one per --content).
    #[arg(long, required = true)]
    style: Vec<PathBuf>,
    /// What the image shows, e.g. "dog" (prompt: "a photo of a sbu dog"); once, or once per pair.
    #[arg(long, required = true)]
    subject: Vec<String>,
    /// The style in words, e.g. "watercolor" (prompt suffix: " in watercolor style").
    #[arg(long = "style-desc")]
    style_desc: String,
    /// Name of the style in the library (default: the style image's file stem).
    #[arg(long)]
    name: Option<String>,
    /// Base model folder (diffusers layout); default: [model] path.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training iterations (default: [train] iterations).
    #[arg(long)]
    steps: Option<usize>,
    /// Training seed (default: [train] seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Training resolution (default: [train] resolution).
    #[arg(long)]
    resolution: Option<usize>,
    /// Library folder to register the style in (default: [library] path).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// Style name in the library.
    style: String,
    /// kohya (A1111, ComfyUI, Forge) or peft (diffusers).
    #[arg(long, default_value = "kohya")]
    format: String,
    /// Output .safetensors file.
    #[arg(short, long)]
    output: PathBuf,
    /// Base model folder, to name the layers (default: the model the style was trained on).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Library folder (default: [library] path).
    #[arg(long)]
    library: Option<PathBuf>,
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
    /// Apply a learned style with style guidance: NAME or NAME=λ (repeatable, to blend styles).
    #[arg(long = "style", value_name = "NAME[=λ]")]
    styles: Vec<String>,
    /// First step (0-based) with style guidance (default: [style] from_step).
    #[arg(long)]
    style_from: Option<usize>,
    /// Baseline instead of style guidance: ordinary CFG with the (single) style's LoRA at this scale.
    #[arg(long, value_name = "ALPHA")]
    lora_scale: Option<f64>,
    /// Library folder (default: [library] path).
    #[arg(long)]
    library: Option<PathBuf>,
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
        Command::Train(args) => train(&config, args),
        Command::Export(args) => export(&config, args),
        Command::Styles { command } => styles(&config, command),
        Command::Bench { command } => bench(&config, command),
        Command::Toy { command } => toy(command),
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
    let mut pipe = Pipeline::load(model, config.model.variant, dtype, &device)
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
    let library = Library::new(
        args.library
            .clone()
            .unwrap_or_else(|| config.library.resolve()),
    );
    let guidance = style_guidance(config, &args, &library, &mut pipe)?;
    eprintln!("seed {seed}, {steps} steps, cfg {cfg}, {width}×{height}, scheduler {sched_name}");
    let image = pipe.generate_guided(&req, &guidance, |p| {
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
        extra: [
            ("dtype".to_string(), serde_json::json!(config.runtime.dtype)),
            ("guidance".to_string(), guidance_json(&guidance)),
        ]
        .into(),
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

/// Parse `NAME` or `NAME=λ`.
fn parse_style_arg(arg: &str, default_lambda: f64) -> Result<(String, f64)> {
    match arg.split_once('=') {
        None => Ok((arg.to_string(), default_lambda)),
        Some((name, l)) => {
            let lambda: f64 = l
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--style {arg}: λ must be a number"))?;
            if !lambda.is_finite() {
                bail!("--style {arg}: λ must be finite");
            }
            Ok((name.to_string(), lambda))
        }
    }
}

/// Load the styles named on the command line, attach them, and build the guidance.
fn style_guidance(
    config: &Config,
    args: &GenerateArgs,
    library: &Library,
    pipe: &mut Pipeline,
) -> Result<Guidance> {
    if args.styles.is_empty() {
        if args.lora_scale.is_some() {
            bail!("--lora-scale needs one --style");
        }
        return Ok(Guidance::Cfg);
    }
    let mut terms = Vec::new();
    for arg in &args.styles {
        let (name, lambda) = parse_style_arg(arg, f64::NAN)?;
        let style = library
            .load(&name, pipe.unet(), pipe.dtype(), pipe.device())
            .with_context(|| format!("loading style {name:?} from {}", library.root().display()))?;
        let lambda = if lambda.is_nan() {
            style.meta.default_lambda
        } else {
            lambda
        };
        style.adapter.attach(pipe.unet_mut(), &name)?;
        eprintln!(
            "style {name}: λ = {lambda}, suffix {:?}",
            style.meta.prompt_suffix
        );
        terms.push(StyleTerm {
            adapter: name,
            lambda,
            suffix: style.meta.prompt_suffix.clone(),
            scale: 1.0,
        });
    }
    if let Some(alpha) = args.lora_scale {
        if terms.len() != 1 {
            bail!("--lora-scale takes exactly one --style");
        }
        let t = terms.remove(0);
        return Ok(Guidance::LoraScale {
            adapter: t.adapter,
            alpha,
            suffix: t.suffix,
        });
    }
    Ok(Guidance::Styles {
        styles: terms,
        from_step: args.style_from.unwrap_or(config.style.from_step),
    })
}

fn guidance_json(g: &Guidance) -> serde_json::Value {
    match g {
        Guidance::Cfg => serde_json::json!("cfg"),
        Guidance::Styles { styles, from_step } => serde_json::json!({
            "mode": "style",
            "from_step": from_step,
            "styles": styles.iter().map(|s| serde_json::json!({"name": s.adapter, "lambda": s.lambda, "suffix": s.suffix})).collect::<Vec<_>>(),
        }),
        Guidance::LoraScale {
            adapter,
            alpha,
            suffix,
        } => serde_json::json!({
            "mode": "lora-scale", "style": adapter, "alpha": alpha, "suffix": suffix,
        }),
    }
}

/// sha256 over the pairs' bytes and wording, the training settings and the base model: a run's
/// identity (a checkpoint is resumed only by the same run).
fn run_fingerprint(specs: &[PairSpec], cfg: &TrainConfig, model: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for spec in specs {
        for p in [&spec.content, &spec.style] {
            h.update(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
        }
        h.update(spec.subject.as_bytes());
        h.update(spec.style_desc.as_bytes());
    }
    h.update(serde_json::to_vec(cfg)?);
    h.update(model.display().to_string().as_bytes());
    Ok(format!("{:x}", h.finalize()))
}

fn train(config: &Config, args: TrainArgs) -> Result<()> {
    let mut cfg = config.train.clone();
    if let Some(n) = args.steps {
        cfg.iterations = n;
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(r) = args.resolution {
        cfg.resolution = r;
    }
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("training settings: {e}"))?;
    if args.content.len() != args.style.len() {
        bail!(
            "{} --content but {} --style images: give one style image per content image",
            args.content.len(),
            args.style.len()
        );
    }
    if args.subject.len() != 1 && args.subject.len() != args.content.len() {
        bail!(
            "give --subject once, or once per pair ({} pairs)",
            args.content.len()
        );
    }
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args.style[0]
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "style".into()),
    };
    pairstyle::library::validate_name(&name)?;
    let library = Library::new(args.out.clone().unwrap_or_else(|| config.library.resolve()));
    if library.contains(&name) {
        bail!(
            "a style named {name:?} already exists in {}",
            library.root().display()
        );
    }
    let specs: Vec<PairSpec> = (0..args.content.len())
        .map(|i| PairSpec {
            content: args.content[i].clone(),
            style: args.style[i].clone(),
            subject: args.subject.get(i).unwrap_or(&args.subject[0]).clone(),
            style_desc: args.style_desc.clone(),
        })
        .collect();
    for spec in &specs {
        for p in [&spec.content, &spec.style] {
            if !p.is_file() {
                bail!("image {} does not exist", p.display());
            }
        }
    }
    let device = config.runtime.device.parse::<DeviceSpec>()?.resolve()?;
    let dtype = config.runtime.dtype.parse::<DTypeSpec>()?.dtype();
    let path = model_path(config, args.model.as_deref())?;
    let model =
        ModelDir::open(&path).with_context(|| format!("opening model {}", path.display()))?;
    let mut pipe = Pipeline::load(model, config.model.variant, dtype, &device)
        .with_context(|| format!("loading model {}", path.display()))?;
    let fingerprint = run_fingerprint(&specs, &cfg, &path)?;
    let ck_dir = library.checkpoint_dir();
    std::fs::create_dir_all(&ck_dir).with_context(|| format!("creating {}", ck_dir.display()))?;
    let ck_path = ck_dir.join(format!("{}.safetensors", &fingerprint[..16]));
    let started = std::time::Instant::now();
    let created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut trainer = PairTrainer::new_multi(&mut pipe, &specs, cfg.clone(), fingerprint)?;
    let first = trainer.with_checkpoint(ck_path.clone())?;
    if first > 0 {
        println!("resuming from iteration {first} ({})", ck_path.display());
    }
    let total = cfg.iterations;
    trainer.run(
        |p| {
            let eta = (p.total - p.iteration) as f64 / p.it_per_s.max(1e-9);
            let style = p
                .loss_style
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into());
            println!(
                "iter {:>4}/{}  loss content {:.4}  style {}  {:.2} it/s  ETA {:.0} s",
                p.iteration, p.total, p.loss_content, style, p.it_per_s, eta
            );
            let _ = std::io::stdout().flush();
        },
        || false,
    )?;
    let adapter = trainer.style_adapter().to_adapter_set()?;
    drop(trainer);
    let sha = |f: fn(&PairSpec) -> &PathBuf| -> Result<Vec<String>> {
        specs
            .iter()
            .map(|p| Ok(pairstyle::library::sha256_file(f(p))?))
            .collect()
    };
    let meta = StyleMeta {
        name: name.clone(),
        subject: args.subject.join(", "),
        style_desc: args.style_desc.clone(),
        prompt_suffix: format!(" in {} style", args.style_desc),
        default_lambda: config.style.lambda,
        base_model: path.display().to_string(),
        rank: cfg.style_rank,
        alpha: cfg.alpha_for(cfg.style_rank),
        content_rank: cfg.content_rank,
        seed: cfg.seed,
        steps: total,
        training_secs: started.elapsed().as_secs_f64(),
        content_sha256: sha(|p| &p.content)?,
        style_sha256: sha(|p| &p.style)?,
        created_unix,
    };
    let files: Vec<PathBuf> = specs
        .iter()
        .flat_map(|p| [p.content.clone(), p.style.clone()])
        .collect();
    let dir = library.register(&meta, &adapter, &files)?;
    let _ = std::fs::remove_file(&ck_path);
    println!("registered style {name} in {}", dir.display());
    Ok(())
}

fn export(config: &Config, args: ExportArgs) -> Result<()> {
    let library = Library::new(
        args.library
            .clone()
            .unwrap_or_else(|| config.library.resolve()),
    );
    let meta = library.meta(&args.style)?;
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(&meta.base_model));
    let model = ModelDir::open(&model_path).with_context(|| {
        format!(
            "opening base model {} (pass --model DIR)",
            model_path.display()
        )
    })?;
    let unet_file: UNetConfigFile = model.config("unet")?;
    let unet_cfg = UNetConfig::resolve(unet_file, &model.config_path("unet"))?;
    let catalog = ModuleCatalog::from_config(&unet_cfg);
    let opts = LoadOptions::default();
    let loaded = pairstyle::lora::load(
        &library
            .style_dir(&args.style)
            .join(pairstyle::library::STYLE_FILE),
        &catalog,
        &opts,
    )?;
    let mut info = ExportInfo::new(model.family()?, &args.style);
    info.description = Some(format!(
        "Pair Customization style \"{}\" learned from one {} image pair",
        meta.style_desc, meta.subject
    ));
    info.trigger_phrase = Some(meta.prompt_suffix.trim().to_string());
    info.steps = Some(meta.steps as u64);
    info.seed = Some(meta.seed);
    match args.format.parse::<ExportFormat>()? {
        ExportFormat::Kohya => export_kohya(&loaded.set, &catalog, &info, &args.output)?,
        ExportFormat::Peft => export_peft(&loaded.set, &info, &args.output)?,
    }
    println!("{}", args.output.display());
    Ok(())
}

fn styles(config: &Config, command: StylesCommand) -> Result<()> {
    match command {
        StylesCommand::List { json, library } => {
            let library = Library::new(library.unwrap_or_else(|| config.library.resolve()));
            let all = library.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no styles in {}", library.root().display());
            } else {
                for s in all {
                    println!(
                        "{:<24} {:<20} λ {:<4} rank {:<3} {} steps",
                        s.name, s.style_desc, s.default_lambda, s.rank, s.steps
                    );
                }
            }
            Ok(())
        }
    }
}

fn bench(config: &Config, command: BenchCommand) -> Result<()> {
    let BenchCommand::Method {
        model,
        size,
        latent,
        rank,
        reps,
        styles,
    } = command;
    let device = config.runtime.device.parse::<DeviceSpec>()?.resolve()?;
    let (label, mut unet) = match (model, size.as_deref()) {
        (Some(dir), _) => {
            let m =
                ModelDir::open(&dir).with_context(|| format!("opening model {}", dir.display()))?;
            let unet = pairstyle::engine::unet::UNet::load(
                &m,
                config.model.variant,
                candle_core::DType::F32,
                &device,
            )?;
            (dir.display().to_string(), unet)
        }
        (None, Some("sd15")) => (
            "SD1.5-size UNet, random weights".to_string(),
            pairstyle::bench::random_unet(
                pairstyle::bench::SD15_UNET_CONFIG,
                0,
                candle_core::DType::F32,
                &device,
            )?,
        ),
        (None, Some("sdxl")) => (
            "SDXL-size UNet, random weights".to_string(),
            pairstyle::bench::random_unet(
                pairstyle::bench::SDXL_UNET_CONFIG,
                0,
                candle_core::DType::F32,
                &device,
            )?,
        ),
        (None, Some(other)) => bail!("--size {other}: use sd15 or sdxl"),
        (None, None) => bail!("pass --model DIR or --size sd15|sdxl"),
    };
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        format!(
            "{} (all)",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        )
    });
    println!("# {label}; latent {latent}x{latent}, batch 1 per branch, f32, rank {rank}, threads {threads}, median of {reps} after 1 warm-up");
    let b = pairstyle::bench::MethodBench {
        latent,
        rank,
        reps,
        styles,
    };
    let rows = pairstyle::bench::run_method_bench(&mut unet, &b, &device)?;
    let plain = rows
        .iter()
        .find(|r| r.case.contains("plain CFG"))
        .map(|r| r.median_s);
    println!("| case | s | × plain CFG step | peak RSS MiB |");
    println!("|---|---|---|---|");
    for r in rows {
        let ratio = match plain {
            Some(p) if r.case.starts_with("sampling") => format!("{:.2}", r.median_s / p),
            _ => "".into(),
        };
        println!(
            "| {} | {:.3} | {} | {:.0} |",
            r.case, r.median_s, ratio, r.peak_mib
        );
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum ToyCommand {
    /// Render a scene of the synthetic world (from its caption, or a random one from a seed),
    /// optionally stylised, to a PNG carrying the caption in a text chunk.
    Render(ToyRenderArgs),
}

#[derive(Debug, clap::Args)]
struct ToyRenderArgs {
    /// Caption in the world's grammar, e.g. "a large red star on the left, on a grey background".
    #[arg(long)]
    prompt: Option<String>,
    /// Style transform: invert, sepia, posterise, pixelate, outline, blur, hatch, grain.
    #[arg(long)]
    style: Option<String>,
    /// Image side in pixels (64 or more).
    #[arg(long, default_value_t = 64)]
    resolution: u32,
    /// Seed: of the random scene when no --prompt is given, and of the style (grain).
    #[arg(long)]
    seed: Option<u64>,
    /// Output PNG path.
    #[arg(short, long)]
    output: PathBuf,
}

fn toy(command: ToyCommand) -> Result<()> {
    use pairstyle::toy::{Scene, StyleKind};
    use rand::SeedableRng;

    let ToyCommand::Render(args) = command;
    let style = args
        .style
        .as_deref()
        .map(str::parse::<StyleKind>)
        .transpose()?;
    let scene = match (&args.prompt, args.seed) {
        (Some(p), _) => Scene::parse(p)?,
        (None, Some(seed)) => Scene::random(&mut rand::rngs::StdRng::seed_from_u64(seed)),
        (None, None) => bail!("pass --prompt CAPTION, or --seed N for a random scene"),
    };
    let mut img = scene.render(args.resolution)?;
    if let Some(s) = style {
        img = s.apply(&img, args.seed.unwrap_or(0));
    }
    let caption = scene.caption();
    let mut text = vec![("caption".to_string(), caption.clone())];
    if let Some(s) = style {
        text.push(("style".to_string(), s.to_string()));
    }
    if let Some(seed) = args.seed {
        text.push(("seed".to_string(), seed.to_string()));
    }
    image_io::save_png_with_text(&args.output, img.as_raw(), img.width(), img.height(), &text)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("{caption}");
    Ok(())
}
