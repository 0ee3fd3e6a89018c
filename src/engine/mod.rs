//! The diffusion engine: Stable Diffusion 1.x / 2.x / SDXL in candle, loaded from diffusers folders.
//!
//! Flow: [`model_dir`] finds the files of a diffusers folder, [`weights`] memory-maps them with
//! shape checks, [`text`] turns prompts into conditioning, [`unet`] predicts noise, [`vae`] maps
//! between pixels and latents, [`scheduler`] walks the noise schedule, and [`pipeline`] ties them
//! into text-to-image sampling with classifier-free guidance.

pub mod attention;
pub mod attention_blockwise;
pub mod conv;
pub mod device;
pub(crate) mod fastmath;
pub mod frozen;
pub mod image_io;
pub mod model_dir;
pub mod nn;
pub mod noise;
pub mod norm;
pub mod pipeline;
pub mod scheduler;
pub mod text;
pub mod unet;
pub mod vae;
pub mod weights;

/// The contiguous data of a CPU storage as `T`, for the CPU kernels of our custom ops
/// ([`conv`], [`norm`]); `what` names the op in the error.
pub(crate) fn contiguous_cpu_slice<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: operands must be contiguous");
    };
    Ok(&T::cpu_storage_as_slice(storage)?[start..end])
}
