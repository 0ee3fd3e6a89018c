//! Scenes of the synthetic world: one or two shapes on a plain background, an exact renderer, a
//! caption grammar with its inverse parser, and the held-out attribute combinations.
//!
//! Everything here is deterministic: a scene drawn from a seeded [`StdRng`](rand::rngs::StdRng)
//! is always the same, and rendering decides each pixel by a geometric rule evaluated at the
//! pixel's centre (no anti-aliasing), so a render is a pure function of the scene and the
//! resolution, and an analyser can recover colours exactly.
//!
//! Caption grammar (lower case, words separated by spaces):
//! ```text
//! caption  := object [ "and" object ] "," "on" "a" BACKGROUND "background"
//! object   := "a" SIZE COLOUR SHAPE position
//! position := "on the left" | "in the center" | "on the right"
//!           | "at the top" [ "left" | "right" ] | "at the bottom" [ "left" | "right" ]
//! ```
//! e.g. "a large red star on the left and a small blue circle at the top right, on a grey
//! background".

use std::fmt;
use std::str::FromStr;

use rand::Rng;

use crate::engine::image_io::RgbImage;
use crate::error::{Error, Result};

/// Smallest supported render side: below it the small shapes lose their outline.
pub const MIN_RESOLUTION: u32 = 64;
/// Largest supported render side, a sanity bound against absurd allocations.
pub const MAX_RESOLUTION: u32 = 4096;

/// Declares a closed enum of attribute words: `ALL`, `name()`, `Display` and `FromStr` (the
/// error names the unknown word and lists the valid ones).
macro_rules! word_enum {
    ($(#[$m:meta])* $name:ident, $what:literal, { $($(#[$vm:meta])* $var:ident = $word:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vm])* $var),+
        }

        impl $name {
            /// Every value, in a fixed order (the attribute space is enumerable).
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The word used for this value in captions.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$var => $word),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                let lower = s.to_ascii_lowercase();
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == lower)
                    .ok_or_else(|| {
                        let valid: Vec<&str> = $name::ALL.iter().map(|v| v.name()).collect();
                        Error::InvalidArgument(format!(
                            "unknown word {s:?}: expected {} ({})",
                            $what,
                            valid.join(", ")
                        ))
                    })
            }
        }
    };
}

word_enum!(
    /// The kind of a shape; each has an exact inside rule in [`ShapeKind::contains`].
    ShapeKind, "a shape", {
        /// A filled disc.
        Circle = "circle",
        /// A filled axis-aligned square.
        Square = "square",
        /// A filled triangle pointing up.
        Triangle = "triangle",
        /// A filled five-pointed star pointing up.
        Star = "star",
        /// A plus-shaped cross.
        Cross = "cross",
        /// An annulus (disc with a hole).
        Ring = "ring",
        /// A square turned 45 degrees.
        Diamond = "diamond",
    }
);

word_enum!(
    /// The fill colour of a shape (fixed RGB, far from every background and from each other).
    Colour, "a colour", {
        /// (220, 40, 40)
        Red = "red",
        /// (40, 170, 60)
        Green = "green",
        /// (40, 80, 220)
        Blue = "blue",
        /// (240, 210, 40)
        Yellow = "yellow",
        /// (245, 130, 30)
        Orange = "orange",
        /// (140, 60, 180)
        Purple = "purple",
        /// (240, 120, 180)
        Pink = "pink",
        /// (40, 200, 210)
        Cyan = "cyan",
    }
);

word_enum!(
    /// The size of a shape: the half-extent is a fixed fraction of the resolution.
    Size, "a size", {
        /// Half-extent 0.09 × resolution.
        Small = "small",
        /// Half-extent 0.15 × resolution.
        Large = "large",
    }
);

