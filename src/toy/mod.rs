//! A synthetic world with exact ground truth, for the embedded toy model and the method benchmark.
//!
//! Real model weights cannot be downloaded on every machine, so pairstyle measures Pair
//! Customization on a world it fully controls:
//! - [`world`]: scenes of one or two simple shapes (kind, colour, size, position) on a plain
//!   background, rendered exactly from a seed, with a caption grammar and its parser, and a fixed
//!   list of held-out (shape, colour) combinations that training never sees.
//! - [`styles`]: deterministic style transforms (pixel-wise, local and texture) that are never
//!   shown to the base model, so the exact stylisation of any output is known.
//! - [`embedded`]: the toy model compiled into the program, the default model.
//! - [`analyse`](mod@analyse): a deterministic analyser that recovers a scene's background and
//!   objects from an image, with the scoring the benchmark uses (per-attribute accuracy, content
//!   leakage) and its own accuracy on clean renders.

pub mod analyse;
pub mod embedded;
pub mod styles;
pub mod world;

pub use analyse::{
    accuracy_on_clean_renders, analyse, check_scene, copies_reference, leaks_reference, Analyser,
    Analysis, Attribute, AttributeAccuracy, Detection, ObjectCheck, Palette, SceneCheck,
    MIN_CONFIDENCE,
};
pub use styles::StyleKind;
pub use world::{Background, Colour, Object, Position, Scene, ShapeKind, Size};
