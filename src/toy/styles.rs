//! Style transforms of the synthetic world: exact, deterministic functions of an image (and a
//! seed, for the random ones), never shown to the base model, so the benchmark knows the true
//! stylisation `T(x)` of any output `x`.
//!
//! They cover three kinds, as Pair Customization's styles do: pixel-wise (invert, sepia,
//! posterise), local (pixelate, outline, blur) and texture (hatch, grain).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::image_io::RgbImage;
use crate::error::{Error, Result};

/// One style transform; [`StyleKind::apply`] computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StyleKind {
    /// Pixel-wise: every channel `c` becomes `255 - c`.
    Invert,
    /// Pixel-wise: the classic sepia colour matrix (a palette map to brown tones).
    Sepia,
    /// Pixel-wise: each channel quantised to 4 levels (0, 85, 170, 255).
    Posterise,
    /// Local: each 8 × 8 block replaced by its mean colour.
    Pixelate,
    /// Local: edges between regions of different colour drawn dark on white, nothing else.
    Outline,
    /// Local: 5 × 5 box blur (separable, edges clamped).
    Blur,
    /// Texture: dark diagonal lines across every non-background pixel (background = most
    /// frequent colour).
    Hatch,
    /// Texture: seeded monochrome noise grain, ±40 per pixel.
    Grain,
}

impl StyleKind {
    /// Every style, in a fixed order.
    pub const ALL: &'static [StyleKind] = &[
        StyleKind::Invert,
        StyleKind::Sepia,
        StyleKind::Posterise,
        StyleKind::Pixelate,
        StyleKind::Outline,
        StyleKind::Blur,
        StyleKind::Hatch,
        StyleKind::Grain,
    ];

    /// The style's name on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            StyleKind::Invert => "invert",
            StyleKind::Sepia => "sepia",
            StyleKind::Posterise => "posterise",
            StyleKind::Pixelate => "pixelate",
            StyleKind::Outline => "outline",
            StyleKind::Blur => "blur",
            StyleKind::Hatch => "hatch",
            StyleKind::Grain => "grain",
        }
    }

    /// Apply the style to `img`. Deterministic: the same image and seed always give the same
    /// pixels; only [`StyleKind::Grain`] uses the seed.
    pub fn apply(self, img: &RgbImage, seed: u64) -> RgbImage {
        match self {
            StyleKind::Invert => map_pixels(img, |p| [255 - p[0], 255 - p[1], 255 - p[2]]),
            StyleKind::Sepia => map_pixels(img, sepia),
            StyleKind::Posterise => map_pixels(img, |p| p.map(|c| (c / 64) * 85)),
            StyleKind::Pixelate => pixelate(img, 8),
            StyleKind::Outline => outline(img),
            StyleKind::Blur => box_blur(img, 2),
            StyleKind::Hatch => hatch(img),
            StyleKind::Grain => grain(img, seed),
        }
    }
}

impl fmt::Display for StyleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StyleKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let lower = if lower == "posterize" {
            "posterise".to_string()
        } else {
            lower
        };
        StyleKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == lower)
            .ok_or_else(|| {
                let names: Vec<&str> = StyleKind::ALL.iter().map(|k| k.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown style {s:?}: expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

fn map_pixels(img: &RgbImage, f: impl Fn([u8; 3]) -> [u8; 3]) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        p.0 = f(p.0);
    }
    out
}

fn sepia(p: [u8; 3]) -> [u8; 3] {
    let [r, g, b] = p.map(f64::from);
    let c = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    [
        c(0.393 * r + 0.769 * g + 0.189 * b),
        c(0.349 * r + 0.686 * g + 0.168 * b),
        c(0.272 * r + 0.534 * g + 0.131 * b),
    ]
}

fn pixelate(img: &RgbImage, block: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = img.clone();
    for by in (0..h).step_by(block as usize) {
        for bx in (0..w).step_by(block as usize) {
            let (x1, y1) = ((bx + block).min(w), (by + block).min(h));
            let mut sum = [0u64; 3];
            for y in by..y1 {
                for x in bx..x1 {
                    let p = img.get_pixel(x, y).0;
                    for k in 0..3 {
                        sum[k] += p[k] as u64;
                    }
                }
            }
            let n = ((x1 - bx) * (y1 - by)) as u64;
            let mean = image::Rgb(sum.map(|s| ((s + n / 2) / n) as u8));
            for y in by..y1 {
                for x in bx..x1 {
                    out.put_pixel(x, y, mean);
                }
            }
        }
    }
    out
}

fn outline(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for y in 0..h {
        for x in 0..w {
            let p = img.get_pixel(x, y);
            let edge = (x + 1 < w && img.get_pixel(x + 1, y) != p)
                || (y + 1 < h && img.get_pixel(x, y + 1) != p)
                || (x > 0 && img.get_pixel(x - 1, y) != p)
                || (y > 0 && img.get_pixel(x, y - 1) != p);
            if edge {
                out.put_pixel(x, y, image::Rgb([20, 20, 20]));
            }
        }
    }
    out
}

fn box_blur(img: &RgbImage, radius: i64) -> RgbImage {
    let (w, h) = img.dimensions();
    let n = (2 * radius + 1) as u32;
    let pass = |src: &RgbImage, horizontal: bool| {
        let mut dst = src.clone();
        for y in 0..h {
            for x in 0..w {
                let mut sum = [0u32; 3];
                for d in -radius..=radius {
                    let (sx, sy) = if horizontal {
                        ((x as i64 + d).clamp(0, w as i64 - 1) as u32, y)
                    } else {
                        (x, (y as i64 + d).clamp(0, h as i64 - 1) as u32)
                    };
                    let p = src.get_pixel(sx, sy).0;
                    for k in 0..3 {
                        sum[k] += p[k] as u32;
                    }
                }
                dst.put_pixel(x, y, image::Rgb(sum.map(|s| ((s + n / 2) / n) as u8)));
            }
        }
        dst
    };
    pass(&pass(img, true), false)
}

/// The most frequent colour (ties: the smallest RGB value), taken as the background.
fn dominant_colour(img: &RgbImage) -> [u8; 3] {
    let mut counts: BTreeMap<[u8; 3], usize> = BTreeMap::new();
    for p in img.pixels() {
        *counts.entry(p.0).or_default() += 1;
    }
    let mut best = ([0u8; 3], 0usize);
    for (c, n) in counts {
        if n > best.1 {
            best = (c, n);
        }
    }
    best.0
}

fn hatch(img: &RgbImage) -> RgbImage {
    let bg = dominant_colour(img);
    let mut out = img.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        if p.0 != bg && (x + y) % 6 < 2 {
            p.0 = p.0.map(|c| ((c as u32 * 35 + 50) / 100) as u8);
        }
    }
    out
}

