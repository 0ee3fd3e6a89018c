//! What can happen to the UI ([`Action`]: a key, a tick, a resize, a daemon reply or event, a
//! picture decoded) and what the UI asks for in return ([`Command`]: a request to the daemon, a
//! file to read). [`update`] applies an action to the state and returns the commands; it is pure,
//! so every behaviour of the UI can be tested without a terminal or a daemon.

use std::path::PathBuf;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::state::{
    format_number, AppState, BlendEntry, Confirm, Connection, DropSnapshot, DropState, Field,
    InputPurpose, Level, Modal, Picture, PictureSlot, StyleAssets, View, LAMBDA_STEP, SIZE_STEP,
};
use crate::daemon::journal::{Job, JobSpec, JobState};
use crate::daemon::protocol::{Event, ReplyBody, Request, StatusReport};
use crate::library::StyleMeta;

/// The largest first step of style guidance the form accepts (the daemon's step limit).
const MAX_STYLE_FROM: usize = 999;

/// Ticks (100 ms each) between status refreshes.
pub const STATUS_EVERY_TICKS: u64 = 20;
/// Ticks between full job-list refreshes (events keep it current in between).
pub const JOBS_EVERY_TICKS: u64 = 100;

/// Something that happened.
// A reply carries a whole request and answer; a few actions pass per frame, so their size does
// not matter and boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A key was pressed.
    Key(KeyEvent),
    /// 100 ms passed.
    Tick,
    /// The terminal has a new size.
    Resize(u16, u16),
    /// The client connected (hellos exchanged, events subscribed).
    Connected {
        /// The daemon's name and version.
        server: String,
    },
    /// The connection broke or could not be made; the client keeps retrying.
    Disconnected {
        /// Why.
        reason: String,
        /// Failed attempts since the last success.
        attempts: u32,
    },
    /// The daemon answered a request.
    Reply {
        /// The request answered.
        request: Request,
        /// The answer, or the daemon's error message.
        result: Result<ReplyBody, String>,
    },
    /// The daemon sent an event.
    Event(Event),
    /// The daemon reported a problem that concerns no request (events dropped, a bad frame).
    DaemonError {
        /// In words.
        message: String,
    },
    /// The pictures of a style were found on disk.
    StyleAssets {
        /// The style.
        name: String,
        /// What was found.
        assets: StyleAssets,
    },
    /// A picture file was decoded (or not).
    PictureLoaded {
        /// The file.
        path: PathBuf,
        /// The picture, or why it could not be read.
        result: Result<Picture, String>,
    },
    /// The drop folder was scanned.
    DropFolder(DropSnapshot),
    /// A failed pair was put back into the watch folder (or not).
    DropRetried {
        /// The pair.
        name: String,
        /// Where it went, or why it could not be moved.
        result: Result<PathBuf, String>,
    },
}

/// Something the UI asks the client to do; the outcome comes back as an [`Action`].
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Send a request to the daemon.
    Send(Request),
    /// Look for a style's pictures (its pair, its sample grid) in its library folder.
    FindStyleAssets {
        /// The style.
        name: String,
        /// Its folder.
        dir: PathBuf,
    },
    /// Decode a picture file.
    LoadPicture(PathBuf),
    /// Scan the drop folder.
    ScanDropFolder {
        /// The watch folder.
        watch: PathBuf,
    },
    /// Put a failed pair back into the watch folder so the daemon takes it again.
    RetryDropped {
        /// The pair's name.
        name: String,
        /// Its folder under `failed/`.
        path: PathBuf,
        /// The watch folder.
        watch: PathBuf,
    },
}

/// Keys that work in every view: `(key, what it does)`.
pub const GLOBAL_KEYS: &[(&str, &str)] = &[
    ("1-4", "views"),
    ("Tab", "next view"),
    ("?", "all keys"),
    ("F5", "refresh"),
    ("q", "quit"),
];

/// The keys of a view, for its help bar and the `?` overlay: `(key, what it does)`.
pub fn view_keys(view: View) -> &'static [(&'static str, &'static str)] {
    match view {
        View::Styles => &[
            ("↑↓", "select"),
            ("/", "filter"),
            ("r", "rename"),
            ("d", "delete"),
            ("e", "export"),
            ("b", "add to blend"),
        ],
        View::Jobs => &[
            ("↑↓", "select"),
            ("c", "cancel"),
            ("p", "pause"),
            ("u", "resume"),
            ("R", "retry"),
            ("K/J", "move up/down"),
        ],
        View::Generate => &[
            ("↑↓", "field"),
            ("Enter", "edit"),
            ("←→", "adjust"),
            ("Space", "pick style"),
            ("r", "random seed"),
            ("s", "submit"),
            ("[ ]", "gallery"),
        ],
        View::DropFolder => &[("↑↓", "select"), ("r", "retry failed pair")],
    }
}

