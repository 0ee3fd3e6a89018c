//! Rendering: a pure function of [`AppState`] onto a ratatui [`Frame`], one file per view.
//!
//! The screen is a tab line, the current view, its help bar and the status bar; a dialog or the
//! `?` overlay may cover the middle. Every part shrinks to fit: a terminal too small for anything
//! useful gets one line saying so.

pub mod dialog;
pub mod dropfolder;
pub mod generate;
pub mod help;
pub mod jobs;
pub mod picture;
pub mod statusbar;
pub mod styles;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use super::state::{AppState, View};

/// The smallest terminal the UI draws into (columns, rows); smaller gets a notice.
pub const MIN_SIZE: (u16, u16) = (20, 5);

/// Style of the selected row or field.
pub fn selected_style() -> Style {
    Style::default().add_modifier(Modifier::REVERSED)
}

/// Style of secondary text.
pub fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}

/// Style of section titles.
pub fn heading() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

/// Draw the whole UI.
pub fn draw(frame: &mut Frame, state: &AppState) {
    let area = frame.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let text = format!("pairstyle: {}×{} is too small", area.width, area.height);
        frame.render_widget(
            Paragraph::new(text).wrap(ratatui::widgets::Wrap { trim: true }),
            area,
        );
        return;
    }
    let [tabs, body, help, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_tabs(frame, tabs, state);
    match state.view {
        View::Styles => styles::draw(frame, body, state),
        View::Jobs => jobs::draw(frame, body, state),
        View::Generate => generate::draw(frame, body, state),
        View::DropFolder => dropfolder::draw(frame, body, state),
    }
    help::draw_bar(frame, help, state);
    statusbar::draw(frame, status, state);
    dialog::draw(frame, body, state);
}

/// The view tabs: `1 Styles  2 Jobs  3 Generate  4 Drop folder`, the current one highlighted;
/// titles shorten on narrow terminals.
fn draw_tabs(frame: &mut Frame, area: Rect, state: &AppState) {
    let full: usize = View::ALL.iter().map(|v| v.title().len() + 4).sum();
    let narrow = (area.width as usize) < full + 10;
    let mut spans = vec![Span::styled(
        if narrow { "" } else { " pairstyle " },
        heading().fg(Color::Cyan),
    )];
    for v in View::ALL {
        let title = if narrow {
            v.title().split(' ').next().unwrap_or("")
        } else {
            v.title()
        };
        let text = format!(" {} {title} ", v.index() + 1);
        let style = if v == state.view {
            selected_style().add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        spans.push(Span::styled(text, style));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// Split `area` into a left and right part when wide enough (`min_wide` columns), else into a
/// top and bottom part; the first part gets `first` cells (clamped).
pub fn split(area: Rect, min_wide: u16, first: u16) -> (Rect, Rect, bool) {
    if area.width >= min_wide {
        let w = first.min(area.width.saturating_sub(10));
        let [a, b] = Layout::horizontal([Constraint::Length(w), Constraint::Min(1)]).areas(area);
        (a, b, true)
    } else {
        let h = (area.height / 2).max(3).min(area.height);
        let [a, b] = Layout::vertical([Constraint::Length(h), Constraint::Min(0)]).areas(area);
        (a, b, false)
    }
}

/// `text` cut to `max` characters with an ellipsis.
pub fn ellipsize(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut s: String = text.chars().take(max - 1).collect();
    s.push('…');
    s
}
