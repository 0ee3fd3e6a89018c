//! pairstyle: learn an artistic style from one image pair (Pair Customization, arXiv 2405.01536)
//! and apply it to a Stable Diffusion model, in Rust with candle.
//!
//! The crate is organised along the flow of the product:
//! - [`engine`]: the diffusion engine (model folders, tokenizer, text encoders, UNet, VAE,
//!   schedulers, the sampling pipeline). It knows nothing of the daemon or the terminal.
//! - [`config`]: the TOML configuration shared by every command.
//! - [`daemon`]: the drop-folder daemon: pair intake, crash-safe job journal, IPC server, worker.
//! - [`error`]: the library's error type.
//! - [`generate`]: text-to-image with styles as one call: request → PNG with its settings.
//! - [`lora`]: LoRA adapters: orthonormal down-projections, adapter sets, style files, export.
//! - [`tui`]: the terminal UI: styles, jobs, blended generation, the drop folder, over IPC.
//! - [`toy`]: a synthetic world (scenes, captions, exact style transforms) with ground truth.

pub mod bench;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod generate;
pub mod library;
pub mod lora;
pub mod toy;
pub mod trainer;
pub mod tui;

pub use error::{Error, Result};