word_enum!(
    /// The plain background colour of a scene.
    Background, "a background", {
        /// (128, 128, 128)
        Grey = "grey",
        /// (255, 255, 255)
        White = "white",
        /// (0, 0, 0)
        Black = "black",
        /// (222, 200, 160)
        Sand = "sand",
    }
);

impl Colour {
    /// The exact RGB value painted for this colour.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [240, 210, 40],
            Colour::Orange => [245, 130, 30],
            Colour::Purple => [140, 60, 180],
            Colour::Pink => [240, 120, 180],
            Colour::Cyan => [40, 200, 210],
        }
    }
}

impl Background {
    /// The exact RGB value of this background.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::Grey => [128, 128, 128],
            Background::White => [255, 255, 255],
            Background::Black => [0, 0, 0],
            Background::Sand => [222, 200, 160],
        }
    }
}

impl Size {
    /// Half-extent of a shape of this size as a fraction of the resolution; a large shape still
    /// fits inside its third of the image, so shapes in different cells never overlap.
    pub fn half_extent(self) -> f64 {
        match self {
            Size::Small => 0.09,
            Size::Large => 0.15,
        }
    }
}

/// A cell of the 3 × 3 grid a shape is centred in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Position {
    /// Row 0, column 0: "at the top left".
    TopLeft,
    /// Row 0, column 1: "at the top".
    Top,
    /// Row 0, column 2: "at the top right".
    TopRight,
    /// Row 1, column 0: "on the left".
    Left,
    /// Row 1, column 1: "in the center".
    Center,
    /// Row 1, column 2: "on the right".
    Right,
    /// Row 2, column 0: "at the bottom left".
    BottomLeft,
    /// Row 2, column 1: "at the bottom".
    Bottom,
    /// Row 2, column 2: "at the bottom right".
    BottomRight,
}

impl Position {
    /// Every position, row by row from the top left.
    pub const ALL: &'static [Position] = &[
        Position::TopLeft,
        Position::Top,
        Position::TopRight,
        Position::Left,
        Position::Center,
        Position::Right,
        Position::BottomLeft,
        Position::Bottom,
        Position::BottomRight,
    ];

    /// (row, column) in the 3 × 3 grid, each 0..3.
    pub fn cell(self) -> (u32, u32) {
        let i = Position::ALL.iter().position(|p| *p == self).unwrap_or(4) as u32;
        (i / 3, i % 3)
    }

    /// The phrase used in captions, e.g. "on the left".
    pub fn phrase(self) -> &'static str {
        match self {
            Position::TopLeft => "at the top left",
            Position::Top => "at the top",
            Position::TopRight => "at the top right",
            Position::Left => "on the left",
            Position::Center => "in the center",
            Position::Right => "on the right",
            Position::BottomLeft => "at the bottom left",
            Position::Bottom => "at the bottom",
            Position::BottomRight => "at the bottom right",
        }
    }

    /// Centre of the cell in pixel coordinates (x, y) at resolution `res`.
    pub fn centre(self, res: u32) -> (f64, f64) {
        let (row, col) = self.cell();
        let third = res as f64 / 3.0;
        ((col as f64 + 0.5) * third, (row as f64 + 0.5) * third)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.phrase())
    }
}

/// Vertices of the five-pointed star in unit coordinates (y down, first point straight up),
/// alternating outer radius 1 and inner radius 0.42.
fn star_vertices() -> [(f64, f64); 10] {
    let mut v = [(0.0, 0.0); 10];
    for (i, p) in v.iter_mut().enumerate() {
        let r = if i % 2 == 0 { 1.0 } else { 0.42 };
        let a = -std::f64::consts::FRAC_PI_2 + i as f64 * std::f64::consts::PI / 5.0;
        *p = (r * a.cos(), r * a.sin());
    }
    v
}

