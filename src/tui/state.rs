//! Everything the terminal UI shows, as one plain value: the daemon's data as last received
//! (status, jobs, styles), what the user is doing (view, selections, filter, the generate form,
//! an open dialog), and local facts (pictures decoded from disk, the drop-folder scan).
//!
//! [`super::action::update`] is the only thing that changes it; [`super::view::draw`] only reads
//! it. Nothing in here touches the terminal, the socket or the clock.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::daemon::journal::{GenerateJob, Job, JobSpec, JobState, StyleWeight};
use crate::daemon::protocol::StatusReport;
use crate::library::StyleMeta;

/// How many loss values a job keeps for its sparkline.
pub const LOSS_HISTORY: usize = 512;
/// How many error messages are kept.
pub const ERROR_HISTORY: usize = 50;
/// Step of the λ keys in the generate view.
pub const LAMBDA_STEP: f64 = 0.5;
/// Step of the width/height keys in the generate view (a multiple of every model's factor).
pub const SIZE_STEP: usize = 64;

/// The four screens of the UI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum View {
    /// The style library.
    Styles,
    /// Training and generation jobs.
    Jobs,
    /// The generation form and the outputs gallery.
    Generate,
    /// What the drop-folder watcher sees.
    DropFolder,
}

impl View {
    /// Every view in tab order.
    pub const ALL: [View; 4] = [View::Styles, View::Jobs, View::Generate, View::DropFolder];

    /// The tab title.
    pub fn title(self) -> &'static str {
        match self {
            View::Styles => "Styles",
            View::Jobs => "Jobs",
            View::Generate => "Generate",
            View::DropFolder => "Drop folder",
        }
    }

    /// Position in [`View::ALL`].
    pub fn index(self) -> usize {
        match self {
            View::Styles => 0,
            View::Jobs => 1,
            View::Generate => 2,
            View::DropFolder => 3,
        }
    }

    /// The next view in tab order (wrapping).
    pub fn next(self) -> View {
        View::ALL[(self.index() + 1) % View::ALL.len()]
    }

    /// The previous view in tab order (wrapping).
    pub fn prev(self) -> View {
        View::ALL[(self.index() + View::ALL.len() - 1) % View::ALL.len()]
    }
}

/// The link to the daemon as the UI knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Not connected yet.
    Connecting,
    /// Hellos exchanged; `server` is the daemon's name and version.
    Connected {
        /// The daemon's hello.
        server: String,
    },
    /// The connection broke or could not be made; the client retries.
    Lost {
        /// Why, in words.
        reason: String,
        /// How many attempts have failed since the last success.
        attempts: u32,
    },
}

/// A decoded picture, small enough to keep in the state (a thumbnail of the file).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Picture {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major RGB bytes, `width * height * 3` of them.
    pub rgb: Vec<u8>,
}

impl Picture {
    /// The RGB value at `(x, y)`; black outside the picture.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        if x >= self.width || y >= self.height {
            return [0, 0, 0];
        }
        let i = ((y as usize) * (self.width as usize) + x as usize) * 3;
        match self.rgb.get(i..i + 3) {
            Some(p) => [p[0], p[1], p[2]],
            None => [0, 0, 0],
        }
    }
}

/// A picture file as the UI has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PictureSlot {
    /// Asked for, not decoded yet.
    Loading,
    /// Decoded.
    Ready(Picture),
    /// Could not be read or decoded.
    Failed(String),
}

/// The image files that belong to a style, found next to it in the library.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StyleAssets {
    /// `(label, path)`: the content image, the style image, then any sample grid or thumbnail.
    pub pictures: Vec<(String, PathBuf)>,
}

/// What the UI remembers about a job beyond the daemon's record: the loss curve, the latest
/// sample image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobHistory {
    /// Content losses of the progress events seen, oldest first.
    pub losses: Vec<f32>,
    /// Style losses seen.
    pub style_losses: Vec<f32>,
    /// The latest image the job wrote.
    pub sample: Option<PathBuf>,
}

