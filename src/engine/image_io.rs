//! Images in and out of the engine: decoding files into [-1, 1] tensors, the resizes and crops the
//! trainer needs, and writing PNGs with the generation settings in text chunks.
//!
//! - Loading ([`load_rgb`], [`load_image_tensor`]) reads PNG, JPEG or WebP, applies the EXIF
//!   orientation, drops alpha (like PIL's `convert("RGB")`), and fails with [`Error::Image`]
//!   naming the file for a missing, empty, truncated, corrupt or non-image file, or for sides
//!   beyond the caller's limit.
//! - Pixels map to tensors as torchvision's `ToTensor` + `Normalize(0.5, 0.5)` does, and back as
//!   diffusers' postprocess does: `(x / 2 + 0.5).clamp(0, 1) * 255`, rounded half to even.
//! - [`save_png_with_text`] encodes in memory, then writes a temporary file in the destination's
//!   folder, fsyncs it and renames it into place ([`write_file_atomic`]): a killed process never
//!   leaves a half-written PNG under the final name.

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, D};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use rand::Rng;

use crate::error::{Error, Result};

/// 8-bit RGB image buffer (re-exported from the `image` crate) used by the helpers below.
pub use image::RgbImage;

/// A generous default for [`load_rgb`]'s side limit: bigger photos are refused, not decoded.
pub const DEFAULT_MAX_SIDE: u32 = 16384;

fn image_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Decode a PNG, JPEG or WebP file into 8-bit RGB, upright per its EXIF orientation; either side
/// above `max_side` pixels is refused before decoding.
pub fn load_rgb(path: impl AsRef<Path>, max_side: u32) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            image_err(path, "file not found")
        } else {
            image_err(path, format!("cannot read file: {e}"))
        }
    })?;
    decode_rgb(path, &bytes, max_side)
}

