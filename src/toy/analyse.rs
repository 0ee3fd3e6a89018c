//! A deterministic analyser of the synthetic world: recovers a scene's background and objects
//! (colour, shape, size, grid position) from an RGB image, and scores the result against the
//! expected [`Scene`].
//!
//! It measures the toy model's outputs (noisy, slightly blurry, colours a little off), so it
//! never assumes exact pixels:
//! 1. **Background**: every pixel votes for its nearest background colour (CIELAB ΔE); the
//!    majority wins, and the per-channel median of its voters is the *observed* background.
//! 2. **Labels**: a pixel farther than a threshold from the observed background is foreground;
//!    it is labelled with the palette colour whose segment "observed background → colour" its
//!    3 × 3 mean lies closest to in RGB (a blurred edge is a mix of the two, so it keeps its
//!    object's label), or left unlabelled when no segment is near.
//! 3. **Components**: 8-connected regions of one label; touching regions whose colours match
//!    the same palette colour are merged (noise splits labels), and regions below a
//!    resolution-scaled size ([`MIN_COMPONENT_FRACTION`]) are noise. A region's colour is the
//!    mean of its most saturated pixels, matched to the palette by ΔE along the background →
//!    colour segments (a faded colour still matches) and rejected (`None`) beyond
//!    [`COLOUR_REJECT_DELTA_E`]; a region whose pixels scatter widely around that mean
//!    ([`MAX_COLOUR_SPREAD`], random noise) is no object.
//! 4. **Shape and size**: each region's coverage (how far each pixel lies from the background
//!    towards the region's colour) is compared by IoU with exact templates drawn by the
//!    world's own inside rule ([`ShapeKind::contains`]), at both nominal sizes and at the size
//!    its area implies, around its centroid and the nearby cell centre, then refined by a local
//!    search of centre and half-extent; the best IoU wins and is the detection's confidence. A
//!    crisp region is compared as its half-maximum mask; a blurred one (most pixels along its
//!    edge part-way) as soft coverage, against templates under a box blur whose width is
//!    fitted too. The fitted half-extent gives the size and the fitted centre the grid cell.
//!    Fits below [`MIN_CONFIDENCE`] are dropped; a region that fits badly and spans several
//!    grid cells (two objects of one colour joined by blur) is split by cell when that fits
//!    better.
//!
//! Everything scales with the resolution; images that are not square, smaller than
//! [`MIN_RESOLUTION`] or larger than [`MAX_ANALYSIS_SIDE`] are first resampled to a square
//! within those bounds. On clean renders it is exact (see [`accuracy_on_clean_renders`]). For
//! stylised images, [`Palette::styled`] maps the palette through a style first
//! ([`Analyser::for_style`]), which makes the pixel-wise styles invert and posterise analysable
//! too (not sepia, outline, pixelate or hatch, which merge colours or break shapes).
//!
//! Scoring: [`check_scene`] matches the expected objects to the detections (most agreeing
//! attributes, then nearest centre) and marks each attribute right or wrong (a missing object
//! is wrong on all); [`AttributeAccuracy`] accumulates those; [`leaks_reference`] tells whether
//! an output copied a reference scene's (shape, colour) instead of the prompt's.

use std::fmt;
use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::engine::image_io::RgbImage;
use crate::error::Result;
use crate::toy::styles::StyleKind;
use crate::toy::world::{
    Background, Colour, Object, Position, Scene, ShapeKind, Size, MIN_RESOLUTION,
};

/// Images are analysed at most this many pixels across (larger ones are resampled first), which
/// bounds the time and memory one analysis takes.
pub const MAX_ANALYSIS_SIDE: u32 = 512;

/// Detections whose best template IoU is below this are not reported (they are not shapes).
pub const MIN_CONFIDENCE: f64 = 0.35;

/// A detection whose colour is farther than this (CIELAB ΔE, along the background → colour
/// segment) from every palette colour gets no colour.
pub const COLOUR_REJECT_DELTA_E: f64 = 32.0;

/// Components whose most saturated pixels lie farther than this from their mean colour (mean
/// RGB distance) are not objects: a painted shape stays within a few units, a noisy one within
/// about 45 (±40 grain), a patch of random noise is near 100 or more.
pub const MAX_COLOUR_SPREAD: f64 = 64.0;

/// Components smaller than this fraction of the image area are noise (20 pixels at 64 × 64,
/// half the 41 of the smallest shape, a small star).
pub const MIN_COMPONENT_FRACTION: f64 = 0.005;

/// The largest side analysed at full detail: above it the template IoU is evaluated on a
/// regular sub-grid of pixels (every `side / 96`-th), which keeps big images fast.
const FULL_DETAIL_SIDE: u32 = 96;

/// A pixel farther than this (RGB) from every background → colour segment stays unlabelled.
const LABEL_RESIDUAL_RGB: f32 = 75.0;

/// Per-pixel sentinel: background or unlabelled.
const NO_LABEL: u8 = u8::MAX;

/// An object is fitted against its soft coverage with blurred templates when at least this
/// fraction of the pixels along its mask's edge are part-way between background and colour.
const SOFT_EDGE_RATIO: f64 = 0.35;

// ---------------------------------------------------------------------------------------------
// Colour science
// ---------------------------------------------------------------------------------------------

/// sRGB byte → linear light, tabulated once.
fn srgb_to_linear_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (i, v) in t.iter_mut().enumerate() {
            let c = i as f64 / 255.0;
            let lin = if c <= 0.04045 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            };
            *v = lin as f32;
        }
        t
    })
}

/// CIELAB (D65) of an sRGB colour given as floats in 0..=255 (clamped).
fn lab_f(rgb: [f32; 3]) -> [f32; 3] {
    let table = srgb_to_linear_table();
    let lin = |c: f32| {
        // Interpolate the table so off-grid (averaged) colours convert smoothly.
        let c = c.clamp(0.0, 255.0);
        let i = (c as usize).min(254);
        let f = c - i as f32;
        table[i] * (1.0 - f) + table[i + 1] * f
    };
    lab_linear([lin(rgb[0]), lin(rgb[1]), lin(rgb[2])])
}

/// CIELAB (D65) of an 8-bit sRGB colour.
fn lab_u8(rgb: [u8; 3]) -> [f32; 3] {
    let table = srgb_to_linear_table();
    lab_linear([
        table[rgb[0] as usize],
        table[rgb[1] as usize],
        table[rgb[2] as usize],
    ])
}

