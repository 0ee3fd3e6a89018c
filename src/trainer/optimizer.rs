//! AdamW with PyTorch's semantics and a saveable state.
//!
//! candle's `AdamW` keeps its moments private, so a training run could not be checkpointed and
//! resumed exactly; this one exposes them. Update, as `torch.optim.AdamW` (non-amsgrad):
//! `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr·(m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

/// One parameter with its two moment estimates.
#[derive(Debug)]
struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a fixed list of variables.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    /// Number of steps taken (PyTorch's per-parameter `step`, equal for all here).
    steps: u64,
}

impl AdamW {
    /// An optimizer over `vars` with zero moments.
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|var| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                Ok(Slot { var, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            slots,
            steps: 0,
        })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Apply one update using the gradients in `grads` (variables without a gradient only decay,
    /// as PyTorch skips them entirely: here they are skipped too).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(slot.var.dtype())?;
            let p = slot.var.as_tensor();
            let decayed = (p * (1.0 - c.lr * c.weight_decay))?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&slot.m / bc1)?;
            let denom = ((&slot.v / bc2)?.sqrt()? + c.eps)?;
            let update = (m_hat.div(&denom)? * c.lr)?;
            slot.var.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    /// The moments `(m, v)` of every variable, in order, for checkpoints.
    pub fn moments(&self) -> Vec<(&Tensor, &Tensor)> {
        self.slots.iter().map(|s| (&s.m, &s.v)).collect()
    }

    /// Restore moments and step count saved by [`AdamW::moments`] / [`AdamW::steps`].
    pub fn restore(&mut self, moments: Vec<(Tensor, Tensor)>, steps: u64) -> Result<()> {
        if moments.len() != self.slots.len() {
            return Err(crate::error::Error::InvalidArgument(format!(
                "optimizer state has {} entries, expected {}",
                moments.len(),
                self.slots.len()
            )));
        }
        for (slot, (m, v)) in self.slots.iter_mut().zip(moments) {
            if m.dims() != slot.var.dims() || v.dims() != slot.var.dims() {
                return Err(crate::error::Error::InvalidArgument(
                    "optimizer state shape differs from its parameter".into(),
                ));
            }
            slot.m = m;
            slot.v = v;
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Two steps on f(p) = Σ p² compared with values computed by hand from the update rule.
    #[test]
    fn matches_the_pytorch_update_rule() {
        let p0 = [1.0f64, -2.0];
        let var = Var::from_slice(&p0, 2, &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![var.clone()], cfg).unwrap();
        let mut expect = p0.to_vec();
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        for t in 1..=2 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
            for i in 0..2 {
                let g = 2.0 * expect[i];
                expect[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                expect[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f64> = var
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..2 {
            assert!((got[i] - expect[i]).abs() < 1e-12, "{got:?} vs {expect:?}");
        }
        assert_eq!(opt.steps(), 2);
    }
}
