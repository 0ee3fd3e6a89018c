//! The running daemon: the drop-folder scanner, one worker per device and the IPC server around
//! one shared state (journal, library, event channel).
//!
//! - The scanner rescans the watch folder at start (pairs dropped while the daemon was down
//!   count), on file events (unless `poll`), when a waiting pair may have become stable, and every
//!   `poll_interval_secs` in any case; it feeds the [`Tracker`] and hands ready pairs to
//!   [`Intake`]; a staged pair becomes a queued training job. A pair whose intake failed for an
//!   I/O reason is retried with exponential [`Backoff`] (`retry_initial_secs` doubling up to
//!   `retry_max_secs`), once its files have been stable again.
//! - The workers (one per `[daemon] devices` entry, else one on `[runtime] device`) each hold
//!   their own loaded model and take the next runnable job from the journal. Training resumes
//!   from its checkpoint in `<library>/.checkpoints/`; after training a sample grid and a
//!   thumbnail are rendered with the new style and registered with it, atomically, by the
//!   library; then the job is done. Generation jobs write `outputs/<job>-<prompt>.png` with the
//!   settings in text chunks. On shutdown a running training job is interrupted (and resumes at
//!   the next start); a running generation finishes first.
//! - The server answers status, job and style requests (rename, remove to the trash, export)
//!   and streams events.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use super::dropfolder::{self, Backoff, Decision, StabilityRules, Tracker};
use super::intake::{Intake, IntakeOutcome, IntakeSettings, StagedPair, INTAKE_RECORD};
use super::journal::{GenerateJob, Job, JobProgress, JobSpec, JobState, Journal, TrainJob};
use super::paths::DaemonPaths;
use super::protocol::{
    DeviceStatus, ErrorCode, Event, QueueCounts, ReplyBody, Request, StatusReport,
};
use super::sdnotify;
use super::server::{self, Handler, ServerOptions};
use super::testhook::{self, PausePoint};
use super::{unix_now, DaemonError, DaemonResult};
use crate::config::Config;
use crate::engine::pipeline::{Pipeline, StepFlow};
use crate::generate::{self, GenerateError, InMemoryStyle, SampleSettings};
use crate::library::{Library, SampleGrid, StyleMeta, SAMPLES_FILE, THUMBNAIL_FILE};

/// How often the worker looks for a job when idle, and the journal saves progress at most.
const WORKER_TICK: Duration = Duration::from_millis(500);
const PROGRESS_SAVE_EVERY: Duration = Duration::from_secs(10);
/// How often the daemon updates its systemd `STATUS=` line.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Name of the trash folder in the state folder (removed styles go there).
pub const TRASH_DIR: &str = "trash";
/// Name of the folder in the state folder that receives exports without a given path.
pub const EXPORTS_DIR: &str = "exports";

/// State shared by the scanner, the workers and the server.
pub struct DaemonState {
    /// Resolved folders and socket.
    pub paths: DaemonPaths,
    config: Config,
    model: PathBuf,
    journal: Mutex<Journal>,
    library: Library,
    events: broadcast::Sender<Event>,
    started: Instant,
    /// The device of each worker.
    devices: Vec<String>,
    /// The job each worker runs, by worker index.
    running: Mutex<Vec<Option<u64>>>,
    shutdown: AtomicBool,
    pause: Option<PausePoint>,
}

/// What the scanner remembers between scans: candidates seen and their stability, and the
/// retry backoff of failed intakes.
#[derive(Debug)]
pub struct ScanState {
    /// Candidates seen and their stability.
    pub tracker: Tracker,
    /// Retry waits of candidates whose intake failed for a transient reason.
    pub backoff: Backoff,
}

impl ScanState {
    /// A fresh state with the rules and waits of `[daemon]`.
    pub fn new(cfg: &super::DaemonConfig) -> Self {
        Self {
            tracker: Tracker::new(StabilityRules::from_config(cfg)),
            backoff: Backoff::from_config(cfg),
        }
    }
}

