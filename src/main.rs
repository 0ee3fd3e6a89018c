//! The `pairstyle` command line: parses flags, merges them over the config file, and calls the
//! library. Errors are reported with `anyhow` context and a non-zero exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use pairstyle::config::Config;
use pairstyle::engine::device::{DTypeSpec, DeviceSpec};
use pairstyle::engine::image_io;
use pairstyle::engine::model_dir::ModelDir;
use pairstyle::engine::pipeline::Pipeline;
use pairstyle::engine::scheduler::{SchedulerConfig, SchedulerKind};
use pairstyle::generate::{GenerateError, GenerationRequest, StyleWeight};
use pairstyle::library::{Library, StyleMeta};
use pairstyle::lora::ExportFormat;
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
    /// Without a command: the terminal UI (`pairstyle tui`).
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Print benchmark numbers: Pair Customization against its baselines with ground truth, the
    /// toy model's quality bars, and the cost of training iterations and sampling steps.
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
    /// Run the daemon: train image pairs dropped into the watch folder, serve the IPC socket.
    Daemon {
        /// Drop folder (default: [daemon] watch, else <state dir>/watch).
        #[arg(long)]
        watch: Option<PathBuf>,
        /// Base model folder for training (default: [model] path).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// The terminal UI (also what `pairstyle` alone opens): styles, jobs, blended generation and
    /// the drop folder. Starts a daemon inside this process when none answers on the socket.
    Tui {
        /// Drop folder for a daemon started here (default: [daemon] watch).
        #[arg(long)]
        watch: Option<PathBuf>,
        /// Base model folder for a daemon started here (default: [model] path).
        #[arg(long)]
        model: Option<PathBuf>,
        /// How pictures are drawn: auto, halfblocks, kitty, sixel or iterm2 (default: [tui]
        /// graphics).
        #[arg(long, value_name = "MODE")]
        graphics: Option<pairstyle::tui::graphics::GraphicsSetting>,
    },
    /// Ask the running daemon about itself, its devices and its job queue.
    Status {
        /// Print JSON ({"daemon": ..., "jobs": [...]}) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StylesCommand {
    /// List the learned styles.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Library folder (default: [library] path, else the daemon's <state dir>/styles).
        #[arg(long)]
        library: Option<PathBuf>,
    },
    /// Show one style: its description, provenance, files and previews.
    Show {
        /// Style name.
        name: String,
        /// Print JSON (the style.toml facts plus its folder and files) instead of text.
        #[arg(long)]
        json: bool,
        /// Library folder (default: [library] path, else the daemon's <state dir>/styles).
        #[arg(long)]
        library: Option<PathBuf>,
    },
    /// Rename a style (its folder, style.toml and the adapter's metadata).
    Rename {
        /// Current name.
        from: String,
        /// New name.
        to: String,
        /// Library folder (default: [library] path, else the daemon's <state dir>/styles).
        #[arg(long)]
        library: Option<PathBuf>,
    },
    /// Move a style to the trash folder (<state dir>/trash); nothing is deleted.
    Remove {
        /// Style name.
        name: String,
        /// Library folder (default: [library] path, else the daemon's <state dir>/styles).
        #[arg(long)]
        library: Option<PathBuf>,
    },
    /// Export a style as a LoRA file (the same as `pairstyle export`).
    Export(ExportArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Pair Customization against its baselines on the synthetic world, with exact ground truth:
    /// for each style transform, train on ONE pair, generate for held-out prompts and seeds, and
    /// write a Markdown + CSV table and contact sheets to --out.
    Method(MethodBenchArgs),
    /// The toy model's quality bars: prompt accuracy on held-out prompts (read by the analyser)
    /// and VAE reconstruction PSNR on held-out scenes.
    ToyModel(ToyModelBenchArgs),
    /// Performance: time, peak memory, FLOPs needed and fraction of the measured machine peak
    /// of one Pair Customization training iteration (content + style step) and of sampling steps
    /// with 0 (plain CFG), 1, 2 and 4 styles, on a model folder's UNet or a real-size random one;
    /// with --vs-reference, also the PyTorch reference and the ratios ours/reference.
    /// `bench cost` is the old name.
    #[command(alias = "cost")]
    Perf(PerfArgs),
}

#[derive(Debug, clap::Args)]
struct PerfArgs {
    /// Model folder whose UNet to use (its real weights).
    #[arg(long, conflicts_with = "size")]
    model: Option<PathBuf>,
    /// Or a real-size architecture with random weights: sd15 or sdxl.
    #[arg(long)]
    size: Option<String>,
    /// Latent side of the training iteration (32 = 256 px for an 8× VAE).
    #[arg(long, default_value_t = 32)]
    latent: usize,
    /// Latent side of the sampling steps (default: --latent).
    #[arg(long)]
    sample_latent: Option<usize>,
    /// LoRA rank of both adapters.
    #[arg(long, default_value_t = 64)]
    rank: usize,
    /// Timed repetitions per case (after one warm-up); the median is printed.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Style counts for the sampling cases (0 = plain CFG).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,4")]
    styles: Vec<usize>,
    /// Skip the training iteration (sampling cases only).
    #[arg(long)]
    no_train: bool,
    /// CPU threads (default: [runtime] threads, else $RAYON_NUM_THREADS, else all cores); the
    /// reference gets the same number.
    #[arg(long)]
    threads: Option<usize>,
    /// Also run the PyTorch reference (tools/reference/bench_reference.py) with the same cases
    /// and threads, then print the ratios ours/reference.
    #[arg(long)]
    vs_reference: bool,
    /// Python for the reference (default: $PYTHON, else tools/reference/.venv/bin/python if it
    /// exists, else python3).
    #[arg(long, requires = "vs_reference")]
    python: Option<PathBuf>,
    /// The reference script (default: tools/reference/bench_reference.py of the source tree).
    #[arg(long, requires = "vs_reference")]
    reference_script: Option<PathBuf>,
    /// Reference only: copy two costs of the published Pair Customization code (see
    /// tools/reference/README.md).
    #[arg(long, requires = "vs_reference")]
    as_published: bool,
    /// Reference only: also time each N-style step as one PEFT mixed-adapter batch.
    #[arg(long, requires = "vs_reference")]
    mixed_batch: bool,
}

#[derive(Debug, clap::Args)]
struct MethodBenchArgs {
    /// Model folder (default: [model] path, else the embedded toy model). Its world must be the
    /// synthetic world, since the analyser reads the outputs.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output folder for table.md, table.csv, sheet.png and sheet-<style>.png.
    #[arg(long, default_value = "bench-method")]
    out: PathBuf,
    /// A setting that runs in minutes (2 styles, 1 prompt per category, 1 seed, few steps).
    #[arg(long)]
    quick: bool,
    /// Styles to learn (default: all eight, or two with --quick).
    #[arg(long, value_delimiter = ',')]
    styles: Vec<String>,
    /// Prompts per category (same shape / different shape).
    #[arg(long)]
    prompts: Option<usize>,
    /// Seeds per prompt.
    #[arg(long)]
    seeds: Option<usize>,
    /// Denoising steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Training iterations per method (the style step starts after a quarter of them).
    #[arg(long)]
    iterations: Option<usize>,
    /// Learning rate of every trained method.
    #[arg(long)]
    lr: Option<f64>,
    /// Classifier-free guidance scale (default: the model's recommended scale, else the
    /// benchmark's 4).
    #[arg(long)]
    cfg: Option<f64>,
    /// Style guidance weight λ (default: 0.75 × the guidance scale, between the paper's 3/5 for
    /// prompts of the training pair's category and 4/5 for others).
    #[arg(long)]
    lambda: Option<f64>,
    /// LoRA scale of the LoRA-scale baselines.
    #[arg(long)]
    lora_scale: Option<f64>,
    /// Pairs of the multi-pair row (below 2 skips it).
    #[arg(long)]
    multi_pairs: Option<usize>,
}

#[derive(Debug, clap::Args)]
struct ToyModelBenchArgs {
    /// Model folder (default: [model] path, else the embedded toy model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Held-out prompts to generate and analyse.
    #[arg(long, default_value_t = 200)]
    prompts: usize,
    /// Prompts of combinations seen in training (a diagnostic beside the bars; 0 skips it).
    #[arg(long, default_value_t = 200)]
    seen_prompts: usize,
    /// Held-out scenes through the VAE.
    #[arg(long, default_value_t = 200)]
    vae_scenes: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Classifier-free guidance scale (default: the model's recommended scale, its
    /// pairstyle.json, else 7.5).
    #[arg(long)]
    cfg: Option<f64>,
    /// Seed of prompts, scenes and noise (0: the reported bars; another seed gives a disjoint
    /// draw, e.g. to choose settings on prompts the bars are not measured on).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for a contact sheet of samples (samples.png).
    #[arg(long)]
    out: Option<PathBuf>,
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
    /// Library folder (default: [library] path, else the daemon's <state dir>/styles).
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
    let command = cli.command.unwrap_or(Command::Tui {
        watch: None,
        model: None,
        graphics: None,
    });
    if let Command::Tui { .. } = &command {
        // The screen belongs to the UI: log to a file instead of stderr.
        init_file_logging(&config)?;
    } else {
        init_logging(&config.log.level);
    }
    if let Some(src) = &source {
        tracing::debug!("config from {}", src.display());
    }
    if config.runtime.threads > 0 {
        // candle sizes its CPU thread pools from RAYON_NUM_THREADS; set it before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", config.runtime.threads.to_string());
    }
    if config.runtime.reuse_host_memory && !pairstyle::engine::device::keep_freed_host_memory() {
        tracing::debug!("the host allocator does not take the reuse settings; using its defaults");
    }
    match command {
        Command::Generate(args) => generate(&config, args),
        Command::Info { model } => info(&config, model.as_deref()),
        Command::Train(args) => train(&config, args),
        Command::Export(args) => export(&config, args),
        Command::Styles { command } => styles(&config, command),
        Command::Bench { command } => bench(&config, command),
        Command::Toy { command } => toy(command),
        Command::Daemon { watch, model } => daemon(config.clone(), watch, model.as_deref()),
        Command::Status { json } => status(&config, json),
        Command::Tui {
            watch,
            model,
            graphics,
        } => {
            let mut config = config.clone();
            if let Some(g) = graphics {
                config.tui.graphics = g;
            }
            tui(config, watch, model.as_deref())
        }
        Command::Config => {
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
    }
}

fn daemon(mut config: Config, watch: Option<PathBuf>, model: Option<&Path>) -> Result<()> {
    if let Some(w) = watch {
        config.daemon.watch = w.display().to_string();
    }
    let model = model_path(&config, model)?;
    pairstyle::daemon::service::run(config, model)?;
    Ok(())
}

fn status(config: &Config, json: bool) -> Result<()> {
    use pairstyle::daemon::protocol::{ReplyBody, Request};
    let paths = pairstyle::daemon::paths::DaemonPaths::resolve(&config.daemon, &config.library)?;
    let mut client = pairstyle::daemon::server::Client::connect(
        &paths.socket,
        "pairstyle status",
        std::time::Duration::from_secs(10),
    )
    .with_context(|| format!("no daemon answers on {}", paths.socket.display()))?;
    let report = match client.request(Request::Status)? {
        Ok(ReplyBody::Status(s)) => s,
        Ok(other) => bail!("unexpected reply from the daemon: {other:?}"),
        Err((_, message)) => bail!("the daemon refused: {message}"),
    };
    let jobs = match client.request(Request::ListJobs)? {
        Ok(ReplyBody::Jobs { jobs }) => jobs,
        Ok(other) => bail!("unexpected reply from the daemon: {other:?}"),
        Err((_, message)) => bail!("the daemon refused: {message}"),
    };
    if json {
        let value = serde_json::json!({ "daemon": report, "jobs": jobs });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!(
            "{}",
            pairstyle::daemon::status::format_status(&report, &jobs)
        );
    }
    Ok(())
}

/// `pairstyle tui`: connect to the daemon, or start one in this process when none answers.
fn tui(mut config: Config, watch: Option<PathBuf>, model: Option<&Path>) -> Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!(
            "the terminal UI needs a terminal (stdin and stdout are not one); \
             `pairstyle --help` lists the other commands"
        );
    }
    if let Some(w) = watch {
        config.daemon.watch = w.display().to_string();
    }
    let paths = pairstyle::daemon::paths::DaemonPaths::resolve(&config.daemon, &config.library)?;
    let embedded = if pairstyle::tui::daemon_answers(&paths.socket) {
        None
    } else {
        let model = model_path(&config, model)?;
        let daemon = pairstyle::daemon::embedded::EmbeddedDaemon::start(config.clone(), model)
            .context("starting a daemon in this process (none answered on the socket)")?;
        Some(daemon)
    };
    let result = pairstyle::tui::run(pairstyle::tui::TuiOptions {
        config,
        socket: paths.socket.clone(),
        embedded: embedded.is_some(),
    });
    if let Some(daemon) = embedded {
        eprintln!("stopping the embedded daemon (a running job resumes at the next start)…");
        daemon.shutdown();
    }
    result?;
    Ok(())
}

/// Logging for the terminal UI: into `<state dir>/tui.log`, since the screen is the UI's.
fn init_file_logging(config: &Config) -> Result<()> {
    let paths = pairstyle::daemon::paths::DaemonPaths::resolve(&config.daemon, &config.library)?;
    std::fs::create_dir_all(&paths.state_dir)
        .with_context(|| format!("creating {}", paths.state_dir.display()))?;
    let file = paths.state_dir.join("tui.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .with_context(|| format!("opening the log file {}", file.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .try_init();
    Ok(())
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
    let dir = pairstyle::toy::embedded::ensure_installed()
        .context("installing the embedded toy model (no [model] path is configured)")?;
    tracing::info!(
        "no model configured: using the embedded toy model ({})",
        dir.display()
    );
    Ok(dir)
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
    let styles = args
        .styles
        .iter()
        .map(|a| parse_style_arg(a))
        .collect::<Result<Vec<_>>>()?;
    let request = GenerationRequest {
        prompt: args.prompt.clone(),
        negative: args.negative.clone(),
        styles,
        seed: args.seed,
        steps: args.steps,
        cfg: args.cfg,
        width: args.width,
        height: args.height,
        scheduler: args.scheduler.clone(),
        style_from: args.style_from,
        lora_scale: args.lora_scale,
    };
    // Checked before any model work, so a bad flag fails at once.
    request.check(&config.generate, None).map_err(cli_error)?;
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
    // Again with the model's recommended guidance scale (its pairstyle.json, read at load).
    let settings = request
        .check(&config.generate, pipe.defaults().guidance_scale)
        .map_err(cli_error)?;
    eprintln!(
        "loaded {} ({:?}) in {:.1} s",
        path.display(),
        pipe.family(),
        t0.elapsed().as_secs_f64()
    );
    let mut library = library_of(config, args.library.clone());
    let label = path.display().to_string();
    let prepared =
        pairstyle::generate::prepare(&mut pipe, &request, &settings, config, &label, &mut library)
            .map_err(cli_error)?;
    for s in &prepared.styles {
        eprintln!("style {}: λ = {}, suffix {:?}", s.name, s.lambda, s.suffix);
    }
    let r = &prepared.request;
    eprintln!(
        "seed {}, {} steps, cfg {}, {}×{}, scheduler {}",
        r.seed, r.steps, r.cfg, r.width, r.height, prepared.scheduler_name
    );
    let image = prepared
        .run(&mut pipe, |p| {
            let per = p.elapsed_s / p.step as f64;
            let eta = per * (p.total - p.step) as f64;
            eprint!(
                "\rstep {:>3}/{} (t={:>3})  {:.2} s/step  ETA {:.0} s   ",
                p.step, p.total, p.timestep, per, eta
            );
            let _ = std::io::stderr().flush();
        })
        .map_err(cli_error)?;
    eprintln!();
    image
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("{}", args.output.display());
    Ok(())
}

/// A generation error in command-line words: a bad setting names its flag (`--steps ...`).
fn cli_error(e: GenerateError) -> anyhow::Error {
    match e {
        GenerateError::Setting { field, detail } => anyhow::anyhow!("--{field} {detail}"),
        other => other.into(),
    }
}

/// Parse `NAME` or `NAME=λ` (no λ: the style's default).
fn parse_style_arg(arg: &str) -> Result<StyleWeight> {
    match arg.split_once('=') {
        None => Ok(StyleWeight {
            name: arg.to_string(),
            lambda: None,
        }),
        Some((name, l)) => {
            let lambda: f64 = l
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--style {arg}: λ must be a number"))?;
            if !lambda.is_finite() {
                bail!("--style {arg}: λ must be finite");
            }
            Ok(StyleWeight {
                name: name.to_string(),
                lambda: Some(lambda),
            })
        }
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
        thumbnail: None,
        samples: None,
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
    let format = args.format.parse::<ExportFormat>()?;
    library
        .export(&args.style, format, args.model.as_deref(), &args.output)
        .with_context(|| {
            format!(
                "exporting style {:?} (pass --model DIR if its base model moved)",
                args.style
            )
        })?;
    println!("{}", args.output.display());
    Ok(())
}

/// The style library the `styles` and `generate` commands use: `--library`, else `[library]
/// path`, else `<state dir>/styles` as the daemon resolves it (the user data dir's
/// `pairstyle/styles` unless `[daemon] state_dir` says otherwise).
fn library_of(config: &Config, flag: Option<PathBuf>) -> Library {
    if let Some(p) = flag {
        return Library::new(p);
    }
    match pairstyle::daemon::paths::DaemonPaths::resolve(&config.daemon, &config.library) {
        Ok(p) => Library::new(p.library),
        Err(_) => Library::new(config.library.resolve()),
    }
}

/// The daemon's trash folder (`<state dir>/trash`).
fn trash_dir(config: &Config) -> Result<PathBuf> {
    let paths = pairstyle::daemon::paths::DaemonPaths::resolve(&config.daemon, &config.library)?;
    Ok(paths.state_dir.join(pairstyle::daemon::service::TRASH_DIR))
}

fn styles(config: &Config, command: StylesCommand) -> Result<()> {
    match command {
        StylesCommand::List { json, library } => {
            let library = library_of(config, library);
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
        StylesCommand::Show {
            name,
            json,
            library,
        } => {
            let library = library_of(config, library);
            let meta = library.meta(&name)?;
            let dir = library.style_dir(&name);
            let mut files: Vec<String> = Vec::new();
            collect_files(&dir, &dir, &mut files)?;
            files.sort();
            if json {
                let mut v = serde_json::to_value(&meta)?;
                v["folder"] = serde_json::json!(dir.display().to_string());
                v["files"] = serde_json::json!(files);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", format_style(&meta, &dir, &files));
            }
            Ok(())
        }
        StylesCommand::Rename { from, to, library } => {
            let library = library_of(config, library);
            let dir = library.rename(&from, &to)?;
            println!("renamed {from} to {to} ({})", dir.display());
            Ok(())
        }
        StylesCommand::Remove { name, library } => {
            let library = library_of(config, library);
            let dest = library.remove_to_trash(&name, &trash_dir(config)?)?;
            println!("moved {name} to {}", dest.display());
            Ok(())
        }
        StylesCommand::Export(mut args) => {
            if args.library.is_none() {
                args.library = Some(library_of(config, None).root().to_path_buf());
            }
            export(config, args)
        }
    }
}

/// Paths of the files under `dir`, relative to `root`.
fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.display().to_string());
        }
    }
    Ok(())
}

