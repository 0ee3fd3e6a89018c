//! The Generate view: the form (prompt, negative prompt, seed, steps, CFG, size, style schedule)
//! with the style picker for a blend of weighted styles; beside it the result of the job submitted
//! last and the outputs gallery.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::picture::PictureView;
use super::{dim, ellipsize, heading, selected_style, split};
use crate::daemon::journal::JobState;
use crate::tui::action::{gallery_pick, submitted_result};
use crate::tui::state::{format_number, AppState, Field, GenerateForm};

/// A field's value as shown when not being edited.
pub fn field_value(form: &GenerateForm, field: Field) -> String {
    match field {
        Field::Seed => form
            .seed
            .map(|s| s.to_string())
            .unwrap_or_else(|| "random".into()),
        Field::Width | Field::Height => {
            let v = if field == Field::Width {
                form.width
            } else {
                form.height
            };
            v.map(|v| v.to_string()).unwrap_or_else(|| "model".into())
        }
        Field::Sampler => match &form.sampler {
            Some(s) if s == "default" => "default (the model's own)".into(),
            Some(s) => s.clone(),
            None => "daemon's [generate] scheduler".into(),
        },
        Field::StyleFrom if form.style_from == 0 => "0: every step".into(),
        Field::StyleFrom => format!("{}: plain CFG before", form.style_from),
        Field::Cfg => form
            .cfg
            .map(format_number)
            .unwrap_or_else(|| "auto (the model's)".into()),
        f => form.field_text(f),
    }
}

/// Draw the Generate view into `area`.
pub fn draw(frame: &mut Frame, area: Rect, state: &AppState) {
    let form_w = (area.width * 11 / 20).max(38);
    let (left, right, wide) = split(area, 70, form_w);
    if !wide && area.height < 18 {
        // Too small for both: the form matters more.
        return draw_form(frame, area, state);
    }
    draw_form(frame, left, state);
    draw_result(frame, right, state);
}

fn draw_form(frame: &mut Frame, area: Rect, state: &AppState) {
    let form = &state.form;
    let block = Block::bordered().title(" Generate ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let w = inner.width as usize;
    let label_w = 10usize;
    let mut lines: Vec<Line> = Vec::new();
    let mut cursor_line = 0usize;
    for f in Field::ALL {
        if f == Field::Styles {
            break;
        }
        let here = form.field == f;
        if here {
            cursor_line = lines.len();
        }
        let value = match (&form.editing, here) {
            (Some(t), true) => format!("{t}▏"),
            _ => field_value(form, f),
        };
        let label = if f == Field::StyleFrom {
            "From step"
        } else {
            f.label()
        };
        let value = ellipsize(&value, w.saturating_sub(label_w + 1));
        let style = if here {
            selected_style()
        } else {
            Style::default()
        };
        lines.push(Line::from(vec![
            Span::styled(
                format!("{label:<label_w$}"),
                if here { heading() } else { dim() },
            ),
            Span::raw(" "),
            Span::styled(value, style),
        ]));
    }
    let chosen = form.blend.len();
    lines.push(Line::from(vec![
        Span::styled(
            format!("{:<label_w$}", "Styles"),
            if form.field == Field::Styles {
                heading()
            } else {
                dim()
            },
        ),
        Span::styled(format!(" {chosen} chosen"), dim()),
    ]));
    if state.styles.is_empty() {
        lines.push(Line::styled("  (no styles in the library yet)", dim()));
    }
    for (i, s) in state.styles.iter().enumerate() {
        let here = form.field == Field::Styles && form.style_cursor == i;
        if here {
            cursor_line = lines.len();
        }
        let (mark, lambda) = match form.lambda_of(&s.name) {
            Some(l) => ("[x]", format!("λ {}", format_number(l))),
            None => ("[ ]", String::new()),
        };
        let name = ellipsize(&s.name, w.saturating_sub(14));
        let style = if here {
            selected_style()
        } else {
            Style::default()
        };
        lines.push(Line::from(vec![
            Span::raw("  "),
            Span::styled(format!("{mark} {name}"), style),
            Span::styled(format!(" {lambda}"), Style::default().fg(Color::Cyan)),
        ]));
    }
    let blend: Vec<String> = form
        .blend
        .iter()
        .map(|b| format!("{} {}", b.name, format_number(b.lambda)))
        .collect();
    lines.push(Line::styled(
        if blend.is_empty() {
            "blend: none (plain CFG)".to_string()
        } else {
            ellipsize(&format!("blend: {}", blend.join(" + ")), w)
        },
        dim(),
    ));
    // Scroll so the cursor stays visible.
    let h = inner.height as usize;
    let top = (cursor_line + 1).saturating_sub(h);
    frame.render_widget(Paragraph::new(lines).scroll((top as u16, 0)), inner);
}

fn draw_result(frame: &mut Frame, area: Rect, state: &AppState) {
    if area.height < 3 || area.width < 6 {
        return;
    }
    let outputs = state.outputs();
    let gallery_h = if outputs.is_empty() {
        0
    } else {
        (outputs.len() as u16 + 2).min(area.height / 3).max(3)
    };
    let [result, gallery] =
        Layout::vertical([Constraint::Min(0), Constraint::Length(gallery_h)]).areas(area);
    // The job submitted last, else the gallery's pick.
    let (title, body): (String, Option<std::path::PathBuf>) = match state.form.submitted {
        Some(id) => {
            let job = state.jobs.iter().find(|j| j.id == id);
            let status = match job {
                Some(j) if j.state == JobState::Done => "done".to_string(),
                Some(j) => match (j.progress, j.state) {
                    (Some(p), JobState::Running) => format!("step {}/{}", p.step, p.total),
                    _ => super::jobs::state_text(j),
                },
                None => "queued".into(),
            };
            (
                format!(" Job #{id}: {status} "),
                submitted_result(state).or_else(|| gallery_pick(state)),
            )
        }
        None => (" Result ".into(), gallery_pick(state)),
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(result);
    frame.render_widget(block, result);
    match body {
        Some(p) => frame.render_widget(
            PictureView {
                slot: state.picture(&p),
                graphics: state.graphics.as_ref(),
            },
            inner,
        ),
        None => frame.render_widget(
            Paragraph::new("Submit with s; the picture appears here when the job is done.")
                .style(dim())
                .wrap(ratatui::widgets::Wrap { trim: true }),
            inner,
        ),
    }
    if gallery_h == 0 {
        return;
    }
    let block = Block::bordered().title(format!(" Outputs ({}) [ ] ", outputs.len()));
    let inner = block.inner(gallery);
    frame.render_widget(block, gallery);
    let rows = inner.height as usize;
    let cur = state.form.gallery_cursor;
    let top = (cur + 1).saturating_sub(rows);
    let lines: Vec<Line> = outputs
        .iter()
        .enumerate()
        .skip(top)
        .take(rows)
        .map(|(i, (id, g, path))| {
            let file = std::path::Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let text = ellipsize(
                &format!("#{id} {:?} {file}", g.prompt),
                inner.width as usize,
            );
            if i == cur {
                Line::styled(text, selected_style())
            } else {
                Line::raw(text)
            }
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}
