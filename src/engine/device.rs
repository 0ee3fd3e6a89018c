//! Where tensors live and in which precision: `device` and `dtype` settings, parsed and resolved.
//!
//! [`DeviceSpec`] is what a user writes (`cpu`, `cuda`, `cuda:1`, `metal`, `auto`) and
//! [`DTypeSpec`] the precision (`f32`, `f16`, `bf16`); both parse from strings and from the TOML
//! config, and fail with the bad value named. [`DeviceSpec::resolve`] opens candle's device and says
//! how to rebuild when a GPU backend was not compiled in.
//!
//! Randomness: candle's CPU backend cannot be seeded (and its generator is not torch's), so
//! reproducible noise is drawn on the host by [`super::noise::NoiseSource`] and moved to the
//! device. Generation is deterministic for a seed on a given build, but never bit-equal to
//! diffusers' torch generator.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// A compute device as written in the config or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (always available; the default).
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal (`cuda` = `cuda:0`); needs the `cuda` feature.
    Cuda(usize),
    /// The Metal GPU with this ordinal (`metal` = `metal:0`); needs the `metal` feature.
    Metal(usize),
    /// CUDA if compiled in and a GPU answers, else Metal likewise, else the CPU.
    Auto,
}

impl DeviceSpec {
    /// Open the candle device; a GPU backend missing from this build is a clear error saying which
    /// feature to rebuild with, and a GPU that fails to open names the device.
    pub fn resolve(&self) -> Result<Device> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Unsupported(format!(
                        "device cuda:{n}: this build of pairstyle has no CUDA support; \
                         rebuild with `cargo build --release --features cuda`"
                    )));
                }
                Device::new_cuda(n).map_err(|e| {
                    Error::InvalidArgument(format!("cannot open device cuda:{n}: {e}"))
                })
            }
            DeviceSpec::Metal(n) => {
                if !cfg!(feature = "metal") {
                    return Err(Error::Unsupported(format!(
                        "device metal:{n}: this build of pairstyle has no Metal support; \
                         rebuild with `cargo build --release --features metal`"
                    )));
                }
                Device::new_metal(n).map_err(|e| {
                    Error::InvalidArgument(format!("cannot open device metal:{n}: {e}"))
                })
            }
            DeviceSpec::Auto => {
                if cfg!(feature = "cuda") {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                if cfg!(feature = "metal") {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    /// Parse `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` or `auto` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "invalid device {s:?}: expected cpu, cuda, cuda:N, metal, metal:N or auto"
            ))
        };
        let lower = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match lower.split_once(':') {
            Some((k, n)) => (k, Some(n.parse::<usize>().map_err(|_| bad())?)),
            None => (lower.as_str(), None),
        };
        match (kind, ordinal) {
            ("cpu", None) => Ok(DeviceSpec::Cpu),
            ("auto", None) => Ok(DeviceSpec::Auto),
            ("cuda", n) => Ok(DeviceSpec::Cuda(n.unwrap_or(0))),
            ("metal" | "mps", n) => Ok(DeviceSpec::Metal(n.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    /// The canonical spelling (`cpu`, `cuda:0`, `metal:0`, `auto`), which parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
            DeviceSpec::Auto => write!(f, "auto"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A floating-point precision for model weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    /// 32-bit float: exact reference numbers, the CPU default.
    #[default]
    F32,
    /// 16-bit IEEE half: GPU inference (the VAE still runs in f32 when its config forces upcast).
    F16,
    /// bfloat16: GPU inference and training with f32's range.
    Bf16,
}

impl DTypeSpec {
    /// The candle dtype.
    pub fn dtype(&self) -> DType {
        match self {
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::F16 => DType::F16,
            DTypeSpec::Bf16 => DType::BF16,
        }
    }
}

impl FromStr for DTypeSpec {
    type Err = Error;

    /// Parse `f32`/`fp32`/`float32`, `f16`/`fp16`/`float16`/`half`, `bf16`/`bfloat16`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Ok(DTypeSpec::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(DTypeSpec::F16),
            "bf16" | "bfloat16" => Ok(DTypeSpec::Bf16),
            _ => Err(Error::InvalidArgument(format!(
                "invalid dtype {s:?}: expected f32, f16 or bf16"
            ))),
        }
    }
}

impl fmt::Display for DTypeSpec {
    /// The canonical spelling (`f32`, `f16`, `bf16`), which parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DTypeSpec::F32 => "f32",
            DTypeSpec::F16 => "f16",
            DTypeSpec::Bf16 => "bf16",
        })
    }
}

impl From<DTypeSpec> for DType {
    fn from(d: DTypeSpec) -> DType {
        d.dtype()
    }
}

impl<'de> serde::Deserialize<'de> for DTypeSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for DTypeSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Seed the device's own generator where it has one (CUDA, Metal); a no-op on the CPU, whose
/// candle generator cannot be seeded. Reproducible code draws noise with
/// [`super::noise::NoiseSource`] instead.
pub fn seed_device(device: &Device, seed: u64) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        _ => Ok(device.set_seed(seed)?),
    }
}

/// Above this size glibc serves each allocation with its own `mmap` and unmaps it on `free`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEPT_ALLOCATION_LIMIT: i32 = 1 << 30;