/// Even-odd point-in-polygon test.
fn in_polygon(u: f64, v: f64, poly: &[(f64, f64)]) -> bool {
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

impl ShapeKind {
    /// Whether the point (u, v), in the shape's unit coordinates (centre at 0, half-extent 1,
    /// y down), is inside the shape. Every shape lies within the square |u|, |v| ≤ 1.
    pub fn contains(self, u: f64, v: f64) -> bool {
        match self {
            ShapeKind::Circle => u * u + v * v <= 1.0,
            ShapeKind::Square => u.abs() <= 0.8 && v.abs() <= 0.8,
            ShapeKind::Triangle => (-0.9..=0.8).contains(&v) && u.abs() <= 0.9 * (v + 0.9) / 1.7,
            ShapeKind::Star => in_polygon(u, v, &star_vertices()),
            ShapeKind::Cross => {
                (u.abs() <= 0.3 && v.abs() <= 0.9) || (v.abs() <= 0.3 && u.abs() <= 0.9)
            }
            ShapeKind::Ring => {
                let d2 = u * u + v * v;
                (0.36..=1.0).contains(&d2)
            }
            ShapeKind::Diamond => u.abs() + v.abs() <= 1.0,
        }
    }
}

/// One shape of a scene: what, which colour, how big, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Object {
    /// The shape kind.
    pub shape: ShapeKind,
    /// The fill colour.
    pub colour: Colour,
    /// Small or large.
    pub size: Size,
    /// The grid cell it is centred in.
    pub position: Position,
}

impl Object {
    /// The caption phrase for this object, e.g. "a large red star on the left".
    pub fn phrase(&self) -> String {
        format!(
            "a {} {} {} {}",
            self.size,
            self.colour,
            self.shape,
            self.position.phrase()
        )
    }

    /// Centre (x, y) and half-extent in pixels at resolution `res`.
    pub fn geometry(&self, res: u32) -> (f64, f64, f64) {
        let (cx, cy) = self.position.centre(res);
        (cx, cy, self.size.half_extent() * res as f64)
    }

    /// Inclusive pixel bounding box `(x0, y0, x1, y1)` of the pixels whose centre may be inside
    /// the shape at resolution `res`; no pixel outside it is ever painted for this object.
    pub fn bbox(&self, res: u32) -> (u32, u32, u32, u32) {
        let (cx, cy, r) = self.geometry(res);
        let lo = |c: f64| ((c - r - 0.5).ceil().max(0.0)) as u32;
        let hi = |c: f64| ((c + r - 0.5).floor().min(res as f64 - 1.0).max(0.0)) as u32;
        (lo(cx), lo(cy), hi(cx), hi(cy))
    }

    /// Whether the pixel (x, y) is painted by this object: its centre lies inside the shape.
    pub fn covers(&self, x: u32, y: u32, res: u32) -> bool {
        let (cx, cy, r) = self.geometry(res);
        let u = (x as f64 + 0.5 - cx) / r;
        let v = (y as f64 + 0.5 - cy) / r;
        u.abs() <= 1.0 && v.abs() <= 1.0 && self.shape.contains(u, v)
    }

    /// Whether this object's (shape, colour) pair is held out of training.
    pub fn is_held_out(&self) -> bool {
        is_held_out(self.shape, self.colour)
    }

    fn random_with<R: Rng + ?Sized>(
        rng: &mut R,
        pairs: &[(ShapeKind, Colour)],
        position: Position,
    ) -> Object {
        let (shape, colour) = pairs[rng.random_range(0..pairs.len())];
        let size = Size::ALL[rng.random_range(0..Size::ALL.len())];
        Object {
            shape,
            colour,
            size,
            position,
        }
    }
}

/// (shape, colour) combinations never used in training, one per shape, so generalisation to
/// unseen combinations can be measured; every shape and every colour still appears in training.
pub const HELD_OUT: &[(ShapeKind, Colour)] = &[
    (ShapeKind::Circle, Colour::Purple),
    (ShapeKind::Square, Colour::Cyan),
    (ShapeKind::Triangle, Colour::Green),
    (ShapeKind::Star, Colour::Blue),
    (ShapeKind::Cross, Colour::Yellow),
    (ShapeKind::Ring, Colour::Pink),
    (ShapeKind::Diamond, Colour::Orange),
];

