//! Helpers of the daemon's process-level tests: a temporary setup (config, watch and state
//! folders) around the tiny SD1.5 fixture, starting and stopping `pairstyle daemon`, waiting
//! with a deadline, and styles with random weights registered straight into the library.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};

use pairstyle::library::{Library, StyleMeta};
use pairstyle::lora::AdapterSet;

/// How long any wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(300);

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A daemon's folders and config in a scratch folder.
pub struct Setup {
    /// The scratch folder.
    pub root: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The drop folder.
    pub watch: PathBuf,
    /// The state folder.
    pub state: PathBuf,
    /// The socket.
    pub socket: PathBuf,
}

impl Setup {
    /// A setup training `iterations` iterations per pair, polling the folder every second, with
    /// `extra` appended to the `[daemon]` section.
    pub fn new(suite: &str, name: &str, iterations: usize, extra: &str) -> Self {
        Self::build(suite, name, iterations, true, extra)
    }

    /// The same, but rescans driven by file events (`poll = false`), as the daemon runs by
    /// default.
    pub fn with_file_events(suite: &str, name: &str, iterations: usize) -> Self {
        Self::build(suite, name, iterations, false, "")
    }

    fn build(suite: &str, name: &str, iterations: usize, poll: bool, extra: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("pairstyle-{suite}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let watch = root.join("watch");
        let state = root.join("state");
        let socket = root.join("d.sock");
        let config = root.join("pairstyle.toml");
        let text = format!(
            "[model]\npath = {model:?}\n\
             [generate]\nsteps = 3\ncfg = 4.0\nwidth = 16\nheight = 16\n\
             [train]\niterations = {iterations}\nstyle_start = 2\nlr = 1e-3\ncontent_rank = 4\n\
             style_rank = 4\nresolution = 16\ncheckpoint_every = 2\nseed = 11\n\
             [daemon]\nstate_dir = {state:?}\nwatch = {watch:?}\nsocket = {socket:?}\n\
             stability_secs = 1\npoll_interval_secs = 1\nlone_timeout_secs = 3\npoll = {poll}\n\
             sample_prompts = [\"a photo of a {{subject}}\", \"a red star\", \"a blue square\"]\n\
             sample_steps = 2\nsample_size = 16\n{extra}\n",
            model = fixture("tiny-sd15").display().to_string(),
            state = state.display().to_string(),
            watch = watch.display().to_string(),
            socket = socket.display().to_string(),
        );
        std::fs::write(&config, text).unwrap();
        std::fs::create_dir_all(&watch).unwrap();
        Self {
            root,
            config,
            watch,
            state,
            socket,
        }
    }

    /// The `pairstyle` binary with this setup's config and no systemd variables.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pairstyle"));
        c.env("PAIRSTYLE_CONFIG", &self.config)
            .env("RAYON_NUM_THREADS", "1")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("PAIRSTYLE_TEST_PAUSE")
            .env_remove("PAIRSTYLE_TEST_PAUSE_DIR");
        c
    }

    /// Start `pairstyle daemon` logging to `<root>/<log>`, with extra environment variables.
    pub fn start(&self, log: &str, env: &[(&str, &str)]) -> Daemon {
        let log = std::fs::File::create(self.root.join(log)).unwrap();
        let mut c = self.cmd();
        for (k, v) in env {
            c.env(k, v);
        }
        c.arg("daemon")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .map(Daemon)
            .unwrap()
    }

    /// The daemon's log so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.join(name)).unwrap_or_default()
    }

    /// The style library folder.
    pub fn library(&self) -> PathBuf {
        self.state.join("styles")
    }

    /// The journal's jobs (empty when there is no readable journal).
    pub fn jobs(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.state.join("journal.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        v["jobs"].as_array().cloned().unwrap_or_default()
    }

    /// Every entry of the library folder, hidden ones too, sorted.
    pub fn library_entries(&self) -> Vec<String> {
        entries(&self.library())
    }

    /// Wait until `cond` holds, or fail with `what` and the daemon's log `log`.
    pub fn wait_for(&self, log: &str, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}; daemon log:\n{}",
                self.log(log)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A running `pairstyle daemon`, killed and reaped when dropped: a test that fails before its
/// [`terminate`] leaves no daemon behind (it would hold the scratch folder and a core).
pub struct Daemon(Child);

impl Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Names in a folder, sorted (empty if it does not exist).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Stop a daemon with SIGTERM and check it exits cleanly.
pub fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "daemon exited with {status}");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "daemon did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL a daemon and reap it.
pub fn kill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A small content/style pair as PNG bytes (the style: inverted and posterised).
pub fn pair_images(seed: u8) -> (Vec<u8>, Vec<u8>) {
    let content = RgbImage::from_fn(24, 20, |x, y| {
        Rgb([(x * 10) as u8 ^ seed, (y * 12) as u8, 128])
    });
    let style = RgbImage::from_fn(24, 20, |x, y| {
        Rgb(content.get_pixel(x, y).0.map(|v| (255 - v) / 64 * 64))
    });
    let enc = |img: &RgbImage| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    (enc(&content), enc(&style))
}

/// Register a style with random StyleLoRA weights for the tiny SD1.5 fixture in `library`.
pub fn random_style(library: &Path, name: &str, desc: &str, seed: u64) -> PathBuf {
    use rand::{Rng, SeedableRng};
    let model = pairstyle::engine::model_dir::ModelDir::open(fixture("tiny-sd15")).unwrap();
    let unet =
        pairstyle::engine::unet::UNet::load(&model, Default::default(), DType::F32, &Device::Cpu)
            .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rank = 4;
    let mut set = AdapterSet::zeros_like_unet(&unet, rank, rank as f64, |_, n_in| {
        let v: Vec<f32> = (0..rank * n_in)
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        Ok(Tensor::from_vec(v, (rank, n_in), &Device::Cpu)?)
    })
    .unwrap();
    for (_, layer) in set.iter_mut() {
        let (out, r) = layer.up.dims2().unwrap();
        let v: Vec<f32> = (0..out * r).map(|_| rng.random_range(-0.5..0.5)).collect();
        layer.up = Tensor::from_vec(v, (out, r), &Device::Cpu).unwrap();
    }
    let meta = StyleMeta {
        name: name.into(),
        subject: "shape".into(),
        style_desc: desc.into(),
        prompt_suffix: format!(" in {desc} style"),
        default_lambda: 3.0,
        base_model: fixture("tiny-sd15").display().to_string(),
        rank,
        alpha: rank as f64,
        content_rank: rank,
        seed,
        steps: 0,
        ..Default::default()
    };
    Library::new(library).register(&meta, &set, &[]).unwrap()
}
