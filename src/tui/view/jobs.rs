//! The Jobs view: training and generation jobs in queue order; for the selected one a progress
//! bar, iteration, losses with a sparkline, it/s and ETA, and its latest image.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Gauge, List, ListItem, ListState, Paragraph, Sparkline, Wrap};
use ratatui::Frame;

use super::picture::PictureView;
use super::{dim, ellipsize, heading, selected_style, split};
use crate::daemon::journal::{Job, JobSpec, JobState};
use crate::daemon::status::format_duration;
use crate::tui::action::selected_job_picture;
use crate::tui::state::{format_number, AppState};

/// What a job does, in a few words: `train ink` or `generate "a cat" + ink, oil`.
pub fn job_title(j: &Job) -> String {
    match &j.spec {
        JobSpec::Train(t) => format!("train {}", t.name),
        JobSpec::Generate(g) => {
            let styles: Vec<&str> = g.styles.iter().map(|s| s.name.as_str()).collect();
            if styles.is_empty() {
                format!("generate {:?}", g.prompt)
            } else {
                format!("generate {:?} + {}", g.prompt, styles.join(", "))
            }
        }
    }
}

/// A job's state as shown (paused queued jobs say so).
pub fn state_text(j: &Job) -> String {
    if j.paused && !j.state.is_finished() {
        format!("{} (paused)", j.state)
    } else {
        j.state.to_string()
    }
}

fn state_colour(s: JobState) -> Color {
    match s {
        JobState::Running => Color::Green,
        JobState::Queued | JobState::Interrupted => Color::Yellow,
        JobState::Done => Color::Blue,
        JobState::Failed => Color::Red,
        JobState::Cancelled => Color::DarkGray,
    }
}

/// `step 40/750 · 1.50 it/s · ETA 7m 53s`, from the latest progress.
pub fn progress_text(j: &Job) -> Option<String> {
    let p = j.progress?;
    let mut s = format!("step {}/{}", p.step, p.total);
    if p.it_per_s > 0.0 {
        s.push_str(&format!(" · {:.2} it/s", p.it_per_s));
    }
    if let (Some(eta), false) = (p.eta_secs, j.state.is_finished()) {
        s.push_str(&format!(" · ETA {}", format_duration(eta)));
    }
    Some(s)
}

/// Draw the Jobs view into `area`.
pub fn draw(frame: &mut Frame, area: Rect, state: &AppState) {
    let (left, right, _) = split(area, 90, area.width / 2);
    draw_list(frame, left, state);
    draw_detail(frame, right, state);
}

fn draw_list(frame: &mut Frame, area: Rect, state: &AppState) {
    let jobs = state.ordered_jobs();
    let block = Block::bordered().title(format!(" Jobs ({}) ", jobs.len()));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if jobs.is_empty() {
        frame.render_widget(Paragraph::new("No jobs.").style(dim()), inner);
        return;
    }
    let w = inner.width as usize;
    let items: Vec<ListItem> = jobs
        .iter()
        .map(|j| {
            let pct = j
                .progress
                .filter(|p| p.total > 0 && !j.state.is_finished())
                .map(|p| format!(" {:>3}%", p.step * 100 / p.total))
                .unwrap_or_default();
            let head = format!("#{:<3} {:<9}", j.id, j.state.as_str());
            let paused = if j.paused && !j.state.is_finished() {
                " ‖"
            } else {
                ""
            };
            let room = w.saturating_sub(head.chars().count() + pct.len() + paused.len() + 1);
            ListItem::new(Line::from(vec![
                Span::styled(head, Style::default().fg(state_colour(j.state))),
                Span::raw(format!(" {}", ellipsize(&job_title(j), room))),
                Span::styled(paused.to_string(), Style::default().fg(Color::Yellow)),
                Span::styled(pct, dim()),
            ]))
        })
        .collect();
    let selected = state
        .selected_job
        .and_then(|id| jobs.iter().position(|j| j.id == id));
    let mut ls = ListState::default().with_selected(selected);
    frame.render_stateful_widget(
        List::new(items).highlight_style(selected_style()),
        inner,
        &mut ls,
    );
}

