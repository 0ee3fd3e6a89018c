//! The job journal: every training and generation job the daemon knows, in one JSON file that is
//! rewritten atomically (temporary file, fsync, rename) after each change, so a crash at any
//! moment leaves either the old or the new state, never a mix.
//!
//! On load, jobs that were `running` become `interrupted` (a daemon that was killed cannot have
//! finished them) and are runnable again: training resumes from its checkpoint. A job interrupted
//! more than [`MAX_INTERRUPTIONS`] times is failed instead, so a job that crashes the daemon cannot
//! crash it forever. A journal that cannot be parsed is renamed aside (`journal.json.corrupt-<time>`)
//! and reported, never overwritten; a journal from a newer pairstyle stops the daemon untouched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::testhook::{self, PausePoint};
use super::{unix_now, DaemonError, DaemonResult};

/// A style and its λ in a generation job (the same type as in [`crate::generate`]).
pub use crate::generate::StyleWeight;

/// Format version of the journal file this build reads and writes.
pub const JOURNAL_VERSION: u32 = 1;
/// How many times a job may be interrupted by a daemon crash before it is failed.
pub const MAX_INTERRUPTIONS: u32 = 3;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// A worker is on it.
    Running,
    /// Finished successfully.
    Done,
    /// Finished with an error.
    Failed,
    /// Was running when the daemon stopped; runnable again (training resumes from its checkpoint).
    Interrupted,
    /// Cancelled by a user.
    Cancelled,
}

impl JobState {
    /// Whether the job is over (done, failed or cancelled).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    /// Whether a worker may pick the job up.
    pub fn is_runnable(self) -> bool {
        matches!(self, JobState::Queued | JobState::Interrupted)
    }

    /// The state's name as written in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Interrupted => "interrupted",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Train a staged pair and register the style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    /// The pair id (see [`super::intake::pair_id`]).
    pub pair_id: String,
    /// Style name to register.
    pub name: String,
    /// The staged pair folder (with its `intake.json`).
    pub staged_dir: PathBuf,
}

/// Generate an image: the same request `pairstyle generate` takes (unset fields take the
/// `[generate]` / `[style]` defaults when the job runs).
pub type GenerateJob = crate::generate::GenerationRequest;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    /// Learn a style from a staged pair.
    Train(TrainJob),
    /// Render an image.
    Generate(GenerateJob),
}

impl JobSpec {
    /// `train` or `generate`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Train(_) => "train",
            JobSpec::Generate(_) => "generate",
        }
    }
}

/// How far a running job has got.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// Steps done (training iterations or denoising steps).
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// Latest loss (training: the content loss).
    pub loss: Option<f32>,
    /// Latest style loss (training, from `style_start` on).
    pub loss_style: Option<f32>,
    /// Steps per second.
    pub it_per_s: f64,
    /// Estimated seconds to the end.
    pub eta_secs: Option<f64>,
}

impl JobProgress {
    /// The same progress with non-finite numbers (a diverged loss, a first-step rate) made
    /// representable in JSON: losses become absent, rates 0, an infinite ETA absent.
    pub fn sanitized(&self) -> Self {
        let f32_opt = |v: Option<f32>| v.filter(|x| x.is_finite());
        Self {
            step: self.step,
            total: self.total,
            loss: f32_opt(self.loss),
            loss_style: f32_opt(self.loss_style),
            it_per_s: if self.it_per_s.is_finite() {
                self.it_per_s
            } else {
                0.0
            },
            eta_secs: self.eta_secs.filter(|x| x.is_finite()),
        }
    }
}

/// One job and its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Unique, increasing id.
    pub id: u64,
    /// What to do.
    pub spec: JobSpec,
    /// Where it is.
    pub state: JobState,
    /// Higher runs first; equal priorities run in id order.
    pub priority: i32,
    /// A paused job is not picked up until resumed.
    pub paused: bool,
    /// Latest progress, if it ever ran.
    pub progress: Option<JobProgress>,
    /// How many daemon stops interrupted it.
    pub interruptions: u32,
    /// Why it failed.
    pub error: Option<String>,
    /// What it produced (the style folder or the PNG path).
    pub result: Option<String>,
    /// Unix time it was queued.
    pub created_unix: u64,
    /// Unix time of its last change.
    pub updated_unix: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalFile {
    version: u32,
    next_id: u64,
    jobs: Vec<Job>,
}

