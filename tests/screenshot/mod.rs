//! PNG screenshots of a terminal screen captured with `tmux capture-pane -e -p` (text with SGR
//! colour escapes): each cell is drawn 8×16 pixels with the public-domain 8×8 font of `font8x8`
//! (rows doubled), in its foreground and background colours; the upper half block `▀` that the
//! UI uses for pictures is drawn exactly (upper half in the foreground, lower in the background),
//! so pictures come out at their on-screen resolution. Glyphs the font lacks are drawn as a
//! hollow box. Used by the end-to-end test to write `docs/tui/<view>.png`.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

/// Cell width in pixels.
pub const CELL_W: u32 = 8;
/// Cell height in pixels.
pub const CELL_H: u32 = 16;

const DEFAULT_FG: [u8; 3] = [0xd0, 0xd0, 0xd0];
const DEFAULT_BG: [u8; 3] = [0x1c, 0x1c, 0x1c];

/// One screen cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    pub ch: char,
    pub fg: [u8; 3],
    pub bg: [u8; 3],
}

impl Default for Cell {
    fn default() -> Self {
        Self {
            ch: ' ',
            fg: DEFAULT_FG,
            bg: DEFAULT_BG,
        }
    }
}

/// xterm's 256-colour palette entry `n`.
fn palette(n: u8) -> [u8; 3] {
    const BASE: [[u8; 3]; 16] = [
        [0, 0, 0],
        [205, 0, 0],
        [0, 205, 0],
        [205, 205, 0],
        [0, 0, 238],
        [205, 0, 205],
        [0, 205, 205],
        [229, 229, 229],
        [127, 127, 127],
        [255, 0, 0],
        [0, 255, 0],
        [255, 255, 0],
        [92, 92, 255],
        [255, 0, 255],
        [0, 255, 255],
        [255, 255, 255],
    ];
    match n {
        0..=15 => BASE[n as usize],
        16..=231 => {
            let i = n - 16;
            let level = |v: u8| if v == 0 { 0 } else { 55 + 40 * v };
            [level(i / 36), level((i / 6) % 6), level(i % 6)]
        }
        _ => {
            let g = 8 + 10 * (n - 232);
            [g, g, g]
        }
    }
}

#[derive(Clone, Copy)]
struct Pen {
    fg: [u8; 3],
    bg: [u8; 3],
    reverse: bool,
    dim: bool,
}

impl Pen {
    fn reset() -> Self {
        Self {
            fg: DEFAULT_FG,
            bg: DEFAULT_BG,
            reverse: false,
            dim: false,
        }
    }

    /// Apply one SGR parameter list (`38;2;r;g;b`, `1`, `0`, ...).
    fn apply(&mut self, params: &[u16]) {
        let mut i = 0;
        if params.is_empty() {
            *self = Self::reset();
        }
        while i < params.len() {
            let p = params[i];
            let extended = |i: usize| -> Option<([u8; 3], usize)> {
                match params.get(i + 1) {
                    Some(5) => params.get(i + 2).map(|&n| (palette(n as u8), 3)),
                    Some(2) => match (params.get(i + 2), params.get(i + 3), params.get(i + 4)) {
                        (Some(&r), Some(&g), Some(&b)) => Some(([r as u8, g as u8, b as u8], 5)),
                        _ => None,
                    },
                    _ => None,
                }
            };
            match p {
                0 => *self = Self::reset(),
                2 => self.dim = true,
                7 => self.reverse = true,
                22 => self.dim = false,
                27 => self.reverse = false,
                30..=37 => self.fg = palette((p - 30) as u8),
                39 => self.fg = DEFAULT_FG,
                40..=47 => self.bg = palette((p - 40) as u8),
                49 => self.bg = DEFAULT_BG,
                90..=97 => self.fg = palette((p - 90 + 8) as u8),
                100..=107 => self.bg = palette((p - 100 + 8) as u8),
                38 | 48 => {
                    if let Some((c, used)) = extended(i) {
                        if p == 38 {
                            self.fg = c;
                        } else {
                            self.bg = c;
                        }
                        i += used;
                        continue;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }

    fn cell(&self, ch: char) -> Cell {
        let (mut fg, mut bg) = (self.fg, self.bg);
        if self.reverse {
            std::mem::swap(&mut fg, &mut bg);
        }
        if self.dim {
            fg = [
                fg[0] / 2 + bg[0] / 2,
                fg[1] / 2 + bg[1] / 2,
                fg[2] / 2 + bg[2] / 2,
            ];
        }
        Cell { ch, fg, bg }
    }
}

/// Parse `capture-pane -e -p` output into a `rows` × `cols` grid of cells.
pub fn parse(text: &str, cols: usize, rows: usize) -> Vec<Vec<Cell>> {
    let mut grid = vec![vec![Cell::default(); cols]; rows];
    let mut pen = Pen::reset();
    for (y, line) in text.lines().take(rows).enumerate() {
        let mut x = 0usize;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    let mut seq = String::new();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            if d == 'm' {
                                let params: Vec<u16> = seq
                                    .split([';', ':'])
                                    .filter(|s| !s.is_empty())
                                    .filter_map(|s| s.parse().ok())
                                    .collect();
                                pen.apply(&params);
                            }
                            break;
                        }
                        seq.push(d);
                    }
                }
                continue;
            }
            if x < cols {
                grid[y][x] = pen.cell(c);
            }
            x += 1;
        }
        // capture-pane ends lines without drawing their trailing blanks: keep the pen's colours.
        for cell in grid[y].iter_mut().skip(x) {
            *cell = pen.cell(' ');
        }
    }
    grid
}