fn lab_linear([r, g, b]: [f32; 3]) -> [f32; 3] {
    let x = (0.412_456_4 * r + 0.357_576_1 * g + 0.180_437_5 * b) / 0.950_47;
    let y = 0.212_672_9 * r + 0.715_152_2 * g + 0.072_175 * b;
    let z = (0.019_333_9 * r + 0.119_192 * g + 0.950_304_1 * b) / 1.088_83;
    let f = |t: f32| {
        if t > 0.008_856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// CIE76 colour difference ΔE between two CIELAB colours.
fn delta_e(a: [f32; 3], b: [f32; 3]) -> f32 {
    let d = [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt()
}

fn to_f(rgb: [u8; 3]) -> [f32; 3] {
    rgb.map(f32::from)
}

/// Position `alpha` ∈ (-∞, ∞) of `p` along the segment `from → to` (0 at `from`, 1 at `to`)
/// and the RGB distance of `p` from the line there.
fn along(p: [f32; 3], from: [f32; 3], to: [f32; 3]) -> (f32, f32) {
    let d = [to[0] - from[0], to[1] - from[1], to[2] - from[2]];
    let q = [p[0] - from[0], p[1] - from[1], p[2] - from[2]];
    let dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    if dd <= f32::EPSILON {
        let r = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt();
        return (0.0, r);
    }
    let a = (q[0] * d[0] + q[1] * d[1] + q[2] * d[2]) / dd;
    let e = [q[0] - a * d[0], q[1] - a * d[1], q[2] - a * d[2]];
    (a, (e[0] * e[0] + e[1] * e[1] + e[2] * e[2]).sqrt())
}

// ---------------------------------------------------------------------------------------------
// Palette
// ---------------------------------------------------------------------------------------------

/// The RGB values the analyser expects for each [`Colour`] and [`Background`]: the world's own
/// ([`Palette::world`]) or those values passed through a style ([`Palette::styled`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Palette {
    colours: Vec<[u8; 3]>,
    backgrounds: Vec<[u8; 3]>,
}

impl Default for Palette {
    fn default() -> Self {
        Palette::world()
    }
}

impl Palette {
    /// The world's exact colours ([`Colour::rgb`], [`Background::rgb`]).
    pub fn world() -> Palette {
        Palette {
            colours: Colour::ALL.iter().map(|c| c.rgb()).collect(),
            backgrounds: Background::ALL.iter().map(|b| b.rgb()).collect(),
        }
    }

    /// The world's colours as `style` paints them: each is applied to a uniform 16 × 16 patch
    /// and the per-channel median of the result is kept. Exact for the pixel-wise styles
    /// (invert, sepia, posterise); the identity for blur, pixelate and hatch (which keep a
    /// uniform patch); grain's median is within a unit or two of the colour. Outline paints
    /// every uniform patch white, so its palette is degenerate, and sepia maps every colour to
    /// a brown of some lightness (see [`Palette::min_separation`]).
    pub fn styled(style: StyleKind) -> Palette {
        let map = |rgb: [u8; 3]| {
            let patch = RgbImage::from_pixel(16, 16, image::Rgb(rgb));
            let out = style.apply(&patch, 0);
            let mut chans: [Vec<u8>; 3] = [Vec::new(), Vec::new(), Vec::new()];
            for p in out.pixels() {
                for (k, c) in chans.iter_mut().enumerate() {
                    c.push(p.0[k]);
                }
            }
            chans.map(|mut c| {
                c.sort_unstable();
                c.get(c.len() / 2).copied().unwrap_or(0)
            })
        };
        Palette {
            colours: Colour::ALL.iter().map(|c| map(c.rgb())).collect(),
            backgrounds: Background::ALL.iter().map(|b| map(b.rgb())).collect(),
        }
    }

    /// The RGB value expected for `colour`.
    pub fn colour_rgb(&self, colour: Colour) -> [u8; 3] {
        let i = Colour::ALL.iter().position(|c| *c == colour).unwrap_or(0);
        self.colours.get(i).copied().unwrap_or(colour.rgb())
    }

    /// The RGB value expected for `background`.
    pub fn background_rgb(&self, background: Background) -> [u8; 3] {
        let i = Background::ALL
            .iter()
            .position(|b| *b == background)
            .unwrap_or(0);
        self.backgrounds.get(i).copied().unwrap_or(background.rgb())
    }

    /// The smallest CIELAB ΔE between two entries of the palette (colours and backgrounds
    /// together): below about 15 the analyser cannot reliably tell them apart (e.g. sepia,
    /// which maps every colour to a brown of some lightness, and outline).
    pub fn min_separation(&self) -> f64 {
        let all: Vec<[f32; 3]> = self
            .colours
            .iter()
            .chain(self.backgrounds.iter())
            .map(|c| lab_u8(*c))
            .collect();
        let mut min = f32::INFINITY;
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                min = min.min(delta_e(all[i], all[j]));
            }
        }
        f64::from(min)
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// One object found in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Nearest palette colour, or `None` when the observed colour is farther than
    /// [`COLOUR_REJECT_DELTA_E`] from all of them.
    pub colour: Option<Colour>,
    /// The shape whose template fits the mask best.
    pub shape: ShapeKind,
    /// Small or large, from the fitted half-extent.
    pub size: Size,
    /// The grid cell of the fitted centre.
    pub position: Position,
    /// Template IoU of the best fit, in 0..=1 (1 for an exact render).
    pub confidence: f64,
    /// Pixels in the object's mask (in the analysed image).
    pub pixels: usize,
    /// Fitted centre `(x, y)` in pixels of the input image.
    pub centre: (f64, f64),
    /// Fitted half-extent as a fraction of the image side (0.09 small, 0.15 large).
    pub half_extent: f64,
    /// Mean observed colour of the object's most saturated pixels.
    pub rgb: [u8; 3],
    /// ΔE (along the background → colour segment) to the chosen palette colour.
    pub colour_distance: f64,
    /// Mean RGB distance of those most saturated pixels from their mean: a few units for a
    /// painted shape, tens for a noisy one, near 100 for a patch of random noise.
    pub colour_spread: f64,
}

impl Detection {
    /// The detection as a world object, when it has a colour.
    pub fn as_object(&self) -> Option<Object> {
        Some(Object {
            shape: self.shape,
            colour: self.colour?,
            size: self.size,
            position: self.position,
        })
    }
}

/// What [`analyse`] found in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// Width of the input image in pixels.
    pub width: u32,
    /// Height of the input image in pixels.
    pub height: u32,
    /// The background colour most pixels are nearest to.
    pub background: Background,
    /// The observed background colour (per-channel median of the pixels that voted for it).
    pub background_rgb: [u8; 3],
    /// Fraction of pixels within ΔE 20 of the nominal background: near 1 minus the objects'
    /// area for a real scene, low for a garbage image.
    pub background_fraction: f64,
    /// Detected objects, largest first.
    pub objects: Vec<Detection>,
}

impl Analysis {
    /// Detections with at least the given confidence.
    pub fn confident(&self, min_confidence: f64) -> impl Iterator<Item = &Detection> {
        self.objects
            .iter()
            .filter(move |d| d.confidence >= min_confidence)
    }