impl DaemonState {
    /// Open the state: folders, journal (running jobs become interrupted), interrupted intakes put
    /// back, staged pairs without a job queued. `model` is the base model folder for training.
    pub fn open(config: Config, model: PathBuf) -> DaemonResult<Arc<Self>> {
        config.daemon.validate()?;
        let paths = DaemonPaths::resolve(&config.daemon, &config.library)?;
        paths.create_dirs()?;
        let pause = PausePoint::from_env(&paths.state_dir);
        let library = Library::new(paths.library.clone());
        for p in library.remove_stale_temps()? {
            tracing::info!(
                "removed {}, left by an interrupted registration",
                p.display()
            );
        }
        let (mut journal, report) = Journal::open(&paths.journal)?;
        journal.set_pause(pause.clone());
        if let Some(c) = &report.corrupt {
            tracing::error!(
                "the job journal was unreadable ({}); it is kept as {}",
                c.error,
                c.preserved_at.display()
            );
        }
        for id in &report.interrupted {
            tracing::info!("job {id} was running when the daemon stopped: it will resume");
        }
        for id in &report.given_up {
            tracing::warn!("job {id} was interrupted too often and is marked failed");
        }
        let (events, _) = broadcast::channel(256);
        let devices = config.daemon.worker_devices(&config.runtime.device);
        for d in &devices {
            // Refuse a misspelt device now rather than at the first job.
            d.parse::<crate::engine::device::DeviceSpec>()?;
        }
        let state = Arc::new(Self {
            library,
            paths,
            running: Mutex::new(vec![None; devices.len()]),
            devices,
            config,
            model,
            journal: Mutex::new(journal),
            events,
            started: Instant::now(),
            shutdown: AtomicBool::new(false),
            pause,
        });
        state.intake().recover()?;
        state.queue_orphaned_staged_pairs()?;
        Ok(state)
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        // A panic while holding the lock leaves a journal that is still consistent on disk.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn running(&self) -> MutexGuard<'_, Vec<Option<u64>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_running(&self, job: u64) -> bool {
        self.running().contains(&Some(job))
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// The event channel (the server forwards it to subscribers).
    pub fn events(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// Ask the scanner and worker to stop.
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn intake(&self) -> Intake {
        Intake::new(
            self.paths.watch.clone(),
            self.paths.failed.clone(),
            self.paths.staging.clone(),
            IntakeSettings {
                train: self.config.train.clone(),
                base_model: self.model.display().to_string(),
                max_side: self.config.daemon.max_side,
                default_subject: self.config.daemon.default_subject.clone(),
            },
        )
    }

    /// A crash between staging a pair and queueing its job leaves a staged pair without a job.
    fn queue_orphaned_staged_pairs(&self) -> DaemonResult<()> {
        let entries = match std::fs::read_dir(&self.paths.staging) {
            Ok(e) => e,
            Err(e) => return Err(DaemonError::io(&self.paths.staging, e)),
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.join(INTAKE_RECORD).is_file() {
                continue;
            }
            let Ok(pair) = StagedPair::load(&dir) else {
                continue;
            };
            let known = self
                .journal()
                .jobs()
                .any(|j| matches!(&j.spec, JobSpec::Train(t) if t.pair_id == pair.id));
            if !known {
                tracing::info!("queueing staged pair {} ({})", pair.name, dir.display());
                self.queue_training(&pair, &dir)?;
            }
        }
        Ok(())
    }

    fn queue_training(&self, pair: &StagedPair, dir: &Path) -> DaemonResult<u64> {
        let id = self.journal().enqueue(
            JobSpec::Train(TrainJob {
                pair_id: pair.id.clone(),
                name: pair.name.clone(),
                staged_dir: dir.to_path_buf(),
            }),
            0,
        )?;
        self.emit(Event::JobQueued {
            job: id,
            what: "train".into(),
            name: Some(pair.name.clone()),
        });
        Ok(id)
    }

    /// One scan of the watch folder at `now`: decide, take and queue. Returns the number of
    /// decisions. A transient intake failure schedules a retry with backoff.
    pub fn scan_once(&self, state: &mut ScanState, now: Instant) -> DaemonResult<usize> {
        let scan = dropfolder::scan(&self.paths.watch)?;
        let decisions = state.tracker.observe(&scan, now);
        let n = decisions.len();
        let intake = self.intake();
        for d in decisions {
            let (key, name, result) = match d {
                Decision::Ready(c) => {
                    let known = |id: &str| self.journal().knows_pair(id);
                    let result = intake.take(&c, &known).and_then(|outcome| match outcome {
                        IntakeOutcome::Staged { pair, dir } => {
                            tracing::info!("pair {} staged as {}", pair.name, pair.id);
                            self.queue_training(&pair, &dir).map(|_| ())
                        }
                        IntakeOutcome::Duplicate { id, dir } => {
                            tracing::info!(
                                "pair {} is already known ({id}); its files are kept in {}",
                                c.name,
                                dir.display()
                            );
                            Ok(())
                        }
                        IntakeOutcome::Rejected { dir, reason } => {
                            self.emit(Event::PairRejected {
                                name: c.name.clone(),
                                reason,
                                path: dir.display().to_string(),
                            });
                            Ok(())
                        }
                    });
                    (c.key, c.name, result)
                }
                Decision::Failed { candidate, reason } => {
                    let result = intake.reject(&candidate, &reason).map(|dir| {
                        self.emit(Event::PairRejected {
                            name: candidate.name.clone(),
                            reason,
                            path: dir.display().to_string(),
                        })
                    });
                    (candidate.key, candidate.name, result)
                }
            };
            match result {
                Ok(()) => state.backoff.succeeded(&key),
                Err(e) => {
                    let wait = state.backoff.failed(&key);
                    let tries = state.backoff.failures(&key);
                    if e.is_transient() {
                        tracing::warn!(
                            "taking pair {name} failed (attempt {tries}), retrying in {} s: {e}",
                            wait.as_secs()
                        );
                    } else {
                        tracing::error!(
                            "taking pair {name} failed (attempt {tries}), retrying in {} s: {e}",
                            wait.as_secs()
                        );
                    }
                    state.tracker.retry_at(&key, now + wait);
                }
            }
        }
        Ok(n)
    }

    /// Rescan the watch folder until shutdown: on file events (unless `poll` is set), when a
    /// waiting pair may have become stable or is due for a retry, and every
    /// `poll_interval_secs` in any case.
    pub fn scanner_loop(&self) {
        let mut state = ScanState::new(&self.config.daemon);
        let every = Duration::from_secs(self.config.daemon.poll_interval_secs);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let _watcher = if self.config.daemon.poll {
            None
        } else {
            match watch_folder(&self.paths.watch, tx) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(
                        "no file events for {} ({e}): rescanning every {} s",
                        self.paths.watch.display(),
                        every.as_secs()
                    );
                    None
                }
            }
        };
        while !self.stopping() {
            if let Err(e) = self.scan_once(&mut state, Instant::now()) {
                tracing::warn!("scanning {} failed: {e}", self.paths.watch.display());
            }
            let wait = state
                .tracker
                .next_deadline(Instant::now())
                .map_or(every, |d| d.min(every));
            let until = Instant::now() + wait;
            while !self.stopping() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                    Ok(()) => {
                        while rx.try_recv().is_ok() {}
                        break;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(left.min(Duration::from_millis(100)));
                    }
                }
            }
        }
    }

    /// A one-line summary for systemd's `STATUS=`.
    pub fn status_line(&self) -> String {
        let q = QueueCounts::of(self.journal().jobs());
        let running: Vec<String> = self
            .running()
            .iter()
            .flatten()
            .map(|j| format!("#{j}"))
            .collect();
        if running.is_empty() {
            format!(
                "idle; watching {}; {} done",
                self.paths.watch.display(),
                q.done
            )
        } else {
            format!(
                "job {} running; {} queued; {} done",
                running.join(", "),
                q.queued + q.interrupted,
                q.done
            )
        }
    }

    fn status(&self) -> StatusReport {
        let journal = self.journal();
        let running = self.running().clone();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            watch: self.paths.watch.display().to_string(),
            library: self.paths.library.display().to_string(),
            state_dir: self.paths.state_dir.display().to_string(),
            devices: self
                .devices
                .iter()
                .zip(running)
                .map(|(device, job)| DeviceStatus {
                    device: device.clone(),
                    job,
                })
                .collect(),
            queue: QueueCounts::of(journal.jobs()),
        }
    }

    /// Run jobs until shutdown: one worker per device (`[daemon] devices`, else `[runtime]
    /// device`), each on its own thread with its own model; returns when all have stopped.
    pub fn worker_loop(&self) {
        if self.devices.len() == 1 {
            self.worker(0);
            return;
        }
        std::thread::scope(|scope| {
            for slot in 0..self.devices.len() {
                let spawned = std::thread::Builder::new()
                    .name(format!("pairstyle-worker-{slot}"))
                    .spawn_scoped(scope, move || self.worker(slot));
                if let Err(e) = spawned {
                    tracing::error!("cannot start the worker for {}: {e}", self.devices[slot]);
                }
            }
        });
    }

    /// One worker: take the next runnable job, run it on device `devices[slot]`, record the
    /// outcome; until shutdown.
    fn worker(&self, slot: usize) {
        let device = self.devices[slot].clone();
        let mut pipeline: Option<Pipeline> = None;
        while !self.stopping() {
            let claimed = self.journal().claim_next(|_| true);
            let job = match claimed {
                Ok(Some(job)) => job,
                Ok(None) => {
                    std::thread::sleep(WORKER_TICK);
                    continue;
                }
                Err(e) => {
                    tracing::warn!("cannot take the next job: {e}");
                    std::thread::sleep(WORKER_TICK);
                    continue;
                }
            };
            self.running()[slot] = Some(job.id);
            tracing::info!(
                "job {} ({}) started on {device} (worker {slot})",
                job.id,
                job.spec.kind()
            );
            let result = match &job.spec {
                JobSpec::Train(t) => self.run_training(&job, t, &mut pipeline, &device),
                JobSpec::Generate(g) => self.run_generation(&job, g, &mut pipeline, &device),
            };
            self.running()[slot] = None;
            // The job's activations are freed; return them to the system while idle.
            crate::engine::device::release_free_host_memory();
            let state = self.journal().get(job.id).map(|j| j.state);
            match result {
                Ok(Some(produced)) => {
                    if let Err(e) = self.journal().finish(job.id, Some(produced.clone())) {
                        tracing::error!("cannot record job {} as done: {e}", job.id);
                    }
                    self.emit(Event::JobDone {
                        job: job.id,
                        result: Some(produced),
                    });
                }
                Ok(None) if state == Some(JobState::Cancelled) => {
                    self.emit(Event::JobCancelled { job: job.id });
                }
                Ok(None) => {
                    // Stopped for shutdown: resume at the next start.
                    let _ = self.journal().interrupt(job.id);
                }
                Err(e) => {
                    let msg = e.to_string();
                    tracing::error!("job {} failed: {msg}", job.id);
                    if state == Some(JobState::Running) {
                        let _ = self.journal().fail(job.id, msg.clone());
                    }
                    self.emit(Event::JobFailed {
                        job: job.id,
                        error: msg,
                    });
                }
            }
        }
    }

    /// The worker's model, loaded on `device` at first use.
    fn pipeline<'p>(
        &self,
        pipeline: &'p mut Option<Pipeline>,
        device: &str,
    ) -> DaemonResult<&'p mut Pipeline> {
        use crate::engine::device::{DTypeSpec, DeviceSpec};
        if pipeline.is_none() {
            let t0 = Instant::now();
            let dev = device.parse::<DeviceSpec>()?.resolve()?;
            let dtype = self.config.runtime.dtype.parse::<DTypeSpec>()?.dtype();
            let model = crate::engine::model_dir::ModelDir::open(&self.model)?;
            *pipeline = Some(Pipeline::load(
                model,
                self.config.model.variant,
                dtype,
                &dev,
            )?);
            tracing::info!(
                "loaded {} on {device} in {:.1} s",
                self.model.display(),
                t0.elapsed().as_secs_f64()
            );
        }
        pipeline
            .as_mut()
            .ok_or_else(|| DaemonError::Config("model not loaded".into()))
    }

    /// Whether job `id` was cancelled (or otherwise left the running state) meanwhile.
    fn no_longer_running(&self, id: u64) -> bool {
        self.journal().get(id).map(|j| j.state) != Some(JobState::Running)
    }

    /// `outputs/<job id>-<prompt words>.png`.
    pub fn output_path(&self, job: u64, prompt: &str) -> PathBuf {
        self.paths
            .outputs
            .join(format!("{job:06}-{}.png", slug(prompt)))
    }

    /// Record a running job's progress (saving the journal at most every
    /// `PROGRESS_SAVE_EVERY`) and tell subscribers.
    fn report_progress(&self, job: u64, progress: JobProgress, last_save: &mut Instant) {
        let mut j = self.journal();
        let _ = j.set_progress(job, progress);
        if last_save.elapsed() >= PROGRESS_SAVE_EVERY {
            let _ = j.save();
            *last_save = Instant::now();
        }
        drop(j);
        self.emit(Event::progress(job, &progress));
    }

    /// Render one generation job into the outputs folder; `Ok(None)` if it was cancelled while
    /// rendering (nothing is written then).
    fn run_generation(
        &self,
        job: &Job,
        g: &GenerateJob,
        pipeline: &mut Option<Pipeline>,
        device: &str,
    ) -> DaemonResult<Option<String>> {
        // Checked before loading anything, so a bad request fails at once (the model's
        // recommended cfg only fills a default, which cannot make a request invalid;
        // `generate::generate` resolves it with the loaded model).
        g.check(&self.config.generate, None)?;
        let pipe = self.pipeline(pipeline, device)?;
        let out = self.output_path(job.id, &g.prompt);
        let mut library = self.library.clone();
        let label = self.model.display().to_string();
        let mut last_save = Instant::now();
        let image = generate::generate(pipe, g, &self.config, &label, &mut library, |p| {
            let it_per_s = p.step as f64 / p.elapsed_s.max(1e-9);
            let progress = JobProgress {
                step: p.step,
                total: p.total,
                loss: None,
                loss_style: None,
                it_per_s,
                eta_secs: Some((p.total - p.step) as f64 / it_per_s.max(1e-9)),
            };
            self.report_progress(job.id, progress, &mut last_save);
            // Cancelled (or the daemon stopping): give up at this step, write nothing.
            if self.no_longer_running(job.id) {
                StepFlow::Stop
            } else {
                StepFlow::Continue
            }
        });
        let image = match image {
            Err(GenerateError::Lib(crate::Error::Stopped { step, total })) => {
                tracing::info!("job {}: stopped after step {step} of {total}", job.id);
                return Ok(None);
            }
            other => other?,
        };
        if self.no_longer_running(job.id) {
            tracing::info!("job {} was cancelled while rendering: not saved", job.id);
            return Ok(None);
        }
        image.save(&out)?;
        let path = out.display().to_string();
        tracing::info!("job {}: wrote {path}", job.id);
        self.emit(Event::SampleReady {
            job: job.id,
            path: path.clone(),
        });
        Ok(Some(path))
    }

    /// Train one staged pair; `Ok(None)` if stopped early (cancel or shutdown).
    fn run_training(
        &self,
        job: &Job,
        t: &TrainJob,
        pipeline: &mut Option<Pipeline>,
        device: &str,
    ) -> DaemonResult<Option<String>> {
        use crate::trainer::{PairSpec, PairTrainer};
        let pair = StagedPair::load(&t.staged_dir)?;
        let content = t.staged_dir.join(&pair.content_file);
        let style = t.staged_dir.join(&pair.style_file);
        let content_sha = crate::library::sha256_file(&content)?;
        let style_sha = crate::library::sha256_file(&style)?;
        // Killed after registering but before recording the job as done: it is registered.
        if let Some(existing) = self.registered_as(&pair, &content_sha, &style_sha)? {
            tracing::info!(
                "job {}: the style is already registered in {existing}",
                job.id
            );
            return Ok(Some(existing));
        }
        let pipe = self.pipeline(pipeline, device)?;
        let spec = PairSpec {
            content: content.clone(),
            style: style.clone(),
            subject: pair.subject.clone(),
            style_desc: pair.style_desc.clone(),
        };
        let ck_dir = self.library.checkpoint_dir();
        std::fs::create_dir_all(&ck_dir).map_err(|e| DaemonError::io(&ck_dir, e))?;
        let ck_path = ck_dir.join(format!("{}.safetensors", &pair.id[..16]));
        let started = Instant::now();
        let mut trainer = PairTrainer::new_multi(
            pipe,
            std::slice::from_ref(&spec),
            pair.train.clone(),
            pair.id.clone(),
        )?;
        let first = trainer.with_checkpoint(ck_path.clone())?;
        if first > 0 {
            tracing::info!("job {}: resuming from iteration {first}", job.id);
        }
        let mut last_save = Instant::now();
        let finished = trainer.run(
            |p| {
                let progress = JobProgress {
                    step: p.iteration,
                    total: p.total,
                    loss: Some(p.loss_content),
                    loss_style: p.loss_style,
                    it_per_s: p.it_per_s,
                    eta_secs: Some((p.total - p.iteration) as f64 / p.it_per_s.max(1e-9)),
                };
                self.report_progress(job.id, progress, &mut last_save);
            },
            || self.stopping() || self.no_longer_running(job.id),
        )?;
        if !finished {
            return Ok(None);
        }
        let adapter = trainer.style_adapter().to_adapter_set()?;
        drop(trainer);
        let cfg = &pair.train;
        let mut meta = StyleMeta {
            name: self.free_style_name(&pair.name),
            subject: pair.subject.clone(),
            style_desc: pair.style_desc.clone(),
            prompt_suffix: format!(" in {} style", pair.style_desc),
            default_lambda: self.config.style.lambda,
            base_model: self.model.display().to_string(),
            rank: cfg.style_rank,
            alpha: cfg.alpha_for(cfg.style_rank),
            content_rank: cfg.content_rank,
            seed: cfg.seed,
            steps: cfg.iterations,
            training_secs: started.elapsed().as_secs_f64(),
            content_sha256: vec![content_sha],
            style_sha256: vec![style_sha],
            created_unix: unix_now(),
            thumbnail: None,
            samples: None,
        };
        let previews = match pipeline.as_mut() {
            Some(pipe) => self.render_previews(job, pipe, &mut meta, &adapter),
            None => Vec::new(),
        };
        let extra: Vec<(&str, &[u8])> = previews.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let pause = self.pause.clone();
        let dir =
            self.library
                .register_with(&meta, &adapter, &[content, style], &extra, &mut |_| {
                    if let Some(p) = &pause {
                        p.hold_if(testhook::STYLE_SAVE);
                    }
                })?;
        let _ = std::fs::remove_file(&ck_path);
        tracing::info!(
            "job {}: registered style {} in {}",
            job.id,
            meta.name,
            dir.display()
        );
        self.emit(Event::StyleRegistered {
            job: job.id,
            name: meta.name.clone(),
            path: dir.display().to_string(),
        });
        if meta.samples.is_some() {
            self.emit(Event::SampleReady {
                job: job.id,
                path: dir.join(SAMPLES_FILE).display().to_string(),
            });
        }
        Ok(Some(dir.display().to_string()))
    }

    /// Render the sample grid and thumbnail of a new style (`[daemon] sample_*`) and note them in
    /// `meta`; returns the files to store with it. A failure is logged, not fatal: the style is
    /// registered without previews.
    fn render_previews(
        &self,
        job: &Job,
        pipe: &mut Pipeline,
        meta: &mut StyleMeta,
        adapter: &crate::lora::AdapterSet,
    ) -> Vec<(&'static str, Vec<u8>)> {
        let d = &self.config.daemon;
        if d.sample_prompts.is_empty() {
            return Vec::new();
        }
        let settings = SampleSettings {
            prompts: d.sample_prompts.clone(),
            steps: d.sample_steps,
            size: d.sample_size,
            seed: d.sample_seed,
        };
        let label = self.model.display().to_string();
        let t0 = Instant::now();
        let sheet = generate::render_samples(
            pipe,
            InMemoryStyle { meta, adapter },
            &settings,
            &self.config,
            &label,
            |done, total| tracing::info!("job {}: sample {done}/{total} rendered", job.id),
        );
        let files = sheet.and_then(|sheet| {
            let grid = sheet.grid_png(&meta.name, &settings)?;
            let thumb = sheet.thumbnail_png(&meta.name)?;
            Ok((sheet, grid, thumb))
        });
        match files {
            Ok((sheet, grid, thumb)) => {
                tracing::info!(
                    "job {}: sample grid rendered in {:.1} s",
                    job.id,
                    t0.elapsed().as_secs_f64()
                );
                meta.thumbnail = Some(THUMBNAIL_FILE.into());
                meta.samples = Some(SampleGrid {
                    file: SAMPLES_FILE.into(),
                    prompts: sheet.prompts,
                    seed: settings.seed,
                    steps: settings.steps,
                    lambda: sheet.lambda,
                });
                vec![(THUMBNAIL_FILE, thumb), (SAMPLES_FILE, grid)]
            }
            Err(e) => {
                tracing::warn!(
                    "job {}: no sample grid for style {}: {e}",
                    job.id,
                    meta.name
                );
                Vec::new()
            }
        }
    }

    /// `name`, or `name-2`, `name-3`... whichever the library does not hold yet.
    fn free_style_name(&self, name: &str) -> String {
        if !self.library.style_dir(name).exists() {
            return name.to_string();
        }
        (2u32..)
            .map(|n| format!("{name}-{n}"))
            .find(|n| !self.library.style_dir(n).exists())
            .unwrap_or_else(|| name.to_string())
    }

    /// The folder of a style already registered from exactly this pair and these settings.
    fn registered_as(
        &self,
        pair: &StagedPair,
        content_sha: &str,
        style_sha: &str,
    ) -> DaemonResult<Option<String>> {
        for meta in self.library.list()? {
            let same = meta.content_sha256 == [content_sha]
                && meta.style_sha256 == [style_sha]
                && meta.subject == pair.subject
                && meta.style_desc == pair.style_desc
                && meta.seed == pair.train.seed
                && meta.steps == pair.train.iterations
                && meta.base_model == pair.base_model;
            if same {
                return Ok(Some(
                    self.library.style_dir(&meta.name).display().to_string(),
                ));
            }
        }
        Ok(None)
    }

    /// Check a generation request and queue it (a seed is fixed now when none is given, so a
    /// job re-run after a crash renders the same image).
    fn submit_generation(&self, mut job: GenerateJob, priority: i32) -> DaemonResult<u64> {
        // The cfg stays unset in the job when the client gave none: the model's recommendation
        // (`cfg = "auto"`) is applied when it renders.
        job.check(&self.config.generate, None)?;
        for s in &job.styles {
            if !self.library.contains(&s.name) {
                return Err(DaemonError::Lib(crate::Error::InvalidArgument(format!(
                    "no style named {:?} in {}",
                    s.name,
                    self.library.root().display()
                ))));
            }
        }
        job.seed = job.seed.or_else(|| Some(generate::clock_seed()));
        let id = self.journal().enqueue(JobSpec::Generate(job), priority)?;
        self.emit(Event::JobQueued {
            job: id,
            what: "generate".into(),
            name: None,
        });
        Ok(id)
    }

    /// Export a style for the IPC request: into `output` (absolute), else
    /// `<state>/exports/<name>.<format>.safetensors`.
    fn export_style(&self, name: &str, format: &str, output: Option<&str>) -> DaemonResult<String> {
        let fmt = format.parse::<crate::lora::ExportFormat>()?;
        let out = match output {
            Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
            Some(p) => {
                return Err(DaemonError::Config(format!(
                    "export path {p:?} must be absolute (the daemon does not share your working \
                     directory)"
                )))
            }
            None => {
                let dir = self.paths.state_dir.join(EXPORTS_DIR);
                std::fs::create_dir_all(&dir).map_err(|e| DaemonError::io(&dir, e))?;
                let ext = match fmt {
                    crate::lora::ExportFormat::Kohya => "kohya",
                    crate::lora::ExportFormat::Peft => "peft",
                };
                dir.join(format!("{name}.{ext}.safetensors"))
            }
        };
        self.library.export(name, fmt, None, &out)?;
        Ok(out.display().to_string())
    }
}

