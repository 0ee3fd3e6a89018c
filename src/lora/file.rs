//! LoRA files: save in the diffusers/PEFT key format, load any common key spelling.
//!
//! We save `unet.<module path>.lora_A.weight` [r, in] and `unet.<module path>.lora_B.weight`
//! [out, r] in f32 with the caller's `__metadata__`, as diffusers and the Pair Customization
//! reference do. The reference writes no alpha (scale 1, i.e. alpha = rank); when a set's alpha
//! differs from its rank we add diffusers' `lora_adapter_metadata` JSON (`unet.r`,
//! `unet.lora_alpha`, `unet.target_modules`, and `unet.rank_pattern` / `unet.alpha_pattern` for
//! layers that differ) so that diffusers and this loader apply the same scale.
//!
//! Loading accepts every spelling listed in `shared/FORMATS.md`:
//! - PEFT `…lora_A.weight` / `…lora_B.weight` (also `lora_A.default.weight`), with or without
//!   `unet.` / `base_model.model.` prefixes;
//! - diffusers' older `…lora.down.weight` / `…lora.up.weight` and `…lora_linear_layer.down/up`;
//! - diffusers' attention-processor form `…attn1.processor.to_q_lora.down.weight` (`to_out_lora`
//!   for `to_out.0`);
//! - kohya `lora_unet_<flattened name>.lora_down.weight` / `.lora_up.weight` / `.alpha`, with
//!   diffusers names (SD1.x/2.x) or SGM names (SDXL), accepted for every model.
//!
//! Names are mapped back to module paths through a [`ModuleCatalog`] (kohya's flattening is
//! ambiguous, so names are matched against the model's known paths, never unflattened).
//!
//! Alpha of a layer, first found: its `.alpha` tensor (any spelling's stem + `.alpha`); the
//! `lora_adapter_metadata` JSON (`alpha_pattern`, then `lora_alpha`, with or without the `unet.`
//! prefix); else alpha = rank (scale 1), which is what kohya assumes and what the reference means.
//!
//! Keys that name no adapted layer (text-encoder LoRA, resnet/conv/feed-forward layers, DoRA or
//! LyCORIS tensors) are an error listing a few of them by default ([`LoadOptions::strict`]); with
//! `strict = false` they are skipped, logged as a warning, and returned in
//! [`LoadedLora::ignored_keys`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use super::adapter_set::{few, AdapterSet, LayerAdapter};
use super::names::ModuleCatalog;
use crate::engine::image_io::write_file_atomic;
use crate::error::{Error, Result};

/// Default file name of a saved style (PEFT keys).
pub const STYLE_FILE: &str = "style.safetensors";

/// The metadata key diffusers stores the PEFT `LoraConfig` under (JSON).
pub const PEFT_METADATA_KEY: &str = "lora_adapter_metadata";

/// How a file spelled its LoRA keys (reported by [`load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeySpelling {
    /// PEFT/diffusers `lora_A.weight` / `lora_B.weight`.
    Peft,
    /// diffusers' older `lora.down.weight` / `lora.up.weight`.
    DiffusersLora,
    /// diffusers' `lora_linear_layer.down.weight` / `.up.weight`.
    LoraLinearLayer,
    /// Old diffusers attention processors: `processor.to_q_lora.down.weight`.
    AttnProcessor,
    /// kohya `lora_unet_…lora_down.weight` / `lora_up.weight` / `alpha`.
    Kohya,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// Key suffixes, their role and spelling. Pairwise disjoint (`_lora.down` vs `.lora.down`).
const SUFFIXES: [(&str, Role, Option<KeySpelling>); 13] = [
    (".lora_A.weight", Role::Down, Some(KeySpelling::Peft)),
    (".lora_B.weight", Role::Up, Some(KeySpelling::Peft)),
    (
        ".lora_A.default.weight",
        Role::Down,
        Some(KeySpelling::Peft),
    ),
    (".lora_B.default.weight", Role::Up, Some(KeySpelling::Peft)),
    (
        ".lora.down.weight",
        Role::Down,
        Some(KeySpelling::DiffusersLora),
    ),
    (
        ".lora.up.weight",
        Role::Up,
        Some(KeySpelling::DiffusersLora),
    ),
    (
        ".lora_linear_layer.down.weight",
        Role::Down,
        Some(KeySpelling::LoraLinearLayer),
    ),
    (
        ".lora_linear_layer.up.weight",
        Role::Up,
        Some(KeySpelling::LoraLinearLayer),
    ),
    (
        "_lora.down.weight",
        Role::Down,
        Some(KeySpelling::AttnProcessor),
    ),
    (
        "_lora.up.weight",
        Role::Up,
        Some(KeySpelling::AttnProcessor),
    ),
    (".lora_down.weight", Role::Down, Some(KeySpelling::Kohya)),
    (".lora_up.weight", Role::Up, Some(KeySpelling::Kohya)),
    (".alpha", Role::Alpha, None),
];