/// Make the host allocator keep large freed buffers for reuse (glibc: mmap and trim thresholds
/// raised to 1 GiB, and one arena for every thread, since a per-thread arena's heaps are at most
/// 64 MiB and anything larger would be mmapped anyway; a no-op elsewhere). Returns whether the
/// allocator accepted every setting.
///
/// Why: by default glibc gives every allocation above its (at most 32 MiB) mmap threshold fresh
/// pages and unmaps them on `free`, so each SD-size activation (a 64×64 latent's feed-forward
/// output is 84 MiB at batch 2) costs a page fault and a zeroed page per 4 KiB: measured on a
/// 2-core CPU, a 320→2560 linear on 8192 tokens took 98.5 ms instead of 36.6 ms (`cargo bench
/// --bench ops -- --only linear [--glibc-defaults]`), a whole SD1.5 sampling step 7.1 s instead
/// of 5.4 s (`bench perf`, docs/perf.md). The kept memory is handed back after each job by
/// [`release_free_host_memory`]. Call it once at start-up, before any thread is spawned (a
/// thread keeps the arena it first allocated from).
pub fn keep_freed_host_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's own tuning parameters; no pointers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, KEPT_ALLOCATION_LIMIT) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, KEPT_ALLOCATION_LIMIT) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Hand the host allocator's free memory back to the operating system (glibc `malloc_trim`;
/// a no-op elsewhere). Returns whether anything was released.
///
/// Why: a training run's activations come and go in chunks below glibc's mmap threshold, and the
/// freed heap stays mapped, so without this the daemon would keep a finished job's peak (about
/// 1 GiB at SD1.5 size, 256 px) resident while it idles or runs the next, smaller job. The
/// daemon calls it after every job; `bench perf` before each sampling call.
pub fn release_free_host_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists (it takes the arena
        // locks itself) and takes no pointers from us.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Freed heap in the middle of the allocator's arenas (pinned by live blocks, so `free`
    /// cannot shrink it) stays resident until [`release_free_host_memory`] hands it back.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn releasing_free_memory_lowers_the_resident_set() {
        const BLOCK: usize = 64 * 1024; // below glibc's mmap threshold: served from the heap
        let mut blocks: Vec<Vec<u8>> = (0..4096)
            .map(|i| vec![(i % 251) as u8 + 1; BLOCK])
            .collect();
        // Keep one block in 16 so that the freed ones sit between live ones.
        let mut kept = Vec::new();
        for (i, b) in blocks.drain(..).enumerate() {
            if i % 16 == 0 {
                kept.push(b);
            }
        }
        let before = crate::bench::rss_mib();
        assert!(release_free_host_memory(), "nothing released");
        let after = crate::bench::rss_mib();
        println!("RSS {before:.0} → {after:.0} MiB after releasing the freed heap");
        // 240 MiB were freed; other tests of this binary allocate meanwhile, so ask for a quarter.
        assert!(
            before - after >= 60.0,
            "RSS {before:.0} → {after:.0} MiB after releasing ~240 MiB of freed heap"
        );
        assert_eq!(kept.len(), 256); // the live blocks stayed live through the release
    }

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal(0));
        assert_eq!(
            "metal:1".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Metal(1)
        );
        assert_eq!(" auto ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for spec in [
            DeviceSpec::Cpu,
            DeviceSpec::Cuda(2),
            DeviceSpec::Metal(0),
            DeviceSpec::Auto,
        ] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn bad_device_names_the_value() {
        for bad in ["tpu", "cuda:x", "cpu:1", "cuda:", "", "auto:0", "cuda:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!("f32".parse::<DTypeSpec>().unwrap(), DTypeSpec::F32);
        assert_eq!("FP16".parse::<DTypeSpec>().unwrap(), DTypeSpec::F16);
        assert_eq!("bf16".parse::<DTypeSpec>().unwrap(), DTypeSpec::Bf16);
        assert_eq!(DTypeSpec::Bf16.dtype(), DType::BF16);
        assert_eq!(DType::from(DTypeSpec::F16), DType::F16);
        let err = "f8".parse::<DTypeSpec>().unwrap_err().to_string();
        assert!(err.contains("\"f8\""), "{err}");
    }

    #[test]
    fn deserializes_from_toml() {
        #[derive(serde::Deserialize)]
        struct C {
            device: DeviceSpec,
            dtype: DTypeSpec,
        }
        let c: C = toml::from_str("device = \"cuda:1\"\ndtype = \"bf16\"").unwrap();
        assert_eq!(c.device, DeviceSpec::Cuda(1));
        assert_eq!(c.dtype, DTypeSpec::Bf16);
        let err = toml::from_str::<C>("device = \"gpu0\"\ndtype = \"f32\"")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("gpu0"), "{err}");
    }

    #[test]
    fn cpu_and_auto_resolve_without_gpu_features() {
        assert!(DeviceSpec::Cpu.resolve().unwrap().is_cpu());
        let auto = DeviceSpec::Auto.resolve().unwrap();
        if !cfg!(feature = "cuda") && !cfg!(feature = "metal") {
            assert!(auto.is_cpu());
        }
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).resolve().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        if !cfg!(feature = "metal") {
            let err = DeviceSpec::Metal(0).resolve().unwrap_err().to_string();
            assert!(err.contains("--features metal"), "{err}");
        }
    }

    #[test]
    fn seeding_the_cpu_is_a_no_op() {
        seed_device(&Device::Cpu, 1).unwrap();
    }
}