/// Decode image bytes (`path` only names them in errors); see [`load_rgb`].
pub fn decode_rgb(path: &Path, bytes: &[u8], max_side: u32) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(image_err(path, "file is empty (0 bytes)"));
    }
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>> {
        let r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| image_err(path, format!("cannot read file: {e}")))?;
        match r.format() {
            Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => Ok(r),
            Some(other) => Err(image_err(
                path,
                format!("unsupported image format {other:?}; use PNG, JPEG or WebP"),
            )),
            None => Err(image_err(
                path,
                "not an image: no PNG, JPEG or WebP signature at the start of the file",
            )),
        }
    };
    let r = reader()?;
    let format = r.format();
    let fmt_name = format.map(|f| format!("{f:?}")).unwrap_or_default();
    let corrupt = |e: image::ImageError| {
        image_err(
            path,
            format!("cannot decode {fmt_name} image (truncated or corrupt file?): {e}"),
        )
    };
    let (w, h) = r.into_dimensions().map_err(corrupt)?;
    if w == 0 || h == 0 {
        return Err(image_err(path, format!("image has no pixels ({w}×{h})")));
    }
    if w > max_side || h > max_side {
        return Err(image_err(
            path,
            format!("image is {w}×{h} pixels, beyond the limit of {max_side} per side"),
        ));
    }
    // zune-jpeg fills a cut-off JPEG with grey instead of failing; PIL refuses such files.
    if format == Some(ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(image_err(
            path,
            "cannot decode Jpeg image (truncated or corrupt file?): no end-of-image marker after the scan data",
        ));
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    // Room for the largest allowed image at 16 bits per RGBA channel, and never below the default.
    let need = (max_side as u64).pow(2).saturating_mul(8);
    limits.max_alloc = Some(need.max(limits.max_alloc.unwrap_or(0)));
    r.limits(limits);
    let mut decoder = r.into_decoder().map_err(corrupt)?;
    let orientation = decoder.orientation().map_err(corrupt)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// Whether a JPEG has an end-of-image marker after its first scan: the header segments are
/// walked by their lengths (so EXIF thumbnails are skipped), then the scan data is searched.
fn jpeg_is_complete(b: &[u8]) -> bool {
    if b.len() < 4 || b[..2] != [0xFF, 0xD8] {
        return false;
    }
    let mut i = 2;
    loop {
        while i + 1 < b.len() && b[i] == 0xFF && b[i + 1] == 0xFF {
            i += 1; // fill bytes
        }
        if i + 4 > b.len() || b[i] != 0xFF {
            return false;
        }
        match b[i + 1] {
            0xDA => break,
            0xD9 => return false,
            0x01 | 0xD0..=0xD7 => i += 2,
            _ => i += 2 + u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize,
        }
    }
    b[i..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// An RGB image as a `[1, 3, H, W]` f32 tensor in [-1, 1] (`x / 255` normalised by mean and std
/// 0.5, as the diffusers training scripts do).
pub fn rgb_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| (v as f32 / 255.0 - 0.5) / 0.5)
        .collect();
    let t = Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?;
    Ok(t.to_device(device)?)
}

/// Load an image file straight into a `[1, 3, H, W]` f32 tensor in [-1, 1] on `device`.
pub fn load_image_tensor(path: impl AsRef<Path>, max_side: u32, device: &Device) -> Result<Tensor> {
    rgb_to_tensor(&load_rgb(path, max_side)?, device)
}

/// The size after resizing the shorter side to `side`, keeping the aspect ratio the way
/// torchvision's `Resize(int)` does (the longer side is truncated, not rounded).
pub fn shorter_side_size(w: u32, h: u32, side: u32) -> (u32, u32) {
    if w <= h {
        let long = (side as u64 * h as u64 / w.max(1) as u64) as u32;
        (side, long.max(1))
    } else {
        let long = (side as u64 * w as u64 / h.max(1) as u64) as u32;
        (long.max(1), side)
    }
}

/// Resize so that the shorter side is `side` pixels, with bilinear (triangle) filtering that
/// widens on downscaling, like PIL's `BILINEAR`.
pub fn resize_shorter_side(img: &RgbImage, side: u32) -> Result<RgbImage> {
    if side == 0 {
        return Err(Error::InvalidArgument("resize to a 0-pixel side".into()));
    }
    let (w, h) = shorter_side_size(img.width(), img.height(), side);
    resize_exact(img, w, h)
}

/// Resize to exactly `w × h` with bilinear filtering (e.g. a content image to its style image's
/// size); the same size returns a copy.
pub fn resize_exact(img: &RgbImage, w: u32, h: u32) -> Result<RgbImage> {
    if w == 0 || h == 0 {
        return Err(Error::InvalidArgument(format!("resize to {w}×{h}")));
    }
    if img.dimensions() == (w, h) {
        return Ok(img.clone());
    }
    Ok(image::imageops::resize(img, w, h, FilterType::Triangle))
}

fn check_crop(w: u32, h: u32, x: u32, y: u32, cw: u32, ch: u32) -> Result<()> {
    if cw == 0 || ch == 0 || x as u64 + cw as u64 > w as u64 || y as u64 + ch as u64 > h as u64 {
        return Err(Error::InvalidArgument(format!(
            "crop {cw}×{ch} at ({x}, {y}) does not fit in a {w}×{h} image"
        )));
    }
    Ok(())
}

/// Top-left offsets `(x, y)` of a centred `cw × ch` crop, rounded as torchvision's `CenterCrop`.
pub fn center_crop_offsets(w: u32, h: u32, cw: u32, ch: u32) -> Result<(u32, u32)> {
    check_crop(w, h, 0, 0, cw, ch)?;
    let x = ((w - cw) as f64 / 2.0).round_ties_even() as u32;
    let y = ((h - ch) as f64 / 2.0).round_ties_even() as u32;
    Ok((x, y))
}

/// Uniformly random top-left offsets `(x, y)` of a `cw × ch` crop (one draw can be shared by a
/// content and a style image of the same size).
pub fn random_crop_offsets<R: Rng + ?Sized>(
    w: u32,
    h: u32,
    cw: u32,
    ch: u32,
    rng: &mut R,
) -> Result<(u32, u32)> {
    check_crop(w, h, 0, 0, cw, ch)?;
    Ok((rng.random_range(0..=w - cw), rng.random_range(0..=h - ch)))
}

/// The `cw × ch` region whose top-left corner is `(x, y)`.
pub fn crop(img: &RgbImage, x: u32, y: u32, cw: u32, ch: u32) -> Result<RgbImage> {
    check_crop(img.width(), img.height(), x, y, cw, ch)?;
    Ok(image::imageops::crop_imm(img, x, y, cw, ch).to_image())
}

/// The image mirrored left to right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

/// The `cw × ch` region at `(x, y)` of a `[..., H, W]` tensor (a view, no copy).
pub fn crop_tensor(t: &Tensor, x: usize, y: usize, cw: usize, ch: usize) -> Result<Tensor> {
    let (h, w) = (t.dim(D::Minus2)?, t.dim(D::Minus1)?);
    let fits = |v: usize, n: usize, lim: usize| n > 0 && v.checked_add(n).is_some_and(|e| e <= lim);
    if !fits(x, cw, w) || !fits(y, ch, h) {
        return Err(Error::InvalidArgument(format!(
            "crop {cw}×{ch} at ({x}, {y}) does not fit in a {w}×{h} tensor"
        )));
    }
    Ok(t.narrow(D::Minus2, y, ch)?.narrow(D::Minus1, x, cw)?)
}

/// A `[..., H, W]` tensor mirrored along its last (width) axis.
pub fn hflip_tensor(t: &Tensor) -> Result<Tensor> {
    let w = t.dim(D::Minus1)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::from_vec(idx, w, t.device())?;
    Ok(t.index_select(&idx, t.rank() - 1)?)
}

/// A `[3, H, W]` (or `[1, 3, H, W]`) tensor in [-1, 1] as 8-bit RGB, exactly as diffusers'
/// postprocess: `(x / 2 + 0.5).clamp(0, 1) * 255`, rounded half to even; NaN becomes 0.
pub fn tensor_to_rgb8(t: &Tensor) -> Result<RgbImage> {
    let t = match t.dims() {
        [1, 3, _, _] => t.squeeze(0)?,
        [3, _, _] => t.clone(),
        dims => {
            return Err(Error::InvalidArgument(format!(
                "expected an image tensor [3, H, W] or [1, 3, H, W], got {dims:?}"
            )))
        }
    };
    let (_, h, w) = t.dims3()?;
    let hwc: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    let bytes: Vec<u8> = hwc
        .iter()
        .map(|&x| {
            let v = (x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
            if v.is_nan() {
                0
            } else {
                v.round_ties_even() as u8
            }
        })
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::InvalidArgument("image buffer size mismatch".into()))
}

/// The settings a generated image was made with, stored in its PNG text chunks.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationMeta {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt, if any.
    pub negative: Option<String>,
    /// The noise seed.
    pub seed: u64,
    /// Number of sampling steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub cfg: f64,
    /// Sampler name (`euler`, `ddim`, `pndm`).
    pub scheduler: String,
    /// The model folder or name.
    pub model: String,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Further settings (style adapters, guidance scales, ...), kept in the JSON `parameters`.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl GenerationMeta {
    /// Key/value pairs for [`save_png_with_text`]: one chunk per setting, `parameters` with all
    /// of them as JSON, and `Software`.
    pub fn text_chunks(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("prompt".to_string(), self.prompt.clone()),
            (
                "negative".to_string(),
                self.negative.clone().unwrap_or_default(),
            ),
            ("seed".to_string(), self.seed.to_string()),
            ("steps".to_string(), self.steps.to_string()),
            ("cfg".to_string(), self.cfg.to_string()),
            ("scheduler".to_string(), self.scheduler.clone()),
            ("model".to_string(), self.model.clone()),
        ];
        // Serialising plain strings and numbers cannot fail; an empty object is a safe fallback.
        let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string());
        v.push(("parameters".to_string(), json));
        v.push((
            "Software".to_string(),
            format!("pairstyle {}", env!("CARGO_PKG_VERSION")),
        ));
        v
    }
}

