//! `[daemon]` settings: where the daemon keeps its state, how it watches the drop folder, and
//! the limits it enforces on input.

use serde::{Deserialize, Serialize};

use super::{DaemonError, DaemonResult};

/// `[daemon]` of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// State folder (library, journal, outputs, staging); empty: `$STATE_DIRECTORY`, else the
    /// user data dir.
    pub state_dir: String,
    /// Drop folder; empty: `<state dir>/watch`.
    pub watch: String,
    /// Unix socket path; empty: `<runtime dir>/pairstyle.sock`.
    pub socket: String,
    /// Seconds both images must stay unchanged (size and mtime) before a pair is taken.
    pub stability_secs: u64,
    /// Seconds after which an incomplete pair (a lone image, an unrecognised file) has failed.
    pub lone_timeout_secs: u64,
    /// Poll the folder instead of relying on filesystem events (network shares).
    pub poll: bool,
    /// Seconds between rescans (a safety net when file events are used).
    pub poll_interval_secs: u64,
    /// Largest accepted image side in pixels.
    pub max_side: u32,
    /// Subject of a pair dropped without a `pair.toml` subject.
    pub default_subject: String,
    /// Largest IPC frame (one JSON line) in bytes.
    pub max_frame_bytes: usize,
    /// Compute devices, one worker each (`cuda:0`, `cuda:1`...); empty: `[runtime] device` alone.
    pub devices: Vec<String>,
    /// Seconds before the first retry of a pair whose intake failed for a transient reason (an
    /// I/O error); each further failure doubles the wait, up to `retry_max_secs`.
    pub retry_initial_secs: u64,
    /// Longest wait between two retries of a failing intake.
    pub retry_max_secs: u64,
    /// Prompts of the sample grid rendered with each new style (`{subject}` becomes the pair's
    /// subject); empty: no grid and no thumbnail.
    pub sample_prompts: Vec<String>,
    /// Denoising steps per sample.
    pub sample_steps: usize,
    /// Side of each sample in pixels; 0: the model's native size.
    pub sample_size: usize,
    /// Seed of every sample.
    pub sample_seed: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: String::new(),
            watch: String::new(),
            socket: String::new(),
            stability_secs: 5,
            lone_timeout_secs: 600,
            poll: false,
            poll_interval_secs: 2,
            max_side: 8192,
            default_subject: "object".into(),
            max_frame_bytes: 1 << 20,
            devices: Vec::new(),
            retry_initial_secs: 5,
            retry_max_secs: 600,
            sample_prompts: vec![
                "a photo of a {subject}".into(),
                "a photo of a cat".into(),
                "a house by a lake".into(),
                "a portrait of a woman".into(),
            ],
            sample_steps: 20,
            sample_size: 0,
            sample_seed: 1,
        }
    }
}

impl DaemonConfig {
    /// The devices to run workers on: `devices`, else `runtime_device` alone.
    pub fn worker_devices(&self, runtime_device: &str) -> Vec<String> {
        if self.devices.is_empty() {
            vec![runtime_device.to_string()]
        } else {
            self.devices.clone()
        }
    }

    /// Check the values that have a usable range.
    pub fn validate(&self) -> DaemonResult<()> {
        let limit = crate::trainer::pair::MAX_PAIR_SIDE;
        if self.max_side == 0 || self.max_side > limit {
            return Err(DaemonError::Config(format!(
                "max_side {} must be between 1 and {limit} (what training accepts)",
                self.max_side
            )));
        }
        if self.poll_interval_secs == 0 {
            return Err(DaemonError::Config(
                "poll_interval_secs must be at least 1".into(),
            ));
        }
        if self.max_frame_bytes < 1024 {
            return Err(DaemonError::Config(format!(
                "max_frame_bytes {} is too small: at least 1024",
                self.max_frame_bytes
            )));
        }
        if self.retry_initial_secs == 0 || self.retry_max_secs < self.retry_initial_secs {
            return Err(DaemonError::Config(format!(
                "retry_initial_secs ({}) must be at least 1 and at most retry_max_secs ({})",
                self.retry_initial_secs, self.retry_max_secs
            )));
        }
        if !self.sample_prompts.is_empty()
            && (self.sample_steps == 0 || self.sample_steps > crate::generate::MAX_STEPS)
        {
            return Err(DaemonError::Config(format!(
                "sample_steps {} must be between 1 and {}",
                self.sample_steps,
                crate::generate::MAX_STEPS
            )));
        }
        if self.devices.iter().any(|d| d.trim().is_empty()) {
            return Err(DaemonError::Config(
                "devices must not contain an empty name".into(),
            ));
        }
        if self.default_subject.trim().is_empty() {
            return Err(DaemonError::Config(
                "default_subject must not be empty".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        DaemonConfig::default().validate().unwrap();
        let bad = DaemonConfig {
            max_frame_bytes: 10,
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("max_frame_bytes"), "{e}");
        let bad = DaemonConfig {
            poll_interval_secs: 0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = DaemonConfig {
            retry_initial_secs: 10,
            retry_max_secs: 5,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("retry"));
        let bad = DaemonConfig {
            sample_steps: 0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sample_steps"));
        let no_samples = DaemonConfig {
            sample_steps: 0,
            sample_prompts: Vec::new(),
            ..Default::default()
        };
        no_samples.validate().unwrap();
    }

    #[test]
    fn the_worker_devices_default_to_the_runtime_device() {
        let d = DaemonConfig::default();
        assert_eq!(d.worker_devices("cuda:0"), ["cuda:0"]);
        let two = DaemonConfig {
            devices: vec!["cuda:0".into(), "cuda:1".into()],
            ..Default::default()
        };
        assert_eq!(two.worker_devices("cpu"), ["cuda:0", "cuda:1"]);
    }
}