    /// The analysis read back as a scene: the most confident coloured detection, plus the next
    /// one in another cell if any (in reading order of their cells). `None` when no detection
    /// has a colour. Useful to compare two images (e.g. an output and its exact stylisation).
    pub fn to_scene(&self) -> Option<Scene> {
        let mut objs: Vec<(f64, Object)> = self
            .objects
            .iter()
            .filter_map(|d| d.as_object().map(|o| (d.confidence, o)))
            .collect();
        objs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let first = objs.first()?.1;
        let mut chosen = vec![first];
        if let Some((_, second)) = objs.iter().find(|(_, o)| o.position != first.position) {
            chosen.push(*second);
        }
        chosen.sort_by_key(|o| o.position);
        Scene::new(chosen, self.background).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// The analyser
// ---------------------------------------------------------------------------------------------

/// A configured analyser: the palette it expects (the world's, or passed through a style).
#[derive(Debug, Clone, Default)]
pub struct Analyser {
    palette: Palette,
}

/// Analyse `img` with the world's own palette; see the module documentation.
pub fn analyse(img: &RgbImage) -> Analysis {
    Analyser::default().analyse(img)
}

impl Analyser {
    /// An analyser expecting the colours of `palette`.
    pub fn new(palette: Palette) -> Analyser {
        Analyser { palette }
    }

    /// An analyser for images painted in `style` (its palette is [`Palette::styled`]).
    pub fn for_style(style: StyleKind) -> Analyser {
        Analyser::new(Palette::styled(style))
    }

    /// The palette this analyser expects.
    pub fn palette(&self) -> &Palette {
        &self.palette
    }

    /// Analyse one image of any size. Never panics: an empty image gives no objects and a
    /// background fraction of 0.
    pub fn analyse(&self, img: &RgbImage) -> Analysis {
        let (width, height) = img.dimensions();
        if width == 0 || height == 0 {
            return Analysis {
                width,
                height,
                background: Background::Grey,
                background_rgb: Background::Grey.rgb(),
                background_fraction: 0.0,
                objects: Vec::new(),
            };
        }
        let side = width.max(height).clamp(MIN_RESOLUTION, MAX_ANALYSIS_SIDE);
        let resampled;
        let work: &RgbImage = if width == side && height == side {
            img
        } else {
            resampled =
                image::imageops::resize(img, side, side, image::imageops::FilterType::Triangle);
            &resampled
        };
        let mut analysis = self.analyse_square(work);
        let (sx, sy) = (
            f64::from(width) / f64::from(side),
            f64::from(height) / f64::from(side),
        );
        for d in &mut analysis.objects {
            d.centre = (d.centre.0 * sx, d.centre.1 * sy);
        }
        analysis.width = width;
        analysis.height = height;
        analysis
    }

    fn analyse_square(&self, img: &RgbImage) -> Analysis {
        let side = img.width() as usize;
        let n = side * side;
        let raw = img.as_raw();
        let px = |i: usize| -> [u8; 3] {
            match raw.get(3 * i..3 * i + 3) {
                Some(s) => [s[0], s[1], s[2]],
                None => [0, 0, 0],
            }
        };
        let labs: Vec<[f32; 3]> = (0..n).map(|i| lab_u8(px(i))).collect();

        // 1. Background: nearest background (ΔE) by majority; observed = median of voters.
        let bg_lab: Vec<[f32; 3]> = self
            .palette
            .backgrounds
            .iter()
            .map(|b| lab_u8(*b))
            .collect();
        let nearest_bg: Vec<usize> = labs
            .iter()
            .map(|l| {
                let d = |k: &usize| bg_lab.get(*k).map_or(f32::INFINITY, |b| delta_e(*l, *b));
                (0..bg_lab.len())
                    .min_by(|a, b| d(a).total_cmp(&d(b)))
                    .unwrap_or(0)
            })
            .collect();
        let mut votes = vec![0usize; bg_lab.len()];
        for &k in &nearest_bg {
            votes[k] += 1;
        }
        let bg_index = votes
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(k, _)| k);
        let background = Background::ALL
            .get(bg_index)
            .copied()
            .unwrap_or(Background::Grey);
        let mut hist = [[0usize; 256]; 3];
        for (i, &k) in nearest_bg.iter().enumerate() {
            if k == bg_index {
                for (h, c) in hist.iter_mut().zip(px(i)) {
                    h[c as usize] += 1;
                }
            }
        }
        let voters = votes.get(bg_index).copied().unwrap_or(0);
        let bg_obs: [u8; 3] = std::array::from_fn(|k| median_of_histogram(&hist[k], voters));
        let bg_obs_lab = lab_u8(bg_obs);
        let bg_nominal_lab = bg_lab.get(bg_index).copied().unwrap_or(bg_obs_lab);
        let near_nominal = labs
            .iter()
            .filter(|l| delta_e(**l, bg_nominal_lab) <= 20.0)
            .count();
        let background_fraction = near_nominal as f64 / n as f64;

        // 2. Labels. The foreground threshold lies well below the least contrasting colour.
        let mut frame = Frame {
            raw,
            side,
            bg_f: to_f(bg_obs),
            colour_labs: self.palette.colours.iter().map(|c| lab_u8(*c)).collect(),
            alphas: vec![0f32; n],
            min_px: ((MIN_COMPONENT_FRACTION * n as f64).round() as usize).max(6),
        };
        let min_contrast = frame
            .colour_labs
            .iter()
            .map(|c| delta_e(*c, bg_obs_lab))
            .fold(f32::INFINITY, f32::min);
        let fg_threshold = (0.4 * min_contrast).clamp(8.0, 20.0);
        let foreground: Vec<bool> = labs
            .iter()
            .map(|l| delta_e(*l, bg_obs_lab) > fg_threshold)
            .collect();
        let labels = self.label_pixels(&mut frame, &foreground);

        // 3. Components of one label, merged by colour, large enough not to be noise.
        let comps: Vec<Vec<usize>> = self
            .merge_same_colour(&frame, components(&labels, side))
            .into_iter()
            .filter(|c| c.len() >= frame.min_px)
            .collect();
        let mut owner = vec![u32::MAX; n];
        for (k, comp) in comps.iter().enumerate() {
            for &i in comp {
                owner[i] = k as u32;
            }
        }

        // 4. One object (or two, split) per component.
        let ctx = FitContext::new(side as u32);
        let mut marks = vec![0u32; n];
        let mut objects = Vec::new();
        for (k, comp) in comps.iter().enumerate() {
            objects.extend(self.detect(&frame, &ctx, &owner, k, comp, &mut marks));
        }
        objects.sort_by(|a, b| {
            b.pixels
                .cmp(&a.pixels)
                .then(a.centre.1.total_cmp(&b.centre.1))
                .then(a.centre.0.total_cmp(&b.centre.0))
        });
        Analysis {
            width: side as u32,
            height: side as u32,
            background,
            background_rgb: bg_obs,
            background_fraction,
            objects,
        }
    }

    /// Label each foreground pixel with the nearest background → colour segment of its 3 × 3
    /// mean (noise would otherwise scatter labels along an object's edge), recording how far
    /// along the segment it lies in `frame.alphas`.
    fn label_pixels(&self, frame: &mut Frame<'_>, foreground: &[bool]) -> Vec<u8> {
        let colours_f: Vec<[f32; 3]> = self.palette.colours.iter().map(|c| to_f(*c)).collect();
        let smooth = box3(frame.raw, frame.side);
        let mut labels = vec![NO_LABEL; foreground.len()];
        for (i, (&fg, p)) in foreground.iter().zip(&smooth).enumerate() {
            if !fg {
                continue;
            }
            let mut best = (NO_LABEL, f32::INFINITY, 0f32);
            for (k, c) in colours_f.iter().enumerate() {
                let (a, r) = along(*p, frame.bg_f, *c);
                if a > 0.15 && r < best.1 {
                    best = (k as u8, r, a);
                }
            }
            if best.1 <= LABEL_RESIDUAL_RGB {
                labels[i] = best.0;
                frame.alphas[i] = best.2;
            }
        }
        labels
    }

    /// The detections of component `k`: its colour, its mask, then the template fit (crisp or
    /// blurred). `marks` is per-image scratch space (the pixels of each component's mask).
    fn detect(
        &self,
        frame: &Frame<'_>,
        ctx: &FitContext,
        owner: &[u32],
        k: usize,
        comp: &[usize],
        marks: &mut [u32],
    ) -> Vec<Detection> {
        let s = frame.side;
        let Some(colour_fit) = self.fit_colour(frame, comp) else {
            return Vec::new();
        };
        if colour_fit.spread > MAX_COLOUR_SPREAD {
            return Vec::new();
        }
        // Coverage of a pixel by this object: how far it lies from the background towards
        // `reference` (0 for pixels of other components, or unclaimed ones off the segment).
        let own = k as u32;
        let coverage = |j: usize, reference: [f32; 3]| -> f32 {
            let o = owner.get(j).copied().unwrap_or(u32::MAX);
            if o != own && o != u32::MAX {
                return 0.0;
            }
            let (a, r) = along(to_f(frame.px(j)), frame.bg_f, reference);
            if o != own && r > LABEL_RESIDUAL_RGB {
                0.0
            } else {
                a.clamp(0.0, 1.0)
            }
        };
        let margin = ctx.margin();
        let (cx0, cy0, cx1, cy1) = bbox_of(comp, s);
        let (wx0, wy0) = (cx0.saturating_sub(margin), cy0.saturating_sub(margin));
        let (wx1, wy1) = ((cx1 + margin).min(s - 1), (cy1 + margin).min(s - 1));
        let (ww, wh) = (wx1 - wx0 + 1, wy1 - wy0 + 1);
        let in_window = |j: usize| -> Option<usize> {
            let (x, y) = (j % s, j / s);
            ((wx0..=wx1).contains(&x) && (wy0..=wy1).contains(&y))
                .then(|| (y - wy0) * ww + (x - wx0))
        };
        let fill = |reference: [f32; 3]| -> Vec<f32> {
            let mut buf = Vec::with_capacity(ww * wh);
            for y in wy0..=wy1 {
                for x in wx0..=wx1 {
                    buf.push(coverage(y * s + x, reference));
                }
            }
            buf
        };
        // Hard mask: the component and its unclaimed neighbours that are at least half-way to
        // the observed colour (the half-maximum edge).
        let observed = to_f(colour_fit.rgb);
        let cov_obs = fill(observed);
        let obs_at = |j: usize| match in_window(j) {
            Some(w) => cov_obs[w],
            None => coverage(j, observed),
        };
        let stamp = own + 1;
        let mut mask = Vec::with_capacity(comp.len() + comp.len() / 2);
        for &i in comp {
            let (x, y) = (i % s, i / s);
            for ny in y.saturating_sub(1)..=(y + 1).min(s - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(s - 1) {
                    let j = ny * s + nx;
                    if marks[j] != stamp && obs_at(j) >= 0.5 {
                        marks[j] = stamp;
                        mask.push(j);
                    }
                }
            }
        }
        mask.sort_unstable();
        if mask.len() < frame.min_px {
            return Vec::new();
        }
        // A blurred object (most pixels along the mask's edge part-way between background and
        // colour) is fitted with blurred templates against its soft coverage, measured against
        // its full colour (a small shape under blur never reaches it); a crisp one (noise only
        // touches a few edge pixels) with exact templates against its mask.
        let in_mask = |x: i64, y: i64| {
            x >= 0
                && y >= 0
                && (x as usize) < s
                && (y as usize) < s
                && marks[y as usize * s + x as usize] == stamp
        };
        let (mut band, mut soft) = (0usize, 0usize);
        for y in wy0..=wy1 {
            for x in wx0..=wx1 {
                let (xi, yi) = (x as i64, y as i64);
                let here = in_mask(xi, yi);
                let edge = [(0i64, 1i64), (1, 0), (0, -1), (-1, 0)]
                    .iter()
                    .any(|(dx, dy)| in_mask(xi + dx, yi + dy) != here);
                if edge {
                    band += 1;
                    let a = cov_obs[(y - wy0) * ww + (x - wx0)];
                    if a > 0.2 && a < 0.8 {
                        soft += 1;
                    }
                }
            }
        }
        let blurred = soft as f64 >= SOFT_EDGE_RATIO * band as f64;
        let window = (wx0, wy0, wx1, wy1);
        let fits = if blurred {
            let full = colour_fit.full;
            let cov_full = fill(full);
            let full_at = |j: usize| match in_window(j) {
                Some(w) => cov_full[w],
                None => coverage(j, full),
            };
            ctx.fit_or_split(&mask, window, &full_at, true, frame.min_px)
        } else {
            let hard = |j: usize| if marks[j] == stamp { 1.0 } else { 0.0 };
            ctx.fit_or_split(&mask, window, &hard, false, frame.min_px)
        };
        let side = s as f64;
        fits.into_iter()
            .filter(|(_, fit)| fit.iou >= MIN_CONFIDENCE)
            .map(|(pixels, fit)| Detection {
                colour: colour_fit.colour,
                shape: fit.shape,
                size: size_of(fit.r / side),
                position: position_of(fit.cx, fit.cy, side),
                confidence: fit.iou,
                pixels,
                centre: (fit.cx, fit.cy),
                half_extent: fit.r / side,
                rgb: colour_fit.rgb,
                colour_distance: colour_fit.distance,
                colour_spread: colour_fit.spread,
            })
            .collect()
    }

    /// Merge touching components whose colours match the same palette colour: noise can split
    /// one object's pixels between the labels of neighbouring colours.
    fn merge_same_colour(&self, frame: &Frame<'_>, comps: Vec<Vec<usize>>) -> Vec<Vec<usize>> {
        let side = frame.side;
        if comps.len() < 2 {
            return comps;
        }
        let colours: Vec<Option<Colour>> = comps
            .iter()
            .map(|c| {
                self.fit_colour(frame, c)
                    .filter(|f| f.spread <= MAX_COLOUR_SPREAD)
                    .and_then(|f| f.colour)
            })
            .collect();
        let mut owner = vec![u32::MAX; side * side];
        for (k, c) in comps.iter().enumerate() {
            for &i in c {
                if let Some(o) = owner.get_mut(i) {
                    *o = k as u32;
                }
            }
        }
        let mut parent: Vec<usize> = (0..comps.len()).collect();
        fn root(parent: &mut [usize], mut k: usize) -> usize {
            while parent[k] != k {
                parent[k] = parent[parent[k]];
                k = parent[k];
            }
            k
        }
        for (a, c) in comps.iter().enumerate() {
            let Some(colour) = colours[a] else {
                continue;
            };
            for &i in c {
                let (x, y) = (i % side, i / side);
                for ny in y.saturating_sub(1)..=(y + 1).min(side - 1) {
                    for nx in x.saturating_sub(1)..=(x + 1).min(side - 1) {
                        let b = owner[ny * side + nx] as usize;
                        if b < comps.len() && b != a && colours[b] == Some(colour) {
                            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
                            if ra != rb {
                                parent[ra.max(rb)] = ra.min(rb);
                            }
                        }
                    }
                }
            }
        }
        let mut merged: Vec<Vec<usize>> = vec![Vec::new(); comps.len()];
        for (k, c) in comps.into_iter().enumerate() {
            let r = root(&mut parent, k);
            merged[r].extend(c);
        }
        merged.retain(|c| !c.is_empty());
        merged
    }

    /// The component's colour: mean of its most saturated pixels, matched to the palette by ΔE
    /// along each background → colour segment (faded colours match with a small penalty).
    fn fit_colour(&self, frame: &Frame<'_>, pixels: &[usize]) -> Option<ColourFit> {
        let (alphas, bg_f, colour_labs) = (&frame.alphas, frame.bg_f, &frame.colour_labs);
        let px = |i: usize| frame.px(i);
        let mut a: Vec<f32> = pixels
            .iter()
            .map(|&i| alphas.get(i).copied().unwrap_or(0.0))
            .collect();
        a.sort_unstable_by(|x, y| x.total_cmp(y));
        let p90 = *a.get((a.len() * 9) / 10)?;
        let cut = 0.8 * p90;
        let mut sum = [0f64; 3];
        let mut count = 0usize;
        for &i in pixels {
            if alphas.get(i).copied().unwrap_or(0.0) >= cut {
                let p = px(i);
                for k in 0..3 {
                    sum[k] += f64::from(p[k]);
                }
                count += 1;
            }
        }
        if count == 0 {
            return None;
        }
        let mean: [f32; 3] = sum.map(|s| (s / count as f64) as f32);
        let rgb = mean.map(|c| c.round().clamp(0.0, 255.0) as u8);
        let mut spread = 0f64;
        for &i in pixels {
            if alphas.get(i).copied().unwrap_or(0.0) >= cut {
                let p = to_f(px(i));
                let d: f32 = (0..3).map(|k| (p[k] - mean[k]).powi(2)).sum();
                spread += f64::from(d.sqrt());
            }
        }
        let spread = spread / count as f64;
        let mean_lab = lab_f(mean);
        let mut best = (0usize, f32::INFINITY);
        for (k, c) in self.palette.colours.iter().enumerate() {
            let c = to_f(*c);
            for step in 0..=10 {
                let t = 0.5 + 0.05 * step as f32;
                let mix = [
                    bg_f[0] + t * (c[0] - bg_f[0]),
                    bg_f[1] + t * (c[1] - bg_f[1]),
                    bg_f[2] + t * (c[2] - bg_f[2]),
                ];
                let mix_lab = if step == 10 {
                    colour_labs.get(k).copied().unwrap_or_else(|| lab_f(mix))
                } else {
                    lab_f(mix)
                };
                let score = delta_e(mean_lab, mix_lab) + 16.0 * (1.0 - t);
                if score < best.1 {
                    best = (k, score);
                }
            }
        }
        let colour = if f64::from(best.1) <= COLOUR_REJECT_DELTA_E {
            Colour::ALL.get(best.0).copied()
        } else {
            None
        };
        // A faded object (a small shape under blur never reaches its colour) is measured
        // against the full colour: the observed one extended along its segment.
        let full = match colour {
            Some(_) => {
                let c = self.palette.colours.get(best.0).map_or(mean, |c| to_f(*c));
                let t = along(mean, bg_f, c).0.clamp(0.35, 1.0);
                std::array::from_fn(|k| bg_f[k] + (mean[k] - bg_f[k]) / t)
            }
            None => mean,
        };
        Some(ColourFit {
            colour,
            rgb,
            full,
            distance: f64::from(best.1),
            spread,
        })
    }
}

/// Per-image state shared by the steps of one analysis.
struct Frame<'a> {
    /// The square image's RGB bytes.
    raw: &'a [u8],
    side: usize,
    /// The observed background.
    bg_f: [f32; 3],
    /// CIELAB of each palette colour.
    colour_labs: Vec<[f32; 3]>,
    /// Per pixel: how far its 3 × 3 mean lies along its label's segment (0 when unlabelled).
    alphas: Vec<f32>,
    /// Smallest component that is not noise.
    min_px: usize,
}