/// A file-name-safe slug of a prompt: lower-case letters and digits joined by `-`, at most 48
/// characters (`prompt` when nothing is left).
pub fn slug(prompt: &str) -> String {
    let mut s = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let word = word.to_ascii_lowercase();
        let sep = usize::from(!s.is_empty());
        if s.len() + sep + word.len() > 48 {
            break;
        }
        if sep == 1 {
            s.push('-');
        }
        s.push_str(&word);
    }
    if s.is_empty() {
        "prompt".into()
    } else {
        s
    }
}

/// Watch `dir` (recursively) and send a unit on every file event.
fn watch_folder(
    dir: &Path,
    tx: std::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = tx.send(());
        }
    })?;
    w.watch(dir, notify::RecursiveMode::Recursive)?;
    Ok(w)
}

fn reply_err(e: DaemonError) -> (ErrorCode, String) {
    let code = match &e {
        DaemonError::UnknownJob(_) => ErrorCode::UnknownJob,
        DaemonError::InvalidTransition { .. }
        | DaemonError::Lib(crate::Error::InvalidArgument(_))
        | DaemonError::Config(_) => ErrorCode::InvalidRequest,
        DaemonError::Generate(g)
            if matches!(**g, crate::generate::GenerateError::Setting { .. }) =>
        {
            ErrorCode::InvalidRequest
        }
        _ => ErrorCode::Internal,
    };
    (code, e.to_string())
}