/// `pairstyle styles show` as text.
fn format_style(meta: &StyleMeta, dir: &Path, files: &[String]) -> String {
    let mut s = format!(
        "{}\n  folder:      {}\n  style:       {} (prompt suffix {:?}), default λ {}\n  \
         learned from: {} image pair(s) of {:?}\n  base model:  {}\n  \
         adapter:     rank {}, alpha {} (content rank {})\n  \
         training:    {} steps, seed {}, {:.1} s\n",
        meta.name,
        dir.display(),
        meta.style_desc,
        meta.prompt_suffix,
        meta.default_lambda,
        meta.content_sha256.len(),
        meta.subject,
        meta.base_model,
        meta.rank,
        meta.alpha,
        meta.content_rank,
        meta.steps,
        meta.seed,
        meta.training_secs
    );
    if let Some(t) = &meta.thumbnail {
        s.push_str(&format!("  thumbnail:   {}\n", dir.join(t).display()));
    }
    if let Some(g) = &meta.samples {
        s.push_str(&format!(
            "  samples:     {} ({} prompts, {} steps, seed {}, λ {})\n",
            dir.join(&g.file).display(),
            g.prompts.len(),
            g.steps,
            g.seed,
            g.lambda
        ));
    }
    s.push_str("  files:\n");
    for f in files {
        s.push_str(&format!("    {f}\n"));
    }
    s
}