impl Frame<'_> {
    fn px(&self, i: usize) -> [u8; 3] {
        match self.raw.get(3 * i..3 * i + 3) {
            Some(s) => [s[0], s[1], s[2]],
            None => [0, 0, 0],
        }
    }
}

/// A component's colour as [`Analyser::fit_colour`] finds it.
struct ColourFit {
    colour: Option<Colour>,
    rgb: [u8; 3],
    /// The colour coverage is measured against (the observed one, unfaded).
    full: [f32; 3],
    distance: f64,
    spread: f64,
}

/// 3 × 3 mean of an RGB buffer (`side` × `side`), averaging only the neighbours that exist.
fn box3(raw: &[u8], side: usize) -> Vec<[f32; 3]> {
    let n = side * side;
    let mut out = vec![[0f32; 3]; n];
    for y in 0..side {
        for x in 0..side {
            let mut sum = [0f32; 3];
            let mut count = 0f32;
            for ny in y.saturating_sub(1)..=(y + 1).min(side - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(side - 1) {
                    let j = 3 * (ny * side + nx);
                    if let Some(p) = raw.get(j..j + 3) {
                        for k in 0..3 {
                            sum[k] += f32::from(p[k]);
                        }
                        count += 1.0;
                    }
                }
            }
            if count > 0.0 {
                out[y * side + x] = sum.map(|v| v / count);
            }
        }
    }
    out
}

fn median_of_histogram(hist: &[usize; 256], total: usize) -> u8 {
    let half = total / 2;
    let mut acc = 0usize;
    for (v, c) in hist.iter().enumerate() {
        acc += c;
        if acc > half {
            return v as u8;
        }
    }
    0
}