/// Apply an action; returns what to ask of the daemon or the disk.
pub fn update(state: &mut AppState, action: Action) -> Vec<Command> {
    match action {
        Action::Key(key) => on_key(state, key),
        Action::Tick => on_tick(state),
        Action::Resize(w, h) => {
            state.size = (w, h);
            Vec::new()
        }
        Action::Connected { server } => {
            state.connection = Connection::Connected { server };
            refresh_all(state)
        }
        Action::Disconnected { reason, attempts } => {
            state.connection = Connection::Lost { reason, attempts };
            Vec::new()
        }
        Action::Reply { request, result } => on_reply(state, request, result),
        Action::Event(event) => on_event(state, event),
        Action::DaemonError { message } => {
            state.notify(Level::Error, format!("daemon: {message}"));
            refresh_all(state)
        }
        Action::StyleAssets { name, assets } => {
            let paths: Vec<PathBuf> = assets.pictures.iter().map(|(_, p)| p.clone()).collect();
            state.style_assets.insert(name, assets);
            paths
                .into_iter()
                .filter_map(|p| request_picture(state, p))
                .collect()
        }
        Action::PictureLoaded { path, result } => {
            let slot = match result {
                Ok(p) => PictureSlot::Ready(p),
                Err(e) => PictureSlot::Failed(e),
            };
            state.pictures.insert(path, slot);
            Vec::new()
        }
        Action::DropFolder(snapshot) => {
            let n = snapshot.entries.len();
            state.drop = Some(snapshot);
            state.drop_cursor = state.drop_cursor.min(n.saturating_sub(1));
            Vec::new()
        }
        Action::DropRetried { name, result } => {
            match result {
                Ok(to) => state.notify(
                    Level::Info,
                    format!("{name} is back in the watch folder as {}", to.display()),
                ),
                Err(e) => state.notify(Level::Error, format!("retrying {name} failed: {e}")),
            }
            scan_drop(state).into_iter().collect()
        }
    }
}

/// Everything the UI shows from the daemon, asked again.
fn refresh_all(state: &AppState) -> Vec<Command> {
    let mut v = vec![
        Command::Send(Request::Status),
        Command::Send(Request::ListJobs),
        Command::Send(Request::ListStyles),
    ];
    v.extend(scan_drop(state));
    v
}

fn scan_drop(state: &AppState) -> Option<Command> {
    let watch = &state.status.as_ref()?.watch;
    Some(Command::ScanDropFolder {
        watch: PathBuf::from(watch),
    })
}

fn connected(state: &AppState) -> bool {
    matches!(state.connection, Connection::Connected { .. })
}

fn on_tick(state: &mut AppState) -> Vec<Command> {
    state.tick += 1;
    let mut out = Vec::new();
    if !connected(state) {
        return out;
    }
    if state.tick.is_multiple_of(STATUS_EVERY_TICKS) {
        out.push(Command::Send(Request::Status));
        out.extend(scan_drop(state));
    }
    if state.tick.is_multiple_of(JOBS_EVERY_TICKS) {
        out.push(Command::Send(Request::ListJobs));
    }
    out
}

/// Ask for a picture unless it is known already.
fn request_picture(state: &mut AppState, path: PathBuf) -> Option<Command> {
    if state.pictures.contains_key(&path) {
        return None;
    }
    state.pictures.insert(path.clone(), PictureSlot::Loading);
    Some(Command::LoadPicture(path))
}

/// The pictures the current screen needs that are not loaded yet.
fn wanted_pictures(state: &mut AppState) -> Vec<Command> {
    let mut out = Vec::new();
    // The selected style's pair and grid.
    if let Some(name) = state.current_style().map(|s| s.name.clone()) {
        match state.style_assets.get(&name) {
            Some(assets) => {
                let paths: Vec<PathBuf> = assets.pictures.iter().map(|(_, p)| p.clone()).collect();
                out.extend(paths.into_iter().filter_map(|p| request_picture(state, p)));
            }
            None => {
                if let Some(dir) = state.style_dir(&name) {
                    state
                        .style_assets
                        .insert(name.clone(), StyleAssets::default());
                    out.push(Command::FindStyleAssets { name, dir });
                }
            }
        }
    }
    // The selected job's latest image.
    if let Some(p) = selected_job_picture(state) {
        out.extend(request_picture(state, p));
    }
    // The generate view's result and gallery pick.
    for p in [submitted_result(state), gallery_pick(state)]
        .into_iter()
        .flatten()
    {
        out.extend(request_picture(state, p));
    }
    out
}

/// The image shown for the selected job: its result PNG (generation) or latest sample.
pub fn selected_job_picture(state: &AppState) -> Option<PathBuf> {
    let job = state.current_job()?;
    if let (JobSpec::Generate(_), Some(r), JobState::Done) = (&job.spec, &job.result, job.state) {
        return Some(PathBuf::from(r));
    }
    state.history.get(&job.id)?.sample.clone()
}

