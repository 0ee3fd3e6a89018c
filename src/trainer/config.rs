//! Training settings of Pair Customization, with the paper's values as defaults.

use serde::{Deserialize, Serialize};

use super::optimizer::AdamWConfig;

/// Every knob of a pair training run (`[train]` in the config file; per pair in `pair.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Total iterations (each: one content step, plus one style step from `style_start`).
    pub iterations: usize,
    /// First iteration (0-based) that also takes a style step.
    pub style_start: usize,
    /// AdamW learning rate (constant).
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Rank of ContentLoRA.
    pub content_rank: usize,
    /// Rank of StyleLoRA.
    pub style_rank: usize,
    /// LoRA alpha of both adapters; 0 means alpha = rank (scale 1), as the paper.
    pub alpha: f64,
    /// Training resolution: shorter side resized to this, then a shared square crop of this side.
    pub resolution: usize,
    /// Probability of the shared horizontal flip (the paper uses 1.0).
    pub flip_p: f64,
    /// The rare token V* of the content prompt.
    pub token: String,
    /// Orthogonal, frozen down-projections (the method); false = ordinary LoRA init with A trained
    /// (the paper's ablation).
    pub orthogonal: bool,
    /// The single-image baseline (a DreamBooth-style LoRA): no ContentLoRA, one LoRA (saved as the
    /// style) trained on the style image alone with the style prompt, from iteration 0.
    pub single_image: bool,
    /// Seed of the orthonormal bases and of every random draw of the run.
    pub seed: u64,
    /// Write a checkpoint every this many iterations (0 = never).
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            iterations: 750,
            style_start: 250,
            lr: 1e-5,
            weight_decay: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            content_rank: 64,
            style_rank: 64,
            alpha: 0.0,
            resolution: 512,
            flip_p: 1.0,
            token: "sbu".into(),
            orthogonal: true,
            single_image: false,
            seed: 0,
            checkpoint_every: 50,
        }
    }
}

impl TrainConfig {
    /// The optimizer settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Alpha of an adapter of rank `r` (alpha = rank when unset).
    pub fn alpha_for(&self, rank: usize) -> f64 {
        if self.alpha > 0.0 {
            self.alpha
        } else {
            rank as f64
        }
    }

    /// `a photo of a <token> <subject>`.
    pub fn content_prompt(&self, subject: &str) -> String {
        format!("a photo of a {} {}", self.token, subject)
    }

    /// The content prompt followed by ` in <style description> style`.
    pub fn style_prompt(&self, subject: &str, style_desc: &str) -> String {
        format!("{} in {} style", self.content_prompt(subject), style_desc)
    }

    /// Check ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.iterations == 0 {
            return Err("iterations must be at least 1".into());
        }
        if self.content_rank == 0 || self.style_rank == 0 {
            return Err("content_rank and style_rank must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("lr must be a positive number (got {})", self.lr));
        }
        if !(0.0..=1.0).contains(&self.flip_p) {
            return Err(format!("flip_p must be in [0, 1] (got {})", self.flip_p));
        }
        if self.resolution < 8 {
            return Err(format!("resolution {} is too small", self.resolution));
        }
        Ok(())
    }
}
