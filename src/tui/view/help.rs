//! The help bar (the current view's keys on one line) and the `?` overlay (every key).

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Wrap};
use ratatui::Frame;

use super::{dim, heading};
use crate::tui::action::{view_keys, GLOBAL_KEYS};
use crate::tui::state::{AppState, Modal, View};

/// The keys that apply right now: a dialog's, a text field's, or the view's and the global ones.
pub fn current_keys(state: &AppState) -> Vec<(&'static str, &'static str)> {
    match &state.modal {
        Some(Modal::Help) => return vec![("Esc", "close")],
        Some(Modal::Confirm(_)) => return vec![("y", "yes"), ("n/Esc", "no")],
        Some(Modal::Input { purpose, .. }) => {
            let mut v = vec![("Enter", "ok"), ("Esc", "cancel")];
            if matches!(purpose, crate::tui::state::InputPurpose::ExportStyle { .. }) {
                v.push(("Tab", "format"));
            }
            return v;
        }
        None => {}
    }
    if state.filtering {
        return vec![("type", "filter"), ("Enter", "keep"), ("Esc", "clear")];
    }
    if state.view == View::Generate && state.form.editing.is_some() {
        return vec![
            ("type", "text"),
            ("Enter", "ok"),
            ("Tab", "next"),
            ("Esc", "cancel"),
        ];
    }
    let mut v: Vec<(&str, &str)> = view_keys(state.view).to_vec();
    v.extend_from_slice(GLOBAL_KEYS);
    v
}

/// Keys as spans: the key highlighted, its meaning dimmed.
fn key_spans(keys: &[(&str, &str)]) -> Vec<Span<'static>> {
    let mut spans = Vec::new();
    for (k, what) in keys {
        spans.push(Span::styled(
            format!(" {k}"),
            Style::default().fg(Color::Yellow),
        ));
        spans.push(Span::styled(format!(" {what} "), dim()));
    }
    spans
}

/// Draw the help bar.
pub fn draw_bar(frame: &mut Frame, area: Rect, state: &AppState) {
    frame.render_widget(
        Paragraph::new(Line::from(key_spans(&current_keys(state)))),
        area,
    );
}

/// Draw the `?` overlay over `area`: one wrapped paragraph per view.
pub fn draw_overlay(frame: &mut Frame, area: Rect) {
    let mut global: Vec<(&str, &str)> = GLOBAL_KEYS.to_vec();
    global.push(("Ctrl-C", "quit at once"));
    let mut sections = vec![("Every view".to_string(), global)];
    for v in View::ALL {
        sections.push((
            format!("{} {}", v.index() + 1, v.title()),
            view_keys(v).to_vec(),
        ));
    }
    let mut lines = Vec::new();
    for (title, keys) in sections {
        let mut spans = vec![Span::styled(format!("{title}:"), heading())];
        spans.extend(key_spans(&keys));
        lines.push(Line::from(spans));
    }
    let w = area.width.min(72);
    let inner = w.saturating_sub(2).max(1) as usize;
    let rows: usize = lines.iter().map(|l| l.width().div_ceil(inner).max(1)).sum();
    let h = area.height.min(rows as u16 + 2);
    let [_, mid, _] = Layout::horizontal([
        Constraint::Fill(1),
        Constraint::Length(w),
        Constraint::Fill(1),
    ])
    .areas(area);
    let [_, popup, _] = Layout::vertical([
        Constraint::Fill(1),
        Constraint::Length(h),
        Constraint::Fill(1),
    ])
    .areas(mid);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(" Keys (Esc closes) ")),
        popup,
    );
}