/// 8-connected components of equal, non-sentinel labels, in scan order of their first pixel.
fn components(labels: &[u8], side: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; labels.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..labels.len() {
        let l = labels[start];
        if l == NO_LABEL || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut comp = Vec::new();
        while let Some(i) = stack.pop() {
            comp.push(i);
            let (x, y) = ((i % side) as i64, (i / side) as i64);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= side as i64 || ny >= side as i64 {
                        continue;
                    }
                    let j = ny as usize * side + nx as usize;
                    if !seen[j] && labels[j] == l {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(comp);
    }
    out
}

fn size_of(half_extent_frac: f64) -> Size {
    let split = (Size::Small.half_extent() * Size::Large.half_extent()).sqrt();
    if half_extent_frac < split {
        Size::Small
    } else {
        Size::Large
    }
}

fn position_of(cx: f64, cy: f64, side: f64) -> Position {
    let cell = |c: f64| ((c * 3.0 / side).floor().clamp(0.0, 2.0)) as usize;
    Position::ALL
        .get(cell(cy) * 3 + cell(cx))
        .copied()
        .unwrap_or(Position::Center)
}

// ---------------------------------------------------------------------------------------------
// Template fitting
// ---------------------------------------------------------------------------------------------

/// Vertices of the world's star, computed exactly as the world does (so [`inside`] agrees with
/// [`ShapeKind::contains`] bit for bit; a test checks it), but once rather than per call.
fn star_vertices() -> &'static [(f64, f64); 10] {
    static V: OnceLock<[(f64, f64); 10]> = OnceLock::new();
    V.get_or_init(|| {
        let mut v = [(0.0, 0.0); 10];
        for (i, p) in v.iter_mut().enumerate() {
            let r = if i % 2 == 0 { 1.0 } else { 0.42 };
            let a = -std::f64::consts::FRAC_PI_2 + i as f64 * std::f64::consts::PI / 5.0;
            *p = (r * a.cos(), r * a.sin());
        }
        v
    })
}

/// [`ShapeKind::contains`], with the star's polygon cached (the world recomputes it per call).
fn inside(shape: ShapeKind, u: f64, v: f64) -> bool {
    if shape != ShapeKind::Star {
        return shape.contains(u, v);
    }
    // Every vertex is within the unit circle, so nothing beyond it is inside.
    if u * u + v * v > 1.000_001 {
        return false;
    }
    let poly = star_vertices();
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// A shape placed at a continuous centre and half-extent, seen through a box blur of the given
/// radius (in lattice steps, 0 for none), with its IoU against a target.
#[derive(Debug, Clone, Copy)]
struct Fit {
    shape: ShapeKind,
    cx: f64,
    cy: f64,
    r: f64,
    blur: usize,
    iou: f64,
}

/// What a template is compared with: the coverage (0..=1) of one object at the points of the
/// sampling lattice (every `stride`-th pixel in both directions) inside a window.
struct Target {
    /// Pixel coordinates of the window's first lattice point.
    x0: i64,
    y0: i64,
    /// Lattice points across and down.
    w: usize,
    h: usize,
    alpha: Vec<f32>,
    /// Sum of the coverage.
    mass: f64,
    /// Coverage-weighted centroid in pixels.
    cx: f64,
    cy: f64,
}

/// A pixel window `(x0, y0, x1, y1)`, inclusive.
type Window = (usize, usize, usize, usize);

/// Per-image constants for fitting.
struct FitContext {
    side: u32,
    stride: usize,
    /// Lattice steps of the smallest blur tried (≈ one pixel at 64 px).
    blur_unit: usize,
}

/// (area / r², centroid offset in v / r) per shape, in [`ShapeKind::ALL`] order.
fn unit_stats() -> &'static [(f64, f64); 7] {
    static UNIT: OnceLock<[(f64, f64); 7]> = OnceLock::new();
    UNIT.get_or_init(|| {
        let n = 400;
        std::array::from_fn(|k| {
            let Some(&shape) = ShapeKind::ALL.get(k) else {
                return (1.0, 0.0);
            };
            let (mut count, mut vsum) = (0usize, 0f64);
            for j in 0..n {
                for i in 0..n {
                    let u = -1.0 + (i as f64 + 0.5) * 2.0 / n as f64;
                    let v = -1.0 + (j as f64 + 0.5) * 2.0 / n as f64;
                    if inside(shape, u, v) {
                        count += 1;
                        vsum += v;
                    }
                }
            }
            let area = count as f64 * 4.0 / (n * n) as f64;
            let offset = if count > 0 { vsum / count as f64 } else { 0.0 };
            (area, offset)
        })
    })
}

fn bbox_of(pixels: &[usize], side: usize) -> Window {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for &i in pixels {
        let (x, y) = (i % side, i / side);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if pixels.is_empty() {
        (0, 0, 0, 0)
    } else {
        (x0, y0, x1, y1)
    }
}

/// In-place box blur of radius `b` along rows (`horizontal`) or columns, zero outside.
fn box_blur_1d(
    buf: &mut [f32],
    tmp: &mut Vec<f32>,
    w: usize,
    h: usize,
    b: usize,
    horizontal: bool,
) {
    let (lines, len) = if horizontal { (h, w) } else { (w, h) };
    let at = |line: usize, k: usize| {
        if horizontal {
            line * w + k
        } else {
            k * w + line
        }
    };
    let norm = 1.0 / (2 * b + 1) as f32;
    for line in 0..lines {
        tmp.clear();
        tmp.extend((0..len).map(|k| buf[at(line, k)]));
        let mut acc: f32 = tmp.iter().take(b + 1).sum();
        for k in 0..len {
            buf[at(line, k)] = acc * norm;
            if let Some(add) = tmp.get(k + b + 1) {
                acc += add;
            }
            if k >= b {
                acc -= tmp[k - b];
            }
        }
    }
}

impl FitContext {
    fn new(side: u32) -> FitContext {
        let stride = (side / FULL_DETAIL_SIDE).max(1) as usize;
        let blur_unit = ((f64::from(side) / 64.0 / stride as f64).round() as usize).max(1);
        FitContext {
            side,
            stride,
            blur_unit,
        }
    }

    /// Pixels added around a mask's bounding box to make a fitting window.
    fn margin(&self) -> usize {
        (0.02 * f64::from(self.side)).ceil() as usize + 2 * self.blur_unit * self.stride + 1
    }

    fn target(&self, window: Window, coverage: &dyn Fn(usize) -> f32) -> Option<Target> {
        let (wx0, wy0, wx1, wy1) = window;
        let st = self.stride;
        let s = self.side as usize;
        let lx0 = wx0.div_ceil(st) * st;
        let ly0 = wy0.div_ceil(st) * st;
        if lx0 > wx1 || ly0 > wy1 || wx1 >= s || wy1 >= s {
            return None;
        }
        let (w, h) = ((wx1 - lx0) / st + 1, (wy1 - ly0) / st + 1);
        let mut alpha = Vec::with_capacity(w * h);
        let (mut mass, mut sx, mut sy) = (0f64, 0f64, 0f64);
        for j in 0..h {
            let y = ly0 + j * st;
            for i in 0..w {
                let x = lx0 + i * st;
                let a = coverage(y * s + x).clamp(0.0, 1.0);
                alpha.push(a);
                let a = f64::from(a);
                mass += a;
                sx += a * (x as f64 + 0.5);
                sy += a * (y as f64 + 0.5);
            }
        }
        if mass <= 0.0 {
            return None;
        }
        Some(Target {
            x0: lx0 as i64,
            y0: ly0 as i64,
            w,
            h,
            alpha,
            mass,
            cx: sx / mass,
            cy: sy / mass,
        })
    }

    /// Lattice range (first, last pixel coordinate) of a template centred at `c`.
    fn span(&self, c: f64, r: f64) -> (i64, i64) {
        let st = self.stride as i64;
        let lo = ((c - r - 0.5).ceil() as i64).max(0);
        let lo = (lo + st - 1) / st * st;
        let hi = ((c + r - 0.5).floor() as i64).min(i64::from(self.side) - 1);
        (lo, hi)
    }

    /// (Soft) IoU of the template against the target: Σ min / Σ max of the two coverages. A
    /// pixel is inside the template when its centre is, as in [`Object::covers`].
    fn iou(&self, t: &Target, shape: ShapeKind, cx: f64, cy: f64, r: f64, blur: usize) -> f64 {
        if r <= 0.0 {
            return 0.0;
        }
        let st = self.stride as i64;
        let (xl, xh) = self.span(cx, r);
        let (yl, yh) = self.span(cy, r);
        let index = |x: i64, y: i64| -> Option<usize> {
            let (i, j) = ((x - t.x0) / st, (y - t.y0) / st);
            (x >= t.x0 && y >= t.y0 && (i as usize) < t.w && (j as usize) < t.h)
                .then(|| j as usize * t.w + i as usize)
        };
        if blur == 0 {
            let (mut count, mut inter) = (0usize, 0f64);
            let mut y = yl;
            while y <= yh {
                let v = (y as f64 + 0.5 - cy) / r;
                let mut x = xl;
                while x <= xh {
                    let u = (x as f64 + 0.5 - cx) / r;
                    if u.abs() <= 1.0 && v.abs() <= 1.0 && inside(shape, u, v) {
                        count += 1;
                        if let Some(k) = index(x, y) {
                            inter += f64::from(t.alpha[k]);
                        }
                    }
                    x += st;
                }
                y += st;
            }
            let union = count as f64 + t.mass - inter;
            return if union > 0.0 { inter / union } else { 0.0 };
        }
        let mut buf = vec![0f32; t.w * t.h];
        let mut outside = 0usize;
        let mut y = yl;
        while y <= yh {
            let v = (y as f64 + 0.5 - cy) / r;
            let mut x = xl;
            while x <= xh {
                let u = (x as f64 + 0.5 - cx) / r;
                if u.abs() <= 1.0 && v.abs() <= 1.0 && inside(shape, u, v) {
                    match index(x, y) {
                        Some(k) => buf[k] = 1.0,
                        None => outside += 1,
                    }
                }
                x += st;
            }
            y += st;
        }
        let mut tmp = Vec::with_capacity(t.w.max(t.h));
        box_blur_1d(&mut buf, &mut tmp, t.w, t.h, blur, true);
        box_blur_1d(&mut buf, &mut tmp, t.w, t.h, blur, false);
        let (mut lo, mut hi) = (0f64, outside as f64);
        for (a, b) in t.alpha.iter().zip(&buf) {
            lo += f64::from(a.min(*b));
            hi += f64::from(a.max(*b));
        }
        if hi > 0.0 {
            lo / hi
        } else {
            0.0
        }
    }

    /// Best template for the target: coarse candidates for every shape (both nominal sizes and
    /// the size the mass implies, at the centroid and at the nearby cell centre, and for blurred
    /// targets at each blur), then a local search from the three best shapes.
    fn fit(&self, t: &Target, soft: bool) -> Option<Fit> {
        let side = f64::from(self.side);
        let (r_small, r_large) = (
            Size::Small.half_extent() * side,
            Size::Large.half_extent() * side,
        );
        let area = t.mass * (self.stride * self.stride) as f64;
        let third = side / 3.0;
        let blurs: Vec<usize> = if soft {
            (0..=2).map(|k| k * self.blur_unit).collect()
        } else {
            vec![0]
        };
        let mut coarse: Vec<Fit> = Vec::new();
        for (&shape, &(unit_area, v_off)) in ShapeKind::ALL.iter().zip(unit_stats().iter()) {
            let r_area = (area / unit_area.max(1e-6))
                .sqrt()
                .clamp(0.6 * r_small, 1.4 * r_large);
            // The blur that suits this shape best at the size its mass implies, then every
            // size at that blur.
            let blur = blurs
                .iter()
                .copied()
                .map(|b| {
                    (
                        b,
                        self.iou(t, shape, t.cx, t.cy - v_off * r_area, r_area, b),
                    )
                })
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0, |(b, _)| b);
            let mut best: Option<Fit> = None;
            for r in [r_small, r_large, r_area] {
                let (cx, cy) = (t.cx, t.cy - v_off * r);
                let gx = ((cx / third).floor().clamp(0.0, 2.0) + 0.5) * third;
                let gy = ((cy / third).floor().clamp(0.0, 2.0) + 0.5) * third;
                let mut centres = vec![(cx, cy)];
                if (gx - cx).abs() <= 0.05 * side && (gy - cy).abs() <= 0.05 * side {
                    centres.push((gx, gy));
                }
                for (cx, cy) in centres {
                    let iou = self.iou(t, shape, cx, cy, r, blur);
                    if best.is_none_or(|b| iou > b.iou) {
                        best = Some(Fit {
                            shape,
                            cx,
                            cy,
                            r,
                            blur,
                            iou,
                        });
                    }
                }
            }
            coarse.extend(best);
        }
        coarse.sort_by(|a, b| b.iou.total_cmp(&a.iou));
        let mut best: Option<Fit> = None;
        for f in coarse.into_iter().take(3) {
            // A local search rarely gains much: skip candidates far behind, and stop at exact.
            if best.is_some_and(|b| b.iou >= 1.0 || f.iou < b.iou - 0.2) {
                continue;
            }
            let r = self.refine(t, f, soft);
            if best.is_none_or(|b| r.iou > b.iou) {
                best = Some(r);
            }
        }
        best
    }

    /// Hill-climb centre, half-extent (and blur, for soft targets) from `start`, halving the
    /// steps when stuck.
    fn refine(&self, t: &Target, start: Fit, soft: bool) -> Fit {
        let side = f64::from(self.side);
        let max_blur = if soft { 2 * self.blur_unit } else { 0 };
        let mut best = start;
        let mut dc = side / 64.0;
        let mut dr = 0.04;
        let min_dc = side / 256.0;
        let mut evals = 0;
        while dc >= min_dc && best.iou < 1.0 && evals < 150 {
            let mut moves = vec![
                (dc, 0.0, 1.0, best.blur),
                (-dc, 0.0, 1.0, best.blur),
                (0.0, dc, 1.0, best.blur),
                (0.0, -dc, 1.0, best.blur),
                (0.0, 0.0, 1.0 + dr, best.blur),
                (0.0, 0.0, 1.0 - dr, best.blur),
            ];
            if best.blur < max_blur {
                moves.push((0.0, 0.0, 1.0, best.blur + 1));
            }
            if best.blur > 0 {
                moves.push((0.0, 0.0, 1.0, best.blur - 1));
            }
            let mut improved = false;
            for (mx, my, mr, blur) in moves {
                let (cx, cy, r) = (best.cx + mx, best.cy + my, best.r * mr);
                let iou = self.iou(t, best.shape, cx, cy, r, blur);
                evals += 1;
                if iou > best.iou + 1e-12 {
                    best = Fit {
                        cx,
                        cy,
                        r,
                        blur,
                        iou,
                        ..best
                    };
                    improved = true;
                }
            }
            if !improved {
                dc /= 2.0;
                dr /= 2.0;
            }
        }
        best
    }

    /// Fit the object whose hard mask is `mask` (coverage `coverage` inside `window`); when it
    /// fits badly, spans several grid cells and is no bigger than two large objects, also try
    /// one fit per cell and keep whichever explains it better. Returns (mask pixels, fit) pairs.
    fn fit_or_split(
        &self,
        mask: &[usize],
        window: Window,
        coverage: &dyn Fn(usize) -> f32,
        soft: bool,
        min_px: usize,
    ) -> Vec<(usize, Fit)> {
        let Some(whole) = self
            .target(window, coverage)
            .and_then(|t| self.fit(&t, soft))
        else {
            return Vec::new();
        };
        let side = f64::from(self.side);
        let max_two = 2.6 * std::f64::consts::PI * (Size::Large.half_extent() * side).powi(2);
        if whole.iou >= 0.8 || mask.len() as f64 > max_two {
            return vec![(mask.len(), whole)];
        }
        let s = self.side as usize;
        let cell = |i: usize| position_of((i % s) as f64 + 0.5, (i / s) as f64 + 0.5, side);
        let mut parts: Vec<(Position, Vec<usize>)> = Vec::new();
        for &i in mask {
            let c = cell(i);
            match parts.iter_mut().find(|(p, _)| *p == c) {
                Some((_, v)) => v.push(i),
                None => parts.push((c, vec![i])),
            }
        }
        parts.retain(|(_, v)| v.len() >= min_px);
        if parts.len() < 2 {
            return vec![(mask.len(), whole)];
        }
        let margin = self.margin();
        let fits: Vec<(usize, Fit)> = parts
            .iter()
            .filter_map(|(c, pixels)| {
                let (x0, y0, x1, y1) = bbox_of(pixels, s);
                let win = (
                    x0.saturating_sub(margin),
                    y0.saturating_sub(margin),
                    (x1 + margin).min(s - 1),
                    (y1 + margin).min(s - 1),
                );
                let part_cov = |j: usize| if cell(j) == *c { coverage(j) } else { 0.0 };
                let t = self.target(win, &part_cov)?;
                self.fit(&t, soft).map(|f| (pixels.len(), f))
            })
            .collect();
        let total: usize = fits.iter().map(|(n, _)| n).sum();
        let mean = fits.iter().map(|(n, f)| *n as f64 * f.iou).sum::<f64>() / total.max(1) as f64;
        if fits.len() >= 2 && fits.iter().all(|(_, f)| f.iou >= 0.6) && mean > whole.iou + 0.1 {
            fits
        } else {
            vec![(mask.len(), whole)]
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scoring
// ---------------------------------------------------------------------------------------------

/// An attribute the benchmark scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attribute {
    /// The object's colour.
    Colour,
    /// The object's shape.
    Shape,
    /// The object's grid cell.
    Position,
    /// Small or large.
    Size,
    /// The scene's background (scored once per scene).
    Background,
}

impl Attribute {
    /// Every attribute, in report order.
    pub const ALL: &'static [Attribute] = &[
        Attribute::Colour,
        Attribute::Shape,
        Attribute::Position,
        Attribute::Size,
        Attribute::Background,
    ];

    /// Lower-case name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Attribute::Colour => "colour",
            Attribute::Shape => "shape",
            Attribute::Position => "position",
            Attribute::Size => "size",
            Attribute::Background => "background",
        }
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one expected object was recovered.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectCheck {
    /// The object the scene asked for.
    pub expected: Object,
    /// The detection matched to it, or `None` when it is missing.
    pub detected: Option<Detection>,
    /// Colour right.
    pub colour: bool,
    /// Shape right.
    pub shape: bool,
    /// Grid cell right.
    pub position: bool,
    /// Size right.
    pub size: bool,
}

impl ObjectCheck {
    fn new(expected: Object, detected: Option<&Detection>) -> ObjectCheck {
        let (colour, shape, position, size) = match detected {
            Some(d) => (
                d.colour == Some(expected.colour),
                d.shape == expected.shape,
                d.position == expected.position,
                d.size == expected.size,
            ),
            None => (false, false, false, false),
        };
        ObjectCheck {
            expected,
            detected: detected.cloned(),
            colour,
            shape,
            position,
            size,
        }
    }

    /// Whether the given object attribute is right (`Background` is per scene: false here).
    pub fn is_correct(&self, attribute: Attribute) -> bool {
        match attribute {
            Attribute::Colour => self.colour,
            Attribute::Shape => self.shape,
            Attribute::Position => self.position,
            Attribute::Size => self.size,
            Attribute::Background => false,
        }
    }

    /// Whether colour, shape, position and size are all right.
    pub fn all_correct(&self) -> bool {
        self.colour && self.shape && self.position && self.size
    }

    fn agreement(&self) -> usize {
        [self.colour, self.shape, self.position, self.size]
            .iter()
            .filter(|b| **b)
            .count()
    }
}

/// How a whole scene was recovered.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneCheck {
    /// One entry per expected object, in the scene's order.
    pub objects: Vec<ObjectCheck>,
    /// Background right.
    pub background: bool,
    /// Detections matched to no expected object (extra or spurious shapes).
    pub unmatched: usize,
}

impl SceneCheck {
    /// Whether the background and every attribute of every object are right.
    pub fn all_correct(&self) -> bool {
        self.background && self.objects.iter().all(ObjectCheck::all_correct)
    }
}

/// Distance, as a fraction of the image side, between an expected object's cell centre and a
/// detection's fitted centre.
fn centre_distance(expected: &Object, d: &Detection, analysis: &Analysis) -> f64 {
    let (ex, ey) = expected.position.centre(1);
    let (w, h) = (
        f64::from(analysis.width.max(1)),
        f64::from(analysis.height.max(1)),
    );
    let (dx, dy) = (d.centre.0 / w - ex, d.centre.1 / h - ey);
    (dx * dx + dy * dy).sqrt()
}

/// Match the expected objects to the detections (one detection per object at most): the
/// assignment with the most agreeing attributes wins, ties going to the smallest total centre
/// distance (a matched detection is preferred to none). Unmatched expected objects are wrong
/// on every attribute.
pub fn check_scene(expected: &Scene, analysis: &Analysis) -> SceneCheck {
    let exp = expected.objects();
    let dets = &analysis.objects;
    // Cost of leaving an object unmatched, beyond any real distance (at most √2).
    const MISSING: f64 = 10.0;
    let score_of = |e: &Object, d: Option<usize>| -> (usize, f64) {
        match d.and_then(|k| dets.get(k)) {
            Some(det) => (
                ObjectCheck::new(*e, Some(det)).agreement(),
                centre_distance(e, det, analysis),
            ),
            None => (0, MISSING),
        }
    };
    let options: Vec<Option<usize>> = std::iter::once(None)
        .chain((0..dets.len()).map(Some))
        .collect();
    let mut best: Option<(Vec<Option<usize>>, usize, f64)> = None;
    let mut consider = |assign: Vec<Option<usize>>| {
        let (mut agree, mut dist) = (0usize, 0f64);
        for (e, d) in exp.iter().zip(&assign) {
            let (a, dd) = score_of(e, *d);
            agree += a;
            dist += dd;
        }
        let better = match &best {
            None => true,
            Some((_, ba, bd)) => agree > *ba || (agree == *ba && dist < *bd - 1e-12),
        };
        if better {
            best = Some((assign, agree, dist));
        }
    };
    match exp.len() {
        1 => {
            for &a in &options {
                consider(vec![a]);
            }
        }
        _ => {
            for &a in &options {
                for &b in &options {
                    if a.is_some() && a == b {
                        continue;
                    }
                    let mut v = vec![a, b];
                    v.resize(exp.len(), None);
                    consider(v);
                }
            }
        }
    }
    let assign = best.map(|b| b.0).unwrap_or_else(|| vec![None; exp.len()]);
    let objects: Vec<ObjectCheck> = exp
        .iter()
        .zip(&assign)
        .map(|(e, d)| ObjectCheck::new(*e, d.and_then(|k| dets.get(k))))
        .collect();
    let matched = assign.iter().filter(|a| a.is_some()).count();
    SceneCheck {
        objects,
        background: analysis.background == expected.background(),
        unmatched: dets.len().saturating_sub(matched),
    }
}

/// Whether `detected` copies one of `reference`'s (shape, colour) pairs instead of the
/// `expected` object's: its pair equals a reference object's pair and differs from the
/// expected one. A detection without a colour copies nothing.
pub fn copies_reference(expected: &Object, detected: &Detection, reference: &Scene) -> bool {
    let Some(colour) = detected.colour else {
        return false;
    };
    let pair = (detected.shape, colour);
    pair != (expected.shape, expected.colour)
        && reference
            .objects()
            .iter()
            .any(|r| (r.shape, r.colour) == pair)
}

/// Content leakage of one output: `Some(true)` when some detection carries a (shape, colour)
/// pair of `reference` (the training scene) that no object of `expected` (the prompt) has;
/// `None` when every reference pair is also expected, so leakage cannot be told apart.
pub fn leaks_reference(expected: &Scene, analysis: &Analysis, reference: &Scene) -> Option<bool> {
    let expected_pairs: Vec<(ShapeKind, Colour)> = expected
        .objects()
        .iter()
        .map(|o| (o.shape, o.colour))
        .collect();
    let foreign: Vec<(ShapeKind, Colour)> = reference
        .objects()
        .iter()
        .map(|o| (o.shape, o.colour))
        .filter(|p| !expected_pairs.contains(p))
        .collect();
    if foreign.is_empty() {
        return None;
    }
    Some(
        analysis
            .objects
            .iter()
            .any(|d| d.colour.is_some_and(|c| foreign.contains(&(d.shape, c)))),
    )
}

/// Counters of correct attributes over many scenes; [`AttributeAccuracy::add`] one
/// [`SceneCheck`] at a time, [`AttributeAccuracy::merge`] partial counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttributeAccuracy {
    /// Scenes counted.
    pub scenes: u64,
    /// Expected objects counted.
    pub objects: u64,
    /// Objects with the right colour.
    pub colour: u64,
    /// Objects with the right shape.
    pub shape: u64,
    /// Objects in the right cell.
    pub position: u64,
    /// Objects with the right size.
    pub size: u64,
    /// Scenes with the right background.
    pub background: u64,
    /// Objects right on all four attributes.
    pub all_correct: u64,
    /// Expected objects with no detection matched.
    pub missing: u64,
    /// Detections matched to no expected object.
    pub unmatched: u64,
}