/// The finished picture of the job submitted last from the generate view.
pub fn submitted_result(state: &AppState) -> Option<PathBuf> {
    let id = state.form.submitted?;
    let job = state.jobs.iter().find(|j| j.id == id)?;
    match (&job.spec, job.state, &job.result) {
        (JobSpec::Generate(_), JobState::Done, Some(r)) => Some(PathBuf::from(r)),
        _ => None,
    }
}

/// The output highlighted in the gallery.
pub fn gallery_pick(state: &AppState) -> Option<PathBuf> {
    state
        .outputs()
        .get(state.form.gallery_cursor)
        .map(|(_, _, p)| PathBuf::from(p))
}

fn on_reply(
    state: &mut AppState,
    request: Request,
    result: Result<ReplyBody, String>,
) -> Vec<Command> {
    let body = match result {
        Ok(b) => b,
        Err(message) => {
            state.notify(
                Level::Error,
                format!("{} failed: {message}", describe(&request)),
            );
            return Vec::new();
        }
    };
    match body {
        ReplyBody::Status(report) => set_status(state, report),
        ReplyBody::Jobs { jobs } => set_jobs(state, jobs),
        ReplyBody::Job { job } => {
            match state.jobs.iter_mut().find(|j| j.id == job.id) {
                Some(j) => *j = job,
                None => state.jobs.push(job),
            }
            wanted_pictures(state)
        }
        ReplyBody::Styles { styles } => set_styles(state, styles),
        ReplyBody::Exported { path } => {
            state.notify(
                Level::Info,
                format!("{}: written to {path}", describe(&request)),
            );
            Vec::new()
        }
        ReplyBody::Queued { job } => {
            state.form.submitted = Some(job);
            state.notify(Level::Info, format!("job #{job} queued"));
            vec![Command::Send(Request::ListJobs)]
        }
        ReplyBody::Ok => {
            state.notify(Level::Info, format!("{}: done", describe(&request)));
            match request {
                Request::RenameStyle { from, to } => {
                    if state.selected_style.as_deref() == Some(from.as_str()) {
                        state.selected_style = Some(to);
                    }
                    state.style_assets.remove(&from);
                    vec![Command::Send(Request::ListStyles)]
                }
                Request::RemoveStyle { name } => {
                    state.style_assets.remove(&name);
                    vec![Command::Send(Request::ListStyles)]
                }
                _ => vec![Command::Send(Request::ListJobs)],
            }
        }
        // The subscription and anything newer need nothing from the UI.
        #[allow(unreachable_patterns)]
        _ => Vec::new(),
    }
}