/// A journal that could not be read, and where it was kept.
#[derive(Debug, Clone, PartialEq)]
pub struct CorruptJournal {
    /// The unreadable file, renamed aside.
    pub preserved_at: PathBuf,
    /// Why it could not be read.
    pub error: String,
}

/// What loading the journal found and changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Jobs that were running and are now interrupted (runnable again).
    pub interrupted: Vec<u64>,
    /// Jobs interrupted too often, now failed.
    pub given_up: Vec<u64>,
    /// Set when the file was unreadable and the journal starts empty.
    pub corrupt: Option<CorruptJournal>,
}

/// The persistent job queue.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    next_id: u64,
    jobs: BTreeMap<u64, Job>,
    pause: Option<PausePoint>,
}

impl Journal {
    /// Open (or create) the journal at `path`, marking running jobs interrupted.
    pub fn open(path: &Path) -> DaemonResult<(Self, LoadReport)> {
        let mut report = LoadReport::default();
        let mut journal = Journal {
            path: path.to_path_buf(),
            next_id: 1,
            jobs: BTreeMap::new(),
            pause: None,
        };
        remove_stale_temps(path);
        let bytes = match std::fs::read(path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(DaemonError::io(path, e)),
        };
        if let Some(bytes) = bytes {
            match parse(path, &bytes)? {
                Ok(file) => {
                    journal.next_id = file.next_id;
                    for job in file.jobs {
                        journal.next_id = journal.next_id.max(job.id + 1);
                        journal.jobs.insert(job.id, job);
                    }
                }
                Err(error) => {
                    let preserved_at = aside_path(path);
                    std::fs::rename(path, &preserved_at).map_err(|e| DaemonError::io(path, e))?;
                    tracing::error!(
                        "job journal {} is unreadable ({error}); kept as {} and starting an \
                         empty queue",
                        path.display(),
                        preserved_at.display()
                    );
                    report.corrupt = Some(CorruptJournal {
                        preserved_at,
                        error,
                    });
                }
            }
        }
        let now = unix_now();
        for job in journal.jobs.values_mut() {
            if job.state != JobState::Running {
                continue;
            }
            job.interruptions += 1;
            job.updated_unix = now;
            if job.interruptions > MAX_INTERRUPTIONS {
                job.state = JobState::Failed;
                job.error = Some(format!(
                    "interrupted {} times (the daemon stopped or crashed while running it); \
                     not retried again",
                    job.interruptions
                ));
                report.given_up.push(job.id);
            } else {
                job.state = JobState::Interrupted;
                report.interrupted.push(job.id);
            }
        }
        journal.save()?;
        Ok((journal, report))
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Set a test-only pause point (see [`super::testhook`]): saves made at that point stop
    /// half-way through writing the temporary file.
    pub fn set_pause(&mut self, pause: Option<PausePoint>) {
        self.pause = pause;
    }

    /// Write the whole journal atomically.
    pub fn save(&self) -> DaemonResult<()> {
        self.save_at("save")
    }

    /// [`Journal::save`], at a named point of the job's life (for the test pause points).
    fn save_at(&self, point: &str) -> DaemonResult<()> {
        let file = JournalFile {
            version: JOURNAL_VERSION,
            next_id: self.next_id,
            jobs: self.jobs.values().cloned().collect(),
        };
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| DaemonError::Config(format!("cannot serialise the journal: {e}")))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DaemonError::io(dir, e))?;
        }
        if let Some(pause) = self.pause.as_ref().filter(|p| p.is(point)) {
            // Crash tests: leave a half-written temporary file, as a kill mid-write would.
            let tmp = self.path.with_file_name(format!(
                ".{}.{}.paused.tmp",
                self.path
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
                std::process::id()
            ));
            let half = &text.as_bytes()[..text.len() / 2];
            std::fs::write(&tmp, half).map_err(|e| DaemonError::io(&tmp, e))?;
            pause.hold_if(point);
        }
        crate::engine::image_io::write_file_atomic(&self.path, text.as_bytes())?;
        Ok(())
    }

    /// Add a queued job and save; returns its id.
    pub fn enqueue(&mut self, spec: JobSpec, priority: i32) -> DaemonResult<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let now = unix_now();
        self.jobs.insert(
            id,
            Job {
                id,
                spec,
                state: JobState::Queued,
                priority,
                paused: false,
                progress: None,
                interruptions: 0,
                error: None,
                result: None,
                created_unix: now,
                updated_unix: now,
            },
        );
        if let Err(e) = self.save_at(testhook::JOURNAL_ENQUEUE) {
            // Not on disk: not queued.
            self.jobs.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// One job.
    pub fn get(&self, id: u64) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// All jobs in id order.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// Whether a training job for this pair id is done or under way (so it is not trained again).
    /// Failed and cancelled jobs do not count: dropping the pair again retries it.
    pub fn knows_pair(&self, pair_id: &str) -> bool {
        self.jobs.values().any(|j| {
            matches!(&j.spec, JobSpec::Train(t) if t.pair_id == pair_id)
                && !matches!(j.state, JobState::Failed | JobState::Cancelled)
        })
    }

    /// The job a worker should run next: runnable, not paused, highest priority, then oldest.
    /// `accept` filters by kind (e.g. a worker that only generates).
    pub fn next_runnable(&self, accept: impl Fn(&JobSpec) -> bool) -> Option<&Job> {
        self.jobs
            .values()
            .filter(|j| j.state.is_runnable() && !j.paused && accept(&j.spec))
            .min_by_key(|j| (std::cmp::Reverse(j.priority), j.id))
    }

    /// Take the job [`Journal::next_runnable`] picks and start it, in one step (so two workers
    /// never take the same job). `None` when nothing is runnable.
    pub fn claim_next(&mut self, accept: impl Fn(&JobSpec) -> bool) -> DaemonResult<Option<Job>> {
        let Some(id) = self.next_runnable(accept).map(|j| j.id) else {
            return Ok(None);
        };
        self.start(id)?;
        Ok(self.jobs.get(&id).cloned())
    }

    fn job_mut(&mut self, id: u64) -> DaemonResult<&mut Job> {
        self.jobs.get_mut(&id).ok_or(DaemonError::UnknownJob(id))
    }

    /// Move a job to `to` if its state is one of `from`, then save.
    fn transition(
        &mut self,
        id: u64,
        from: &[JobState],
        to: JobState,
        edit: impl FnOnce(&mut Job),
    ) -> DaemonResult<()> {
        self.transition_at(id, from, to, edit, "save")
    }

    /// [`Journal::transition`], saving at the named point.
    fn transition_at(
        &mut self,
        id: u64,
        from: &[JobState],
        to: JobState,
        edit: impl FnOnce(&mut Job),
        point: &str,
    ) -> DaemonResult<()> {
        let job = self.job_mut(id)?;
        if !from.contains(&job.state) {
            return Err(DaemonError::InvalidTransition {
                job: id,
                from: job.state.to_string(),
                to: to.to_string(),
            });
        }
        job.state = to;
        job.updated_unix = unix_now();
        edit(job);
        self.save_at(point)
    }

    /// A worker takes the job (queued or interrupted → running).
    pub fn start(&mut self, id: u64) -> DaemonResult<()> {
        self.transition(
            id,
            &[JobState::Queued, JobState::Interrupted],
            JobState::Running,
            |j| j.error = None,
        )
    }

    /// Record progress in memory (call [`Journal::save`] now and then to persist it).
    pub fn set_progress(&mut self, id: u64, progress: JobProgress) -> DaemonResult<()> {
        let job = self.job_mut(id)?;
        job.progress = Some(progress.sanitized());
        job.updated_unix = unix_now();
        Ok(())
    }

    /// The job finished (running → done), with what it produced.
    pub fn finish(&mut self, id: u64, result: Option<String>) -> DaemonResult<()> {
        self.transition_at(
            id,
            &[JobState::Running],
            JobState::Done,
            |j| j.result = result,
            testhook::JOURNAL_FINISH,
        )
    }

    /// The job failed (from any unfinished state), with the reason.
    pub fn fail(&mut self, id: u64, error: impl Into<String>) -> DaemonResult<()> {
        let error = error.into();
        self.transition(
            id,
            &[JobState::Queued, JobState::Running, JobState::Interrupted],
            JobState::Failed,
            |j| j.error = Some(error),
        )
    }

    /// A worker stopped a running job without finishing it (daemon shutdown): it is interrupted
    /// and will resume, without counting as a crash.
    pub fn interrupt(&mut self, id: u64) -> DaemonResult<()> {
        self.transition(id, &[JobState::Running], JobState::Interrupted, |_| {})
    }

    /// Cancel an unfinished job (a running one must also be stopped by its worker).
    pub fn cancel(&mut self, id: u64) -> DaemonResult<()> {
        self.transition(
            id,
            &[JobState::Queued, JobState::Running, JobState::Interrupted],
            JobState::Cancelled,
            |_| {},
        )
    }

    /// Queue a failed, cancelled or interrupted job again (its interruption count is reset).
    pub fn retry(&mut self, id: u64) -> DaemonResult<()> {
        self.transition(
            id,
            &[JobState::Failed, JobState::Cancelled, JobState::Interrupted],
            JobState::Queued,
            |j| {
                j.interruptions = 0;
                j.error = None;
            },
        )
    }

    /// Change a job's priority and save.
    pub fn set_priority(&mut self, id: u64, priority: i32) -> DaemonResult<()> {
        let job = self.job_mut(id)?;
        job.priority = priority;
        job.updated_unix = unix_now();
        self.save()
    }

    /// Pause or resume an unfinished job and save (a running job keeps running; pausing only
    /// keeps it from being picked up again after an interruption).
    pub fn set_paused(&mut self, id: u64, paused: bool) -> DaemonResult<()> {
        let job = self.job_mut(id)?;
        if job.state.is_finished() {
            return Err(DaemonError::InvalidTransition {
                job: id,
                from: job.state.to_string(),
                to: if paused { "paused" } else { "resumed" }.into(),
            });
        }
        job.paused = paused;
        job.updated_unix = unix_now();
        self.save()
    }
}

