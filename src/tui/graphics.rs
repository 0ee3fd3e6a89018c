//! Pictures through the terminal's own graphics protocol (kitty, sixel or iTerm2), where the
//! terminal has one, with `ratatui-image` doing the encoding and the cell bookkeeping; half blocks
//! ([`super::view::picture`]) everywhere else.
//!
//! What the terminal supports is found once at start-up ([`detect`], which asks the terminal
//! with escape sequences unless `[tui] graphics` names a protocol) and kept in the state as plain
//! data ([`Graphics`]), so rendering stays a function of the state: [`render`] encodes a picture
//! for a given area and protocol, and memoises the encoding only to save time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::widgets::Widget;
use ratatui_image::picker::{Picker, ProtocolType};
use ratatui_image::protocol::Protocol;
use ratatui_image::{Image, Resize};
use serde::{Deserialize, Serialize};

use super::state::Picture;

/// `[tui] graphics`: how pictures are drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphicsSetting {
    /// Ask the terminal; half blocks when it offers no graphics protocol.
    #[default]
    Auto,
    /// Half blocks always (any terminal, and `tmux capture-pane` shows them).
    Halfblocks,
    /// The kitty graphics protocol (kitty, WezTerm, Ghostty, Konsole).
    Kitty,
    /// Sixel (xterm -ti vt340, foot, mlterm, WezTerm, Windows Terminal).
    Sixel,
    /// iTerm2's inline images (iTerm2, WezTerm).
    Iterm2,
}

impl std::str::FromStr for GraphicsSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "halfblocks" => Ok(Self::Halfblocks),
            "kitty" => Ok(Self::Kitty),
            "sixel" => Ok(Self::Sixel),
            "iterm2" => Ok(Self::Iterm2),
            other => Err(format!(
                "unknown graphics setting {other:?} (auto, halfblocks, kitty, sixel or iterm2)"
            )),
        }
    }
}

/// A terminal graphics protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GraphicsProtocol {
    /// The kitty graphics protocol.
    Kitty,
    /// Sixel.
    Sixel,
    /// iTerm2 inline images.
    Iterm2,
}

impl GraphicsProtocol {
    /// The name shown in the status bar.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kitty => "kitty",
            Self::Sixel => "sixel",
            Self::Iterm2 => "iTerm2",
        }
    }

    fn protocol_type(self) -> ProtocolType {
        match self {
            Self::Kitty => ProtocolType::Kitty,
            Self::Sixel => ProtocolType::Sixel,
            Self::Iterm2 => ProtocolType::Iterm2,
        }
    }
}

/// How pictures are drawn when not with half blocks: the protocol and the terminal's cell size
/// in pixels (needed to size the encoded image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Graphics {
    /// The protocol.
    pub protocol: GraphicsProtocol,
    /// One cell's size in pixels (width, height).
    pub cell: (u16, u16),
    /// Running inside tmux (the escape sequences are wrapped for passthrough).
    pub tmux: bool,
}

/// A cell size for terminals that do not report theirs (roughly 1:2, like most fonts).
const FALLBACK_CELL: (u16, u16) = (10, 20);

/// Decide how to draw pictures. `Auto` asks the terminal (escape sequences on stdin/stdout, at
/// most about a second; call it after the terminal is in raw mode and before reading events),
/// except inside tmux or screen, where it picks half blocks;
/// a named protocol is used as told, with the cell size asked for when the terminal answers.
/// `None`: half blocks.
pub fn detect(setting: GraphicsSetting) -> Option<Graphics> {
    let forced = match setting {
        GraphicsSetting::Halfblocks => return None,
        GraphicsSetting::Auto if in_multiplexer() => {
            // Inside tmux/screen the answer would have to come from the outer terminal through
            // passthrough; a detached or non-passing session never answers, and a late answer
            // would be read as key presses. Half blocks are always right there.
            tracing::info!("in a terminal multiplexer: pictures as half blocks");
            return None;
        }
        GraphicsSetting::Auto => None,
        GraphicsSetting::Kitty => Some(GraphicsProtocol::Kitty),
        GraphicsSetting::Sixel => Some(GraphicsProtocol::Sixel),
        GraphicsSetting::Iterm2 => Some(GraphicsProtocol::Iterm2),
    };
    let picker = match Picker::from_query_stdio() {
        Ok(p) => p,
        Err(e) => {
            tracing::info!("the terminal did not say what graphics it supports: {e}");
            Picker::from_fontsize(FALLBACK_CELL)
        }
    };
    let found = match picker.protocol_type() {
        ProtocolType::Halfblocks => None,
        ProtocolType::Kitty => Some(GraphicsProtocol::Kitty),
        ProtocolType::Sixel => Some(GraphicsProtocol::Sixel),
        ProtocolType::Iterm2 => Some(GraphicsProtocol::Iterm2),
    };
    let protocol = forced.or(found)?;
    let (w, h) = picker.font_size();
    let cell = if w > 0 && h > 0 {
        (w, h)
    } else {
        FALLBACK_CELL
    };
    let tmux = std::env::var_os("TMUX").is_some_and(|v| !v.is_empty());
    tracing::info!(
        "pictures through the {} protocol, cells of {}×{} px",
        protocol.name(),
        cell.0,
        cell.1
    );
    Some(Graphics {
        protocol,
        cell,
        tmux,
    })
}

