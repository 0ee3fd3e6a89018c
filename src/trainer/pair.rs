//! A training pair on disk and its preprocessing, as the paper does it: the content image resized
//! to the style image's size if they differ, the shorter side resized to the training resolution
//! (bilinear), then per iteration one shared random square crop and a shared horizontal flip.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::Rng;

use crate::engine::image_io::{self, RgbImage};
use crate::error::{Error, Result};

/// Images larger than this on either side are rejected as absurd.
pub const MAX_PAIR_SIDE: u32 = 8192;

/// One content/style pair with its wording.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairSpec {
    /// The un-stylised image.
    pub content: PathBuf,
    /// The same image, stylised.
    pub style: PathBuf,
    /// What the image shows (e.g. `dog`), used in `a photo of a <token> <subject>`.
    pub subject: String,
    /// The style in words (e.g. `watercolor`), used in `… in <style> style`.
    pub style_desc: String,
}

/// A pair resized for training, ready to be cropped each iteration.
#[derive(Debug, Clone)]
pub struct PreparedPair {
    content: RgbImage,
    style: RgbImage,
    /// Original (height, width) of the content and style images, for SDXL size conditioning.
    pub original_sizes: [(usize, usize); 2],
    resolution: u32,
}

/// The crop and flip of one iteration, shared by both images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Augment {
    /// Left edge of the crop.
    pub x: u32,
    /// Top edge of the crop.
    pub y: u32,
    /// Whether both images are mirrored.
    pub flip: bool,
}

impl PreparedPair {
    /// Load and resize both images. Unreadable, truncated or absurdly large files fail with an
    /// error naming the file.
    pub fn load(content: &Path, style: &Path, resolution: usize) -> Result<Self> {
        let res = u32::try_from(resolution)
            .map_err(|_| Error::InvalidArgument(format!("resolution {resolution}")))?;
        let c = image_io::load_rgb(content, MAX_PAIR_SIDE)?;
        let s = image_io::load_rgb(style, MAX_PAIR_SIDE)?;
        let original_sizes = [
            (c.height() as usize, c.width() as usize),
            (s.height() as usize, s.width() as usize),
        ];
        let c = if c.dimensions() != s.dimensions() {
            image_io::resize_exact(&c, s.width(), s.height())?
        } else {
            c
        };
        let content = image_io::resize_shorter_side(&c, res)?;
        let style = image_io::resize_shorter_side(&s, res)?;
        Ok(Self {
            content,
            style,
            original_sizes,
            resolution: res,
        })
    }

    /// Draw this iteration's crop and flip.
    pub fn draw_augment<R: Rng>(&self, rng: &mut R, flip_p: f64) -> Result<Augment> {
        let (w, h) = self.style.dimensions();
        let (x, y) = image_io::random_crop_offsets(w, h, self.resolution, self.resolution, rng)?;
        let flip = flip_p >= 1.0 || (flip_p > 0.0 && rng.random::<f64>() < flip_p);
        Ok(Augment { x, y, flip })
    }

    /// The content and style crops as [1, 3, R, R] tensors in [-1, 1].
    pub fn tensors(&self, aug: Augment, device: &Device) -> Result<(Tensor, Tensor)> {
        let one = |img: &RgbImage| -> Result<Tensor> {
            let r = self.resolution;
            let mut c = image_io::crop(img, aug.x, aug.y, r, r)?;
            if aug.flip {
                c = image_io::hflip(&c);
            }
            image_io::rgb_to_tensor(&c, device)
        };
        Ok((one(&self.content)?, one(&self.style)?))
    }
}