fn glyph(ch: char) -> Option<[u8; 8]> {
    font8x8::BASIC_FONTS
        .get(ch)
        .or_else(|| font8x8::LATIN_FONTS.get(ch))
        .or_else(|| font8x8::BOX_FONTS.get(ch))
        .or_else(|| font8x8::BLOCK_FONTS.get(ch))
        .or_else(|| font8x8::GREEK_FONTS.get(ch))
        .or_else(|| font8x8::MISC_FONTS.get(ch))
}

/// Substitutes for common UI characters the font lacks.
fn fallback(ch: char) -> char {
    match ch {
        '●' | '•' => 'o',
        '○' => 'o',
        '…' => '.',
        '▏' => '|',
        '←' => '<',
        '→' => '>',
        '↑' => '^',
        '↓' => 'v',
        '×' => 'x',
        '≤' => '<',
        '≥' => '>',
        _ => ch,
    }
}

/// Draw a grid of cells as an image of `CELL_W × CELL_H` pixels per cell.
pub fn render(grid: &[Vec<Cell>]) -> RgbImage {
    let rows = grid.len() as u32;
    let cols = grid.first().map_or(0, |r| r.len()) as u32;
    let mut img = RgbImage::from_pixel(cols * CELL_W, rows * CELL_H, Rgb(DEFAULT_BG));
    for (y, row) in grid.iter().enumerate() {
        for (x, cell) in row.iter().enumerate() {
            let (x0, y0) = (x as u32 * CELL_W, y as u32 * CELL_H);
            for dy in 0..CELL_H {
                for dx in 0..CELL_W {
                    let on = match cell.ch {
                        '▀' => dy < CELL_H / 2,
                        '█' => true,
                        ' ' => false,
                        c => match glyph(c).or_else(|| glyph(fallback(c))) {
                            Some(rows) => rows[(dy / 2) as usize] & (1 << dx) != 0,
                            // A hollow box for what the font lacks.
                            None => {
                                (dx == 1 || dx == CELL_W - 2 || dy == 2 || dy == CELL_H - 3)
                                    && (1..CELL_W - 1).contains(&dx)
                                    && (2..CELL_H - 2).contains(&dy)
                            }
                        },
                    };
                    let c = if on { cell.fg } else { cell.bg };
                    img.put_pixel(x0 + dx, y0 + dy, Rgb(c));
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_and_half_blocks_come_out_exactly() {
        let text = "\x1b[38;2;255;0;0m\x1b[48;2;0;0;255m▀\x1b[0mA\x1b[7mB\x1b[38;5;196m\n";
        let grid = parse(text, 4, 2);
        assert_eq!(grid[0][0].fg, [255, 0, 0]);
        assert_eq!(grid[0][0].bg, [0, 0, 255]);
        assert_eq!(grid[0][1].fg, DEFAULT_FG);
        // Reverse video swaps the colours.
        assert_eq!((grid[0][2].fg, grid[0][2].bg), (DEFAULT_BG, DEFAULT_FG));
        assert_eq!(palette(196), [255, 0, 0]);
        let img = render(&grid);
        assert_eq!(img.dimensions(), (4 * CELL_W, 2 * CELL_H));
        // The half block: red on top, blue below.
        assert_eq!(img.get_pixel(3, 2).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(3, CELL_H - 2).0, [0, 0, 255]);
        // The letter has foreground pixels.
        let a_on = (0..CELL_H)
            .flat_map(|y| (0..CELL_W).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(CELL_W + x, y).0 == DEFAULT_FG)
            .count();
        assert!(a_on > 10, "{a_on}");
    }
}
