//! A named adapter's weights for every target layer, detached from any model: what a style file
//! holds, what the trainer produces, and what is attached to a UNet for sampling.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::engine::nn::LowRankAdapter;
use crate::engine::unet::UNet;
use crate::error::{Error, Result};

/// One layer's low-rank update `ΔW = (alpha / r) · B·A`.
#[derive(Debug, Clone)]
pub struct LayerAdapter {
    /// Down-projection A [r, in].
    pub down: Tensor,
    /// Up-projection B [out, r].
    pub up: Tensor,
    /// Alpha; the layer's scale is `alpha / r`.
    pub alpha: f64,
}

impl LayerAdapter {
    /// A layer from A [r, in], B [out, r] and alpha; errors unless both are matrices sharing r ≥ 1.
    pub fn new(down: Tensor, up: Tensor, alpha: f64) -> Result<Self> {
        let l = Self { down, up, alpha };
        l.check("<layer>")?;
        Ok(l)
    }

    /// Rank r (rows of A).
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// Input width (columns of A).
    pub fn in_dim(&self) -> usize {
        self.down.dims().get(1).copied().unwrap_or(0)
    }

    /// Output width (rows of B).
    pub fn out_dim(&self) -> usize {
        self.up.dims().first().copied().unwrap_or(0)
    }

    /// The fixed part of the scale, `alpha / r`.
    pub fn alpha_over_rank(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    fn check(&self, path: &str) -> Result<()> {
        let (r, _) = self
            .down
            .dims2()
            .map_err(|_| bad_shape(path, "A", self.down.dims()))?;
        let (_, r2) = self
            .up
            .dims2()
            .map_err(|_| bad_shape(path, "B", self.up.dims()))?;
        if r == 0 || r != r2 {
            return Err(Error::Lora {
                origin: path.to_string(),
                message: format!(
                    "A {:?} and B {:?} do not share a rank ≥ 1",
                    self.down.dims(),
                    self.up.dims()
                ),
            });
        }
        if !self.alpha.is_finite() {
            return Err(Error::Lora {
                origin: path.to_string(),
                message: format!("alpha {} is not finite", self.alpha),
            });
        }
        Ok(())
    }
}

fn bad_shape(path: &str, which: &str, dims: &[usize]) -> Error {
    Error::Lora {
        origin: path.to_string(),
        message: format!("{which} must be a matrix, found shape {dims:?}"),
    }
}

/// A LoRA adapter for a set of layers, keyed by diffusers module path
/// (e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0`), with a nominal rank and
/// alpha. Each layer also carries its own alpha (files from other tools may vary it per layer, and
/// may vary the rank too); sets built here use the nominal values everywhere.
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    rank: usize,
    alpha: f64,
    layers: BTreeMap<String, LayerAdapter>,
}