/// Whether the (shape, colour) combination is held out of training (listed in [`HELD_OUT`]).
pub fn is_held_out(shape: ShapeKind, colour: Colour) -> bool {
    HELD_OUT.contains(&(shape, colour))
}

/// Every (shape, colour) combination, shapes outer, colours inner.
pub fn all_pairs() -> Vec<(ShapeKind, Colour)> {
    ShapeKind::ALL
        .iter()
        .flat_map(|&s| Colour::ALL.iter().map(move |&c| (s, c)))
        .collect()
}

/// The (shape, colour) combinations the training sampler may use: all but [`HELD_OUT`].
pub fn train_pairs() -> Vec<(ShapeKind, Colour)> {
    all_pairs()
        .into_iter()
        .filter(|&(s, c)| !is_held_out(s, c))
        .collect()
}

/// A scene: one or two objects in distinct grid cells on a plain background.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scene {
    objects: Vec<Object>,
    background: Background,
}

impl Scene {
    /// Build a scene, checking its invariants: one or two objects, in different positions (so
    /// they never overlap and the caption is unambiguous).
    pub fn new(objects: Vec<Object>, background: Background) -> Result<Scene> {
        if objects.is_empty() || objects.len() > 2 {
            return Err(Error::InvalidArgument(format!(
                "a scene has one or two shapes, got {}",
                objects.len()
            )));
        }
        if objects.len() == 2 && objects[0].position == objects[1].position {
            return Err(Error::InvalidArgument(format!(
                "two shapes {}: each shape needs its own position",
                objects[0].position
            )));
        }
        Ok(Scene {
            objects,
            background,
        })
    }

    /// The objects, in caption (and drawing) order.
    pub fn objects(&self) -> &[Object] {
        &self.objects
    }

    /// The background.
    pub fn background(&self) -> Background {
        self.background
    }

    /// Whether any object uses a held-out (shape, colour) combination.
    pub fn is_held_out(&self) -> bool {
        self.objects.iter().any(Object::is_held_out)
    }

    fn random_from<R: Rng + ?Sized>(rng: &mut R, pairs: &[(ShapeKind, Colour)]) -> Scene {
        let n = rng.random_range(1..=2usize);
        let first = Position::ALL[rng.random_range(0..Position::ALL.len())];
        let mut objects = vec![Object::random_with(rng, pairs, first)];
        if n == 2 {
            let others: Vec<Position> = Position::ALL
                .iter()
                .copied()
                .filter(|p| *p != first)
                .collect();
            let second = others[rng.random_range(0..others.len())];
            objects.push(Object::random_with(rng, pairs, second));
        }
        let background = Background::ALL[rng.random_range(0..Background::ALL.len())];
        Scene {
            objects,
            background,
        }
    }

    /// A uniformly random scene over the whole attribute space (held-out combinations included).
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> Scene {
        Scene::random_from(rng, &all_pairs())
    }

    /// A random scene for training: no object uses a held-out (shape, colour) combination.
    pub fn random_train<R: Rng + ?Sized>(rng: &mut R) -> Scene {
        Scene::random_from(rng, &train_pairs())
    }

    /// A random evaluation scene whose first object uses a held-out combination (the second, if
    /// any, is drawn from the whole space).
    pub fn random_held_out<R: Rng + ?Sized>(rng: &mut R) -> Scene {
        let mut s = Scene::random(rng);
        let (shape, colour) = HELD_OUT[rng.random_range(0..HELD_OUT.len())];
        s.objects[0].shape = shape;
        s.objects[0].colour = colour;
        s
    }

