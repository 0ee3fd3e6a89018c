//! Export a style for other tools: kohya format for A1111 / ComfyUI / Forge, PEFT format for
//! diffusers.
//!
//! kohya files: `lora_unet_<name with '.' → '_'>.lora_down.weight` [r, in], `.lora_up.weight`
//! [out, r] and a scalar `.alpha` for every layer, always (without it kohya assumes alpha = rank
//! but ComfyUI uses scale 1). SD1.x/2.x use diffusers module names, SDXL uses SGM names
//! (`input_blocks` / `middle_block` / `output_blocks`, see [`super::names`]), as kohya's own
//! trainers write them. Metadata: kohya's `ss_*` keys (A1111 shows `ss_output_name` as the alias and
//! reads `ss_base_model_version` / `ss_v2` for the model version) and ModelSpec 1.0.1 keys
//! (`modelspec.*`, values as kohya's sd-scripts writes them).
//!
//! Style guidance is a sampling rule, not a weight: tools that merge the file as an ordinary LoRA
//! only approximate it, and `modelspec.usage_hint` says so.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use super::adapter_set::AdapterSet;
use super::file::{peft_adapter_metadata, peft_tensors, write_safetensors, PEFT_METADATA_KEY};
use super::names::{flatten, ModuleCatalog};
use crate::engine::model_dir::ModelFamily;
use crate::error::{Error, Result};

/// The file formats `pairstyle export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// kohya keys with `.alpha`, SGM names for SDXL, `ss_*` + ModelSpec metadata (A1111, ComfyUI).
    Kohya,
    /// diffusers/PEFT keys (`unet.<path>.lora_A.weight`) with the PEFT config in metadata.
    Peft,
}

impl FromStr for ExportFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "kohya" | "a1111" | "comfyui" => Ok(Self::Kohya),
            "peft" | "diffusers" => Ok(Self::Peft),
            other => Err(Error::InvalidArgument(format!(
                "unknown export format {other:?} (kohya or peft)"
            ))),
        }
    }
}

/// What the exported file says about the style; every field but `family` and `name` is optional.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// Base model family (key names and version metadata depend on it).
    pub family: ModelFamily,
    /// Whether the base model predicts v (SD 2.x 768-v); decides `modelspec.prediction_type`.
    pub v_prediction: bool,
    /// Short name: `ss_output_name` (A1111's alias for the LoRA).
    pub name: String,
    /// `modelspec.title` (default: `name`).
    pub title: Option<String>,
    /// `modelspec.description`.
    pub description: Option<String>,
    /// `modelspec.author`.
    pub author: Option<String>,
    /// `modelspec.trigger_phrase`, e.g. "in watercolor painting style".
    pub trigger_phrase: Option<String>,
    /// `modelspec.usage_hint` (default: [`usage_hint`] of the trigger phrase).
    pub usage_hint: Option<String>,
    /// Training resolution (square side): `ss_resolution`.
    pub train_resolution: Option<u32>,
    /// Intended generation resolution: `modelspec.resolution` (default: the family's native size).
    pub resolution: Option<(u32, u32)>,
    /// Training iterations: `ss_steps` and `ss_max_train_steps`.
    pub steps: Option<u64>,
    /// Training seed: `ss_seed`.
    pub seed: Option<u64>,
    /// Unix time training started: `ss_training_started_at`.
    pub training_started_at: Option<f64>,
    /// Unix time training finished: `ss_training_finished_at`, and `modelspec.date` (UTC).
    pub training_finished_at: Option<f64>,
    /// Base model name: `ss_sd_model_name`.
    pub base_model_name: Option<String>,
    /// Further metadata copied as is (e.g. the style's own `pairstyle.*` keys); the keys this
    /// module writes take precedence.
    pub extra: BTreeMap<String, String>,
}

impl ExportInfo {
    /// Info with only the family and the name set.
    pub fn new(family: ModelFamily, name: impl Into<String>) -> Self {
        Self {
            family,
            v_prediction: false,
            name: name.into(),
            title: None,
            description: None,
            author: None,
            trigger_phrase: None,
            usage_hint: None,
            train_resolution: None,
            resolution: None,
            steps: None,
            seed: None,
            training_started_at: None,
            training_finished_at: None,
            base_model_name: None,
            extra: BTreeMap::new(),
        }
    }
}