fn load_pipeline(config: &Config, flag: Option<&Path>) -> Result<Pipeline> {
    let path = model_path(config, flag)?;
    let model =
        ModelDir::open(&path).with_context(|| format!("opening model {}", path.display()))?;
    let device = config.runtime.device.parse::<DeviceSpec>()?.resolve()?;
    let dtype = config.runtime.dtype.parse::<DTypeSpec>()?.dtype();
    Pipeline::load(model, config.model.variant, dtype, &device)
        .with_context(|| format!("loading model {}", path.display()))
}

/// `bench method`'s default λ as a fraction of the guidance scale: the paper's defaults are λ 3
/// (same category) and 4 (other categories) at CFG 5, i.e. 0.6 and 0.8; the benchmark's prompts
/// are half of each.
const LAMBDA_PER_CFG: f64 = 0.75;

fn bench_method(config: &Config, a: MethodBenchArgs) -> Result<()> {
    use pairstyle::bench::quality::{run_method_bench, MethodBench};
    use pairstyle::toy::StyleKind;

    let mut b = if a.quick {
        MethodBench::quick()
    } else {
        MethodBench::full()
    };
    if !a.styles.is_empty() {
        b.styles = a
            .styles
            .iter()
            .map(|s| s.parse::<StyleKind>())
            .collect::<pairstyle::Result<_>>()?;
    }
    if let Some(n) = a.prompts {
        b.prompts_per_category = n;
    }
    if let Some(n) = a.seeds {
        b.seeds = n;
    }
    if let Some(n) = a.steps {
        b.steps = n;
    }
    if let Some(n) = a.iterations {
        b.train.iterations = n;
        b.train.style_start = n / 4;
    }
    if let Some(lr) = a.lr {
        b.train.lr = lr;
    }
    if let Some(l) = a.lora_scale {
        b.lora_scale = l;
    }
    if let Some(n) = a.multi_pairs {
        b.multi_pairs = n;
    }
    if b.prompts_per_category == 0 || b.seeds == 0 || b.steps == 0 || b.styles.is_empty() {
        bail!("--prompts, --seeds, --steps and --styles must not be zero or empty");
    }
    let mut pipe = load_pipeline(config, a.model.as_deref())?;
    if let Some(c) = a.cfg.or(pipe.defaults().guidance_scale) {
        b.cfg = c;
    }
    b.lambda = a.lambda.unwrap_or(LAMBDA_PER_CFG * b.cfg);
    eprintln!("guidance scale {}, style guidance λ {}", b.cfg, b.lambda);
    if let Some(n) = pipe.native_size() {
        b.train.resolution = n;
    }
    let report = run_method_bench(&mut pipe, &b, &a.out, |line| eprintln!("{line}"))?;
    print!("{}", report.markdown());
    println!("\n(written to {})", a.out.display());
    Ok(())
}