/// A request in words, for messages.
pub fn describe(request: &Request) -> String {
    match request {
        Request::Status => "status".into(),
        Request::ListJobs => "listing jobs".into(),
        Request::Job { job } => format!("reading job #{job}"),
        Request::SubmitGenerate { .. } => "submitting the generation".into(),
        Request::Cancel { job } => format!("cancelling job #{job}"),
        Request::Pause { job } => format!("pausing job #{job}"),
        Request::Resume { job } => format!("resuming job #{job}"),
        Request::Retry { job } => format!("retrying job #{job}"),
        Request::SetPriority { job, priority } => {
            format!("setting job #{job}'s priority to {priority}")
        }
        Request::ListStyles => "listing styles".into(),
        Request::RenameStyle { from, to } => format!("renaming {from} to {to}"),
        Request::RemoveStyle { name } => format!("deleting {name}"),
        Request::ExportStyle { name, format, .. } => format!("exporting {name} ({format})"),
        Request::Subscribe => "subscribing to events".into(),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

fn set_status(state: &mut AppState, report: StatusReport) -> Vec<Command> {
    let first = state.status.is_none();
    state.status = Some(report);
    let mut out = wanted_pictures(state);
    if first {
        out.extend(scan_drop(state));
    }
    out
}

fn set_jobs(state: &mut AppState, jobs: Vec<Job>) -> Vec<Command> {
    state.jobs = jobs;
    let ids: Vec<u64> = state.jobs.iter().map(|j| j.id).collect();
    state.history.retain(|id, _| ids.contains(id));
    let keep = state.selected_job.filter(|id| ids.contains(id));
    state.selected_job = keep.or_else(|| state.ordered_jobs().first().map(|j| j.id));
    let n = state.outputs().len();
    state.form.gallery_cursor = state.form.gallery_cursor.min(n.saturating_sub(1));
    wanted_pictures(state)
}

fn set_styles(state: &mut AppState, mut styles: Vec<StyleMeta>) -> Vec<Command> {
    styles.sort_by(|a, b| a.name.cmp(&b.name));
    state.styles = styles;
    let names: Vec<String> = state.styles.iter().map(|s| s.name.clone()).collect();
    // A blend keeps only styles that still exist.
    state.form.blend.retain(|b| names.contains(&b.name));
    state.form.style_cursor = state.form.style_cursor.min(names.len().saturating_sub(1));
    state.style_assets.retain(|n, _| names.contains(n));
    fix_style_selection(state);
    wanted_pictures(state)
}

/// Keep the style selection on a visible style (the first one if the old one is gone).
fn fix_style_selection(state: &mut AppState) {
    let visible: Vec<String> = state
        .filtered_styles()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let keep = state
        .selected_style
        .as_ref()
        .is_some_and(|n| visible.contains(n));
    if !keep {
        state.selected_style = visible.first().cloned();
    }
}

fn on_event(state: &mut AppState, event: Event) -> Vec<Command> {
    match event {
        Event::JobQueued { job, what, name } => {
            let name = name.map(|n| format!(" {n}")).unwrap_or_default();
            state.notify(Level::Info, format!("job #{job} queued ({what}{name})"));
            vec![Command::Send(Request::ListJobs)]
        }
        Event::Progress {
            job,
            step,
            total,
            loss,
            loss_style,
            it_per_s,
            eta_secs,
        } => {
            state.history.entry(job).or_default().push(loss, loss_style);
            match state.jobs.iter_mut().find(|j| j.id == job) {
                Some(j) => {
                    j.state = JobState::Running;
                    j.progress = Some(crate::daemon::journal::JobProgress {
                        step,
                        total,
                        loss,
                        loss_style,
                        it_per_s,
                        eta_secs,
                    });
                    Vec::new()
                }
                None => vec![Command::Send(Request::ListJobs)],
            }
        }
        Event::SampleReady { job, path } => {
            state.history.entry(job).or_default().sample = Some(PathBuf::from(&path));
            let shown = state.selected_job == Some(job) || state.form.submitted == Some(job);
            if shown {
                // A sample is rewritten under the same name: decode it again.
                state.pictures.remove(&PathBuf::from(&path));
                wanted_pictures(state)
            } else {
                Vec::new()
            }
        }
        Event::StyleRegistered { name, .. } => {
            state.notify(Level::Info, format!("style {name} is in the library"));
            vec![
                Command::Send(Request::ListStyles),
                Command::Send(Request::ListJobs),
            ]
        }
        Event::JobDone { job, result } => {
            if let Some(j) = state.jobs.iter_mut().find(|j| j.id == job) {
                j.state = JobState::Done;
                j.result = result.clone();
                if let Some(p) = j.progress.as_mut() {
                    p.step = p.total;
                }
            }
            let what = match result {
                Some(r) => format!("job #{job} done: {r}"),
                None => format!("job #{job} done"),
            };
            state.notify(Level::Info, what);
            let mut out = wanted_pictures(state);
            out.push(Command::Send(Request::ListJobs));
            out
        }
        Event::JobFailed { job, error } => {
            if let Some(j) = state.jobs.iter_mut().find(|j| j.id == job) {
                j.state = JobState::Failed;
                j.error = Some(error.clone());
            }
            state.notify(Level::Error, format!("job #{job} failed: {error}"));
            vec![Command::Send(Request::ListJobs)]
        }
        Event::JobCancelled { job } => {
            if let Some(j) = state.jobs.iter_mut().find(|j| j.id == job) {
                j.state = JobState::Cancelled;
            }
            state.notify(Level::Info, format!("job #{job} cancelled"));
            vec![Command::Send(Request::ListJobs)]
        }
        Event::PairRejected { name, reason, .. } => {
            state.notify(Level::Error, format!("pair {name} rejected: {reason}"));
            scan_drop(state).into_iter().collect()
        }
        #[allow(unreachable_patterns)]
        _ => vec![Command::Send(Request::ListJobs)],
    }
}

fn is_press(key: &KeyEvent) -> bool {
    key.kind != KeyEventKind::Release
}

fn on_key(state: &mut AppState, key: KeyEvent) -> Vec<Command> {
    if !is_press(&key) {
        return Vec::new();
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        state.quit = true;
        return Vec::new();
    }
    if state.modal.is_some() {
        return on_modal_key(state, key);
    }
    if state.filtering {
        return on_filter_key(state, key);
    }
    if state.view == View::Generate && state.form.editing.is_some() {
        return on_edit_key(state, key);
    }
    match key.code {
        KeyCode::Char('q') => {
            state.quit = true;
            return Vec::new();
        }
        KeyCode::Char('?') => {
            state.modal = Some(Modal::Help);
            return Vec::new();
        }
        KeyCode::Tab => return switch_view(state, state.view.next()),
        KeyCode::BackTab => return switch_view(state, state.view.prev()),
        KeyCode::Char(c @ '1'..='4') if !(state.view == View::Generate && numeric_field(state)) => {
            let i = (c as usize) - ('1' as usize);
            return switch_view(state, View::ALL[i]);
        }
        KeyCode::F(5) => {
            state.notify(Level::Info, "refreshing");
            return refresh_all(state);
        }
        KeyCode::Char('r') if key.modifiers.contains(KeyModifiers::CONTROL) => {
            state.notify(Level::Info, "refreshing");
            return refresh_all(state);
        }
        _ => {}
    }
    match state.view {
        View::Styles => on_styles_key(state, key),
        View::Jobs => on_jobs_key(state, key),
        View::Generate => on_generate_key(state, key),
        View::DropFolder => on_drop_key(state, key),
    }
}

fn numeric_field(state: &AppState) -> bool {
    state.form.field.is_numeric()
}

fn switch_view(state: &mut AppState, view: View) -> Vec<Command> {
    state.view = view;
    let mut out = wanted_pictures(state);
    if view == View::DropFolder {
        out.extend(scan_drop(state));
    }
    out
}

fn on_modal_key(state: &mut AppState, key: KeyEvent) -> Vec<Command> {
    let Some(modal) = state.modal.take() else {
        return Vec::new();
    };
    match modal {
        Modal::Help => {
            if !matches!(
                key.code,
                KeyCode::Esc | KeyCode::Char('?') | KeyCode::Char('q') | KeyCode::Enter
            ) {
                state.modal = Some(Modal::Help);
            }
            Vec::new()
        }
        Modal::Confirm(what) => match key.code {
            KeyCode::Char('y') | KeyCode::Char('Y') | KeyCode::Enter => confirm(state, what),
            KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => Vec::new(),
            _ => {
                state.modal = Some(Modal::Confirm(what));
                Vec::new()
            }
        },
        Modal::Input { purpose, mut text } => match key.code {
            KeyCode::Esc => Vec::new(),
            KeyCode::Enter => submit_input(state, purpose, text),
            KeyCode::Backspace => {
                text.pop();
                state.modal = Some(Modal::Input { purpose, text });
                Vec::new()
            }
            KeyCode::Tab => {
                let purpose = match purpose {
                    InputPurpose::ExportStyle { name, format } => InputPurpose::ExportStyle {
                        name,
                        format: if format == "kohya" { "peft" } else { "kohya" }.into(),
                    },
                    other => other,
                };
                state.modal = Some(Modal::Input { purpose, text });
                Vec::new()
            }
            KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                text.push(c);
                state.modal = Some(Modal::Input { purpose, text });
                Vec::new()
            }
            _ => {
                state.modal = Some(Modal::Input { purpose, text });
                Vec::new()
            }
        },
    }
}

fn confirm(state: &mut AppState, what: Confirm) -> Vec<Command> {
    match what {
        Confirm::DeleteStyle(name) => {
            state.form.blend.retain(|b| b.name != name);
            vec![Command::Send(Request::RemoveStyle { name })]
        }
        Confirm::CancelJob(job) => vec![Command::Send(Request::Cancel { job })],
    }
}

fn submit_input(state: &mut AppState, purpose: InputPurpose, text: String) -> Vec<Command> {
    let text = text.trim().to_string();
    match purpose {
        InputPurpose::RenameStyle { from } => {
            if let Err(e) = crate::library::validate_name(&text) {
                state.notify(Level::Error, e.to_string());
                state.modal = Some(Modal::Input {
                    purpose: InputPurpose::RenameStyle { from },
                    text,
                });
                return Vec::new();
            }
            if text == from {
                return Vec::new();
            }
            for b in state.form.blend.iter_mut().filter(|b| b.name == from) {
                b.name = text.clone();
            }
            vec![Command::Send(Request::RenameStyle { from, to: text })]
        }
        InputPurpose::ExportStyle { name, format } => {
            // The daemon writes the file, so a path must mean the same to it: absolute, or
            // nothing for its own exports folder.
            if !text.is_empty() && !text.starts_with('/') {
                state.notify(
                    Level::Error,
                    "give an absolute path, or nothing for the daemon's exports folder",
                );
                state.modal = Some(Modal::Input {
                    purpose: InputPurpose::ExportStyle { name, format },
                    text,
                });
                return Vec::new();
            }
            vec![Command::Send(Request::ExportStyle {
                name,
                format,
                output: (!text.is_empty()).then_some(text),
            })]
        }
    }
}

fn on_filter_key(state: &mut AppState, key: KeyEvent) -> Vec<Command> {
    match key.code {
        KeyCode::Esc => {
            state.filter.clear();
            state.filtering = false;
        }
        KeyCode::Enter | KeyCode::Down | KeyCode::Up => state.filtering = false,
        KeyCode::Backspace => {
            state.filter.pop();
        }
        KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => state.filter.push(c),
        _ => {}
    }
    fix_style_selection(state);
    wanted_pictures(state)
}

/// Move a selection by `delta` within `len` items (clamped).
fn step_index(current: usize, len: usize, delta: isize) -> usize {
    if len == 0 {
        return 0;
    }
    let next = current as isize + delta;
    next.clamp(0, len as isize - 1) as usize
}

/// `Some(delta)` for the list-navigation keys.
fn nav_delta(key: &KeyEvent) -> Option<isize> {
    match key.code {
        KeyCode::Up | KeyCode::Char('k') => Some(-1),
        KeyCode::Down | KeyCode::Char('j') => Some(1),
        KeyCode::PageUp => Some(-10),
        KeyCode::PageDown => Some(10),
        KeyCode::Home | KeyCode::Char('g') => Some(isize::MIN / 2),
        KeyCode::End | KeyCode::Char('G') => Some(isize::MAX / 2),
        _ => None,
    }
}

fn on_styles_key(state: &mut AppState, key: KeyEvent) -> Vec<Command> {
    if let Some(d) = nav_delta(&key) {
        let names: Vec<String> = state
            .filtered_styles()
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let cur = state
            .selected_style
            .as_ref()
            .and_then(|n| names.iter().position(|m| m == n))
            .unwrap_or(0);
        state.selected_style = names.get(step_index(cur, names.len(), d)).cloned();
        return wanted_pictures(state);
    }
    let selected = state.current_style().map(|s| s.name.clone());
    match (key.code, selected) {
        (KeyCode::Char('/'), _) => state.filtering = true,
        (KeyCode::Char('r'), Some(name)) => {
            state.modal = Some(Modal::Input {
                purpose: InputPurpose::RenameStyle { from: name.clone() },
                text: name,
            })
        }
        (KeyCode::Char('d') | KeyCode::Delete, Some(name)) => {
            state.modal = Some(Modal::Confirm(Confirm::DeleteStyle(name)))
        }
        (KeyCode::Char('e'), Some(name)) => {
            state.modal = Some(Modal::Input {
                text: String::new(),
                purpose: InputPurpose::ExportStyle {
                    name,
                    format: "kohya".into(),
                },
            })
        }
        (KeyCode::Char('b'), Some(name)) => toggle_blend(state, &name),
        (KeyCode::Char('r' | 'd' | 'e' | 'b'), None) => {
            state.notify(Level::Error, "no style selected")
        }
        _ => {}
    }
    Vec::new()
}

/// Add a style to the generate blend with the default λ, or take it out.
fn toggle_blend(state: &mut AppState, name: &str) {
    let form = &mut state.form;
    if let Some(i) = form.blend.iter().position(|b| b.name == name) {
        form.blend.remove(i);
        state.notify(Level::Info, format!("{name} left the blend"));
    } else {
        let lambda = state
            .styles
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.default_lambda)
            .filter(|l| l.is_finite() && *l > 0.0)
            .unwrap_or(form.default_lambda);
        form.blend.push(BlendEntry {
            name: name.to_string(),
            lambda,
        });
        state.notify(
            Level::Info,
            format!("{name} joined the blend (λ {})", format_number(lambda)),
        );
    }
}

