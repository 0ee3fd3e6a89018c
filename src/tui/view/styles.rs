//! The Styles view: the library as a filterable list; for the selected style its metadata and
//! its pictures (the content/style pair it was learned from, its sample grid).

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, List, ListItem, ListState, Paragraph, Wrap};
use ratatui::Frame;

use super::picture::PictureView;
use super::{dim, ellipsize, heading, selected_style, split};
use crate::daemon::status::format_duration;
use crate::library::StyleMeta;
use crate::tui::state::{format_number, AppState};

/// Draw the Styles view into `area`.
pub fn draw(frame: &mut Frame, area: Rect, state: &AppState) {
    let list_w = (area.width / 3).clamp(18, 32);
    let (left, right, _) = split(area, 60, list_w);
    draw_list(frame, left, state);
    draw_detail(frame, right, state);
}

fn draw_list(frame: &mut Frame, area: Rect, state: &AppState) {
    let styles = state.filtered_styles();
    let title = format!(" Styles {}/{} ", styles.len(), state.styles.len());
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let mut list_area = inner;
    if state.filtering || !state.filter.is_empty() {
        let [f, rest] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
        let mut spans = vec![
            Span::styled("/", Style::default().fg(Color::Yellow)),
            Span::raw(state.filter.clone()),
        ];
        if state.filtering {
            spans.push(Span::styled("▏", Style::default().fg(Color::Yellow)));
        }
        frame.render_widget(Paragraph::new(Line::from(spans)), f);
        list_area = rest;
    }
    if state.styles.is_empty() {
        let text = "No styles yet: drop a pair into the watch folder (view 4).";
        frame.render_widget(
            Paragraph::new(text).style(dim()).wrap(Wrap { trim: true }),
            list_area,
        );
        return;
    }
    let w = list_area.width as usize;
    let items: Vec<ListItem> = styles
        .iter()
        .map(|s| {
            let mark = if state.form.lambda_of(&s.name).is_some() {
                "+"
            } else {
                " "
            };
            let name = ellipsize(&s.name, w.saturating_sub(2));
            let rest = w.saturating_sub(name.chars().count() + 3);
            let mut spans = vec![Span::raw(format!("{mark}{name}"))];
            if rest > 3 {
                spans.push(Span::styled(
                    format!(" {}", ellipsize(&s.style_desc, rest)),
                    dim(),
                ));
            }
            ListItem::new(Line::from(spans))
        })
        .collect();
    let selected = state
        .selected_style
        .as_ref()
        .and_then(|n| styles.iter().position(|s| &s.name == n));
    let mut ls = ListState::default().with_selected(selected);
    frame.render_stateful_widget(
        List::new(items).highlight_style(selected_style()),
        list_area,
        &mut ls,
    );
}

/// The metadata lines of a style.
pub fn meta_lines(s: &StyleMeta) -> Vec<Line<'static>> {
    let kv =
        |k: &str, v: String| Line::from(vec![Span::styled(format!("{k:<9}"), dim()), Span::raw(v)]);
    vec![
        kv("style", s.style_desc.clone()),
        kv("subject", s.subject.clone()),
        kv(
            "λ",
            format!(
                "{} (default)   rank {}   alpha {}",
                format_number(s.default_lambda),
                s.rank,
                format_number(s.alpha)
            ),
        ),
        kv(
            "trained",
            format!(
                "{} steps in {}, seed {}",
                s.steps,
                format_duration(s.training_secs),
                s.seed
            ),
        ),
        kv("created", crate::daemon::format_utc(s.created_unix)),
        kv("model", s.base_model.clone()),
    ]
}

fn draw_detail(frame: &mut Frame, area: Rect, state: &AppState) {
    let Some(style) = state.current_style() else {
        frame.render_widget(Block::bordered().title(" Style "), area);
        return;
    };
    let block = Block::bordered().title(Span::styled(format!(" {} ", style.name), heading()));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let lines = meta_lines(style);
    let meta_h = (lines.len() as u16).min(inner.height);
    let [meta, pics] =
        Layout::vertical([Constraint::Length(meta_h), Constraint::Min(0)]).areas(inner);
    frame.render_widget(Paragraph::new(lines), meta);
    if pics.height < 3 {
        return;
    }
    let assets = state.style_assets.get(&style.name);
    let pictures = assets.map(|a| a.pictures.as_slice()).unwrap_or(&[]);
    if pictures.is_empty() {
        let text = if assets.is_some() {
            "no pictures found in the style's folder"
        } else {
            ""
        };
        frame.render_widget(Paragraph::new(text).style(dim()), pics);
        return;
    }
    let n = pictures.len().min(3);
    let cols = Layout::horizontal(vec![Constraint::Ratio(1, n as u32); n]).split(pics);
    for ((label, path), col) in pictures.iter().zip(cols.iter()) {
        let [cap, pic] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(*col);
        frame.render_widget(
            Paragraph::new(ellipsize(label, cap.width as usize)).style(heading()),
            cap,
        );
        let pad = Rect {
            width: pic.width.saturating_sub(1),
            ..pic
        };
        frame.render_widget(
            PictureView {
                slot: state.picture(path),
                graphics: state.graphics.as_ref(),
            },
            pad,
        );
    }
}