fn bench_toy_model(config: &Config, a: ToyModelBenchArgs) -> Result<()> {
    use pairstyle::bench::quality::{run_model_quality, ModelQualityBench};
    use pairstyle::toy::analyse::Attribute;

    let pipe = load_pipeline(config, a.model.as_deref())?;
    let cfg = a
        .cfg
        .unwrap_or_else(|| config.generate.cfg.resolve(pipe.defaults().guidance_scale));
    eprintln!("guidance scale {cfg}");
    let q = ModelQualityBench {
        prompts: a.prompts,
        seen_prompts: a.seen_prompts,
        steps: a.steps,
        cfg,
        vae_scenes: a.vae_scenes,
        seed: a.seed,
    };
    let r = run_model_quality(&pipe, &q, a.out.as_deref(), |line| eprintln!("{line}"))?;
    let p = &r.prompt_accuracy;
    println!("| measure | value | bar (floor) |");
    println!("|---|---:|---|");
    println!(
        "| colour correct, {} held-out prompts | {:.1} % | ≥ 90 % (80 %) |",
        a.prompts,
        p.percent(Attribute::Colour)
    );
    println!(
        "| shape correct | {:.1} % | ≥ 90 % (75 %) |",
        p.percent(Attribute::Shape)
    );
    println!(
        "| position correct | {:.1} % | ≥ 90 % (70 %) |",
        p.percent(Attribute::Position)
    );
    println!("| size correct | {:.1} % | |", p.percent(Attribute::Size));
    println!(
        "| background correct | {:.1} % | |",
        p.percent(Attribute::Background)
    );
    println!(
        "| VAE PSNR, {} held-out scenes | {:.2} dB | ≥ 30 dB |",
        a.vae_scenes, r.vae_psnr_db
    );
    println!(
        "| VAE reconstructions with every colour right | {:.1} % | |",
        r.vae_colour_percent
    );
    println!(
        "| analyser on 500 clean renders (colour / shape / position) | {:.1} / {:.1} / {:.1} % | ≥ 98 % |",
        r.analyser_accuracy.percent(Attribute::Colour),
        r.analyser_accuracy.percent(Attribute::Shape),
        r.analyser_accuracy.percent(Attribute::Position)
    );
    let attrs = |acc: &pairstyle::toy::AttributeAccuracy| {
        format!(
            "{:.1} / {:.1} / {:.1} / {:.1} %",
            acc.percent(Attribute::Colour),
            acc.percent(Attribute::Shape),
            acc.percent(Attribute::Position),
            acc.all_correct_percent()
        )
    };
    println!("\nBreakdown (colour / shape / position / all four of an object):\n");
    println!("| objects | count | accuracy |");
    println!("|---|---:|---|");
    println!(
        "| every object of the held-out prompts | {} | {} |",
        p.objects,
        attrs(p)
    );
    println!(
        "| held-out (shape, colour) objects only | {} | {} |",
        r.held_out_objects.objects,
        attrs(&r.held_out_objects)
    );
    if a.seen_prompts > 0 {
        println!(
            "| {} new prompts of seen combinations | {} | {} |",
            a.seen_prompts,
            r.seen_prompt_accuracy.objects,
            attrs(&r.seen_prompt_accuracy)
        );
    }
    if !r.held_out_colour_errors.is_empty() {
        let errs: Vec<String> = r
            .held_out_colour_errors
            .iter()
            .map(|((want, got), n)| {
                let got = got.map_or_else(|| "none".to_string(), |g| g.to_string());
                format!("{want}→{got} {n}")
            })
            .collect();
        println!(
            "\nHeld-out objects' colour errors (asked→drawn count): {}",
            errs.join(", ")
        );
    }
    Ok(())
}