impl Handler for DaemonState {
    fn handle(&self, request: Request) -> Result<ReplyBody, (ErrorCode, String)> {
        match request {
            Request::Status => Ok(ReplyBody::Status(self.status())),
            Request::ListJobs => Ok(ReplyBody::Jobs {
                jobs: self.journal().jobs().cloned().collect(),
            }),
            Request::Job { job } => self
                .journal()
                .get(job)
                .cloned()
                .map(|job| ReplyBody::Job { job })
                .ok_or_else(|| reply_err(DaemonError::UnknownJob(job))),
            Request::Cancel { job } => {
                self.journal().cancel(job).map_err(reply_err)?;
                // A running job notices at its next iteration; the worker then emits the event.
                if !self.is_running(job) {
                    self.emit(Event::JobCancelled { job });
                }
                Ok(ReplyBody::Ok)
            }
            Request::Pause { job } => self
                .journal()
                .set_paused(job, true)
                .map(|_| ReplyBody::Ok)
                .map_err(reply_err),
            Request::Resume { job } => self
                .journal()
                .set_paused(job, false)
                .map(|_| ReplyBody::Ok)
                .map_err(reply_err),
            Request::Retry { job } => self
                .journal()
                .retry(job)
                .map(|_| ReplyBody::Ok)
                .map_err(reply_err),
            Request::SetPriority { job, priority } => self
                .journal()
                .set_priority(job, priority)
                .map(|_| ReplyBody::Ok)
                .map_err(reply_err),
            Request::ListStyles => self
                .library
                .list()
                .map(|styles| ReplyBody::Styles { styles })
                .map_err(|e| (ErrorCode::Internal, e.to_string())),
            Request::SubmitGenerate { job, priority } => self
                .submit_generation(job, priority)
                .map(|job| ReplyBody::Queued { job })
                .map_err(reply_err),
            Request::RenameStyle { from, to } => {
                let dir = self
                    .library
                    .rename(&from, &to)
                    .map_err(|e| reply_err(e.into()))?;
                tracing::info!("renamed style {from} to {to} ({})", dir.display());
                Ok(ReplyBody::Ok)
            }
            Request::RemoveStyle { name } => {
                let trash = self.paths.state_dir.join(TRASH_DIR);
                let dir = self
                    .library
                    .remove_to_trash(&name, &trash)
                    .map_err(|e| reply_err(e.into()))?;
                tracing::info!("moved style {name} to {}", dir.display());
                Ok(ReplyBody::Ok)
            }
            Request::ExportStyle {
                name,
                format,
                output,
            } => self
                .export_style(&name, &format, output.as_deref())
                .map(|path| ReplyBody::Exported { path })
                .map_err(reply_err),
            // The server answers subscriptions itself.
            Request::Subscribe => Ok(ReplyBody::Subscribed),
        }
    }
}