impl AttributeAccuracy {
    /// Count one scene.
    pub fn add(&mut self, check: &SceneCheck) {
        self.scenes += 1;
        self.background += u64::from(check.background);
        self.unmatched += check.unmatched as u64;
        for o in &check.objects {
            self.objects += 1;
            self.colour += u64::from(o.colour);
            self.shape += u64::from(o.shape);
            self.position += u64::from(o.position);
            self.size += u64::from(o.size);
            self.all_correct += u64::from(o.all_correct());
            self.missing += u64::from(o.detected.is_none());
        }
    }

    /// Add another set of counts to these.
    pub fn merge(&mut self, other: &AttributeAccuracy) {
        self.scenes += other.scenes;
        self.objects += other.objects;
        self.colour += other.colour;
        self.shape += other.shape;
        self.position += other.position;
        self.size += other.size;
        self.background += other.background;
        self.all_correct += other.all_correct;
        self.missing += other.missing;
        self.unmatched += other.unmatched;
    }

    /// Number correct for an attribute (objects, or scenes for the background).
    pub fn correct(&self, attribute: Attribute) -> u64 {
        match attribute {
            Attribute::Colour => self.colour,
            Attribute::Shape => self.shape,
            Attribute::Position => self.position,
            Attribute::Size => self.size,
            Attribute::Background => self.background,
        }
    }