fn bench(config: &Config, command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Method(a) => bench_method(config, a),
        BenchCommand::ToyModel(a) => bench_toy_model(config, a),
        BenchCommand::Perf(a) => bench_perf(config, a),
    }
}

/// Where `tools/reference/bench_reference.py` is: under the working directory, above the
/// executable (target/<profile>/pairstyle), or in the source tree this binary was built from.
fn find_reference_script() -> PathBuf {
    let rel = Path::new("tools/reference/bench_reference.py");
    let mut candidates = vec![rel.to_path_buf()];
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).map(|d| d.join(rel)));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| rel.to_path_buf())
}

/// `pairstyle bench perf` (alias `bench cost`).
fn bench_perf(config: &Config, a: PerfArgs) -> Result<()> {
    use pairstyle::bench::compare;

    if let Some(t) = a.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        // Before any tensor work: candle's CPU kernels size their pools from this.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    let sample_latent = a.sample_latent.unwrap_or(a.latent);
    if a.latent == 0 || sample_latent == 0 || a.rank == 0 || a.reps == 0 {
        bail!("--latent, --sample-latent, --rank and --reps must be at least 1");
    }
    let device = config.runtime.device.parse::<DeviceSpec>()?.resolve()?;
    let dtype_spec = config.runtime.dtype.parse::<DTypeSpec>()?;
    let dtype = dtype_spec.dtype();
    // On a GPU, memory is reported above what was in use once the device was open.
    let device_baseline_mib = pairstyle::bench::device_mem::in_use_mib(&device);
    let device_arg = if device.is_cpu() { "cpu" } else { "cuda" };
    let dtype_arg = dtype_spec.to_string();
    if a.vs_reference && device.is_cpu() && dtype != candle_core::DType::F32 {
        bail!("--vs-reference on the CPU compares in f32 (the reference's CPU run is f32); pass --dtype f32");
    }
    let source = match (&a.model, a.size.as_deref()) {
        (Some(dir), _) => vec!["--model".to_string(), dir.display().to_string()],
        (None, Some(s @ ("sd15" | "sdxl"))) => vec!["--size".to_string(), s.to_string()],
        (None, Some(other)) => bail!("--size {other}: use sd15 or sdxl"),
        (None, None) => bail!("pass --model DIR or --size sd15|sdxl"),
    };

    // The reference first: it fails fast when Python or its packages are missing, and it runs
    // while this process holds no model.
    let reference = if a.vs_reference {
        if !device.is_cpu() && !device.is_cuda() {
            bail!("--vs-reference compares on the CPU or a CUDA GPU (where the reference runs)");
        }
        let script = a
            .reference_script
            .clone()
            .unwrap_or_else(find_reference_script);
        let python = a
            .python
            .clone()
            .or_else(|| std::env::var_os("PYTHON").map(PathBuf::from))
            .unwrap_or_else(|| {
                let venv = script
                    .parent()
                    .map(|d| d.join(".venv/bin/python"))
                    .filter(|p| p.is_file());
                venv.unwrap_or_else(|| PathBuf::from("python3"))
            });
        let styles = a
            .styles
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut args = source.clone();
        for (flag, v) in [
            ("--latent", a.latent.to_string()),
            ("--sample-latent", sample_latent.to_string()),
            ("--rank", a.rank.to_string()),
            ("--reps", a.reps.to_string()),
            ("--styles", styles),
            ("--threads", threads.to_string()),
            ("--device", device_arg.to_string()),
            ("--dtype", dtype_arg.clone()),
        ] {
            args.push(flag.to_string());
            args.push(v);
        }
        for (on, flag) in [
            (a.no_train, "--no-train"),
            (a.as_published, "--as-published"),
            (a.mixed_batch, "--mixed-batch"),
        ] {
            if on {
                args.push(flag.to_string());
            }
        }
        println!(
            "## reference: {} {} {} (OMP_NUM_THREADS={threads})",
            python.display(),
            script.display(),
            args.join(" ")
        );
        std::io::stdout().flush().ok();
        let cmd = compare::ReferenceCommand {
            python,
            script,
            args,
            threads,
        };
        let out = compare::run_reference(&cmd)?;
        print!("{out}");
        println!();
        Some(compare::parse_report(&out).context("reading the reference's table")?)
    } else {
        None
    };

    let (label, mut unet) = match (&a.model, a.size.as_deref()) {
        (Some(dir), _) => {
            let m =
                ModelDir::open(dir).with_context(|| format!("opening model {}", dir.display()))?;
            let unet =
                pairstyle::engine::unet::UNet::load(&m, config.model.variant, dtype, &device)?;
            (dir.display().to_string(), unet)
        }
        (None, Some(size)) => {
            let (json, label) = if size == "sdxl" {
                (
                    pairstyle::bench::SDXL_UNET_CONFIG,
                    "SDXL-size UNet, random weights",
                )
            } else {
                (
                    pairstyle::bench::SD15_UNET_CONFIG,
                    "SD1.5-size UNet, random weights",
                )
            };
            let unet = pairstyle::bench::random_unet(json, 0, dtype, &device)?;
            (label.to_string(), unet)
        }
        (None, None) => bail!("pass --model DIR or --size sd15|sdxl"),
    };
    // 1024³ keeps 2 CPU cores busy for ~20 ms; a GPU needs 8192³ to reach its rate.
    let gemm_n: usize = if device.is_cpu() { 1024 } else { 8192 };
    const GEMM_TRIES: usize = 10;
    let peak = pairstyle::bench::measure_gemm_peak(gemm_n, GEMM_TRIES, dtype, &device)?;
    if a.vs_reference {
        println!("## ours: pairstyle bench perf {}", source.join(" "));
    }
    let sampling = if sample_latent == a.latent {
        String::new()
    } else {
        format!(" (sampling {sample_latent}x{sample_latent})")
    };
    println!(
        "# ours (candle 0.11, {}): {label}; latent {l}x{l}{sampling}, batch 1 per branch, {}, rank {}, threads {threads}, median of {} after 1 warm-up (sampling cases interleaved: each round runs every case once, so drift slows them alike)",
        if cfg!(debug_assertions) { "dev profile" } else { "release profile" },
        if device.is_cpu() {
            dtype_arg.clone()
        } else {
            format!("{device_arg}, {dtype_arg} weights and activations, f32 LoRA and AdamW")
        },
        a.rank,
        a.reps,
        l = a.latent,
    );
    println!(
        "{} {peak:.1} GFLOP/s ({dtype_arg} GEMM {gemm_n}×{gemm_n}×{gemm_n}, candle matmul, best of {GEMM_TRIES}, {})",
        compare::PEAK_PREFIX,
        if device.is_cpu() {
            format!("{threads} threads")
        } else {
            device_arg.to_string()
        }
    );
    if let Some(base) = device_baseline_mib {
        println!("# peak device MiB: device memory in use (total − free, sampled every ms) above the {base:.0} MiB in use when the device was opened");
    }
    println!(
        "# GFLOP: needed, counted analytically (matmul-class work; training = forward + input-gradient backward of the live part + LoRA weight gradients; docs/perf.md)"
    );
    println!(
        "# sampling: all branches start from one latent, as in generation (conv_in and, without SDXL's added conditions, the first ResNet computed once), style adapters merged into f32/f64 weights where cheaper; GFLOP counts every branch in full, unmerged, like the reference's count"
    );
    if device_baseline_mib.is_none() {
        println!("# memory: before each sampling call (the first one comes after the training case) the allocator's free memory is handed back to the system (malloc_trim), as the daemon does after every job");
        println!(
            "# allocator: large freed buffers {} ([runtime] reuse_host_memory = {})",
            if config.runtime.reuse_host_memory {
                "kept for reuse"
            } else {
                "returned to the system at once (glibc defaults)"
            },
            config.runtime.reuse_host_memory
        );
    }
    std::io::stdout().flush().ok();
    let b = pairstyle::bench::PerfBench {
        latent: a.latent,
        sample_latent,
        rank: a.rank,
        reps: a.reps,
        styles: a.styles,
        train: !a.no_train,
        dtype,
        device_baseline_mib,
    };
    let rows = pairstyle::bench::run_perf_bench(&mut unet, &b, &device)?;
    let table = pairstyle::bench::perf_table(&rows, peak, device_baseline_mib.is_some());
    print!("{table}");
    println!();
    print!(
        "{}",
        pairstyle::bench::memory_table(&rows, device_baseline_mib.is_some())
    );
    if let Some(reference) = reference {
        let ours =
            compare::parse_report(&format!("{} {peak} GFLOP/s\n{table}", compare::PEAK_PREFIX))
                .context("reading our own table")?;
        println!();
        print!("{}", compare::ratio_table(&ours, &reference));
    }
    Ok(())
}