/// Whether we run inside tmux or GNU screen.
fn in_multiplexer() -> bool {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let term = std::env::var("TERM").unwrap_or_default();
    set("TMUX") || set("STY") || term.starts_with("screen") || term.starts_with("tmux")
}

/// Encoded pictures kept between frames (at most this many).
const CACHE_ENTRIES: usize = 32;

thread_local! {
    static ENCODED: RefCell<HashMap<u64, Protocol>> = RefCell::new(HashMap::new());
}

fn cache_key(g: &Graphics, p: &Picture, area: Rect) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    g.hash(&mut h);
    (area.width, area.height).hash(&mut h);
    p.hash(&mut h);
    h.finish()
}

/// Draw `p` into `area` with the protocol of `g`, scaled to fit with its aspect ratio kept.
/// Returns `false` when the picture cannot be encoded (the caller then draws half blocks).
pub fn render(g: &Graphics, p: &Picture, area: Rect, buf: &mut Buffer) -> bool {
    if area.width == 0 || area.height == 0 {
        return true;
    }
    let key = cache_key(g, p, area);
    ENCODED.with(|cache| {
        let mut cache = cache.borrow_mut();
        if !cache.contains_key(&key) {
            let Some(encoded) = encode(g, p, area) else {
                return false;
            };
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, encoded);
        }
        match cache.get(&key) {
            Some(encoded) => {
                Image::new(encoded).render(area, buf);
                true
            }
            None => false,
        }
    })
}

fn encode(g: &Graphics, p: &Picture, area: Rect) -> Option<Protocol> {
    let rgb = image::RgbImage::from_raw(p.width, p.height, p.rgb.clone())?;
    let mut picker = Picker::from_fontsize(g.cell);
    picker.set_protocol_type(g.protocol.protocol_type());
    match picker.new_protocol(image::DynamicImage::ImageRgb8(rgb), area, Resize::Fit(None)) {
        Ok(encoded) => Some(encoded),
        Err(e) => {
            tracing::warn!("cannot encode a picture for {}: {e}", g.protocol.name());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picture() -> Picture {
        Picture {
            width: 4,
            height: 4,
            rgb: (0..48).map(|i| (i * 5) as u8).collect(),
        }
    }

    #[test]
    fn settings_parse_and_name_the_choices() {
        assert_eq!(
            "Kitty".parse::<GraphicsSetting>(),
            Ok(GraphicsSetting::Kitty)
        );
        assert_eq!(
            "halfblocks".parse::<GraphicsSetting>(),
            Ok(GraphicsSetting::Halfblocks)
        );
        let e = "png".parse::<GraphicsSetting>().unwrap_err();
        assert!(
            e.contains("auto, halfblocks, kitty, sixel or iterm2"),
            "{e}"
        );
        assert_eq!(detect(GraphicsSetting::Halfblocks), None);
    }

    #[test]
    fn each_protocol_writes_its_escape_sequence_into_the_buffer() {
        for (protocol, marker) in [
            (GraphicsProtocol::Kitty, "\x1b_G"),
            (GraphicsProtocol::Sixel, "\x1bP"),
            (GraphicsProtocol::Iterm2, "\x1b]1337;File="),
        ] {
            let g = Graphics {
                protocol,
                cell: (8, 16),
                tmux: false,
            };
            let area = Rect::new(0, 0, 6, 3);
            let mut buf = Buffer::empty(area);
            assert!(render(&g, &picture(), area, &mut buf));
            let all: String = buf.content().iter().map(|c| c.symbol()).collect();
            assert!(all.contains(marker), "{protocol:?}: {all:?}");
            // Rendering again (from the cache) draws the same cells.
            let mut again = Buffer::empty(area);
            assert!(render(&g, &picture(), area, &mut again));
            if protocol != GraphicsProtocol::Kitty {
                // (kitty transmits the image once, then only places it)
                assert_eq!(buf, again, "{protocol:?}");
            }
        }
    }

    #[test]
    fn a_picture_whose_pixels_do_not_match_its_size_is_refused() {
        let bad = Picture {
            width: 10,
            height: 10,
            rgb: vec![0; 5],
        };
        let g = Graphics {
            protocol: GraphicsProtocol::Sixel,
            cell: (8, 16),
            tmux: false,
        };
        let area = Rect::new(0, 0, 4, 2);
        assert!(!render(&g, &bad, area, &mut Buffer::empty(area)));
    }
}
