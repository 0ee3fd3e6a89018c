//! Seeded Gaussian noise, identical on every device and platform for a given seed.
//!
//! candle's own random tensors are not seedable on the CPU, so noise is drawn here with a seeded
//! ChaCha generator and copied to the device.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::Result;

/// A seeded source of standard normal tensors.
pub struct NoiseSource {
    rng: rand::rngs::StdRng,
}

impl NoiseSource {
    /// A source whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Draw a tensor of `shape` with i.i.d. N(0, 1) entries, as `dtype` on `device`.
    pub fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_unit_variance() {
        let a = NoiseSource::new(3)
            .randn(&[4096], DType::F32, &Device::Cpu)
            .unwrap();
        let b = NoiseSource::new(3)
            .randn(&[4096], DType::F32, &Device::Cpu)
            .unwrap();
        let c = NoiseSource::new(4)
            .randn(&[4096], DType::F32, &Device::Cpu)
            .unwrap();
        let va: Vec<f32> = a.to_vec1().unwrap();
        assert_eq!(va, b.to_vec1::<f32>().unwrap());
        assert_ne!(va, c.to_vec1::<f32>().unwrap());
        let mean = va.iter().sum::<f32>() / va.len() as f32;
        let var = va.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / va.len() as f32;
        // 4096 samples: the standard error of the mean is 1/64 and of the variance about 0.022.
        assert!(mean.abs() < 0.08, "mean {mean}");
        assert!((var - 1.0).abs() < 0.1, "var {var}");
    }
}