/// Parse the journal: `Ok(Err(reason))` for a corrupt file, `Err` for a newer format version.
fn parse(path: &Path, bytes: &[u8]) -> DaemonResult<Result<JournalFile, String>> {
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Ok(Err(format!("not valid JSON: {e}"))),
    };
    match value.get("version").and_then(serde_json::Value::as_u64) {
        None => return Ok(Err("no format version".into())),
        Some(v) if v > u64::from(JOURNAL_VERSION) => {
            return Err(DaemonError::JournalVersion {
                path: path.to_path_buf(),
                found: u32::try_from(v).unwrap_or(u32::MAX),
                supported: JOURNAL_VERSION,
            })
        }
        Some(_) => {}
    }
    let file: JournalFile = match serde_json::from_value(value) {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("unexpected content: {e}"))),
    };
    let mut seen = std::collections::HashSet::new();
    for job in &file.jobs {
        if !seen.insert(job.id) {
            return Ok(Err(format!("job id {} appears twice", job.id)));
        }
    }
    Ok(Ok(file))
}

/// Remove the temporary files (`.journal.json.<pid>.….tmp`) that writes killed before their
/// rename left next to the journal; files of living processes are kept.
fn remove_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        if !rest.ends_with(".tmp") {
            continue;
        }
        let owner = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(crate::library::process_alive) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => tracing::info!(
                "removed {}, left by an interrupted journal write",
                entry.path().display()
            ),
            Err(e) => tracing::warn!("cannot remove {}: {e}", entry.path().display()),
        }
    }
}