fn valid_keyword(k: &str) -> bool {
    // PNG keywords: 1–79 Latin-1 characters, printable, no leading/trailing/double spaces.
    let n = k.chars().count();
    (1..=79).contains(&n)
        && k.chars()
            .all(|c| (' '..='~').contains(&c) || ('\u{a1}'..='\u{ff}').contains(&c))
        && !k.starts_with(' ')
        && !k.ends_with(' ')
        && !k.contains("  ")
}

/// Encode 8-bit RGB pixels (`w × h × 3` bytes, row-major) as PNG bytes with text chunks: ASCII
/// values as `tEXt`, others as UTF-8 `iTXt`.
pub fn encode_png_with_text<K: AsRef<str>, V: AsRef<str>>(
    rgb8: &[u8],
    w: u32,
    h: u32,
    text: &[(K, V)],
) -> Result<Vec<u8>> {
    let expected = w as u64 * h as u64 * 3;
    if w == 0 || h == 0 || rgb8.len() as u64 != expected {
        return Err(Error::InvalidArgument(format!(
            "PNG of {w}×{h} RGB needs {expected} bytes, got {}",
            rgb8.len()
        )));
    }
    let mut out = Vec::with_capacity(rgb8.len() / 2 + 1024);
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            let (k, v) = (k.as_ref(), v.as_ref());
            if !valid_keyword(k) {
                return Err(Error::InvalidArgument(format!(
                    "PNG text keyword {k:?} must be 1-79 printable Latin-1 characters"
                )));
            }
            let res = if v.is_ascii() && !v.contains('\0') {
                enc.add_text_chunk(k.to_string(), v.to_string())
            } else {
                enc.add_itxt_chunk(k.to_string(), v.to_string())
            };
            res.map_err(|e| Error::InvalidArgument(format!("PNG text chunk {k:?}: {e}")))?;
        }
        let enc_err = |e: png::EncodingError| Error::InvalidArgument(format!("PNG encoding: {e}"));
        let mut writer = enc.write_header().map_err(enc_err)?;
        writer.write_image_data(rgb8).map_err(enc_err)?;
        writer.finish().map_err(enc_err)?;
    }
    Ok(out)
}

