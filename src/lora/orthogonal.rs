//! Down-projections for the two Pair Customization adapters.
//!
//! Orthogonality is structural: for every input width n one seeded Gaussian n×n matrix is
//! orthonormalised (in f64), ContentLoRA takes rows `[0, r_c)` and StyleLoRA rows
//! `[r_c, r_c + r_s)`, so `A_c · A_sᵀ = 0` and the two updates read orthogonal input subspaces.
//! Both A are frozen; only B is trained. Any orthonormal basis keeps the property, so the exact
//! random stream does not have to match PyTorch's (the file stores A).
//!
//! Rows are orthonormalised one after the other with modified Gram-Schmidt run twice ("twice is
//! enough"), so row i depends only on the first i + 1 Gaussian rows: computing the first k rows
//! costs O(k²·n) and gives exactly the first k rows of the full n×n matrix.
//!
//! [`kaiming_down`] is the paper's ablation "without orthogonality": an ordinary LoRA init.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// SplitMix64 finaliser: a fixed, well-mixing map from one u64 to another.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of the basis of width `n` under `master_seed`: one independent stream per width, so
/// that adding or removing layers of another width never changes this width's basis.
pub fn width_seed(master_seed: u64, n: usize) -> u64 {
    splitmix64(master_seed ^ splitmix64(n as u64))
}

/// A stable seed for one named layer under `master_seed` (FNV-1a of the name, mixed), for
/// per-layer random inits such as [`kaiming_down`] that must not depend on layer order.
pub fn path_seed(master_seed: u64, path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(master_seed ^ h)
}