fn draw_detail(frame: &mut Frame, area: Rect, state: &AppState) {
    let Some(job) = state.current_job() else {
        frame.render_widget(Block::bordered().title(" Job "), area);
        return;
    };
    let block = Block::bordered().title(Span::styled(format!(" Job #{} ", job.id), heading()));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let mut lines = vec![
        Line::raw(job_title(job)),
        Line::from(vec![
            Span::styled(
                state_text(job),
                Style::default().fg(state_colour(job.state)),
            ),
            Span::styled(format!("   priority {}", job.priority), dim()),
        ]),
    ];
    if let Some(p) = job.progress {
        let mut l = Vec::new();
        if let Some(loss) = p.loss {
            l.push(format!("loss {loss:.4}"));
        }
        if let Some(ls) = p.loss_style {
            l.push(format!("style loss {ls:.4}"));
        }
        if !l.is_empty() {
            lines.push(Line::raw(l.join(" · ")));
        }
    }
    if let JobSpec::Generate(g) = &job.spec {
        let blend: Vec<String> = g
            .styles
            .iter()
            .map(|s| match s.lambda {
                Some(l) => format!("{} λ{}", s.name, format_number(l)),
                None => s.name.clone(),
            })
            .collect();
        if !blend.is_empty() {
            lines.push(Line::raw(format!("styles: {}", blend.join(", "))));
        }
    }
    if let Some(e) = &job.error {
        lines.push(Line::styled(
            format!("error: {e}"),
            Style::default().fg(Color::Red),
        ));
    } else if let (JobState::Done, Some(r)) = (job.state, &job.result) {
        lines.push(Line::styled(format!("→ {r}"), dim()));
    }
    let text_h = (lines.len() as u16).min(inner.height);
    let gauge_h = u16::from(job.progress.is_some() && inner.height > text_h);
    let [text, gauge, rest] = Layout::vertical([
        Constraint::Length(text_h),
        Constraint::Length(gauge_h),
        Constraint::Min(0),
    ])
    .areas(inner);
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), text);
    if let (Some(p), true) = (job.progress, gauge_h > 0) {
        let ratio = if p.total > 0 {
            (p.step as f64 / p.total as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let label = progress_text(job).unwrap_or_default();
        frame.render_widget(
            Gauge::default()
                .ratio(ratio)
                .label(ellipsize(&label, gauge.width as usize))
                .gauge_style(
                    Style::default()
                        .fg(state_colour(job.state))
                        .bg(Color::Black),
                ),
            gauge,
        );
    }
    let losses = state
        .history
        .get(&job.id)
        .map(|h| h.losses.as_slice())
        .unwrap_or(&[]);
    let picture = selected_job_picture(state);
    let (spark, pic) = match (losses.len() >= 2, picture.is_some()) {
        (true, true) => {
            let [a, b] = Layout::vertical([Constraint::Length(4), Constraint::Min(0)]).areas(rest);
            (Some(a), Some(b))
        }
        (true, false) => {
            let [a, _] = Layout::vertical([Constraint::Length(8), Constraint::Min(0)]).areas(rest);
            (Some(a), None)
        }
        (false, true) => (None, Some(rest)),
        (false, false) => (None, None),
    };
    if let Some(a) = spark.filter(|a| a.height >= 2) {
        let [cap, bars] = Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(a);
        let (lo, hi) = losses
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        frame.render_widget(
            Paragraph::new(format!(
                "loss {lo:.4} … {hi:.4}, latest {:.4}",
                losses.last().copied().unwrap_or(0.0)
            ))
            .style(dim()),
            cap,
        );
        // The newest values that fit, scaled between their own minimum and maximum.
        let shown = &losses[losses.len().saturating_sub(bars.width as usize)..];
        let (slo, shi) = shown
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let span = (shi - slo).max(1e-12);
        let data: Vec<u64> = shown
            .iter()
            .map(|x| 1 + ((x - slo) / span * 100.0) as u64)
            .collect();
        frame.render_widget(
            Sparkline::default()
                .data(&data)
                .max(101)
                .style(Style::default().fg(Color::Cyan)),
            bars,
        );
    }
    if let (Some(a), Some(path)) = (pic, picture) {
        if a.height >= 2 {
            frame.render_widget(
                PictureView {
                    slot: state.picture(&path),
                    graphics: state.graphics.as_ref(),
                },
                a,
            );
        }
    }
}