fn grain(img: &RgbImage, seed: u64) -> RgbImage {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let d: i16 = rng.random_range(-40..=40);
        p.0 = p.0.map(|c| (c as i16 + d).clamp(0, 255) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy::world::Scene;

    fn scene_image() -> RgbImage {
        Scene::parse(
            "a large red star on the left and a small blue circle at the top right, \
             on a grey background",
        )
        .unwrap()
        .render(64)
        .unwrap()
    }

    #[test]
    fn every_style_changes_and_is_deterministic() {
        let img = scene_image();
        for &s in StyleKind::ALL {
            let a = s.apply(&img, 9);
            let b = s.apply(&img, 9);
            assert_eq!(a.dimensions(), img.dimensions(), "{s}");
            assert_eq!(a.as_raw(), b.as_raw(), "{s} is not deterministic");
            assert_ne!(a.as_raw(), img.as_raw(), "{s} left the image unchanged");
        }
    }

    #[test]
    fn styles_differ_from_each_other() {
        let img = scene_image();
        let outs: Vec<RgbImage> = StyleKind::ALL.iter().map(|s| s.apply(&img, 1)).collect();
        for i in 0..outs.len() {
            for j in i + 1..outs.len() {
                assert_ne!(outs[i].as_raw(), outs[j].as_raw());
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for &s in StyleKind::ALL {
            assert_eq!(s.to_string().parse::<StyleKind>().unwrap(), s);
        }
        assert_eq!(
            "Posterize".parse::<StyleKind>().unwrap(),
            StyleKind::Posterise
        );
        let e = "watercolour".parse::<StyleKind>().unwrap_err().to_string();
        assert!(e.contains("watercolour") && e.contains("invert"), "{e}");
    }

    #[test]
    fn exact_values() {
        let img = scene_image();
        let bg = img.get_pixel(0, 0).0;
        assert_eq!(bg, [128, 128, 128]);
        assert_eq!(StyleKind::Invert.apply(&img, 0).get_pixel(0, 0).0, [127; 3]);
        assert_eq!(
            StyleKind::Posterise.apply(&img, 0).get_pixel(0, 0).0,
            [170; 3]
        );
        // Outline: a uniform corner is white, the star's edge is dark.
        let o = StyleKind::Outline.apply(&img, 0);
        assert_eq!(o.get_pixel(0, 0).0, [255; 3]);
        assert!(o.pixels().any(|p| p.0 == [20; 3]));
        // Hatch leaves the background alone.
        let h = StyleKind::Hatch.apply(&img, 0);
        assert_eq!(h.get_pixel(0, 0).0, bg);
        // Grain depends on the seed.
        assert_ne!(
            StyleKind::Grain.apply(&img, 1).as_raw(),
            StyleKind::Grain.apply(&img, 2).as_raw()
        );
        // Pixelate: each 8 × 8 block is uniform.
        let p = StyleKind::Pixelate.apply(&img, 0);
        for (x, y, px) in p.enumerate_pixels() {
            assert_eq!(px, p.get_pixel(x / 8 * 8, y / 8 * 8));
        }
    }
}
