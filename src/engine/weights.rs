//! Named, shape-checked access to model weights.
//!
//! [`Weights`] is a small path-scoped view over one of three sources: memory-mapped safetensors
//! files (the normal case), an in-memory map (tests, adapters), or seeded random tensors (to run
//! real-size architectures without downloading weights). Every lookup checks the shape the
//! architecture expects and fails with the tensor's full name, both shapes and the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where tensors come from.
enum Source {
    /// Memory-mapped safetensors files (several for sharded checkpoints).
    Mmap(MmapedSafetensors),
    /// Tensors already in memory, by full name.
    Map(HashMap<String, Tensor>),
    /// Deterministic pseudo-random tensors, for architecture tests without weight files.
    Random { seed: u64, std: f64 },
}

struct Shared {
    source: Source,
    /// Files (or a description) named in errors.
    origin: PathBuf,
}

/// A path-scoped, shape-checked view of a set of weights, in the spirit of candle's `VarBuilder`.
#[derive(Clone)]
pub struct Weights {
    shared: Arc<Shared>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Memory-map safetensors files. Corrupt or truncated files fail here, naming the file.
    pub fn from_safetensors(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        for p in paths {
            if !p.is_file() {
                return Err(Error::MissingFile { path: p.clone() });
            }
        }
        // SAFETY: the files are mapped read-only; as with every mmap, a concurrent writer could
        // change them under us, which is the caller's promise not to do (model folders are
        // treated as immutable).
        let st = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| Error::Safetensors {
            path: paths.first().cloned().unwrap_or_default(),
            message: e.to_string(),
        })?;
        let origin = match paths {
            [one] => one.clone(),
            _ => paths
                .first()
                .and_then(|p| p.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        Ok(Self::new(Source::Mmap(st), origin, dtype, device))
    }

    /// Weights held in memory (names are full names).
    pub fn from_map(map: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Map(map), PathBuf::from("<memory>"), dtype, device)
    }

    /// Seeded random weights with the given standard deviation: every requested tensor exists
    /// and has the requested shape. Used to run real-size architectures without weight files.
    pub fn random(seed: u64, std: f64, dtype: DType, device: &Device) -> Self {
        Self::new(
            Source::Random { seed, std },
            PathBuf::from("<random>"),
            dtype,
            device,
        )
    }

    fn new(source: Source, origin: PathBuf, dtype: DType, device: &Device) -> Self {
        Self {
            shared: Arc::new(Shared { source, origin }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// A view one level deeper: `w.pp("down_blocks").pp(0)` looks up `down_blocks.0.*`.
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        let prefix = if self.prefix.is_empty() {
            name
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            shared: self.shared.clone(),
            prefix,
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    /// The path of this view (`""` at the root), e.g. `down_blocks.0.attentions.0`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of `name` under this view.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The dtype tensors are converted to on load.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same weights, loaded as another dtype.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self {
            dtype,
            ..self.clone()
        }
    }

    /// Whether a tensor named `name` (under this view) exists.
    pub fn contains(&self, name: &str) -> bool {
        let full = self.path(name);
        match &self.shared.source {
            Source::Mmap(st) => st.get(&full).is_ok(),
            Source::Map(m) => m.contains_key(&full),
            Source::Random { .. } => true,
        }
    }

    /// Load `name` and check that it has `shape`.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.path(name);
        let t = match &self.shared.source {
            Source::Mmap(st) => {
                let view = st.get(&full).map_err(|_| self.missing(&full))?;
                if view.shape() != shape {
                    return Err(self.mismatch(&full, shape, view.shape()));
                }
                st.load(&full, &self.device)?
            }
            Source::Map(m) => {
                let t = m.get(&full).ok_or_else(|| self.missing(&full))?;
                if t.dims() != shape {
                    return Err(self.mismatch(&full, shape, t.dims()));
                }
                t.to_device(&self.device)?
            }
            Source::Random { seed, std } => random_tensor(*seed, *std, &full, shape, &self.device)?,
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    fn missing(&self, full: &str) -> Error {
        Error::MissingTensor {
            name: full.to_string(),
            file: self.shared.origin.clone(),
        }
    }

    fn mismatch(&self, full: &str, expected: &[usize], found: &[usize]) -> Error {
        Error::ShapeMismatch {
            name: full.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
            file: self.shared.origin.clone(),
        }
    }
}

/// A deterministic tensor for `name`: the name is hashed into the seed so that every tensor
/// differs, and norm weights (`*.weight` of 1-D shape) are drawn around 1 to keep activations sane.
fn random_tensor(seed: u64, std: f64, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    // Values are drawn in chunks, each from its own generator seeded by (seed, name, chunk), so
    // they are the same for any thread count and an SDXL-size UNet (2.6 G values) fills in
    // seconds on many cores.
    const CHUNK: usize = 1 << 16;
    let mut h: u64 = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let n: usize = shape.iter().product();
    let base = if shape.len() == 1 && name.ends_with(".weight") {
        1.0 // norm scales
    } else {
        0.0
    };
    let mut data = vec![0f32; n];
    data.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                h ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            for pair in chunk.chunks_mut(2) {
                // Box–Muller: two independent normals from two uniforms.
                let u1: f64 = rng.random::<f64>().max(1e-12);
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let (sin, cos) = (2.0 * std::f64::consts::PI * u2).sin_cos();
                pair[0] = (base + std * r * cos) as f32;
                if let Some(second) = pair.get_mut(1) {
                    *second = (base + std * r * sin) as f32;
                }
            }
        });
    Ok(Tensor::from_vec(data, shape, dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_mismatch_names_tensor_and_both_shapes() {
        let mut m = HashMap::new();
        m.insert(
            "a.b.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let w = Weights::from_map(m, DType::F32, &Device::Cpu);
        let err = w.pp("a").pp("b").get(&[3, 2], "weight").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("a.b.weight"), "{msg}");
        assert!(msg.contains("[3, 2]") && msg.contains("[2, 3]"), "{msg}");
        let err = w.get(&[1], "nope").unwrap_err();
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn random_weights_are_deterministic_and_distinct() {
        let w = Weights::random(7, 0.02, DType::F32, &Device::Cpu);
        let a = w.get(&[4, 4], "x.weight").unwrap();
        let b = w.get(&[4, 4], "x.weight").unwrap();
        let c = w.get(&[4, 4], "y.weight").unwrap();
        let d = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(d(&a, &b), 0.0);
        assert!(d(&a, &c) > 0.0);
    }

    #[test]
    fn random_weights_have_the_requested_statistics() {
        // Several chunks' worth, so the per-chunk generators are covered.
        let w = Weights::random(1, 0.02, DType::F32, &Device::Cpu);
        let stats = |t: Tensor| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        };
        let (mean, std) = stats(w.get(&[300_001], "proj.bias").unwrap());
        assert!(
            mean.abs() < 2e-4 && (std - 0.02).abs() < 2e-4,
            "{mean} {std}"
        );
        let (mean, std) = stats(w.get(&[300_001], "norm.weight").unwrap());
        assert!(
            (mean - 1.0).abs() < 2e-4 && (std - 0.02).abs() < 2e-4,
            "{mean} {std}"
        );
    }
}