    /// Render at `res` × `res` pixels: the background, then each object in order, a pixel taking
    /// an object's colour when its centre is inside the shape. Exact, with no anti-aliasing.
    pub fn render(&self, res: u32) -> Result<RgbImage> {
        if !(MIN_RESOLUTION..=MAX_RESOLUTION).contains(&res) {
            return Err(Error::InvalidArgument(format!(
                "resolution {res} is outside {MIN_RESOLUTION}..={MAX_RESOLUTION}"
            )));
        }
        let mut img = RgbImage::from_pixel(res, res, image::Rgb(self.background.rgb()));
        for o in &self.objects {
            let (x0, y0, x1, y1) = o.bbox(res);
            let px = image::Rgb(o.colour.rgb());
            for y in y0..=y1 {
                for x in x0..=x1 {
                    if o.covers(x, y, res) {
                        img.put_pixel(x, y, px);
                    }
                }
            }
        }
        Ok(img)
    }

    /// The caption in the world's grammar, e.g. "a large red star on the left, on a grey
    /// background"; [`Scene::parse`] inverts it exactly.
    pub fn caption(&self) -> String {
        let objs: Vec<String> = self.objects.iter().map(Object::phrase).collect();
        format!(
            "{}, on a {} background",
            objs.join(" and "),
            self.background
        )
    }

    /// Parse a caption of the grammar (case-insensitive, any spacing, optional final full
    /// stop) back into the scene; an error names the first word that does not fit and what was
    /// expected there.
    pub fn parse(caption: &str) -> Result<Scene> {
        let mut cur = Cursor::new(caption);
        let mut objects = vec![parse_object(&mut cur)?];
        if cur.peek() == Some("and") {
            cur.next("\"and\"")?;
            objects.push(parse_object(&mut cur)?);
        }
        cur.expect(",")?;
        cur.expect("on")?;
        cur.expect("a")?;
        let background: Background = cur.next_as("a background")?;
        cur.expect("background")?;
        if let Some(w) = cur.peek() {
            return Err(cur.err(format!("unexpected word {w:?} after the background")));
        }
        Scene::new(objects, background).map_err(|e| cur.err(e.to_string()))
    }
}

impl fmt::Display for Scene {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.caption())
    }
}

impl FromStr for Scene {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Scene::parse(s)
    }
}

/// Word cursor over a caption, for [`Scene::parse`].
struct Cursor<'a> {
    caption: &'a str,
    words: Vec<String>,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(caption: &'a str) -> Self {
        let trimmed = caption.trim().trim_end_matches('.');
        let words = trimmed
            .to_ascii_lowercase()
            .replace(',', " , ")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Cursor {
            caption,
            words,
            at: 0,
        }
    }

    fn err(&self, message: String) -> Error {
        Error::InvalidArgument(format!("caption {:?}: {message}", self.caption))
    }

    fn peek(&self) -> Option<&str> {
        self.words.get(self.at).map(String::as_str)
    }

    fn next(&mut self, expected: &str) -> Result<String> {
        match self.words.get(self.at) {
            Some(w) => {
                self.at += 1;
                Ok(w.clone())
            }
            None => Err(self.err(format!("ends early: expected {expected}"))),
        }
    }

    fn expect(&mut self, word: &str) -> Result<()> {
        let w = self.next(&format!("{word:?}"))?;
        if w == word {
            Ok(())
        } else {
            Err(self.err(format!("unknown word {w:?}: expected {word:?}")))
        }
    }

    fn next_as<T: FromStr<Err = Error>>(&mut self, expected: &str) -> Result<T> {
        let w = self.next(expected)?;
        w.parse::<T>().map_err(|e| match e {
            Error::InvalidArgument(m) => self.err(m),
            e => e,
        })
    }
}