/// ModelSpec architecture id of the base model (without the `/lora` suffix), as sd-scripts names
/// them: `stable-diffusion-v1`, `stable-diffusion-v2-512`, `stable-diffusion-v2-768-v`,
/// `stable-diffusion-xl-v1-base`.
pub fn architecture(family: ModelFamily, v_prediction: bool) -> &'static str {
    match (family, v_prediction) {
        (ModelFamily::Sd1, _) => "stable-diffusion-v1",
        (ModelFamily::Sd2, false) => "stable-diffusion-v2-512",
        (ModelFamily::Sd2, true) => "stable-diffusion-v2-768-v",
        (ModelFamily::Sdxl, _) => "stable-diffusion-xl-v1-base",
    }
}

/// kohya's `ss_base_model_version`: `sd_v1`, `sd_v2` or `sdxl_base_v1-0`.
pub fn base_model_version(family: ModelFamily) -> &'static str {
    match family {
        ModelFamily::Sd1 => "sd_v1",
        ModelFamily::Sd2 => "sd_v2",
        ModelFamily::Sdxl => "sdxl_base_v1-0",
    }
}

/// The family's native generation size (width, height).
pub fn native_resolution(family: ModelFamily, v_prediction: bool) -> (u32, u32) {
    match (family, v_prediction) {
        (ModelFamily::Sdxl, _) => (1024, 1024),
        (ModelFamily::Sd2, true) => (768, 768),
        _ => (512, 512),
    }
}

/// The usage hint written to `modelspec.usage_hint`: style guidance is a sampling rule, and
/// loading the file as an ordinary LoRA only approximates it.
pub fn usage_hint(trigger_phrase: Option<&str>) -> String {
    let phrase = trigger_phrase
        .map(|p| format!("add \"{p}\" to the prompt"))
        .unwrap_or_else(|| "add the style phrase to the prompt".to_string());
    format!(
        "Pair Customization StyleLoRA (trained with pairstyle). It is meant for style guidance, a \
         sampling rule: eps = eps0(uncond) + cfg*(eps0(prompt) - eps0(uncond)) + \
         lambda*(eps_lora(prompt + style phrase) - eps0(prompt)), which keeps the base model's \
         content and layout. Loaded as an ordinary LoRA (weight about 0.5-1; {phrase}) it only \
         approximates that."
    )
}

/// `x` as Python's `str(float)` writes it (`64.0`, `0.5`), as kohya's metadata has it.
fn py_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Unix seconds as an ISO-8601 UTC date-time `YYYY-MM-DDTHH:MM:SS` (civil-from-days).
pub fn iso8601_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// ModelSpec 1.0.1 keys for `set` described by `info`, with `implementation` (sd-scripts writes
/// `https://github.com/Stability-AI/generative-models` for SDXL LoRA and `diffusers` otherwise).
pub fn modelspec_metadata(info: &ExportInfo, implementation: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("modelspec.{k}"), v);
    };
    put("sai_model_spec", "1.0.1".into());
    put(
        "architecture",
        format!("{}/lora", architecture(info.family, info.v_prediction)),
    );
    put("implementation", implementation.into());
    put(
        "title",
        info.title.clone().unwrap_or_else(|| info.name.clone()),
    );
    let (w, h) = info
        .resolution
        .unwrap_or_else(|| native_resolution(info.family, info.v_prediction));
    put("resolution", format!("{w}x{h}"));
    put(
        "prediction_type",
        if info.v_prediction { "v" } else { "epsilon" }.into(),
    );
    if let Some(t) = info.training_finished_at.or(info.training_started_at) {
        put("date", iso8601_utc(t.floor() as i64));
    }
    if let Some(d) = &info.description {
        put("description", d.clone());
    }
    if let Some(a) = &info.author {
        put("author", a.clone());
    }
    if let Some(t) = &info.trigger_phrase {
        put("trigger_phrase", t.clone());
    }
    put(
        "usage_hint",
        info.usage_hint
            .clone()
            .unwrap_or_else(|| usage_hint(info.trigger_phrase.as_deref())),
    );
    m
}

