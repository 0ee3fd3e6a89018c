//! LoRA adapters for Pair Customization, independent of training and sampling.
//!
//! - [`orthogonal`]: seeded orthonormal down-projections (ContentLoRA rows `[0, r_c)`, StyleLoRA
//!   rows `[r_c, r_c + r_s)`), and the ordinary init of the "no orthogonality" ablation.
//! - [`adapter_set`]: a named adapter's A/B/alpha for every target layer; attach to a UNet.
//! - [`names`]: module paths and their spellings (diffusers, SGM, kohya's flattened names).
//! - [`file`](mod@file): save `style.safetensors` (PEFT keys, metadata), load any common LoRA spelling.
//! - [`export`]: kohya files for A1111/ComfyUI and PEFT files for diffusers, with metadata.

pub mod adapter_set;
pub mod export;
pub mod file;
pub mod names;
pub mod orthogonal;

pub use adapter_set::{AdapterSet, LayerAdapter};
pub use export::{export_kohya, export_peft, ExportFormat, ExportInfo};
pub use file::{load, read_metadata, save_peft, KeySpelling, LoadOptions, LoadedLora};
pub use names::ModuleCatalog;
pub use orthogonal::{kaiming_down, orthonormal_rows, OrthogonalBasis};
