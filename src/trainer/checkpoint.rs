//! Training checkpoints: both adapters' trainable weights, both optimizers' moments, and the next
//! iteration, in one safetensors file written atomically (temp file, fsync, rename), so a killed
//! process leaves either the previous checkpoint or the new one, never a torn file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::PairTrainer;
use crate::engine::image_io::write_file_atomic;
use crate::error::{Error, Result};

/// A checkpoint read from disk.
pub struct Checkpoint {
    /// Identity of the run (pair, settings, base model).
    pub fingerprint: String,
    /// The iteration to run next.
    pub next_iteration: usize,
    /// Optimizer step counts: one per ContentLoRA, then the StyleLoRA's.
    pub steps: Vec<u64>,
    tensors: HashMap<String, Tensor>,
}

fn var_names(prefix: &str, n_layers: usize, train_down: bool) -> Vec<String> {
    (0..n_layers)
        .flat_map(|i| {
            let mut v = vec![format!("{prefix}.{i}.up")];
            if train_down {
                v.push(format!("{prefix}.{i}.down"));
            }
            v
        })
        .collect()
}

/// Write the trainer's state to `path` atomically.
pub fn save(tr: &PairTrainer<'_>, path: &Path) -> Result<()> {
    let train_down = !tr.cfg.orthogonal;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut parts: Vec<(String, &super::LearnedAdapter, &super::optimizer::AdamW)> = tr
        .pairs
        .iter()
        .enumerate()
        .map(|(k, p)| (format!("content{k}"), &p.content, &p.opt_content))
        .collect();
    parts.push(("style".to_string(), &tr.style, &tr.opt_style));
    for (prefix, adapter, opt) in parts {
        let prefix = prefix.as_str();
        let names = var_names(prefix, adapter.layers.len(), train_down);
        let vars: Vec<&Tensor> = adapter
            .layers
            .iter()
            .flat_map(|l| {
                let mut v = vec![l.up.as_tensor()];
                if train_down {
                    v.push(l.down.as_tensor());
                }
                v
            })
            .collect();
        for ((name, var), (m, v)) in names.iter().zip(vars).zip(opt.moments()) {
            tensors.push((name.clone(), var.to_device(&Device::Cpu)?));
            tensors.push((format!("{name}.adam_m"), m.to_device(&Device::Cpu)?));
            tensors.push((format!("{name}.adam_v"), v.to_device(&Device::Cpu)?));
        }
    }
    let mut meta = HashMap::new();
    meta.insert("fingerprint".to_string(), tr.fingerprint.clone());
    meta.insert("next_iteration".to_string(), tr.next_iteration.to_string());
    let steps: Vec<String> = tr
        .pairs
        .iter()
        .map(|p| p.opt_content.steps().to_string())
        .chain(std::iter::once(tr.opt_style.steps().to_string()))
        .collect();
    meta.insert("optimizer_steps".to_string(), steps.join(","));
    meta.insert("format".to_string(), "pairstyle-checkpoint-1".to_string());
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_file_atomic(path, &bytes)
}

/// Read a checkpoint; a truncated or foreign file is an error naming it.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::Safetensors {
        path: path.to_path_buf(),
        message: m,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some("pairstyle-checkpoint-1") {
        return Err(bad("not a pairstyle training checkpoint".into()));
    }
    let num = |k: &str| -> Result<u64> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("missing or bad {k}")))
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Checkpoint {
        fingerprint: meta.get("fingerprint").cloned().unwrap_or_default(),
        next_iteration: num("next_iteration")? as usize,
        steps: meta
            .get("optimizer_steps")
            .map(|v| {
                v.split(',')
                    .map(|x| x.parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(|_| bad("bad optimizer_steps".into()))?
            .ok_or_else(|| bad("missing optimizer_steps".into()))?,
        tensors,
    })
}

/// Put a checkpoint's state into the trainer.
pub fn restore(tr: &mut PairTrainer<'_>, ck: Checkpoint) -> Result<()> {
    let train_down = !tr.cfg.orthogonal;
    let device = tr.pipe.device().clone();
    let take = |name: &str| -> Result<Tensor> {
        ck.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                file: "<checkpoint>".into(),
            })
    };
    if ck.steps.len() != tr.pairs.len() + 1 {
        return Err(Error::InvalidArgument(format!(
            "checkpoint has {} optimizers, the run {}",
            ck.steps.len(),
            tr.pairs.len() + 1
        )));
    }
    let mut parts: Vec<(String, &super::LearnedAdapter, &mut super::optimizer::AdamW)> = tr
        .pairs
        .iter_mut()
        .enumerate()
        .map(|(k, p)| (format!("content{k}"), &p.content, &mut p.opt_content))
        .collect();
    parts.push(("style".to_string(), &tr.style, &mut tr.opt_style));
    for (index, (prefix, adapter, opt)) in parts.into_iter().enumerate() {
        let prefix = prefix.as_str();
        let names = var_names(prefix, adapter.layers.len(), train_down);
        let vars: Vec<&candle_core::Var> = adapter
            .layers
            .iter()
            .flat_map(|l| {
                let mut v = vec![&l.up];
                if train_down {
                    v.push(&l.down);
                }
                v
            })
            .collect();
        let mut moments = Vec::new();
        for (name, var) in names.iter().zip(vars) {
            let t = take(name)?.to_dtype(var.dtype())?.to_device(&device)?;
            var.set(&t)?;
            let m = take(&format!("{name}.adam_m"))?
                .to_dtype(var.dtype())?
                .to_device(&device)?;
            let v = take(&format!("{name}.adam_v"))?
                .to_dtype(var.dtype())?
                .to_device(&device)?;
            moments.push((m, v));
        }
        let steps = ck.steps[index];
        opt.restore(moments, steps)?;
    }
    tr.next_iteration = ck.next_iteration;
    Ok(())
}