fn on_jobs_key(state: &mut AppState, key: KeyEvent) -> Vec<Command> {
    let order: Vec<u64> = state.ordered_jobs().iter().map(|j| j.id).collect();
    if let Some(d) = nav_delta(&key) {
        let cur = state
            .selected_job
            .and_then(|id| order.iter().position(|&o| o == id))
            .unwrap_or(0);
        state.selected_job = order.get(step_index(cur, order.len(), d)).copied();
        return wanted_pictures(state);
    }
    let Some(job) = state.current_job().cloned() else {
        if matches!(key.code, KeyCode::Char('c' | 'p' | 'u' | 'R' | 'K' | 'J')) {
            state.notify(Level::Error, "no job selected");
        }
        return Vec::new();
    };
    let id = job.id;
    match key.code {
        KeyCode::Char('c') | KeyCode::Char('x') | KeyCode::Delete => {
            if job.state.is_finished() {
                state.notify(Level::Error, format!("job #{id} is already {}", job.state));
            } else {
                state.modal = Some(Modal::Confirm(Confirm::CancelJob(id)));
            }
            Vec::new()
        }
        KeyCode::Char('p') => vec![Command::Send(Request::Pause { job: id })],
        KeyCode::Char('u') => vec![Command::Send(Request::Resume { job: id })],
        KeyCode::Char('R') => vec![Command::Send(Request::Retry { job: id })],
        KeyCode::Char('K') | KeyCode::Char('J') => {
            let up = key.code == KeyCode::Char('K');
            reorder(state, &order, &job, up)
        }
        _ => Vec::new(),
    }
}