/// `pairstyle toy dataset`: render `count` seeded scenes into one u8 tensor plus captions.
fn toy_dataset(args: ToyDatasetArgs) -> Result<()> {
    use pairstyle::toy::Scene;
    use rand::SeedableRng;

    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let res = args.resolution as usize;
    let bytes = args
        .count
        .checked_mul(res * res * 3)
        .filter(|b| *b <= 16 << 30)
        .context("the dataset would exceed 16 GiB; lower --count or --resolution")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut pixels = Vec::with_capacity(bytes);
    let mut captions = String::new();
    for _ in 0..args.count {
        let scene = if args.held_out {
            Scene::random_held_out(&mut rng)
        } else {
            Scene::random_train(&mut rng)
        };
        pixels.extend_from_slice(scene.render(args.resolution)?.as_raw());
        captions.push_str(&scene.caption());
        captions.push('\n');
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let images = candle_core::Tensor::from_vec(
        pixels,
        (args.count, res, res, 3),
        &candle_core::Device::Cpu,
    )?;
    let tmp = args.output.join("images.safetensors.tmp");
    images.save_safetensors("images", &tmp)?;
    std::fs::rename(&tmp, args.output.join("images.safetensors"))?;
    image_io::write_file_atomic(&args.output.join("captions.txt"), captions.as_bytes())?;
    println!(
        "wrote {} scenes at {res}x{res} to {}",
        args.count,
        args.output.display()
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
enum ToyCommand {
    /// Render a scene of the synthetic world (from its caption, or a random one from a seed),
    /// optionally stylised, to a PNG carrying the caption in a text chunk.
    Render(ToyRenderArgs),
    /// Write a training set of the world for pretraining the toy model: `images.safetensors`
    /// (tensor "images", u8, N × res × res × 3) and `captions.txt` (one caption per line, same
    /// order). Scenes never use the held-out (shape, colour) combinations unless --held-out.
    Dataset(ToyDatasetArgs),
    /// Write the embedded toy model (the default model) as a diffusers folder, and print how it
    /// was trained.
    Model {
        /// Output folder (must not exist).
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ToyDatasetArgs {
    /// Number of scenes.
    #[arg(long)]
    count: usize,
    /// Seed of the scene sampler: the same seed always gives the same set.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image side in pixels (64 or more).
    #[arg(long, default_value_t = 64)]
    resolution: u32,
    /// Draw evaluation scenes whose first object uses a held-out combination instead.
    #[arg(long)]
    held_out: bool,
    /// Output folder (created).
    #[arg(short, long)]
    output: PathBuf,
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

    let args = match command {
        ToyCommand::Render(args) => args,
        ToyCommand::Dataset(args) => return toy_dataset(args),
        ToyCommand::Model { output } => {
            pairstyle::toy::embedded::write_to(&output)?;
            println!(
                "wrote the embedded toy model ({:.1} MB, fingerprint {}) to {}",
                pairstyle::toy::embedded::total_bytes() as f64 / 1e6,
                pairstyle::toy::embedded::fingerprint(),
                output.display()
            );
            return Ok(());
        }
    };
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