/// The full metadata of a kohya export: `info.extra`, then kohya's `ss_*` keys and ModelSpec.
pub fn kohya_metadata(set: &AdapterSet, info: &ExportInfo) -> BTreeMap<String, String> {
    let mut m = info.extra.clone();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", set.rank().to_string());
    put("ss_network_alpha", py_float(set.alpha()));
    put(
        "ss_base_model_version",
        base_model_version(info.family).into(),
    );
    put(
        "ss_v2",
        if info.family == ModelFamily::Sd2 {
            "True"
        } else {
            "False"
        }
        .into(),
    );
    if info.v_prediction {
        put("ss_v_parameterization", "True".into());
    }
    put("ss_output_name", info.name.clone());
    if let Some(r) = info.train_resolution {
        put("ss_resolution", format!("({r}, {r})"));
    }
    if let Some(s) = info.steps {
        put("ss_steps", s.to_string());
        put("ss_max_train_steps", s.to_string());
    }
    if let Some(s) = info.seed {
        put("ss_seed", s.to_string());
    }
    if let Some(t) = info.training_started_at {
        put("ss_training_started_at", py_float(t));
    }
    if let Some(t) = info.training_finished_at {
        put("ss_training_finished_at", py_float(t));
    }
    if let Some(n) = &info.base_model_name {
        put("ss_sd_model_name", n.clone());
    }
    let implementation = match info.family {
        ModelFamily::Sdxl => "https://github.com/Stability-AI/generative-models",
        _ => "diffusers",
    };
    m.extend(modelspec_metadata(info, implementation));
    m
}

/// The kohya module name of `path` for `family`: the diffusers path (SD1.x/2.x) or the SGM path
/// (SDXL), flattened, behind `lora_unet_`.
pub fn kohya_name(path: &str, catalog: &ModuleCatalog, family: ModelFamily) -> Result<String> {
    let entry = catalog.get(path).ok_or_else(|| Error::Lora {
        origin: "export".into(),
        message: format!("layer {path} is not an attention projection of the base model"),
    })?;
    let name = match family {
        ModelFamily::Sdxl => entry.sgm.as_deref().ok_or_else(|| Error::Lora {
            origin: "export".into(),
            message: format!("layer {path} has no SGM name (not inside an attention block)"),
        })?,
        _ => entry.path.as_str(),
    };
    Ok(format!("lora_unet_{}", flatten(name)))
}

/// The tensors of a kohya export: `<name>.lora_down.weight`, `.lora_up.weight` (f32) and a
/// scalar f32 `.alpha` for every layer.
pub fn kohya_tensors(
    set: &AdapterSet,
    catalog: &ModuleCatalog,
    family: ModelFamily,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(3 * set.len());
    for (path, l) in set.iter() {
        let name = kohya_name(path, catalog, family)?;
        out.push((
            format!("{name}.lora_down.weight"),
            l.down.to_dtype(DType::F32)?,
        ));
        out.push((format!("{name}.lora_up.weight"), l.up.to_dtype(DType::F32)?));
        out.push((
            format!("{name}.alpha"),
            Tensor::new(l.alpha as f32, &Device::Cpu)?,
        ));
    }
    Ok(out)
}

/// Write `set` as a kohya LoRA file for A1111 / ComfyUI / Forge to `out`, atomically. `catalog`
/// gives the base model's module names (from the UNet or just its config).
pub fn export_kohya(
    set: &AdapterSet,
    catalog: &ModuleCatalog,
    info: &ExportInfo,
    out: &Path,
) -> Result<()> {
    if set.is_empty() {
        return Err(Error::InvalidArgument(
            "cannot export an empty adapter".into(),
        ));
    }
    write_safetensors(
        out,
        kohya_tensors(set, catalog, info.family)?,
        &kohya_metadata(set, info),
    )
}

/// The metadata of a PEFT export: `info.extra`, diffusers' `lora_adapter_metadata` (so diffusers
/// builds the right `LoraConfig`, alpha included), `format = pt` and ModelSpec.
pub fn peft_metadata(set: &AdapterSet, info: &ExportInfo) -> BTreeMap<String, String> {
    let mut m = info.extra.clone();
    m.insert("format".into(), "pt".into());
    m.insert(PEFT_METADATA_KEY.into(), peft_adapter_metadata(set));
    m.extend(modelspec_metadata(info, "diffusers"));
    m
}

/// Write `set` as a diffusers/PEFT LoRA file (`pipe.load_lora_weights(...)`) to `out`, atomically.
pub fn export_peft(set: &AdapterSet, info: &ExportInfo, out: &Path) -> Result<()> {
    if set.is_empty() {
        return Err(Error::InvalidArgument(
            "cannot export an empty adapter".into(),
        ));
    }
    write_safetensors(out, peft_tensors(set)?, &peft_metadata(set, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_floats() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00");
        assert_eq!(iso8601_utc(1_714_521_600), "2024-05-01T00:00:00");
        assert_eq!(iso8601_utc(951_782_400 + 3661), "2000-02-29T01:01:01");
        assert_eq!(py_float(64.0), "64.0");
        assert_eq!(py_float(0.5), "0.5");
    }
}