fn classify(key: &str) -> Option<(&str, Role, Option<KeySpelling>)> {
    SUFFIXES.iter().find_map(|(suffix, role, spelling)| {
        key.strip_suffix(suffix)
            .map(|stem| (stem, *role, *spelling))
    })
}

/// How [`load`] treats keys and where it puts the tensors.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Error on keys that name no adapted layer (default); else skip them with a warning.
    pub strict: bool,
    /// dtype of the loaded A and B (default f32).
    pub dtype: DType,
    /// Device of the loaded A and B (default CPU).
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            strict: true,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// What [`load`] read from a LoRA file.
#[derive(Debug, Clone)]
pub struct LoadedLora {
    /// The adapter, keyed by diffusers module path. Nominal rank = the largest layer rank; nominal
    /// alpha = `lora_alpha` of the PEFT metadata if present, else the alpha of the first layer
    /// (path order) that has the nominal rank.
    pub set: AdapterSet,
    /// The file's `__metadata__` (string values), unchanged.
    pub metadata: BTreeMap<String, String>,
    /// The key spellings found in the file.
    pub spellings: BTreeSet<KeySpelling>,
    /// Keys skipped because they name no adapted layer (only with `strict = false`).
    pub ignored_keys: Vec<String>,
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn lora_err(path: &Path, message: String) -> Error {
    Error::Lora {
        origin: path.display().to_string(),
        message,
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::from_io(path, e))
}

/// Write `tensors` (any dtype/device; converted to contiguous CPU tensors) with `metadata` as a
/// safetensors file, atomically (temporary file, fsync, rename). The `safetensors` crate is used
/// directly because candle's writer drops `__metadata__`.
pub fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        data.push((k, t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let meta: Option<HashMap<String, String>> = if metadata.is_empty() {
        None
    } else {
        Some(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    let bytes = safetensors::serialize(data, meta).map_err(|e| st_err(path, e))?;
    write_file_atomic(path, &bytes)
}

/// The `__metadata__` of a safetensors file, reading only its header (cheap for listing styles).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::from_io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| st_err(path, "file too short for a safetensors header"))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || n + 8 > len {
        return Err(st_err(
            path,
            format!("header length {n} does not fit the file ({len} bytes): truncated or not safetensors"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| st_err(path, format!("bad header: {e}")))?;
    let mut out = BTreeMap::new();
    if let Some(m) = v.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            let s = v
                .as_str()
                .ok_or_else(|| st_err(path, format!("metadata value of {k} is not a string")))?;
            out.insert(k.clone(), s.to_string());
        }
    }
    Ok(out)
}

/// Whether `a` and `b` are the same alpha for file purposes.
fn same_alpha(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// A JSON number, as an integer when it is one (PEFT types `r` and `lora_alpha` as int).
fn json_num(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        serde_json::Value::from(x as i64)
    } else {
        serde_json::Value::from(x)
    }
}

/// diffusers' `lora_adapter_metadata` for `set` (the PEFT `LoraConfig` of the UNet, with keys
/// prefixed `unet.`): nominal `r` and `lora_alpha`, the target modules, and rank/alpha patterns
/// for layers that differ from the nominal values.
pub fn peft_adapter_metadata(set: &AdapterSet) -> String {
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let mut targets = Vec::new();
    for (p, l) in set.iter() {
        targets.push(serde_json::Value::from(p));
        if l.rank() != set.rank() {
            rank_pattern.insert(p.to_string(), serde_json::Value::from(l.rank()));
        }
        if !same_alpha(l.alpha, set.alpha()) {
            alpha_pattern.insert(p.to_string(), json_num(l.alpha));
        }
    }
    let v = serde_json::json!({
        "unet.r": set.rank(),
        "unet.lora_alpha": json_num(set.alpha()),
        "unet.target_modules": targets,
        "unet.rank_pattern": rank_pattern,
        "unet.alpha_pattern": alpha_pattern,
        "unet.lora_dropout": 0.0,
        "unet.bias": "none",
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// The tensors of `set` under PEFT/diffusers keys (`unet.<path>.lora_A.weight` [r, in] and
/// `unet.<path>.lora_B.weight` [out, r]), in f32.
pub fn peft_tensors(set: &AdapterSet) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(2 * set.len());
    for (p, l) in set.iter() {
        out.push((
            format!("unet.{p}.lora_A.weight"),
            l.down.to_dtype(DType::F32)?,
        ));
        out.push((
            format!("unet.{p}.lora_B.weight"),
            l.up.to_dtype(DType::F32)?,
        ));
    }
    Ok(out)
}

/// Save `set` to `path` in the diffusers/PEFT key format (f32) with `metadata` as
/// `__metadata__`, atomically. If some layer's alpha differs from its rank and `metadata` has no
/// `lora_adapter_metadata`, that key is added ([`peft_adapter_metadata`]) so the scale survives.
pub fn save_peft(set: &AdapterSet, path: &Path, metadata: &BTreeMap<String, String>) -> Result<()> {
    if set.is_empty() {
        return Err(lora_err(
            path,
            "refusing to save an adapter with no layers".into(),
        ));
    }
    let mut meta = metadata.clone();
    let scale_not_one = set
        .iter()
        .any(|(_, l)| !same_alpha(l.alpha, l.rank() as f64));
    if scale_not_one && !meta.contains_key(PEFT_METADATA_KEY) {
        meta.insert(PEFT_METADATA_KEY.to_string(), peft_adapter_metadata(set));
    }
    write_safetensors(path, peft_tensors(set)?, &meta)
}

/// Alphas from diffusers' `lora_adapter_metadata` JSON: (default alpha, per-pattern alphas).
fn peft_alphas(
    path: &Path,
    metadata: &BTreeMap<String, String>,
) -> (Option<f64>, Vec<(String, f64)>) {
    let Some(raw) = metadata.get(PEFT_METADATA_KEY) else {
        return (None, Vec::new());
    };
    let v: serde_json::Value = match serde_json::from_str(raw) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(
                "{}: ignoring unreadable {PEFT_METADATA_KEY}: {e}",
                path.display()
            );
            return (None, Vec::new());
        }
    };
    let get = |k: &str| v.get(format!("unet.{k}")).or_else(|| v.get(k));
    let alpha = get("lora_alpha").and_then(|a| a.as_f64());
    let mut pattern = Vec::new();
    if let Some(obj) = get("alpha_pattern").and_then(|p| p.as_object()) {
        for (k, a) in obj {
            if let Some(a) = a.as_f64() {
                pattern.push((k.clone(), a));
            }
        }
    }
    (alpha, pattern)
}

/// Squeeze a `[a, b, 1, 1]` (1×1-conv-shaped) LoRA weight to `[a, b]`; other shapes unchanged.
fn as_matrix(t: Tensor) -> Result<Tensor> {
    let d = t.dims().to_vec();
    Ok(if d.len() == 4 && d[2] == 1 && d[3] == 1 {
        t.reshape((d[0], d[1]))?
    } else {
        t
    })
}

#[derive(Default)]
struct Parts {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, f64)>,
}

/// Load a LoRA file for the modules of `catalog` (see the module documentation for the accepted
/// spellings, alpha rules and unmatched keys). Errors name the file: missing, truncated or corrupt
/// files, keys naming no adapted layer (strict mode), a down-projection without its
/// up-projection, duplicate layers, and shapes that do not fit the catalog's widths.
pub fn load(path: &Path, catalog: &ModuleCatalog, opts: &LoadOptions) -> Result<LoadedLora> {
    let bytes = read_file(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| st_err(path, e))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| st_err(path, e))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();

    let mut unmatched = Vec::new();
    let mut duplicates = Vec::new();
    let mut spellings = BTreeSet::new();
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let mut names = st.names();
    names.sort_unstable();
    for key in names {
        let Some((stem, role, spelling)) = classify(key) else {
            unmatched.push(key.to_string());
            continue;
        };
        // Alphas of the older spellings sit beside the pair: `…to_q_lora.alpha`, `…lora.alpha`.
        let entry = catalog.resolve(stem).or_else(|| match role {
            Role::Alpha => ["_lora", ".lora", ".lora_linear_layer"]
                .iter()
                .find_map(|s| stem.strip_suffix(s))
                .and_then(|s| catalog.resolve(s)),
            _ => None,
        });
        let Some(entry) = entry else {
            unmatched.push(key.to_string());
            continue;
        };
        let view = st.tensor(key).map_err(|e| st_err(path, e))?;
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| st_err(path, format!("{key}: {e}")))?;
        let p = parts.entry(entry.path.clone()).or_default();
        let slot_taken: Option<String> = match role {
            Role::Down => p.down.replace((key.to_string(), t)).map(|x| x.0),
            Role::Up => p.up.replace((key.to_string(), t)).map(|x| x.0),
            Role::Alpha => {
                let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                if v.len() != 1 {
                    return Err(lora_err(
                        path,
                        format!("{key}: alpha must be a scalar, found shape {:?}", t.dims()),
                    ));
                }
                p.alpha.replace((key.to_string(), v[0])).map(|x| x.0)
            }
        };
        if let Some(other) = slot_taken {
            duplicates.push(format!("{key} and {other} ({})", entry.path));
        }
        if let Some(s) = spelling {
            spellings.insert(s);
        }
    }
    if !duplicates.is_empty() {
        return Err(lora_err(
            path,
            format!(
                "{} layer(s) appear twice under different key spellings: {}",
                duplicates.len(),
                few(&duplicates)
            ),
        ));
    }

