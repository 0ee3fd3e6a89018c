//! Pictures in any terminal with unicode half blocks: each cell shows two pixels, the upper one
//! as the foreground colour of `▀` and the lower one as the background. The picture is scaled to
//! fit the area with its aspect ratio kept (cells are about twice as tall as wide, so a cell of
//! two half blocks is close to square), averaging the source pixels each target pixel covers.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::widgets::Widget;

use super::dim;
use crate::tui::graphics::{self, Graphics};
use crate::tui::state::{Picture, PictureSlot};

/// The upper half block.
pub const HALF_BLOCK: &str = "▀";

/// The size in target pixels (`width`, `height`) at which `p` fits `cols` × `rows` cells.
pub fn fit(p: &Picture, cols: u16, rows: u16) -> (u32, u32) {
    if p.width == 0 || p.height == 0 || cols == 0 || rows == 0 {
        return (0, 0);
    }
    let (max_w, max_h) = (f64::from(cols), f64::from(rows) * 2.0);
    let scale = (max_w / f64::from(p.width)).min(max_h / f64::from(p.height));
    let w = (f64::from(p.width) * scale).round().clamp(1.0, max_w) as u32;
    let h = (f64::from(p.height) * scale).round().clamp(1.0, max_h) as u32;
    (w, h)
}

/// `p` resampled to `w` × `h` pixels (box average when shrinking, nearest when growing).
pub fn resample(p: &Picture, w: u32, h: u32) -> Vec<[u8; 3]> {
    let mut out = Vec::with_capacity((w * h) as usize);
    if p.width == 0 || p.height == 0 {
        return out;
    }
    let span = |t: u32, n_t: u32, n_s: u32| {
        let lo = (u64::from(t) * u64::from(n_s) / u64::from(n_t)) as u32;
        let hi = ((u64::from(t + 1) * u64::from(n_s)).div_ceil(u64::from(n_t)) as u32).max(lo + 1);
        (lo, hi.min(n_s))
    };
    for ty in 0..h {
        let (y0, y1) = span(ty, h, p.height);
        for tx in 0..w {
            let (x0, x1) = span(tx, w, p.width);
            let mut sum = [0u64; 3];
            let mut n = 0u64;
            for y in y0..y1 {
                for x in x0..x1 {
                    let px = p.pixel(x, y);
                    for c in 0..3 {
                        sum[c] += u64::from(px[c]);
                    }
                    n += 1;
                }
            }
            let n = n.max(1);
            out.push([(sum[0] / n) as u8, (sum[1] / n) as u8, (sum[2] / n) as u8]);
        }
    }
    out
}

/// Draw `p` into `area` with half blocks, centred across and at the top.
pub fn render_halfblocks(p: &Picture, area: Rect, buf: &mut Buffer) {
    let (w, h) = fit(p, area.width, area.height);
    if w == 0 || h == 0 {
        return;
    }
    let px = resample(p, w, h);
    let rows = h.div_ceil(2) as u16;
    let x0 = area.x + (area.width - w as u16) / 2;
    let y0 = area.y;
    let rgb = |c: [u8; 3]| Color::Rgb(c[0], c[1], c[2]);
    for row in 0..rows {
        for col in 0..w as u16 {
            let top = px[(u32::from(row) * 2 * w + u32::from(col)) as usize];
            let bottom_y = u32::from(row) * 2 + 1;
            let mut style = Style::default().fg(rgb(top));
            if bottom_y < h {
                style = style.bg(rgb(px[(bottom_y * w + u32::from(col)) as usize]));
            }
            if let Some(cell) = buf.cell_mut((x0 + col, y0 + row)) {
                cell.set_symbol(HALF_BLOCK).set_style(style);
            }
        }
    }
}

/// A picture slot as a widget: the picture, or a line saying it is loading or unreadable.
pub struct PictureView<'a> {
    /// The picture as the state has it; `None`: nothing to show.
    pub slot: Option<&'a PictureSlot>,
    /// The terminal's graphics protocol; `None`: half blocks.
    pub graphics: Option<&'a Graphics>,
}

impl Widget for PictureView<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        if area.width == 0 || area.height == 0 {
            return;
        }
        let text = match self.slot {
            Some(PictureSlot::Ready(p)) => {
                let drawn = self
                    .graphics
                    .is_some_and(|g| graphics::render(g, p, area, buf));
                if !drawn {
                    render_halfblocks(p, area, buf);
                }
                return;
            }
            Some(PictureSlot::Loading) => "loading…".to_string(),
            Some(PictureSlot::Failed(e)) => format!("unreadable: {e}"),
            None => "no picture".to_string(),
        };
        buf.set_stringn(area.x, area.y, text, area.width as usize, dim());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(w: u32, h: u32) -> Picture {
        let mut rgb = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let v = if (x + y) % 2 == 0 { 255 } else { 0 };
                rgb.extend_from_slice(&[v, v, v]);
            }
        }
        Picture {
            width: w,
            height: h,
            rgb,
        }
    }

    #[test]
    fn fit_keeps_the_aspect_ratio() {
        let wide = checker(200, 100);
        assert_eq!(fit(&wide, 40, 40), (40, 20));
        let tall = checker(100, 200);
        // 10 rows hold 20 pixels: the height limits.
        assert_eq!(fit(&tall, 40, 10), (10, 20));
        assert_eq!(fit(&tall, 0, 10), (0, 0));
    }

    #[test]
    fn shrinking_averages_pixels() {
        let p = checker(4, 4);
        let px = resample(&p, 2, 2);
        assert_eq!(px, vec![[127, 127, 127]; 4]);
        let same = resample(&p, 4, 4);
        assert_eq!(same[0], [255, 255, 255]);
        assert_eq!(same[1], [0, 0, 0]);
    }

    #[test]
    fn halfblocks_carry_both_pixels() {
        // Top row red, bottom row blue.
        let p = Picture {
            width: 1,
            height: 2,
            rgb: vec![255, 0, 0, 0, 0, 255],
        };
        let area = Rect::new(0, 0, 1, 1);
        let mut buf = Buffer::empty(area);
        render_halfblocks(&p, area, &mut buf);
        let cell = &buf[(0, 0)];
        assert_eq!(cell.symbol(), HALF_BLOCK);
        assert_eq!(cell.fg, Color::Rgb(255, 0, 0));
        assert_eq!(cell.bg, Color::Rgb(0, 0, 255));
    }
}