/// `journal.json.corrupt-<unix>` (with `.2`, `.3`... if taken).
fn aside_path(path: &Path) -> PathBuf {
    let base = format!("{}.corrupt-{}", path.display(), unix_now());
    let first = PathBuf::from(&base);
    if !first.exists() {
        return first;
    }
    (2u32..)
        .map(|n| PathBuf::from(format!("{base}.{n}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ps-journal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn train(pair: &str) -> JobSpec {
        JobSpec::Train(TrainJob {
            pair_id: pair.into(),
            name: format!("style-{pair}"),
            staged_dir: PathBuf::from("/staging").join(pair),
        })
    }

    fn generate(prompt: &str) -> JobSpec {
        JobSpec::Generate(GenerateJob {
            prompt: prompt.into(),
            styles: vec![
                StyleWeight {
                    name: "a".into(),
                    lambda: Some(3.0),
                },
                StyleWeight {
                    name: "b".into(),
                    lambda: None,
                },
            ],
            ..Default::default()
        })
    }

    #[test]
    fn jobs_survive_a_reopen() {
        let d = scratch("reopen");
        let p = d.join("journal.json");
        let (mut j, report) = Journal::open(&p).unwrap();
        assert_eq!(report, LoadReport::default());
        let a = j.enqueue(train("p1"), 0).unwrap();
        let b = j.enqueue(generate("a fox"), 5).unwrap();
        j.start(a).unwrap();
        j.set_progress(
            a,
            JobProgress {
                step: 3,
                total: 10,
                loss: Some(0.5),
                loss_style: None,
                it_per_s: 2.0,
                eta_secs: Some(3.5),
            },
        )
        .unwrap();
        j.finish(a, Some("/lib/style-p1".into())).unwrap();
        let before: Vec<Job> = j.jobs().cloned().collect();
        drop(j);
        let (j, report) = Journal::open(&p).unwrap();
        assert_eq!(report, LoadReport::default());
        assert_eq!(j.jobs().cloned().collect::<Vec<_>>(), before);
        assert_eq!(j.get(b).unwrap().state, JobState::Queued);
        // Ids are never reused.
        let (mut j, _) = Journal::open(&p).unwrap();
        assert_eq!(j.enqueue(train("p2"), 0).unwrap(), b + 1);
        // No temporary file is left next to the journal.
        let names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["journal.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn running_jobs_become_interrupted_and_runnable_then_give_up() {
        let d = scratch("interrupt");
        let p = d.join("journal.json");
        let (mut j, _) = Journal::open(&p).unwrap();
        let a = j.enqueue(train("p1"), 0).unwrap();
        let b = j.enqueue(train("p2"), 0).unwrap();
        j.start(a).unwrap();
        drop(j); // the daemon dies with job a running
        for round in 1..=MAX_INTERRUPTIONS {
            let (mut j, report) = Journal::open(&p).unwrap();
            assert_eq!(report.interrupted, [a], "round {round}");
            let job = j.get(a).unwrap();
            assert_eq!(
                (job.state, job.interruptions),
                (JobState::Interrupted, round)
            );
            // Requeued: it runs before the younger job b.
            assert_eq!(j.next_runnable(|_| true).unwrap().id, a);
            j.start(a).unwrap();
        }
        let (j, report) = Journal::open(&p).unwrap();
        assert_eq!(report.given_up, [a]);
        let job = j.get(a).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job
            .error
            .as_deref()
            .unwrap()
            .contains("interrupted 4 times"));
        assert_eq!(j.next_runnable(|_| true).unwrap().id, b);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_journal_is_kept_aside_and_reported() {
        let d = scratch("corrupt");
        let p = d.join("journal.json");
        for (i, garbage) in [
            &b"{\"version\": 1, \"next_id\": 3, \"jobs\": [{\"id\": 1"[..],
            b"\x00\xffnot json",
            b"{\"jobs\": []}",
            b"{\"version\": 1, \"next_id\": 1, \"jobs\": [{\"id\": 1, \"spec\": {\"kind\": \"dance\"}}]}",
        ]
        .iter()
        .enumerate()
        {
            std::fs::write(&p, garbage).unwrap();
            let (j, report) = Journal::open(&p).unwrap();
            let c = report.corrupt.unwrap_or_else(|| panic!("case {i} not reported"));
            assert_eq!(std::fs::read(&c.preserved_at).unwrap(), *garbage, "case {i}");
            assert!(!c.error.is_empty());
            assert_eq!(j.jobs().count(), 0);
            // The fresh journal is valid.
            assert!(Journal::open(&p).unwrap().1.corrupt.is_none());
        }
        // All four unreadable files are still there.
        let kept = std::fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".corrupt-")
            })
            .count();
        assert_eq!(kept, 4);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_newer_journal_is_refused_and_left_untouched() {
        let d = scratch("newer");
        let p = d.join("journal.json");
        let text = b"{\"version\": 99, \"whatever\": true}";
        std::fs::write(&p, text).unwrap();
        let e = Journal::open(&p).unwrap_err();
        assert!(
            matches!(e, DaemonError::JournalVersion { found: 99, .. }),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), text);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_stale_temporary_file_from_a_killed_write_does_not_matter() {
        let d = scratch("stale");
        let p = d.join("journal.json");
        let (mut j, _) = Journal::open(&p).unwrap();
        j.enqueue(train("p1"), 0).unwrap();
        drop(j);
        // A write killed before its rename leaves a partial temporary file behind.
        // (No process has pid 999999999: Linux pids stop at 2^22.)
        let dead = d.join(".journal.json.999999999.0.tmp");
        std::fs::write(&dead, b"{\"version\": 1, \"ne").unwrap();
        let mine = d.join(format!(".journal.json.{}.77.tmp", std::process::id()));
        std::fs::write(&mine, b"{").unwrap();
        let (j, report) = Journal::open(&p).unwrap();
        assert!(report.corrupt.is_none());
        assert_eq!(j.jobs().count(), 1);
        // The dead writer's file is gone, the living one's kept.
        assert!(!dead.exists());
        assert!(mine.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_diverged_loss_does_not_corrupt_the_journal() {
        let d = scratch("nan");
        let p = d.join("journal.json");
        let (mut j, _) = Journal::open(&p).unwrap();
        let a = j.enqueue(train("p1"), 0).unwrap();
        j.set_progress(
            a,
            JobProgress {
                step: 1,
                total: 9,
                loss: Some(f32::NAN),
                loss_style: Some(0.25),
                it_per_s: f64::INFINITY,
                eta_secs: Some(f64::NAN),
            },
        )
        .unwrap();
        j.save().unwrap();
        let (j, report) = Journal::open(&p).unwrap();
        assert!(report.corrupt.is_none());
        let prog = j.get(a).unwrap().progress.unwrap();
        assert_eq!(
            (prog.loss, prog.loss_style, prog.it_per_s),
            (None, Some(0.25), 0.0)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn transitions_are_checked() {
        let d = scratch("transitions");
        let (mut j, _) = Journal::open(&d.join("journal.json")).unwrap();
        let a = j.enqueue(train("p1"), 0).unwrap();
        assert!(matches!(
            j.finish(a, None),
            Err(DaemonError::InvalidTransition { .. })
        ));
        j.start(a).unwrap();
        assert!(j.start(a).is_err());
        j.finish(a, None).unwrap();
        let e = j.cancel(a).unwrap_err().to_string();
        assert!(e.contains("is done") && e.contains("cancelled"), "{e}");
        assert!(j.set_paused(a, true).is_err());
        assert!(matches!(j.cancel(42), Err(DaemonError::UnknownJob(42))));
        let b = j.enqueue(train("p2"), 0).unwrap();
        j.start(b).unwrap();
        j.fail(b, "out of memory").unwrap();
        assert_eq!(j.get(b).unwrap().error.as_deref(), Some("out of memory"));
        j.retry(b).unwrap();
        assert_eq!(j.get(b).unwrap().state, JobState::Queued);
        assert!(j.get(b).unwrap().error.is_none());
        j.start(b).unwrap();
        j.interrupt(b).unwrap();
        assert_eq!(j.get(b).unwrap().state, JobState::Interrupted);
        assert_eq!(j.get(b).unwrap().interruptions, 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn priority_pause_and_kind_decide_what_runs_next() {
        let d = scratch("order");
        let (mut j, _) = Journal::open(&d.join("journal.json")).unwrap();
        let a = j.enqueue(train("p1"), 0).unwrap();
        let b = j.enqueue(generate("x"), 0).unwrap();
        let c = j.enqueue(train("p3"), 0).unwrap();
        assert_eq!(j.next_runnable(|_| true).unwrap().id, a);
        j.set_priority(c, 10).unwrap();
        assert_eq!(j.next_runnable(|_| true).unwrap().id, c);
        j.set_paused(c, true).unwrap();
        assert_eq!(j.next_runnable(|_| true).unwrap().id, a);
        let only_generate = |s: &JobSpec| matches!(s, JobSpec::Generate(_));
        assert_eq!(j.next_runnable(only_generate).unwrap().id, b);
        j.set_paused(c, false).unwrap();
        j.cancel(c).unwrap();
        j.start(a).unwrap();
        j.start(b).unwrap();
        assert!(j.next_runnable(|_| true).is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn known_pairs_exclude_failed_and_cancelled_jobs() {
        let d = scratch("known");
        let (mut j, _) = Journal::open(&d.join("journal.json")).unwrap();
        let a = j.enqueue(train("p1"), 0).unwrap();
        assert!(j.knows_pair("p1"));
        assert!(!j.knows_pair("p2"));
        j.cancel(a).unwrap();
        assert!(!j.knows_pair("p1"));
        let b = j.enqueue(train("p1"), 0).unwrap();
        j.start(b).unwrap();
        j.finish(b, None).unwrap();
        assert!(j.knows_pair("p1"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