    let (meta_alpha, alpha_pattern) = peft_alphas(path, &metadata);
    let mut layers = Vec::new();
    for (module, p) in parts {
        let (down, up) = match (p.down, p.up) {
            (Some(d), Some(u)) => (d, u),
            (d, u) => {
                // Half a pair (or an alpha alone) cannot be applied.
                let keys: Vec<String> = [d.map(|x| x.0), u.map(|x| x.0), p.alpha.map(|x| x.0)]
                    .into_iter()
                    .flatten()
                    .collect();
                if opts.strict {
                    return Err(lora_err(
                        path,
                        format!(
                            "layer {module} has only {} (its down- and up-projection must both be present)",
                            keys.join(", ")
                        ),
                    ));
                }
                unmatched.extend(keys);
                continue;
            }
        };
        let a = as_matrix(down.1)?;
        let b = as_matrix(up.1)?;
        let (r, a_in) = a.dims2().map_err(|_| {
            lora_err(
                path,
                format!("{}: expected a matrix, found shape {:?}", down.0, a.dims()),
            )
        })?;
        let (b_out, r2) = b.dims2().map_err(|_| {
            lora_err(
                path,
                format!("{}: expected a matrix, found shape {:?}", up.0, b.dims()),
            )
        })?;
        let fits = catalog
            .get(&module)
            .and_then(|e| e.dims)
            .is_none_or(|(n_in, n_out)| n_in == a_in && n_out == b_out);
        if r != r2 || r == 0 || !fits {
            let (n_in, n_out) = catalog
                .get(&module)
                .and_then(|e| e.dims)
                .unwrap_or((a_in, b_out));
            return Err(Error::ShapeMismatch {
                name: format!("{} / {} (B·A of {module})", up.0, down.0),
                expected: vec![n_out, r.max(1), n_in],
                found: vec![b_out, r2, a_in],
                file: path.to_path_buf(),
            });
        }
        let alpha = p
            .alpha
            .map(|(_, a)| a)
            .or_else(|| {
                alpha_pattern
                    .iter()
                    .find(|(k, _)| *k == module)
                    .or_else(|| {
                        alpha_pattern
                            .iter()
                            .find(|(k, _)| module.ends_with(&format!(".{k}")))
                    })
                    .map(|(_, a)| *a)
            })
            .or(meta_alpha)
            .unwrap_or(r as f64);
        let layer = LayerAdapter {
            down: a.to_dtype(opts.dtype)?.to_device(&opts.device)?,
            up: b.to_dtype(opts.dtype)?.to_device(&opts.device)?,
            alpha,
        };
        layers.push((module, layer));
    }

    if !unmatched.is_empty() {
        if opts.strict {
            return Err(lora_err(
                path,
                format!(
                    "{} key(s) name no attention projection (to_q/to_k/to_v/to_out.0 of attn1/attn2) \
                     of this UNet: {} (text-encoder, resnet or feed-forward LoRA, or another base model?)",
                    unmatched.len(),
                    few(&unmatched)
                ),
            ));
        }
        tracing::warn!(
            "{}: ignoring {} key(s) that name no adapted layer: {}",
            path.display(),
            unmatched.len(),
            few(&unmatched)
        );
    }
    if layers.is_empty() {
        return Err(lora_err(path, "no LoRA layer found in the file".into()));
    }

    let rank = layers.iter().map(|(_, l)| l.rank()).max().unwrap_or(0);
    let alpha = meta_alpha.unwrap_or_else(|| {
        layers
            .iter()
            .find(|(_, l)| l.rank() == rank)
            .map(|(_, l)| l.alpha)
            .unwrap_or(rank as f64)
    });
    let mut set = AdapterSet::new(rank, alpha);
    for (module, layer) in layers {
        set.insert(module, layer)?;
    }
    Ok(LoadedLora {
        set,
        metadata,
        spellings,
        ignored_keys: unmatched,
    })
}