fn parse_object(cur: &mut Cursor<'_>) -> Result<Object> {
    let article = cur.next("\"a\"")?;
    if article != "a" && article != "an" {
        return Err(cur.err(format!("unknown word {article:?}: expected \"a\"")));
    }
    let size: Size = cur.next_as("a size")?;
    let colour: Colour = cur.next_as("a colour")?;
    let shape: ShapeKind = cur.next_as("a shape")?;
    let position = parse_position(cur)?;
    Ok(Object {
        shape,
        colour,
        size,
        position,
    })
}

fn parse_position(cur: &mut Cursor<'_>) -> Result<Position> {
    const EXPECTED: &str = "a position (on the left, in the center, on the right, at the top, \
                            at the bottom, at the top left, ...)";
    let prep = cur.next(EXPECTED)?;
    match prep.as_str() {
        "on" => {
            cur.expect("the")?;
            let side = cur.next("\"left\" or \"right\"")?;
            match side.as_str() {
                "left" => Ok(Position::Left),
                "right" => Ok(Position::Right),
                w => Err(cur.err(format!(
                    "unknown word {w:?}: expected \"left\" or \"right\""
                ))),
            }
        }
        "in" => {
            cur.expect("the")?;
            let w = cur.next("\"center\"")?;
            if w == "center" || w == "centre" || w == "middle" {
                Ok(Position::Center)
            } else {
                Err(cur.err(format!("unknown word {w:?}: expected \"center\"")))
            }
        }
        "at" => {
            cur.expect("the")?;
            let vert = cur.next("\"top\" or \"bottom\"")?;
            let top = match vert.as_str() {
                "top" => true,
                "bottom" => false,
                w => {
                    return Err(cur.err(format!(
                        "unknown word {w:?}: expected \"top\" or \"bottom\""
                    )))
                }
            };
            let side = match cur.peek() {
                Some("left") => Some(false),
                Some("right") => Some(true),
                _ => None,
            };
            if side.is_some() {
                cur.next("a side")?;
            }
            Ok(match (top, side) {
                (true, None) => Position::Top,
                (true, Some(false)) => Position::TopLeft,
                (true, Some(true)) => Position::TopRight,
                (false, None) => Position::Bottom,
                (false, Some(false)) => Position::BottomLeft,
                (false, Some(true)) => Position::BottomRight,
            })
        }
        w => Err(cur.err(format!("unknown word {w:?}: expected {EXPECTED}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn caption_parse_round_trip() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let s = Scene::random(&mut rng);
            let c = s.caption();
            let back = Scene::parse(&c).unwrap_or_else(|e| panic!("{c}: {e}"));
            assert_eq!(back, s, "{c}");
        }
    }

    #[test]
    fn caption_example() {
        let s = Scene::new(
            vec![
                Object {
                    shape: ShapeKind::Star,
                    colour: Colour::Red,
                    size: Size::Large,
                    position: Position::Left,
                },
                Object {
                    shape: ShapeKind::Circle,
                    colour: Colour::Blue,
                    size: Size::Small,
                    position: Position::Right,
                },
            ],
            Background::Grey,
        )
        .unwrap();
        assert_eq!(
            s.caption(),
            "a large red star on the left and a small blue circle on the right, on a grey background"
        );
        let p = Scene::parse("A large RED star on the left,on a grey background.").unwrap();
        assert_eq!(p.objects().len(), 1);
        assert_eq!(p.objects()[0].colour, Colour::Red);
    }

    #[test]
    fn parse_errors_name_the_word() {
        let e = Scene::parse("a large mauve star on the left, on a grey background")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"mauve\"") && e.contains("colour"), "{e}");
        let e = Scene::parse("a large red blob on the left, on a grey background")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"blob\"") && e.contains("shape"), "{e}");
        let e = Scene::parse("a large red star on the left, on a grey floor")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"floor\""), "{e}");
        let e = Scene::parse("a large red star somewhere, on a grey background")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"somewhere\""), "{e}");
        let e = Scene::parse("a large red star").unwrap_err().to_string();
        assert!(e.contains("ends early"), "{e}");
        let e = Scene::parse(
            "a large red star on the left and a small red circle on the left, on a grey background",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("own position"), "{e}");
    }

    #[test]
    fn same_seed_same_pixels() {
        for res in [64, 96] {
            let a = Scene::random(&mut StdRng::seed_from_u64(42))
                .render(res)
                .unwrap();
            let b = Scene::random(&mut StdRng::seed_from_u64(42))
                .render(res)
                .unwrap();
            assert_eq!(a.as_raw(), b.as_raw());
        }
        let mut r1 = StdRng::seed_from_u64(3);
        let mut r2 = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            assert_eq!(Scene::random_train(&mut r1), Scene::random_train(&mut r2));
        }
    }

    #[test]
    fn every_shape_paints_only_inside_its_bbox() {
        for res in [64u32, 100] {
            for &shape in ShapeKind::ALL {
                for &size in Size::ALL {
                    for &position in Position::ALL {
                        let o = Object {
                            shape,
                            colour: Colour::Red,
                            size,
                            position,
                        };
                        let img = Scene::new(vec![o], Background::Grey)
                            .unwrap()
                            .render(res)
                            .unwrap();
                        let (x0, y0, x1, y1) = o.bbox(res);
                        let mut inside = 0;
                        for (x, y, p) in img.enumerate_pixels() {
                            if p.0 == Colour::Red.rgb() {
                                let in_box = x >= x0 && x <= x1 && y >= y0 && y <= y1;
                                assert!(in_box, "{shape} {size} {position} at ({x},{y})");
                                inside += 1;
                            }
                        }
                        assert!(inside >= 10, "{shape} {size} {position}: {inside} px");
                    }
                }
            }
        }
    }

    #[test]
    fn two_objects_never_overlap() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..100 {
            let s = Scene::random(&mut rng);
            if let [a, b] = s.objects() {
                let (ax0, ay0, ax1, ay1) = a.bbox(64);
                let (bx0, by0, bx1, by1) = b.bbox(64);
                assert!(ax1 < bx0 || bx1 < ax0 || ay1 < by0 || by1 < ay0, "{s}");
            }
        }
    }

    #[test]
    fn held_out_never_in_training() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut seen_any = 0;
        for _ in 0..2000 {
            let s = Scene::random_train(&mut rng);
            assert!(!s.is_held_out(), "{s}");
            for o in s.objects() {
                assert!(!is_held_out(o.shape, o.colour));
            }
            seen_any += s.objects().len();
        }
        assert!(seen_any > 2000);
        let mut rng = StdRng::seed_from_u64(6);
        assert!((0..50).all(|_| Scene::random_held_out(&mut rng).is_held_out()));
        assert_eq!(
            train_pairs().len() + HELD_OUT.len(),
            ShapeKind::ALL.len() * Colour::ALL.len()
        );
        // Every shape and every colour remains in training.
        for &s in ShapeKind::ALL {
            assert!(train_pairs().iter().any(|p| p.0 == s));
        }
        for &c in Colour::ALL {
            assert!(train_pairs().iter().any(|p| p.1 == c));
        }
    }

    #[test]
    fn resolution_bounds() {
        let s = Scene::random(&mut StdRng::seed_from_u64(1));
        assert!(s.render(32).is_err());
        assert_eq!(s.render(64).unwrap().dimensions(), (64, 64));
    }

    #[test]
    fn colours_and_backgrounds_are_distinct() {
        let mut all: Vec<[u8; 3]> = Colour::ALL.iter().map(|c| c.rgb()).collect();
        all.extend(Background::ALL.iter().map(|b| b.rgb()));
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                let d: i32 = (0..3)
                    .map(|k| (all[i][k] as i32 - all[j][k] as i32).abs())
                    .sum();
                assert!(d >= 60, "{:?} vs {:?}", all[i], all[j]);
            }
        }
    }
}