impl JobHistory {
    /// Record one progress event's losses, keeping at most [`LOSS_HISTORY`].
    pub fn push(&mut self, loss: Option<f32>, style: Option<f32>) {
        fn push_capped(v: &mut Vec<f32>, x: f32) {
            if v.len() >= LOSS_HISTORY {
                v.remove(0);
            }
            v.push(x);
        }
        if let Some(l) = loss.filter(|l| l.is_finite()) {
            push_capped(&mut self.losses, l);
        }
        if let Some(l) = style.filter(|l| l.is_finite()) {
            push_capped(&mut self.style_losses, l);
        }
    }
}

/// A field of the generate form, in the order shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// The prompt.
    Prompt,
    /// The negative prompt.
    Negative,
    /// The noise seed.
    Seed,
    /// Denoising steps.
    Steps,
    /// Classifier-free guidance scale.
    Cfg,
    /// Width in pixels.
    Width,
    /// Height in pixels.
    Height,
    /// The sampler (stepped through [`SAMPLERS`]).
    Sampler,
    /// The first step with style guidance (the schedule option).
    StyleFrom,
    /// The style picker.
    Styles,
}

impl Field {
    /// Every field in form order.
    pub const ALL: [Field; 10] = [
        Field::Prompt,
        Field::Negative,
        Field::Seed,
        Field::Steps,
        Field::Cfg,
        Field::Width,
        Field::Height,
        Field::Sampler,
        Field::StyleFrom,
        Field::Styles,
    ];

    /// The label shown in the form.
    pub fn label(self) -> &'static str {
        match self {
            Field::Prompt => "Prompt",
            Field::Negative => "Negative",
            Field::Seed => "Seed",
            Field::Steps => "Steps",
            Field::Cfg => "CFG",
            Field::Width => "Width",
            Field::Height => "Height",
            Field::Sampler => "Sampler",
            Field::StyleFrom => "Style from step",
            Field::Styles => "Styles",
        }
    }

    /// Whether the field holds free text (typed) rather than a number (also typed, or stepped).
    pub fn is_text(self) -> bool {
        matches!(self, Field::Prompt | Field::Negative)
    }

    /// Whether the field holds a number that can be typed.
    pub fn is_numeric(self) -> bool {
        !self.is_text() && !matches!(self, Field::Styles | Field::Sampler)
    }

    fn position(self) -> usize {
        Field::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }

    /// The field below (stays on the last).
    pub fn next(self) -> Field {
        Field::ALL[(self.position() + 1).min(Field::ALL.len() - 1)]
    }

    /// The field above (stays on the first).
    pub fn prev(self) -> Field {
        Field::ALL[self.position().saturating_sub(1)]
    }
}

/// A style chosen for a blend, with its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct BlendEntry {
    /// The style's name.
    pub name: String,
    /// Its style-guidance weight λ.
    pub lambda: f64,
}

/// The samplers the form steps through; `None` leaves the choice to the daemon's
/// `[generate] scheduler`.
pub const SAMPLERS: [Option<&str>; 5] = [
    None,
    Some("default"),
    Some("euler"),
    Some("ddim"),
    Some("pndm"),
];

/// The generate form.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateForm {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative: String,
    /// The seed; `None` lets the daemon pick one (it records it in the PNG).
    pub seed: Option<u64>,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; `None` is the daemon's `[generate] cfg` (`"auto"`: the
    /// model's recommended scale).
    pub cfg: Option<f64>,
    /// Width in pixels; `None` is the model's native size.
    pub width: Option<usize>,
    /// Height in pixels; `None` is the model's native size.
    pub height: Option<usize>,
    /// The sampler (one of [`SAMPLERS`]); `None` is the daemon's `[generate] scheduler`.
    pub sampler: Option<String>,
    /// Plain CFG before this step, style guidance from it (0: every step).
    pub style_from: usize,
    /// The chosen styles in the order they were picked.
    pub blend: Vec<BlendEntry>,
    /// The field with the cursor.
    pub field: Field,
    /// The text being typed into the current field, while editing.
    pub editing: Option<String>,
    /// The highlighted row of the style picker (an index into the library's styles).
    pub style_cursor: usize,
    /// The job submitted last, whose result is shown.
    pub submitted: Option<u64>,
    /// The highlighted entry of the outputs gallery (an index into the finished outputs).
    pub gallery_cursor: usize,
    /// λ given to a style when it is picked.
    pub default_lambda: f64,
}