/// Run the daemon until SIGINT or SIGTERM: scanner and worker threads, the socket server on a
/// tokio runtime. `model` is the base model folder for training and generation.
///
/// systemd (`Type=notify`): `READY=1` once the socket listens, a `STATUS=` line every few
/// seconds, `WATCHDOG=1` from this main loop at half the `WatchdogSec=` interval as long as the
/// scanner and worker threads are alive (a thread that died stops the pings, so systemd restarts
/// the service), `STOPPING=1` on the way out.
pub fn run(config: Config, model: PathBuf) -> DaemonResult<()> {
    let state = DaemonState::open(config, model)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DaemonError::io("<tokio runtime>", e))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| DaemonError::io("<thread>", e))
    };
    let scanner = {
        let state = state.clone();
        spawn("pairstyle-scanner", Box::new(move || state.scanner_loop()))?
    };
    let worker = {
        let state = state.clone();
        spawn("pairstyle-worker", Box::new(move || state.worker_loop()))?
    };
    let result = rt.block_on(async {
        let listener = server::bind(&state.paths.socket)?;
        tracing::info!(
            "pairstyle daemon: watching {}, socket {}, library {}, devices {}",
            state.paths.watch.display(),
            state.paths.socket.display(),
            state.paths.library.display(),
            state.devices.join(", ")
        );
        let handler: Arc<dyn Handler> = state.clone();
        let options = ServerOptions::for_current_user(state.config.daemon.max_frame_bytes);
        let server = tokio::spawn(server::serve(
            listener,
            handler,
            state.events(),
            options,
            stop_rx,
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| DaemonError::io("<signal>", e))?;
        sdnotify::notify("READY=1");
        let watchdog = sdnotify::watchdog_interval();
        let mut tick = tokio::time::interval(watchdog.unwrap_or(STATUS_EVERY).min(STATUS_EVERY));
        let mut warned = false;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    let alive = !scanner.is_finished() && !worker.is_finished();
                    if alive {
                        if watchdog.is_some() {
                            sdnotify::notify("WATCHDOG=1");
                        }
                        sdnotify::notify(&format!("STATUS={}", state.status_line()));
                    } else if !warned {
                        warned = true;
                        tracing::error!("a scanner or worker thread stopped unexpectedly");
                        sdnotify::notify("STATUS=a scanner or worker thread died; waiting for the watchdog");
                    }
                }
            }
        }
        sdnotify::notify("STOPPING=1");
        tracing::info!("stopping: a running job is interrupted and resumes at the next start");
        let _ = stop_tx.send(true);
        let _ = server.await;
        Ok::<(), DaemonError>(())
    });
    state.request_shutdown();
    let _ = scanner.join();
    let _ = worker.join();
    let _ = std::fs::remove_file(&state.paths.socket);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_short_safe_file_names() {
        assert_eq!(slug("A photo of a Cat!"), "a-photo-of-a-cat");
        assert_eq!(slug("  ../../etc/passwd  "), "etc-passwd");
        assert_eq!(slug("日本"), "prompt");
        let long = slug(&"word ".repeat(40));
        assert!(long.len() <= 48 && long.starts_with("word-word"), "{long}");
    }
}