impl AdapterSet {
    /// An empty set with nominal `rank` and `alpha` (scale `alpha / rank`).
    pub fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            layers: BTreeMap::new(),
        }
    }

    /// A fresh adapter on every attention projection of `unet` (`to_q`, `to_k`, `to_v`,
    /// `to_out.0` of attn1 and attn2): A from `down_for(path, in_width)` (must be [rank, in]),
    /// B zero-initialised [out, rank] in A's dtype and device, every layer with `alpha`.
    pub fn zeros_like_unet(
        unet: &UNet,
        rank: usize,
        alpha: f64,
        mut down_for: impl FnMut(&str, usize) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut set = Self::new(rank, alpha);
        for lin in unet.adaptable_linears() {
            let (n_in, n_out) = lin.dims();
            let down = down_for(lin.path(), n_in)?;
            if down.dims() != [rank, n_in] {
                return Err(Error::ShapeMismatch {
                    name: format!("{} (down-projection)", lin.path()),
                    expected: vec![rank, n_in],
                    found: down.dims().to_vec(),
                    file: "<adapter init>".into(),
                });
            }
            let up = Tensor::zeros((n_out, rank), down.dtype(), down.device())?;
            set.insert(lin.path(), LayerAdapter { down, up, alpha })?;
        }
        Ok(set)
    }

    /// Nominal rank (every layer's rank in sets built here; for loaded files, the largest rank).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Nominal alpha (for loaded files, see [`crate::lora::file::load`]).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Set the nominal rank and alpha (metadata only: layers keep their own alpha).
    pub fn set_nominal(&mut self, rank: usize, alpha: f64) {
        self.rank = rank;
        self.alpha = alpha;
    }

    /// Add or replace the layer at `path`, checking that A and B fit each other.
    pub fn insert(&mut self, path: impl Into<String>, layer: LayerAdapter) -> Result<()> {
        let path = path.into();
        layer.check(&path)?;
        self.layers.insert(path, layer);
        Ok(())
    }

    /// The layer at `path`.
    pub fn get(&self, path: &str) -> Option<&LayerAdapter> {
        self.layers.get(path)
    }

    /// The layer at `path`, mutably (e.g. to put trained B in place; keep shapes).
    pub fn get_mut(&mut self, path: &str) -> Option<&mut LayerAdapter> {
        self.layers.get_mut(path)
    }

    /// Layers by path, in lexicographic path order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &LayerAdapter)> {
        self.layers.iter().map(|(p, l)| (p.as_str(), l))
    }

    /// Layers by path, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut LayerAdapter)> {
        self.layers.iter_mut().map(|(p, l)| (p.as_str(), l))
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the set has no layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// A copy with every tensor converted to `dtype` on `device`.
    pub fn to_dtype_device(&self, dtype: DType, device: &Device) -> Result<Self> {
        let mut out = Self::new(self.rank, self.alpha);
        for (p, l) in &self.layers {
            out.layers.insert(
                p.clone(),
                LayerAdapter {
                    down: l.down.to_dtype(dtype)?.to_device(device)?,
                    up: l.up.to_dtype(dtype)?.to_device(device)?,
                    alpha: l.alpha,
                },
            );
        }
        Ok(out)
    }

    /// Attach this set to `unet` as adapter `name` (replacing an adapter of that name on the layers
    /// it covers). All or nothing: every path must be an adaptable layer of `unet` with matching
    /// widths, else nothing is attached and the error names the offending paths. Tensors are
    /// converted to the layer's dtype when they differ (same-dtype tensors are shared, not copied,
    /// so trainable `Var`s stay linked); the caller keeps them on the UNet's device.
    pub fn attach(&self, unet: &mut UNet, name: &str) -> Result<()> {
        let mut linears = unet.adaptable_linears_mut();
        let index: BTreeMap<String, usize> = linears
            .iter()
            .enumerate()
            .map(|(i, l)| (l.path().to_string(), i))
            .collect();
        let mut missing = Vec::new();
        let mut plan = Vec::with_capacity(self.layers.len());
        for (path, layer) in &self.layers {
            let Some(&i) = index.get(path) else {
                missing.push(path.as_str());
                continue;
            };
            let (n_in, n_out) = linears[i].dims();
            if layer.in_dim() != n_in || layer.out_dim() != n_out {
                return Err(Error::ShapeMismatch {
                    name: format!("{path} (adapter {name}: A [r, in], B [out, r])"),
                    expected: vec![n_out, layer.rank(), n_in],
                    found: vec![layer.out_dim(), layer.rank(), layer.in_dim()],
                    file: "<adapter set>".into(),
                });
            }
            plan.push((i, layer));
        }
        if !missing.is_empty() {
            return Err(Error::Lora {
                origin: format!("adapter '{name}'"),
                message: format!(
                    "{} layer(s) are not attention projections of this UNet (another base model?): {}",
                    missing.len(),
                    few(&missing)
                ),
            });
        }
        for (i, layer) in plan {
            // Adapter sets live on the CPU (loaded from files); the layer may be on a GPU.
            let dtype = linears[i].weight_dtype();
            let device = linears[i].base().weight().device().clone();
            linears[i].set_adapter(
                name,
                LowRankAdapter {
                    down: layer.down.to_device(&device)?.to_dtype(dtype)?,
                    up: layer.up.to_device(&device)?.to_dtype(dtype)?,
                    alpha_over_rank: layer.alpha_over_rank(),
                },
            )?;
        }
        Ok(())
    }

    /// Remove adapter `name` from every layer of `unet` (no-op where absent).
    pub fn detach(unet: &mut UNet, name: &str) {
        for lin in unet.adaptable_linears_mut() {
            lin.remove_adapter(name);
        }
    }
}

/// The first few items of a list, for error messages: `a, b, c (and 12 more)`.
pub(crate) fn few<S: AsRef<str>>(items: &[S]) -> String {
    const SHOWN: usize = 5;
    let mut s = items
        .iter()
        .take(SHOWN)
        .map(|x| x.as_ref())
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" (and {} more)", items.len() - SHOWN));
    }
    s
}