impl GenerateForm {
    /// An empty form with the configured defaults.
    pub fn new(defaults: &crate::config::Config) -> Self {
        let g = &defaults.generate;
        Self {
            prompt: String::new(),
            negative: g.negative.clone(),
            seed: None,
            steps: g.steps.max(1),
            cfg: g.cfg.scale(),
            width: (g.width > 0).then_some(g.width),
            height: (g.height > 0).then_some(g.height),
            sampler: None,
            style_from: defaults.style.from_step,
            blend: Vec::new(),
            field: Field::Prompt,
            editing: None,
            style_cursor: 0,
            submitted: None,
            gallery_cursor: 0,
            default_lambda: defaults.style.lambda,
        }
    }

    /// The λ of a style in the blend, if chosen.
    pub fn lambda_of(&self, name: &str) -> Option<f64> {
        self.blend.iter().find(|b| b.name == name).map(|b| b.lambda)
    }

    /// The job this form describes.
    pub fn to_job(&self) -> GenerateJob {
        GenerateJob {
            prompt: self.prompt.trim().to_string(),
            negative: (!self.negative.trim().is_empty()).then(|| self.negative.clone()),
            styles: self
                .blend
                .iter()
                .map(|b| StyleWeight {
                    name: b.name.clone(),
                    lambda: Some(b.lambda),
                })
                .collect(),
            seed: self.seed,
            steps: Some(self.steps),
            cfg: self.cfg,
            width: self.width,
            height: self.height,
            scheduler: self.sampler.clone(),
            style_from: Some(self.style_from),
            lora_scale: None,
        }
    }

    /// Step the sampler through [`SAMPLERS`] by `dir` (wrapping).
    pub fn step_sampler(&mut self, dir: i64) {
        let n = SAMPLERS.len() as i64;
        let at = SAMPLERS
            .iter()
            .position(|s| *s == self.sampler.as_deref())
            .unwrap_or(0) as i64;
        self.sampler = SAMPLERS[(at + dir).rem_euclid(n) as usize].map(str::to_string);
    }

    /// The current value of a non-style field as text (what editing starts from).
    pub fn field_text(&self, field: Field) -> String {
        let opt = |v: Option<usize>| v.map(|v| v.to_string()).unwrap_or_default();
        match field {
            Field::Prompt => self.prompt.clone(),
            Field::Negative => self.negative.clone(),
            Field::Seed => self.seed.map(|s| s.to_string()).unwrap_or_default(),
            Field::Steps => self.steps.to_string(),
            Field::Cfg => self.cfg.map(format_number).unwrap_or_default(),
            Field::Width => opt(self.width),
            Field::Height => opt(self.height),
            Field::Sampler => self.sampler.clone().unwrap_or_default(),
            Field::StyleFrom => self.style_from.to_string(),
            Field::Styles => String::new(),
        }
    }
}

/// `7.5` → `7.5`, `3.0` → `3`: numbers as people write them.
pub fn format_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        let s = format!("{x:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// What the drop-folder watcher would say about one dropped pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropState {
    /// Complete and stable: the daemon takes it at its next scan.
    Ready,
    /// Complete but written too recently; taken once unchanged for the stability time.
    WaitingForStability {
        /// Seconds until it counts as stable.
        secs_left: u64,
    },
    /// Something is missing or misnamed; it fails after the lone-file timeout.
    Incomplete {
        /// What is wrong.
        reason: String,
    },
    /// Moved to `failed/` with a reason.
    Failed {
        /// The first line of its `Reason:` in `error.txt`.
        reason: String,
    },
}