/// Move a waiting job one place up or down the queue by giving it a priority just above the
/// job before it (or just below the one after it).
fn reorder(state: &mut AppState, order: &[u64], job: &Job, up: bool) -> Vec<Command> {
    if !job.state.is_runnable() {
        state.notify(
            Level::Error,
            format!(
                "job #{} is {}: only waiting jobs can be moved",
                job.id, job.state
            ),
        );
        return Vec::new();
    }
    let runnable: Vec<&Job> = order
        .iter()
        .filter_map(|id| state.jobs.iter().find(|j| j.id == *id))
        .filter(|j| j.state.is_runnable())
        .collect();
    let Some(pos) = runnable.iter().position(|j| j.id == job.id) else {
        return Vec::new();
    };
    let neighbour = if up {
        pos.checked_sub(1).and_then(|p| runnable.get(p))
    } else {
        runnable.get(pos + 1)
    };
    let Some(other) = neighbour else {
        let edge = if up { "first" } else { "last" };
        state.notify(Level::Info, format!("job #{} is already {edge}", job.id));
        return Vec::new();
    };
    let priority = if up {
        other.priority.saturating_add(1)
    } else {
        other.priority.saturating_sub(1)
    };
    vec![Command::Send(Request::SetPriority {
        job: job.id,
        priority,
    })]
}

