//! The bottom line: the link to the daemon (and whether it runs inside this process), the latest
//! message, and the queue.

use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use super::dim;
use crate::tui::state::{AppState, Connection, Level};

/// The connection in words (shorter when `narrow`) and its colour.
pub fn connection_text(state: &AppState, narrow: bool) -> (String, Color) {
    match &state.connection {
        Connection::Connecting => ("○ connecting…".into(), Color::Yellow),
        Connection::Connected { server } => {
            let text = match (state.embedded, narrow) {
                (true, true) => "● embedded daemon".to_string(),
                (true, false) => format!("● embedded daemon (started in this process): {server}"),
                (false, true) => "● daemon".to_string(),
                (false, false) => format!("● daemon: {server}"),
            };
            (text, Color::Green)
        }
        Connection::Lost { reason, attempts } => {
            let text = if narrow {
                format!("○ no daemon (retry {attempts})")
            } else {
                format!("○ daemon unreachable (retry {attempts}): {reason}")
            };
            (text, Color::Red)
        }
    }
}

/// Draw the status bar.
pub fn draw(frame: &mut Frame, area: Rect, state: &AppState) {
    let narrow = area.width < 80;
    let (conn, colour) = connection_text(state, narrow);
    let mut spans = vec![Span::styled(conn, Style::default().fg(colour))];
    if let Some(n) = state.visible_notice() {
        let style = match n.level {
            Level::Info => Style::default().fg(Color::Cyan),
            Level::Error => Style::default().fg(Color::Red),
        };
        spans.push(Span::raw(" │ "));
        spans.push(Span::styled(n.text.clone(), style));
    }
    if let Some(s) = &state.status {
        let q = &s.queue;
        spans.push(Span::styled(
            format!(
                " │ {} running, {} queued, {} done, {} failed",
                q.running,
                q.queued + q.interrupted,
                q.done,
                q.failed
            ),
            dim(),
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}