/// One entry of the drop-folder view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropEntry {
    /// The pair's name.
    pub name: String,
    /// Where it stands.
    pub state: DropState,
    /// Its folder (the pair folder, or its folder under `failed/`), or the watch folder for flat
    /// files.
    pub path: PathBuf,
    /// The files that make it up (names only).
    pub files: Vec<String>,
}

/// The drop folder as last scanned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropSnapshot {
    /// The watch folder.
    pub watch: PathBuf,
    /// Pending pairs first (in name order), then failed ones.
    pub entries: Vec<DropEntry>,
    /// A problem reading the folder, if any.
    pub error: Option<String>,
}

/// What a confirmation dialog will do on `y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    /// Move a style to the library's trash.
    DeleteStyle(String),
    /// Cancel a job.
    CancelJob(u64),
}

/// What a one-line input dialog is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputPurpose {
    /// A new name for a style.
    RenameStyle {
        /// The current name.
        from: String,
    },
    /// Where to export a style (the text is the output file); Tab switches the format.
    ExportStyle {
        /// The style.
        name: String,
        /// `kohya` or `peft`.
        format: String,
    },
}

/// A dialog over the current view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modal {
    /// Every key of every view (`?`).
    Help,
    /// A yes/no question.
    Confirm(Confirm),
    /// A line of text.
    Input {
        /// What the text is for.
        purpose: InputPurpose,
        /// The text typed so far.
        text: String,
    },
}

/// How serious a notice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something worked.
    Info,
    /// Something failed.
    Error,
}

/// The message shown in the status bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Info or error.
    pub level: Level,
    /// In words.
    pub text: String,
    /// The tick it was posted at (notices fade after a while).
    pub at_tick: u64,
}

/// How many ticks a notice stays in the status bar.
pub const NOTICE_TICKS: u64 = 50;

/// The whole UI state.
#[derive(Debug, Clone, PartialEq)]
pub struct AppState {
    /// The screen shown.
    pub view: View,
    /// An open dialog.
    pub modal: Option<Modal>,
    /// The link to the daemon.
    pub connection: Connection,
    /// The daemon was started inside this process because none answered.
    pub embedded: bool,
    /// The socket path, for the status bar.
    pub socket: String,
    /// The terminal's graphics protocol for pictures; `None`: half blocks.
    pub graphics: Option<crate::tui::graphics::Graphics>,
    /// The daemon's latest status report.
    pub status: Option<StatusReport>,
    /// Every job, as last listed (the UI keeps them current from events in between).
    pub jobs: Vec<Job>,
    /// Loss curves and samples per job id.
    pub history: BTreeMap<u64, JobHistory>,
    /// The selected job's id.
    pub selected_job: Option<u64>,
    /// The library's styles, in name order.
    pub styles: Vec<StyleMeta>,
    /// The styles list's filter text (case-insensitive substring of name, subject, style).
    pub filter: String,
    /// Typing into the filter.
    pub filtering: bool,
    /// The selected style's name.
    pub selected_style: Option<String>,
    /// Pictures found for styles, by name.
    pub style_assets: BTreeMap<String, StyleAssets>,
    /// Decoded pictures by file path.
    pub pictures: BTreeMap<PathBuf, PictureSlot>,
    /// The generate form.
    pub form: GenerateForm,
    /// The drop folder as last scanned.
    pub drop: Option<DropSnapshot>,
    /// The selected drop-folder entry.
    pub drop_cursor: usize,
    /// The status-bar message.
    pub notice: Option<Notice>,
    /// Errors seen, oldest first (at most [`ERROR_HISTORY`]).
    pub errors: Vec<String>,
    /// Ticks since start (the app sends one every 100 ms).
    pub tick: u64,
    /// The terminal size in cells.
    pub size: (u16, u16),
    /// State of the seed randomiser (a splitmix64 counter, so updates stay pure).
    pub rng: u64,
    /// The user asked to quit.
    pub quit: bool,
}

