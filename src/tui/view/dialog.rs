//! Dialogs over the current view: a yes/no question, a line of text, the `?` overlay.

use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Wrap};
use ratatui::Frame;

use super::dim;
use crate::tui::state::{AppState, Confirm, InputPurpose, Modal};

/// A rectangle of `w` × `h` cells centred in `area` (clamped to it).
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

/// Draw the open dialog, if any, over `area`.
pub fn draw(frame: &mut Frame, area: Rect, state: &AppState) {
    let Some(modal) = &state.modal else {
        return;
    };
    let (title, lines): (String, Vec<Line>) = match modal {
        Modal::Help => return super::help::draw_overlay(frame, area),
        Modal::Confirm(c) => {
            let question = match c {
                Confirm::DeleteStyle(name) => {
                    format!("Delete style {name}? It goes to the library's trash.")
                }
                Confirm::CancelJob(id) => format!("Cancel job #{id}?"),
            };
            (
                " Confirm ".into(),
                vec![
                    Line::raw(question),
                    Line::from(vec![
                        Span::styled("y", Style::default().fg(Color::Yellow)),
                        Span::styled(" yes   ", dim()),
                        Span::styled("n", Style::default().fg(Color::Yellow)),
                        Span::styled(" no", dim()),
                    ]),
                ],
            )
        }
        Modal::Input { purpose, text } => {
            let (title, extra) = match purpose {
                InputPurpose::RenameStyle { from } => (format!(" Rename {from} "), None),
                InputPurpose::ExportStyle { name, format } => (
                    format!(" Export {name} "),
                    Some(vec![
                        Line::from(vec![
                            Span::styled("format: ", dim()),
                            Span::raw(format.clone()),
                            Span::styled("  (Tab switches kohya/peft)", dim()),
                        ]),
                        Line::styled(
                            "absolute path of the file; empty: the daemon's exports folder",
                            dim(),
                        ),
                    ]),
                ),
            };
            let mut lines = vec![Line::from(vec![
                Span::raw(text.clone()),
                Span::styled("▏", Style::default().fg(Color::Yellow)),
            ])];
            lines.extend(extra.into_iter().flatten());
            (title, lines)
        }
    };
    let w = area.width.min(60);
    let h = (lines.len() as u16 + 3).min(area.height);
    let rect = centered(area, w, h.max(3));
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(title)),
        rect,
    );
}