fn on_generate_key(state: &mut AppState, key: KeyEvent) -> Vec<Command> {
    let field = state.form.field;
    let n_styles = state.styles.len();
    match key.code {
        KeyCode::Up | KeyCode::Char('k') => {
            if field == Field::Styles && state.form.style_cursor > 0 {
                state.form.style_cursor -= 1;
            } else {
                state.form.field = field.prev();
            }
        }
        KeyCode::Down | KeyCode::Char('j') => {
            if field == Field::Styles {
                state.form.style_cursor = step_index(state.form.style_cursor, n_styles, 1);
            } else {
                state.form.field = field.next();
            }
        }
        KeyCode::Enter | KeyCode::Char(' ') if field == Field::Styles => {
            match state
                .styles
                .get(state.form.style_cursor)
                .map(|s| s.name.clone())
            {
                Some(name) => toggle_blend(state, &name),
                None => state.notify(Level::Error, "the library has no styles yet"),
            }
        }
        KeyCode::Enter | KeyCode::Char(' ') if field == Field::Sampler => {
            state.form.step_sampler(1)
        }
        KeyCode::Enter => state.form.editing = Some(state.form.field_text(field)),
        KeyCode::Char(c) if c.is_ascii_digit() && numeric_field(state) => {
            state.form.editing = Some(c.to_string());
        }
        KeyCode::Backspace | KeyCode::Delete => match field {
            Field::Seed => state.form.seed = None,
            Field::Cfg => state.form.cfg = None,
            Field::Width => state.form.width = None,
            Field::Height => state.form.height = None,
            Field::Sampler => state.form.sampler = None,
            _ => {}
        },
        KeyCode::Left | KeyCode::Char('-') | KeyCode::Char('h') => adjust(state, -1),
        KeyCode::Right | KeyCode::Char('+') | KeyCode::Char('=') | KeyCode::Char('l') => {
            adjust(state, 1)
        }
        KeyCode::Char('r') => {
            let seed = splitmix64(&mut state.rng) >> 32;
            state.form.seed = Some(seed);
            state.notify(Level::Info, format!("seed {seed}"));
        }
        KeyCode::Char('s') => return submit(state),
        KeyCode::Char('[') => {
            state.form.gallery_cursor = state.form.gallery_cursor.saturating_sub(1);
            return wanted_pictures(state);
        }
        KeyCode::Char(']') => {
            let n = state.outputs().len();
            state.form.gallery_cursor = step_index(state.form.gallery_cursor, n, 1);
            return wanted_pictures(state);
        }
        _ => {}
    }
    Vec::new()
}

/// The next value of a splitmix64 generator (small, good enough for seeds, and pure).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Step the current numeric field, or the highlighted style's λ, by one notch.
fn adjust(state: &mut AppState, dir: i64) {
    let form = &mut state.form;
    let size = |v: Option<usize>| {
        let base = v.unwrap_or(512) as i64;
        Some((base + dir * SIZE_STEP as i64).clamp(SIZE_STEP as i64, 4096) as usize)
    };
    match form.field {
        Field::Seed => {
            form.seed = Some(match form.seed {
                Some(s) if dir < 0 => s.saturating_sub(1),
                Some(s) => s.saturating_add(1),
                None => 0,
            })
        }
        Field::Steps => form.steps = (form.steps as i64 + dir).clamp(1, 1000) as usize,
        Field::Cfg => {
            let from = form.cfg.unwrap_or(crate::config::FALLBACK_CFG);
            form.cfg = Some((from + 0.5 * dir as f64).clamp(0.0, 30.0))
        }
        Field::Width => form.width = size(form.width),
        Field::Height => form.height = size(form.height),
        Field::Sampler => form.step_sampler(dir),
        Field::StyleFrom => {
            form.style_from =
                (form.style_from as i64 + dir).clamp(0, MAX_STYLE_FROM as i64) as usize
        }
        Field::Styles => {
            let Some(name) = state.styles.get(form.style_cursor).map(|s| s.name.clone()) else {
                return;
            };
            match form.blend.iter_mut().find(|b| b.name == name) {
                Some(b) => b.lambda = (b.lambda + LAMBDA_STEP * dir as f64).clamp(0.0, 20.0),
                None => state.notify(Level::Error, format!("pick {name} first (Space)")),
            }
        }
        Field::Prompt | Field::Negative => {}
    }
}