impl AppState {
    /// The state at start, with the configured generation defaults.
    pub fn new(defaults: &crate::config::Config, socket: String, embedded: bool) -> Self {
        Self {
            view: View::Styles,
            modal: None,
            connection: Connection::Connecting,
            embedded,
            socket,
            graphics: None,
            status: None,
            jobs: Vec::new(),
            history: BTreeMap::new(),
            selected_job: None,
            styles: Vec::new(),
            filter: String::new(),
            filtering: false,
            selected_style: None,
            style_assets: BTreeMap::new(),
            pictures: BTreeMap::new(),
            form: GenerateForm::new(defaults),
            drop: None,
            drop_cursor: 0,
            notice: None,
            errors: Vec::new(),
            tick: 0,
            size: (80, 24),
            rng: 0x005e_ed0f_7a1e,
            quit: false,
        }
    }

    /// The styles that match the filter, in name order.
    pub fn filtered_styles(&self) -> Vec<&StyleMeta> {
        let needle = self.filter.trim().to_lowercase();
        self.styles
            .iter()
            .filter(|s| {
                needle.is_empty()
                    || s.name.to_lowercase().contains(&needle)
                    || s.subject.to_lowercase().contains(&needle)
                    || s.style_desc.to_lowercase().contains(&needle)
            })
            .collect()
    }

    /// The selected style, if it is in the filtered list.
    pub fn current_style(&self) -> Option<&StyleMeta> {
        let name = self.selected_style.as_deref()?;
        self.filtered_styles().into_iter().find(|s| s.name == name)
    }

    /// Jobs in the order shown: running, then runnable by priority (the order the daemon picks
    /// them), then the rest, newest first.
    pub fn ordered_jobs(&self) -> Vec<&Job> {
        let rank = |j: &Job| match j.state {
            JobState::Running => 0,
            JobState::Queued | JobState::Interrupted => 1,
            _ => 2,
        };
        let mut v: Vec<&Job> = self.jobs.iter().collect();
        v.sort_by(|a, b| {
            rank(a).cmp(&rank(b)).then_with(|| match rank(a) {
                2 => b.updated_unix.cmp(&a.updated_unix).then(b.id.cmp(&a.id)),
                _ => b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)),
            })
        });
        v
    }

    /// The selected job.
    pub fn current_job(&self) -> Option<&Job> {
        let id = self.selected_job?;
        self.jobs.iter().find(|j| j.id == id)
    }

    /// Finished generation jobs with an output file, newest first: the outputs gallery.
    pub fn outputs(&self) -> Vec<(u64, &GenerateJob, &str)> {
        let mut v: Vec<(u64, &GenerateJob, &str)> = self
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Done)
            .filter_map(|j| match (&j.spec, &j.result) {
                (JobSpec::Generate(g), Some(r)) => Some((j.id, g, r.as_str())),
                _ => None,
            })
            .collect();
        v.sort_by_key(|o| std::cmp::Reverse(o.0));
        v
    }

    /// The folder of a style in the library, when the daemon has said where the library is.
    pub fn style_dir(&self, name: &str) -> Option<PathBuf> {
        self.status
            .as_ref()
            .map(|s| PathBuf::from(&s.library).join(name))
    }

    /// A decoded picture for `path`, if ready.
    pub fn picture(&self, path: &std::path::Path) -> Option<&PictureSlot> {
        self.pictures.get(path)
    }

    /// Post a status-bar message.
    pub fn notify(&mut self, level: Level, text: impl Into<String>) {
        let text = text.into();
        if level == Level::Error {
            if self.errors.len() >= ERROR_HISTORY {
                self.errors.remove(0);
            }
            self.errors.push(text.clone());
        }
        self.notice = Some(Notice {
            level,
            text,
            at_tick: self.tick,
        });
    }

    /// The notice, unless it has faded (errors stay until replaced).
    pub fn visible_notice(&self) -> Option<&Notice> {
        self.notice.as_ref().filter(|n| {
            n.level == Level::Error || self.tick.saturating_sub(n.at_tick) < NOTICE_TICKS
        })
    }

    /// Whether keys go to a text field (so letters are typed, not commands).
    pub fn typing(&self) -> bool {
        self.filtering
            || (self.form.editing.is_some() && self.view == View::Generate)
            || matches!(self.modal, Some(Modal::Input { .. }))
    }
}
