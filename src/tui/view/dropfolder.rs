//! The Drop-folder view: the pairs the watcher sees (ready, waiting for their files to stop
//! changing, incomplete) and those it moved to `failed/`, with the reason and a retry key.

use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, List, ListItem, ListState, Paragraph, Wrap};
use ratatui::Frame;

use super::{dim, ellipsize, heading, selected_style, split};
use crate::tui::state::{AppState, DropEntry, DropState};

/// A short label for an entry's state and its colour.
pub fn state_label(s: &DropState) -> (String, Color) {
    match s {
        DropState::Ready => ("ready".into(), Color::Green),
        DropState::WaitingForStability { secs_left } => {
            (format!("settling {secs_left}s"), Color::Yellow)
        }
        DropState::Incomplete { .. } => ("incomplete".into(), Color::Yellow),
        DropState::Failed { .. } => ("failed".into(), Color::Red),
    }
}

/// Draw the Drop-folder view into `area`.
pub fn draw(frame: &mut Frame, area: Rect, state: &AppState) {
    let Some(snap) = &state.drop else {
        let text = if state.status.is_some() {
            "scanning the drop folder…"
        } else {
            "waiting for the daemon to say where its drop folder is…"
        };
        frame.render_widget(
            Paragraph::new(text)
                .style(dim())
                .block(Block::bordered().title(" Drop folder ")),
            area,
        );
        return;
    };
    let (left, right, _) = split(area, 70, (area.width / 2).max(30));
    let title = format!(" {} ", snap.watch.display());
    let block = Block::bordered().title(Span::styled(
        ellipsize(&title, left.width.saturating_sub(2) as usize),
        heading(),
    ));
    let inner = block.inner(left);
    frame.render_widget(block, left);
    if let Some(e) = &snap.error {
        frame.render_widget(
            Paragraph::new(e.clone())
                .style(Style::default().fg(Color::Red))
                .wrap(Wrap { trim: true }),
            inner,
        );
        return;
    }
    if snap.entries.is_empty() {
        frame.render_widget(
            Paragraph::new(
                "Empty. Drop a folder <name>/ with content.png and style.png (or <name>.content.png \
                 and <name>.style.png) here to train a style.",
            )
            .style(dim())
            .wrap(Wrap { trim: true }),
            inner,
        );
    } else {
        let w = inner.width as usize;
        let items: Vec<ListItem> = snap
            .entries
            .iter()
            .map(|e| {
                let (label, colour) = state_label(&e.state);
                let name = ellipsize(&e.name, w.saturating_sub(15));
                ListItem::new(Line::from(vec![
                    Span::styled(format!("{label:<13}"), Style::default().fg(colour)),
                    Span::raw(name),
                ]))
            })
            .collect();
        let mut ls = ListState::default().with_selected(Some(state.drop_cursor));
        frame.render_stateful_widget(
            List::new(items).highlight_style(selected_style()),
            inner,
            &mut ls,
        );
    }
    let block = Block::bordered().title(" Details ");
    let inner = block.inner(right);
    frame.render_widget(block, right);
    if let Some(e) = snap.entries.get(state.drop_cursor) {
        frame.render_widget(
            Paragraph::new(detail_lines(e)).wrap(Wrap { trim: false }),
            inner,
        );
    }
}

/// What the details pane says about an entry.
pub fn detail_lines(e: &DropEntry) -> Vec<Line<'static>> {
    let (label, colour) = state_label(&e.state);
    let mut lines = vec![
        Line::styled(e.name.clone(), heading()),
        Line::styled(label, Style::default().fg(colour)),
    ];
    match &e.state {
        DropState::Ready => lines.push(Line::raw(
            "Complete and unchanged: the daemon takes it at its next scan.",
        )),
        DropState::WaitingForStability { secs_left } => lines.push(Line::raw(format!(
            "Both images are here; taken once they stay unchanged for {secs_left} more s."
        ))),
        DropState::Incomplete { reason } => lines.push(Line::raw(reason.clone())),
        DropState::Failed { reason } => {
            lines.push(Line::styled(
                reason.clone(),
                Style::default().fg(Color::Red),
            ));
            lines.push(Line::styled(
                "r: put it back into the watch folder to try again",
                dim(),
            ));
        }
    }
    lines.push(Line::styled(format!("in {}", e.path.display()), dim()));
    if !e.files.is_empty() {
        lines.push(Line::styled(
            format!("files: {}", e.files.join(", ")),
            dim(),
        ));
    }
    lines
}