/// Write an 8-bit RGB PNG with text chunks, atomically: the file appears complete under `path`
/// or not at all (an existing file is replaced only on success).
pub fn save_png_with_text<K: AsRef<str>, V: AsRef<str>>(
    path: impl AsRef<Path>,
    rgb8: &[u8],
    w: u32,
    h: u32,
    text: &[(K, V)],
) -> Result<()> {
    let path = path.as_ref();
    let bytes = encode_png_with_text(rgb8, w, h, text).map_err(|e| match e {
        Error::InvalidArgument(m) => image_err(path, m),
        e => e,
    })?;
    write_file_atomic(path, &bytes)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write `bytes` to `path` through a hidden temporary file in the same folder (`.NAME.PID.N.tmp`),
/// fsynced, then renamed over `path`; on any failure the temporary file is removed and `path` is
/// untouched.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}.{n}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; folders cannot be fsynced everywhere, so this is best effort.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// All text chunks of a PNG (`tEXt`, `zTXt`, `iTXt`) as key/value pairs in file order per kind.
pub fn read_png_text(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            image_err(path, "file not found")
        } else {
            image_err(path, format!("cannot read file: {e}"))
        }
    })?;
    let bad = |e: png::DecodingError| image_err(path, format!("cannot decode PNG: {e}"));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(bad)?;
    // Read the pixels and the trailing chunks so that text after IDAT is seen too.
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| image_err(path, "PNG too large to decode"))?;
    let mut buf = vec![0u8; size];
    reader.next_frame(&mut buf).map_err(bad)?;
    reader.finish().map_err(bad)?;
    let info = reader.info();
    let mut out = Vec::new();
    for c in &info.uncompressed_latin1_text {
        out.push((c.keyword.clone(), c.text.clone()));
    }
    for c in &info.compressed_latin1_text {
        out.push((c.keyword.clone(), c.get_text().map_err(bad)?));
    }
    for c in &info.utf8_text {
        out.push((c.keyword.clone(), c.get_text().map_err(bad)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_side_truncates_like_torchvision() {
        assert_eq!(shorter_side_size(1000, 750, 512), (682, 512));
        assert_eq!(shorter_side_size(750, 1000, 512), (512, 682));
        assert_eq!(shorter_side_size(512, 512, 256), (256, 256));
    }

    #[test]
    fn center_crop_rounds_half_to_even() {
        assert_eq!(center_crop_offsets(5, 5, 2, 2).unwrap(), (2, 2)); // 1.5 -> 2
        assert_eq!(center_crop_offsets(7, 4, 2, 3).unwrap(), (2, 0)); // 2.5 -> 2, 0.5 -> 0
        assert!(center_crop_offsets(4, 4, 5, 1).is_err());
    }

    #[test]
    fn keywords_are_checked() {
        assert!(valid_keyword("prompt"));
        assert!(!valid_keyword(""));
        assert!(!valid_keyword(" x"));
        assert!(!valid_keyword("a\u{2603}"));
        assert!(!valid_keyword(&"k".repeat(80)));
    }
}
