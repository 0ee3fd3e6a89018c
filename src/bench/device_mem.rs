//! Device memory of a GPU run, as the driver reports it: `bench perf` on CUDA gives peak device
//! memory where the CPU run gives peak RSS.
//!
//! Measured the same way on both sides of `--vs-reference` (the reference script polls
//! `torch.cuda.mem_get_info` likewise): memory in use on the device (total − free) sampled every
//! millisecond by a thread while a case runs, its maximum, minus what was in use when the device
//! was opened (so the CUDA context and other processes are left out; model weights, activations,
//! allocator caches and library workspaces are in). A spike shorter than the sampling interval
//! can be missed; allocations that live that briefly are small next to the weights.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::Device;

/// Memory in use on `device` in MiB (total − free, whole device), or `None` on the CPU and on
/// backends without a memory query.
pub fn in_use_mib(device: &Device) -> Option<f64> {
    imp::in_use_bytes(device).map(|b| b as f64 / (1024.0 * 1024.0))
}

/// A background sampler of device memory in use; see the module docs.
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl PeakSampler {
    /// Start sampling `device`; `None` where [`in_use_mib`] has no reading.
    pub fn start(device: &Device) -> Option<Self> {
        let first = imp::in_use_bytes(device)?;
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(first));
        let (s, p, d) = (stop.clone(), peak.clone(), device.clone());
        let handle = std::thread::Builder::new()
            .name("device-mem".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(b) = imp::in_use_bytes(&d) {
                        p.fetch_max(b, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
            .ok()?;
        Some(Self {
            stop,
            peak,
            handle: Some(handle),
        })
    }

    /// Stop sampling; the largest reading in MiB.
    pub fn finish(mut self) -> f64 {
        self.stop_thread();
        self.peak.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::Device;

    pub fn in_use_bytes(device: &Device) -> Option<u64> {
        let cuda = device.as_cuda_device().ok()?;
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    pub fn in_use_bytes(_device: &Device) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_has_no_device_reading() {
        assert!(in_use_mib(&Device::Cpu).is_none());
        assert!(PeakSampler::start(&Device::Cpu).is_none());
    }
}
