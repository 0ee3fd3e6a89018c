//! Small numeric building blocks shared by the CPU kernels: a vectorisable `exp` for f32 and
//! the run-time choice of SIMD build.

/// The widest build of a CPU kernel this machine runs: kernels whose loops should vectorise
/// compile their body three times (baseline x86-64, AVX2+FMA, AVX-512) and pick one at run
/// time with [`Simd::detect`]. (`gemm` dispatches on its own.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simd {
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
    /// AVX2 with FMA.
    Avx2Fma,
    /// AVX-512 F/VL/BW/DQ (with AVX2 and FMA).
    Avx512,
}

impl Simd {
    /// The widest build this CPU supports.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            if avx2
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
            {
                return Simd::Avx512;
            }
            if avx2 {
                return Simd::Avx2Fma;
            }
        }
        Simd::Baseline
    }
}

/// log2(e).
const LOG2E_F32: f32 = std::f32::consts::LOG2_E;
/// 1.5·2²³: adding it rounds an f32 of magnitude < 2²² to an integer, held in the low mantissa
/// bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `exp(x)` for f32, branch-free so that loops over it vectorise: `x = n·ln2 + r` with
/// |r| ≤ ln2/2 (ln2 split in two parts for an exact reduction), a degree-7 polynomial for `e^r`
/// (Cephes' `expf` coefficients, about 1 ulp), and `2^n` built in the exponent bits. Arguments
/// are clamped to [−87, 88] (so `exp(−∞)` gives e^−87 ≈ 1.6e−38 instead of 0, harmless as a
/// softmax weight); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * LOG2E_F32 + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let n_int = t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let pow2 = f32::from_bits(((n_int + 127) as u32) << 23);
    y * pow2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0.0_f64;
        let mut x = -87.0_f32;
        while x < 88.0 {
            let ours = exp_f32(x) as f64;
            let exact = (x as f64).exp();
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "exp_f32 relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    }
}
