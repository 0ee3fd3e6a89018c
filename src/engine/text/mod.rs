//! Text conditioning: prompts → token ids → CLIP text-encoder states → the UNet's conditioning.
//!
//! [`tokenizer`] is CLIP's BPE tokenizer (both folder layouts), [`clip`] our CLIP text
//! transformer (SD1.x CLIP-L, SD2.x OpenCLIP-H, SDXL's pair), and [`conditioning`] applies the
//! model family's rule (diffusers' `encode_prompt`) to turn a batch of prompts into
//! [`Conditioning`].

pub mod clip;
pub mod conditioning;
pub mod tokenizer;

pub use clip::{Activation, ClipTextConfig, ClipTextEncoder, ClipTextOutput, PoolingRule};
pub use conditioning::{Conditioning, PromptEncoder, TextBranch};
pub use tokenizer::{ClipTokenizer, SpecialToken};