/// The first `k` rows (k ≤ n, clamped) of [`orthonormal_rows`]`(n, seed)`, row-major `k×n`.
///
/// Row i is the i-th row of a seeded standard Gaussian matrix (drawn row by row), made orthogonal
/// to rows 0..i by two passes of modified Gram-Schmidt and normalised, all in f64. A row whose
/// remainder is numerically zero (probability zero for Gaussian input) is redrawn.
pub fn orthonormal_rows_first(n: usize, k: usize, seed: u64) -> Vec<f64> {
    let k = k.min(n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut q = vec![0f64; k * n];
    let mut i = 0;
    while i < k {
        let mut v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let norm0 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for _pass in 0..2 {
            for j in 0..i {
                let qj = &q[j * n..(j + 1) * n];
                let dot: f64 = qj.iter().zip(&v).map(|(a, b)| a * b).sum();
                for (x, a) in v.iter_mut().zip(qj) {
                    *x -= dot * a;
                }
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if !norm.is_finite() || norm <= 1e-8 * norm0 {
            continue; // degenerate draw: take the next Gaussian row instead
        }
        for (dst, x) in q[i * n..(i + 1) * n].iter_mut().zip(&v) {
            *dst = x / norm;
        }
        i += 1;
    }
    q
}

/// An orthonormal `n×n` matrix (row-major) from a seeded Gaussian matrix, orthonormalised in f64:
/// `Q·Qᵀ = I` to about 1e-15. The same `(n, seed)` always gives the same matrix.
pub fn orthonormal_rows(n: usize, seed: u64) -> Vec<f64> {
    orthonormal_rows_first(n, n, seed)
}

/// Rows computed so far for one width.
#[derive(Debug)]
struct CachedRows {
    rows: usize,
    data: Arc<Vec<f64>>,
}

/// Seeded orthonormal bases, one per input width, giving the frozen down-projections of
/// ContentLoRA (rows `[0, r_c)`) and StyleLoRA (rows `[r_c, r_c + r_s)`).
///
/// Each width has its own seed derived from the master seed ([`width_seed`]). Bases are cached
/// per width (only as many rows as were asked for: the first k rows do not depend on k), so many
/// layers of the same width share one computation. Thread-safe.
#[derive(Debug)]
pub struct OrthogonalBasis {
    master_seed: u64,
    cache: Mutex<HashMap<usize, CachedRows>>,
}

impl OrthogonalBasis {
    /// Bases derived from `master_seed`.
    pub fn new(master_seed: u64) -> Self {
        Self {
            master_seed,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The master seed.
    pub fn master_seed(&self) -> u64 {
        self.master_seed
    }

    /// The first `k` rows of width `n`'s basis (k ≤ n), computed once and cached.
    fn first_rows(&self, n: usize, k: usize) -> Arc<Vec<f64>> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.get(&n) {
                if c.rows >= k {
                    return c.data.clone();
                }
            }
        }
        // Computed outside the lock; a concurrent caller may compute the same rows (identical).
        let data = Arc::new(orthonormal_rows_first(
            n,
            k,
            width_seed(self.master_seed, n),
        ));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let keep = cache.get(&n).is_some_and(|c| c.rows >= k);
        if !keep {
            cache.insert(
                n,
                CachedRows {
                    rows: k,
                    data: data.clone(),
                },
            );
        }
        data
    }

    /// Rows `[start, start + count)` of width `n`'s basis as a `[count, n]` tensor.
    pub fn rows(
        &self,
        n: usize,
        start: usize,
        count: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let end = start
            .checked_add(count)
            .filter(|&e| e <= n)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "orthonormal rows [{start}, {start}+{count}) do not fit input width {n}: \
                     content rank + style rank must not exceed the narrowest adapted layer's width"
                ))
            })?;
        if count == 0 {
            return Err(Error::InvalidArgument(
                "an adapter rank must be at least 1".into(),
            ));
        }
        let data = self.first_rows(n, end);
        let slice = &data[start * n..end * n];
        Ok(Tensor::from_slice(slice, (count, n), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }

    /// ContentLoRA's down-projection for input width `n`: rows `[0, r_c)`, shape `[r_c, n]`.
    pub fn content_rows(
        &self,
        n: usize,
        r_c: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.rows(n, 0, r_c, dtype, device)
    }

    /// StyleLoRA's down-projection for input width `n`: rows `[r_c, r_c + r_s)`, shape `[r_s, n]`.
    /// Errors when `r_c + r_s > n` (the two subspaces could not be orthogonal).
    pub fn style_rows(
        &self,
        n: usize,
        r_c: usize,
        r_s: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.rows(n, r_c, r_s, dtype, device)
    }
}

/// An ordinary LoRA down-projection `[rows, n]` for the "without orthogonality" ablation, drawn as
/// PEFT's default init does: Kaiming-uniform with `a = √5` over fan-in `n`, i.e. U(−1/√n, 1/√n).
/// Seeded (see [`path_seed`] for a per-layer seed); the caller makes it trainable.
pub fn kaiming_down(
    rows: usize,
    n: usize,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if rows == 0 || n == 0 {
        return Err(Error::InvalidArgument(format!(
            "kaiming_down: empty shape [{rows}, {n}]"
        )));
    }
    // gain = sqrt(2 / (1 + a²)) = sqrt(1/3); bound = sqrt(3) · gain / sqrt(fan_in) = 1 / sqrt(n).
    let bound = 1.0 / (n as f64).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<f64> = (0..rows * n)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Tensor::from_vec(data, (rows, n), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_gram_error(q: &[f64], k: usize, n: usize) -> f64 {
        let mut worst = 0f64;
        for i in 0..k {
            for j in 0..k {
                let dot: f64 = (0..n).map(|c| q[i * n + c] * q[j * n + c]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                worst = worst.max((dot - want).abs());
            }
        }
        worst
    }

    #[test]
    fn orthonormal_and_prefix_consistent() {
        for n in [1, 2, 7, 33] {
            let q = orthonormal_rows(n, 11);
            assert!(max_gram_error(&q, n, n) < 1e-13, "n = {n}");
            let k = n.div_ceil(2);
            let first = orthonormal_rows_first(n, k, 11);
            assert_eq!(first[..], q[..k * n]);
        }
        assert_ne!(orthonormal_rows(8, 1), orthonormal_rows(8, 2));
    }

    #[test]
    fn kaiming_bounds() {
        let t = kaiming_down(4, 100, 3, DType::F64, &Device::Cpu).unwrap();
        let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.abs() <= 0.1));
        let mean_sq = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
        // Var of U(-b, b) is b²/3 = 1/300.
        assert!((mean_sq - 1.0 / 300.0).abs() < 1.0 / 600.0, "{mean_sq}");
    }

    #[test]
    fn rows_out_of_range_is_an_error() {
        let b = OrthogonalBasis::new(0);
        assert!(b.style_rows(16, 8, 9, DType::F32, &Device::Cpu).is_err());
        assert!(b.style_rows(16, 8, 8, DType::F32, &Device::Cpu).is_ok());
        assert!(b.content_rows(16, 0, DType::F32, &Device::Cpu).is_err());
    }
}
