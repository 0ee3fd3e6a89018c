//! End to end: the real `pairstyle` binary in a tmux pane, driven with `send-keys` and read with
//! `capture-pane`, on a temporary state folder with the tiny SD1.5 fixture model.
//!
//! - `embedded_daemon_trains_and_generates`: with no daemon running, `pairstyle` starts one inside
//!   itself and says so; two pairs dropped in the watch folder become styles; in the Generate view
//!   both are picked with weights and the job is submitted; the screen shows the job's outcome.
//!   A bad pair shows up as failed in the Drop-folder view.
//! - `reconnects_after_a_daemon_restart`: the UI connected to a `pairstyle daemon` process says
//!   when it goes away and reconnects by itself when it is back.
//!
//! Both skip (with a message) where tmux is not installed. With `PAIRSTYLE_TUI_SCREENSHOTS=DIR`
//! the first one also writes the screen of each view to `DIR/<view>.txt` and, drawn from the
//! coloured capture (`capture-pane -e`), `DIR/<view>.png` (docs/tui/ holds them).

mod common;
mod screenshot;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

const WAIT: Duration = Duration::from_secs(300);
/// The first test's terminal size (columns, rows).
const SCREEN: (usize, usize) = (110, 32);

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A tmux server of our own (its own socket name), with one session running a script.
struct Tmux {
    server: String,
}