fn submit(state: &mut AppState) -> Vec<Command> {
    if state.form.prompt.trim().is_empty() {
        state.form.field = Field::Prompt;
        state.notify(Level::Error, "write a prompt first (Enter on Prompt)");
        return Vec::new();
    }
    if !connected(state) {
        state.notify(
            Level::Error,
            "not connected to the daemon; try again when it is back",
        );
        return Vec::new();
    }
    let job = state.form.to_job();
    let styles = job.styles.len();
    state.notify(
        Level::Info,
        format!(
            "submitting {:?} with {styles} style{}",
            job.prompt,
            if styles == 1 { "" } else { "s" }
        ),
    );
    vec![Command::Send(Request::SubmitGenerate { job, priority: 0 })]
}

fn on_edit_key(state: &mut AppState, key: KeyEvent) -> Vec<Command> {
    let Some(mut text) = state.form.editing.take() else {
        return Vec::new();
    };
    match key.code {
        KeyCode::Esc => {}
        KeyCode::Enter | KeyCode::Tab | KeyCode::Down | KeyCode::Up => {
            if let Err(e) = commit_field(state, &text) {
                state.notify(Level::Error, e);
                state.form.editing = Some(text);
                return Vec::new();
            }
            match key.code {
                KeyCode::Tab | KeyCode::Down => state.form.field = state.form.field.next(),
                KeyCode::Up => state.form.field = state.form.field.prev(),
                _ => {}
            }
        }
        KeyCode::Backspace => {
            text.pop();
            state.form.editing = Some(text);
        }
        KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
            text.push(c);
            state.form.editing = Some(text);
        }
        _ => state.form.editing = Some(text),
    }
    Vec::new()
}

/// Store typed text into the current field, or say why it is not a valid value.
fn commit_field(state: &mut AppState, text: &str) -> Result<(), String> {
    let form = &mut state.form;
    let t = text.trim();
    let field = form.field;
    let int = |what: &str, lo: usize, hi: usize| -> Result<usize, String> {
        match t.parse::<usize>() {
            Ok(v) if (lo..=hi).contains(&v) => Ok(v),
            _ => Err(format!("{what} must be a whole number from {lo} to {hi}")),
        }
    };
    let size = |what: &str| -> Result<Option<usize>, String> {
        if t.is_empty() {
            return Ok(None);
        }
        match t.parse::<usize>() {
            Ok(v) if (8..=4096).contains(&v) && v % 8 == 0 => Ok(Some(v)),
            _ => Err(format!(
                "{what} must be a multiple of 8 from 8 to 4096 (empty: the model's size)"
            )),
        }
    };
    match field {
        Field::Prompt => form.prompt = text.to_string(),
        Field::Negative => form.negative = text.to_string(),
        Field::Seed => {
            form.seed = if t.is_empty() {
                None
            } else {
                Some(
                    t.parse::<u64>()
                        .map_err(|_| "the seed must be a whole number (empty: random)")?,
                )
            }
        }
        Field::Steps => form.steps = int("steps", 1, 1000)?,
        Field::Cfg if t.is_empty() => form.cfg = None,
        Field::Cfg => match t.parse::<f64>() {
            Ok(v) if v.is_finite() && (0.0..=30.0).contains(&v) => form.cfg = Some(v),
            _ => return Err("CFG must be a number from 0 to 30 (empty: auto)".into()),
        },
        Field::Width => form.width = size("width")?,
        Field::Height => form.height = size("height")?,
        Field::StyleFrom => form.style_from = int("style-from step", 0, MAX_STYLE_FROM)?,
        Field::Sampler | Field::Styles => {}
    }
    Ok(())
}

fn on_drop_key(state: &mut AppState, key: KeyEvent) -> Vec<Command> {
    let n = state.drop.as_ref().map_or(0, |d| d.entries.len());
    if let Some(d) = nav_delta(&key) {
        state.drop_cursor = step_index(state.drop_cursor, n, d);
        return Vec::new();
    }
    if key.code != KeyCode::Char('r') {
        return Vec::new();
    }
    let entry = state
        .drop
        .as_ref()
        .and_then(|d| d.entries.get(state.drop_cursor).map(|e| (e, &d.watch)));
    match entry {
        Some((e, watch)) if matches!(e.state, DropState::Failed { .. }) => {
            vec![Command::RetryDropped {
                name: e.name.clone(),
                path: e.path.clone(),
                watch: watch.clone(),
            }]
        }
        Some((e, _)) => {
            let name = e.name.clone();
            state.notify(
                Level::Error,
                format!("{name} has not failed: the daemon takes it when it is ready"),
            );
            Vec::new()
        }
        None => {
            state.notify(Level::Error, "nothing selected");
            Vec::new()
        }
    }
}