    /// Percentage correct for an attribute (0 when nothing was counted).
    pub fn percent(&self, attribute: Attribute) -> f64 {
        let total = match attribute {
            Attribute::Background => self.scenes,
            _ => self.objects,
        };
        pct(self.correct(attribute), total)
    }

    /// Percentage of objects right on colour, shape, position and size together.
    pub fn all_correct_percent(&self) -> f64 {
        pct(self.all_correct, self.objects)
    }

    /// The lowest per-attribute percentage.
    pub fn min_percent(&self) -> f64 {
        Attribute::ALL
            .iter()
            .map(|a| self.percent(*a))
            .fold(f64::INFINITY, f64::min)
    }
}

fn pct(n: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * n as f64 / total as f64
    }
}

impl fmt::Display for AttributeAccuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} scenes, {} objects:", self.scenes, self.objects)?;
        for a in Attribute::ALL {
            write!(f, " {} {:.1} %,", a, self.percent(*a))?;
        }
        write!(
            f,
            " all four {:.1} % ({} missing, {} unmatched)",
            self.all_correct_percent(),
            self.missing,
            self.unmatched
        )
    }
}

/// The analyser's own accuracy on `n` clean renders of [`Scene::random`] scenes drawn from
/// `StdRng::seed_from_u64(seed)` at `res` × `res` pixels, for reporting beside benchmark
/// numbers. Fails only for a resolution the world cannot render.
pub fn accuracy_on_clean_renders(n: usize, seed: u64, res: u32) -> Result<AttributeAccuracy> {
    let mut rng = StdRng::seed_from_u64(seed);
    let analyser = Analyser::default();
    let mut acc = AttributeAccuracy::default();
    for _ in 0..n {
        let scene = Scene::random(&mut rng);
        let img = scene.render(res)?;
        acc.add(&check_scene(&scene, &analyser.analyse(&img)));
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn cached_star_agrees_with_the_world() {
        let mut rng = StdRng::seed_from_u64(1);
        let n = 301;
        for j in 0..n {
            for i in 0..n {
                let u = -1.05 + 2.1 * i as f64 / (n - 1) as f64;
                let v = -1.05 + 2.1 * j as f64 / (n - 1) as f64;
                for &s in ShapeKind::ALL {
                    assert_eq!(inside(s, u, v), s.contains(u, v), "{s} at ({u}, {v})");
                }
            }
        }
        for _ in 0..100_000 {
            let (u, v) = (rng.random_range(-1.1..1.1), rng.random_range(-1.1..1.1));
            assert_eq!(
                inside(ShapeKind::Star, u, v),
                ShapeKind::Star.contains(u, v)
            );
        }
    }

    #[test]
    fn unit_shapes() {
        let stats = unit_stats();
        let circle = stats[0];
        assert!((circle.0 - std::f64::consts::PI).abs() < 0.01, "{circle:?}");
        assert!(circle.1.abs() < 1e-3);
        // The triangle's centroid lies below its centre: -0.9 + 2/3 × 1.7.
        let triangle = stats[2];
        assert!(
            (triangle.1 - (-0.9 + 1.7 * 2.0 / 3.0)).abs() < 0.01,
            "{triangle:?}"
        );
        assert!((triangle.0 - 0.5 * 1.8 * 1.7).abs() < 0.01, "{triangle:?}");
    }

    #[test]
    fn lab_reference_values() {
        let white = lab_u8([255, 255, 255]);
        assert!((white[0] - 100.0).abs() < 0.1 && white[1].abs() < 0.1 && white[2].abs() < 0.1);
        assert!(lab_u8([0, 0, 0])[0].abs() < 1e-3);
        let red = lab_u8([255, 0, 0]);
        assert!(
            (red[0] - 53.2).abs() < 0.3 && (red[1] - 80.1).abs() < 0.5,
            "{red:?}"
        );
        // The interpolated float path agrees with the table on integer inputs.
        let a = lab_f([12.0, 200.0, 77.0]);
        let b = lab_u8([12, 200, 77]);
        assert!(delta_e(a, b) < 1e-3);
    }

    #[test]
    fn segment_projection() {
        let (a, r) = along([150.0, 100.0, 100.0], [100.0; 3], [200.0, 100.0, 100.0]);
        assert!((a - 0.5).abs() < 1e-6 && r.abs() < 1e-4);
        let (a, r) = along([100.0, 130.0, 100.0], [100.0; 3], [200.0, 100.0, 100.0]);
        assert!(a.abs() < 1e-6 && (r - 30.0).abs() < 1e-4);
        let (a, r) = along([1.0, 2.0, 2.0], [0.0; 3], [0.0; 3]);
        assert!(a == 0.0 && (r - 3.0).abs() < 1e-6);
    }

    #[test]
    fn box_blur_keeps_mass_and_spreads() {
        let (w, h) = (9, 7);
        let mut buf = vec![0f32; w * h];
        buf[3 * w + 4] = 1.0;
        let mut tmp = Vec::new();
        box_blur_1d(&mut buf, &mut tmp, w, h, 1, true);
        box_blur_1d(&mut buf, &mut tmp, w, h, 1, false);
        let total: f32 = buf.iter().sum();
        assert!((total - 1.0).abs() < 1e-5);
        for y in 2..=4 {
            for x in 3..=5 {
                assert!((buf[y * w + x] - 1.0 / 9.0).abs() < 1e-6);
            }
        }
        assert_eq!(buf[w + 4], 0.0);
    }

    #[test]
    fn cells_and_sizes() {
        assert_eq!(position_of(0.0, 0.0, 64.0), Position::TopLeft);
        assert_eq!(position_of(63.9, 32.0, 64.0), Position::Right);
        assert_eq!(position_of(-5.0, 100.0, 64.0), Position::BottomLeft);
        for &p in Position::ALL {
            let (x, y) = p.centre(96);
            assert_eq!(position_of(x, y, 96.0), p);
        }
        assert_eq!(size_of(Size::Small.half_extent()), Size::Small);
        assert_eq!(size_of(Size::Large.half_extent()), Size::Large);
        assert_eq!(size_of(0.11), Size::Small);
        assert_eq!(size_of(0.125), Size::Large);
    }

    #[test]
    fn every_object_alone_is_exact() {
        // Every shape, size, colour and cell, on every background, at 64 px.
        for &background in Background::ALL {
            for &shape in ShapeKind::ALL {
                for &size in Size::ALL {
                    for (k, &position) in Position::ALL.iter().enumerate() {
                        let colour = Colour::ALL[(k + shape as usize) % Colour::ALL.len()];
                        let o = Object {
                            shape,
                            colour,
                            size,
                            position,
                        };
                        let scene = Scene::new(vec![o], background).unwrap();
                        let a = analyse(&scene.render(64).unwrap());
                        assert_eq!(a.objects.len(), 1, "{scene}: {a:#?}");
                        assert_eq!(a.objects[0].as_object(), Some(o), "{scene}");
                        assert_eq!(a.background, background);
                        assert_eq!(a.background_rgb, background.rgb());
                    }
                }
            }
        }
    }

    #[test]
    fn big_images_are_resampled() {
        let scene = Scene::parse(
            "a small green cross at the bottom left and a large pink ring at the top, \
             on a black background",
        )
        .unwrap();
        let img = scene.render(1024).unwrap();
        let a = analyse(&img);
        assert_eq!((a.width, a.height), (1024, 1024));
        let c = check_scene(&scene, &a);
        assert!(c.all_correct() && c.unmatched == 0, "{a:#?}");
        let ring = a
            .objects
            .iter()
            .find(|d| d.shape == ShapeKind::Ring)
            .unwrap();
        let (x, y) = Position::Top.centre(1024);
        assert!((ring.centre.0 - x).abs() < 6.0 && (ring.centre.1 - y).abs() < 6.0);
    }
}