impl Tmux {
    fn start(name: &str, script: &Path, w: u16, h: u16) -> Self {
        let server = format!("pairstyle-test-{name}-{}", std::process::id());
        let t = Self { server };
        let ok = t
            .cmd()
            .args([
                "new-session",
                "-d",
                "-s",
                "ui",
                "-x",
                &w.to_string(),
                "-y",
                &h.to_string(),
            ])
            .arg(script)
            .status()
            .expect("tmux new-session")
            .success();
        assert!(ok, "tmux new-session failed");
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.server]);
        c
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            let ok = self
                .cmd()
                .args(["send-keys", "-t", "ui", k])
                .status()
                .expect("tmux send-keys")
                .success();
            assert!(ok, "send-keys {k}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn text(&self, text: &str) {
        let ok = self
            .cmd()
            .args(["send-keys", "-t", "ui", "-l", text])
            .status()
            .expect("tmux send-keys")
            .success();
        assert!(ok, "send-keys -l {text}");
        std::thread::sleep(Duration::from_millis(250));
    }

    /// The screen with its colours as SGR escapes.
    fn screen_ansi(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-e", "-p", "-t", "ui"])
            .output()
            .expect("tmux capture-pane -e");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "ui"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Wait until the screen satisfies `cond`; returns the screen.
    fn wait(&self, what: &str, log: &Path, cond: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if cond(&s) {
                return s;
            }
            if start.elapsed() > WAIT {
                panic!(
                    "timed out waiting for {what}; screen:\n{s}\nlog:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
        // tmux leaves its socket file behind.
        let dir = std::env::var_os("TMUX_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let _ = std::fs::remove_file(dir.join(format!("tmux-{uid}")).join(&self.server));
    }
}

struct Setup {
    root: PathBuf,
    config: PathBuf,
    watch: PathBuf,
    state: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Self {
        // Short: the socket path must fit a Unix socket address.
        let root = std::env::temp_dir().join(format!("ps-tui-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let watch = root.join("watch");
        let state = root.join("state");
        let config = root.join("pairstyle.toml");
        let text = format!(
            "[model]\npath = {model:?}\n\
             [train]\niterations = 4\nstyle_start = 2\nlr = 1e-3\ncontent_rank = 4\n\
             style_rank = 4\nresolution = 16\ncheckpoint_every = 2\nseed = 11\n\
             [generate]\nsteps = 2\n\
             [daemon]\nstate_dir = {state:?}\nwatch = {watch:?}\nsocket = {socket:?}\n\
             stability_secs = 1\npoll_interval_secs = 1\nlone_timeout_secs = 3\n\
             [tui]\ngraphics = {graphics:?}\n",
            // The screenshots test draws half blocks (what capture-pane can show); the others ask
            // tmux what it supports, as a user's first start would.
            graphics = if name == "emb" { "halfblocks" } else { "auto" },
            model = common::fixture("tiny-sd15").display().to_string(),
            state = state.display().to_string(),
            watch = watch.display().to_string(),
            socket = root.join("d.sock").display().to_string(),
        );
        std::fs::create_dir_all(&watch).expect("watch folder");
        std::fs::write(&config, text).expect("config");
        Self {
            root,
            config,
            watch,
            state,
        }
    }

    /// A script that runs `pairstyle ARGS` and then keeps the pane open showing its exit status.
    fn script(&self, args: &str) -> PathBuf {
        let path = self.root.join(format!("run-{}.sh", args.replace(' ', "-")));
        let text = format!(
            "#!/bin/sh\nexport PAIRSTYLE_CONFIG={config:?}\nexport RAYON_NUM_THREADS=1\n\
             unset STATE_DIRECTORY RUNTIME_DIRECTORY\n\
             {bin:?} {args} 2>>{log:?}\necho \"EXITED $?\"\nsleep 600\n",
            config = self.config.display().to_string(),
            bin = env!("CARGO_BIN_EXE_pairstyle"),
            log = self.log().display().to_string(),
        );
        std::fs::write(&path, text).expect("script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn log(&self) -> PathBuf {
        self.root.join("stderr.log")
    }

    fn drop_pair(&self, name: &str, seed: u8) {
        let content = RgbImage::from_fn(24, 20, |x, y| {
            Rgb([(x * 10) as u8 ^ seed, (y * 12) as u8, 128])
        });
        let style = RgbImage::from_fn(24, 20, |x, y| {
            Rgb(content.get_pixel(x, y).0.map(|v| (255 - v) / 64 * 64))
        });
        let dir = self.watch.join(name);
        std::fs::create_dir_all(&dir).expect("pair folder");
        content.save(dir.join("content.png")).expect("content");
        style.save(dir.join("style.png")).expect("style");
    }

    fn daemon(&self) -> Child {
        let log = std::fs::File::create(self.root.join("daemon.log")).expect("daemon log");
        Command::new(env!("CARGO_BIN_EXE_pairstyle"))
            .arg("daemon")
            .env("PAIRSTYLE_CONFIG", &self.config)
            .env("RAYON_NUM_THREADS", "1")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the daemon")
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Save a screen for the docs when asked to: its text, and a PNG drawn from the coloured capture
/// taken now (`cols` × `rows` cells).
fn screenshot(tmux: &Tmux, (cols, rows): (usize, usize), name: &str, screen: &str) {
    if let Ok(dir) = std::env::var("PAIRSTYLE_TUI_SCREENSHOTS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("screenshot folder");
        let text: Vec<&str> = screen.lines().map(str::trim_end).collect();
        std::fs::write(dir.join(format!("{name}.txt")), text.join("\n") + "\n")
            .expect("screenshot");
        let grid = screenshot::parse(&tmux.screen_ansi(), cols, rows);
        screenshot::render(&grid)
            .save(dir.join(format!("{name}.png")))
            .expect("screenshot PNG");
    }
}

fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn embedded_daemon_trains_and_generates() {
    if !tmux_available() {
        eprintln!("SKIPPED tui_e2e: tmux is not installed (apt-get install tmux to run it)");
        return;
    }
    let s = Setup::new("emb");
    s.drop_pair("ink", 1);
    s.drop_pair("oil", 2);
    // A bad pair: a truncated content image.
    let cut = s.watch.join("cut");
    std::fs::create_dir_all(&cut).expect("cut");
    std::fs::write(cut.join("content.png"), b"\x89PNG\r\n\x1a\n truncated").expect("cut");
    std::fs::copy(s.watch.join("ink/style.png"), cut.join("style.png")).expect("cut");

    let script = s.script("");
    let tmux = Tmux::start("emb", &script, SCREEN.0 as u16, SCREEN.1 as u16);
    let log = s.log();
    tmux.wait("the embedded daemon in the status bar", &log, |t| {
        t.contains("embedded daemon") && t.contains("pairstyle 0.1.0")
    });
    let styles = tmux.wait("two trained styles", &log, |t| {
        t.contains("Styles 2/2") && t.contains(" ink ") && t.contains("oil")
    });
    screenshot(&tmux, SCREEN, "styles", &styles);

    tmux.keys(&["2"]);
    let jobs = tmux.wait("the training jobs done", &log, |t| {
        t.lines()
            .filter(|l| l.contains(" done ") && l.contains("train "))
            .count()
            >= 2
    });
    screenshot(&tmux, SCREEN, "jobs", &jobs);

    tmux.keys(&["4"]);
    let drop = tmux.wait("the bad pair failed", &log, |t| {
        t.lines()
            .any(|l| l.contains("failed ") && l.contains(" cut"))
    });
    screenshot(&tmux, SCREEN, "dropfolder", &drop);

    // Generate: prompt, two styles with weights, submit.
    tmux.keys(&["3"]);
    tmux.wait("the generate view", &log, |t| t.contains("Prompt"));
    tmux.keys(&["Enter"]);
    tmux.text("a red disc");
    tmux.keys(&["Enter"]);
    // From the prompt down to the style picker, the last field.
    for _ in 1..pairstyle::tui::state::Field::ALL.len() {
        tmux.keys(&["Down"]);
    }
    tmux.keys(&["Space", "Down", "Space", "Right", "Right"]);
    let form = tmux.wait("two styles picked", &log, |t| {
        t.matches("[x]").count() == 2 && t.contains("2 chosen")
    });
    assert!(form.contains("a red disc"), "{form}");
    tmux.keys(&["s"]);
    let outcome = tmux.wait("the generation job's outcome", &log, |t| {
        t.contains(": done ") || t.contains("not implemented") || t.contains(": failed ")
    });
    if outcome.contains("not implemented") {
        screenshot(&tmux, SCREEN, "generate", &outcome);
        eprintln!(
            "NOTE tui_e2e: this daemon does not run generation jobs yet; the submission reached \
             it and its refusal is on screen"
        );
    } else {
        assert!(outcome.contains(": done "), "{outcome}");
        // The result appears as a picture (half blocks), and in the outputs gallery.
        let shown = tmux.wait("the result picture", &log, |t| {
            t.contains('▀') && t.contains("Outputs (1)") && t.contains("a red disc")
        });
        screenshot(&tmux, SCREEN, "generate", &shown);
        // The finished job is in the Jobs view with its blend.
        tmux.keys(&["2"]);
        tmux.wait("the generation job in the jobs view", &log, |t| {
            t.contains("generate \"a red disc\"")
        });
    }

    tmux.keys(&["?"]);
    let help = tmux.wait("the help overlay", &log, |t| {
        t.contains("Keys (Esc closes)")
    });
    screenshot(&tmux, SCREEN, "help", &help);
    tmux.keys(&["q", "q"]);
    tmux.wait("a clean exit", &log, |t| t.contains("EXITED 0"));
    // The daemon stopped with the UI: its socket is gone.
    assert!(!s.root.join("d.sock").exists());
    assert!(s.state.join("tui.log").is_file());
}

#[test]
fn reconnects_after_a_daemon_restart() {
    if !tmux_available() {
        eprintln!("SKIPPED tui_e2e: tmux is not installed (apt-get install tmux to run it)");
        return;
    }
    let s = Setup::new("re");
    let mut daemon = s.daemon();
    let socket = s.root.join("d.sock");
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < WAIT, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let script = s.script("tui");
    let tmux = Tmux::start("re", &script, 100, 20);
    let log = s.log();
    let first = tmux.wait("a connection to the running daemon", &log, |t| {
        t.contains("● daemon: pairstyle")
    });
    assert!(!first.contains("embedded"), "{first}");
    stop(&mut daemon);
    tmux.wait("the UI noticing the daemon is gone", &log, |t| {
        t.contains("daemon unreachable")
    });
    let mut daemon = s.daemon();
    tmux.wait("the UI reconnecting", &log, |t| {
        t.contains("● daemon: pairstyle")
    });
    tmux.keys(&["q"]);
    tmux.wait("a clean exit", &log, |t| t.contains("EXITED 0"));
    stop(&mut daemon);
}

#[test]
fn without_a_terminal_it_says_so_and_starts_nothing() {
    let s = Setup::new("tty");
    let out = Command::new(env!("CARGO_BIN_EXE_pairstyle"))
        .env("PAIRSTYLE_CONFIG", &s.config)
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .expect("run pairstyle");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a terminal"), "{err}");
    // No daemon was started for it.
    assert!(!s.root.join("d.sock").exists());
    assert!(!s.state.join("journal.json").exists());
}
