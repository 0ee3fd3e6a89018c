//! The CLIP BPE tokenizer, built exactly as transformers 5.x builds `CLIPTokenizer`.
//!
//! A tokenizer folder holds either `tokenizer.json` or `vocab.json` + `merges.txt` (what
//! diffusers folders ship), plus optionally `tokenizer_config.json` / `special_tokens_map.json`.
//! Whatever the layout, only the vocabulary and the merges are read from the files; the pipeline
//! around them is CLIP's, as in transformers' `CLIPTokenizer.__init__` (which also ignores the
//! pipeline stored in a `tokenizer.json`):
//! - normalizer: NFC, every run of whitespace → one space, lower-casing;
//! - pre-tokenizer: CLIP's regex (`<|startoftext|>`, `<|endoftext|>`, contractions, letter runs,
//!   single digits, runs of other non-space characters), then byte-level mapping;
//! - model: BPE with the `</w>` end-of-word suffix;
//! - special tokens (bos, eos, unk, pad and those of `added_tokens_decoder`) are matched in the raw
//!   text before normalization. A consequence worth knowing: SD2's and SDXL's second tokenizer
//!   pad with `!`, which therefore becomes a special token, so a `!` in a prompt encodes as the
//!   bare `!` id (0) rather than `!</w>` — transformers does the same.
//!
//! [`ClipTokenizer::encode`] then does what diffusers' `tokenizer(prompt, padding="max_length",
//! max_length=model_max_length, truncation=True)` does: BOS, the tokens truncated so that EOS
//! fits, EOS, then padding up to `model_max_length`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::error::{Error, Result};

/// CLIP's pre-tokenization pattern, as transformers 5.x writes it in `CLIPTokenizer`.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Sequence length when `tokenizer_config.json` gives none (or an unset sentinel): CLIP's 77.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// Default special tokens of `CLIPTokenizer`.
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

/// One special token: its text and its id in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token's text, e.g. `<|endoftext|>`.
    pub text: String,
    /// Its id.
    pub id: u32,
}

/// A CLIP tokenizer with fixed-length (padded, truncated) output, as diffusers uses it.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    bos: SpecialToken,
    eos: SpecialToken,
    pad: SpecialToken,
    dir: PathBuf,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("dir", &self.dir)
            .field("max_length", &self.max_length)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

impl ClipTokenizer {
    /// Load a tokenizer folder: `tokenizer.json` if present (as transformers prefers it), else
    /// `vocab.json` + `merges.txt`; settings from `tokenizer_config.json` and, when that has no
    /// `added_tokens_decoder`, `special_tokens_map.json` (transformers' precedence). A missing
    /// file is `Error::MissingFile` naming it.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::MissingFile { path: dir });
        }
        let config_path = dir.join("tokenizer_config.json");
        let config: Map<String, Value> = if config_path.is_file() {
            read_object(&config_path)?
        } else {
            Map::new()
        };

        let json_path = dir.join("tokenizer.json");
        let (vocab, merges, json_added) = if json_path.is_file() {
            read_tokenizer_json(&json_path)?
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            let vocab = read_vocab(&vocab_path)?;
            let merges = read_merges(&merges_path)?;
            (vocab, merges, Vec::new())
        };

        // Special tokens: tokenizer_config.json, overridden by special_tokens_map.json only in
        // the legacy case (no added_tokens_decoder), exactly as transformers resolves them.
        let mut settings = config.clone();
        let mut added: Vec<AddedToken> = Vec::new();
        match config.get("added_tokens_decoder") {
            Some(Value::Object(dec)) => {
                let mut entries: Vec<(u64, &Value)> = dec
                    .iter()
                    .filter_map(|(k, v)| k.parse::<u64>().ok().map(|id| (id, v)))
                    .collect();
                entries.sort_by_key(|(id, _)| *id);
                for (_, v) in entries {
                    if let Some(t) = added_token_from_json(v, false) {
                        added.push(t);
                    }
                }
            }
            _ => {
                let map_path = dir.join("special_tokens_map.json");
                if map_path.is_file() {
                    for (k, v) in read_object(&map_path)? {
                        settings.insert(k, v);
                    }
                }
                added.extend(json_added);
            }
        }

        let unk_text = token_text(&settings, "unk_token").unwrap_or_else(|| DEFAULT_EOS.into());
        let bos_text = token_text(&settings, "bos_token").unwrap_or_else(|| DEFAULT_BOS.into());
        let eos_text = token_text(&settings, "eos_token").unwrap_or_else(|| DEFAULT_EOS.into());
        let pad_text = token_text(&settings, "pad_token").unwrap_or_else(|| DEFAULT_EOS.into());

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false)
            .unk_token(unk_text.clone())
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?;
        let mut inner = Tokenizer::new(bpe);
        let replace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let normalizer = NormSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(replace),
            NormalizerWrapper::Lowercase(Lowercase),
        ]);
        inner
            .with_normalizer(Some(normalizer))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let pre = PreSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        inner.with_pre_tokenizer(Some(pre));

        // Named special tokens are added after the serialized ones, as transformers does.
        for text in [&bos_text, &eos_text, &unk_text, &pad_text] {
            if !added.iter().any(|t| &t.content == text) {
                added.push(AddedToken::from(text.clone(), true));
            }
        }
        inner
            .add_special_tokens(added)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;

        let lookup = |text: String, what: &str| -> Result<SpecialToken> {
            let id = inner.token_to_id(&text).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{} token {text:?} is not in the vocabulary of {}",
                    what,
                    dir.display()
                ))
            })?;
            Ok(SpecialToken { text, id })
        };
        let bos = lookup(bos_text, "bos")?;
        let eos = lookup(eos_text, "eos")?;
        let pad = lookup(pad_text, "pad")?;

        let max_length = match config.get("model_max_length").and_then(Value::as_f64) {
            // transformers writes a huge sentinel (1e30) when the length is unset.
            Some(n) if (3.0..=1e6).contains(&n) => n as usize,
            Some(n) if n < 3.0 => {
                return Err(Error::config(
                    config_path,
                    format!("model_max_length {n} leaves no room for bos and eos"),
                ))
            }
            _ => DEFAULT_MAX_LENGTH,
        };

        Ok(Self {
            inner,
            max_length,
            bos,
            eos,
            pad,
            dir,
        })
    }

    /// The fixed sequence length `encode` returns (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The beginning-of-sequence token (`<|startoftext|>`).
    pub fn bos(&self) -> &SpecialToken {
        &self.bos
    }

    /// The end-of-sequence token (`<|endoftext|>`); the text encoder pools at its position.
    pub fn eos(&self) -> &SpecialToken {
        &self.eos
    }

    /// The padding token: `<|endoftext|>` for SD1.x, `!` for SD2.x and SDXL's `tokenizer_2`.
    pub fn pad(&self) -> &SpecialToken {
        &self.pad
    }

    /// The folder this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ids of `text` without special tokens, truncation or padding.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Exactly `max_length` ids: BOS, the prompt's tokens truncated so that EOS fits, EOS, then
    /// the padding token (diffusers' `padding="max_length", truncation=True`).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let tokens = self.tokenize(prompt)?;
        let keep = tokens.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos.id);
        ids.extend_from_slice(&tokens[..keep]);
        ids.push(self.eos.id);
        ids.resize(self.max_length, self.pad.id);
        Ok(ids)
    }

    /// Whether `prompt` is longer than fits and would be truncated by [`ClipTokenizer::encode`].
    pub fn is_truncated(&self, prompt: &str) -> Result<bool> {
        Ok(self.tokenize(prompt)?.len() > self.max_length - 2)
    }

    /// Encode a batch into a `[B, max_length]` u32 tensor on `device`.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S], device: &Device) -> Result<Tensor> {
        let mut all = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            all.extend(self.encode(p.as_ref())?);
        }
        Ok(Tensor::from_vec(
            all,
            (prompts.len(), self.max_length),
            device,
        )?)
    }
}

/// Read a JSON file that must hold an object.
fn read_object(path: &Path) -> Result<Map<String, Value>> {
    match crate::engine::model_dir::read_json::<Value>(path)? {
        Value::Object(m) => Ok(m),
        _ => Err(Error::config(path, "expected a JSON object")),
    }
}

/// `vocab.json`: token → id.
fn read_vocab(path: &Path) -> Result<Vocab> {
    let obj = read_object(path)?;
    vocab_from_object(&obj, path)
}

fn vocab_from_object(obj: &Map<String, Value>, path: &Path) -> Result<Vocab> {
    let mut vocab = Vocab::default();
    for (token, id) in obj {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| {
                Error::config(path, format!("vocabulary id of {token:?} is not a u32"))
            })?;
        vocab.insert(token.clone(), id);
    }
    Ok(vocab)
}

/// `merges.txt`: one `left right` pair a line; lines starting with `#version` and blank lines
/// are skipped (the `tokenizers` library's reader, which transformers 5.x uses).
fn read_merges(path: &Path) -> Result<Merges> {
    let text = crate::error::read_to_string(path)?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            return Err(Error::config(
                path,
                format!(
                    "line {}: a merge must be two tokens separated by one space",
                    n + 1
                ),
            ));
        }
        merges.push((parts[0].to_string(), parts[1].to_string()));
    }
    Ok(merges)
}

/// Vocabulary, merges and added tokens of a BPE `tokenizer.json`.
fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges, Vec<AddedToken>)> {
    let root = read_object(path)?;
    let model = root
        .get("model")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::config(path, "no model object"))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "{}: tokenizer model {other} (CLIP needs BPE)",
                path.display()
            )))
        }
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::config(path, "model.vocab is not an object"))?;
    let vocab = vocab_from_object(vocab, path)?;
    let mut merges = Vec::new();
    for m in model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::config(path, "model.merges is not a list"))?
    {
        let pair = match m {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(a) => match (a.first(), a.get(1), a.len()) {
                (Some(Value::String(x)), Some(Value::String(y)), 2) => Some((x.clone(), y.clone())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| Error::config(path, format!("bad merge {m}")))?);
    }
    let added = root
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| added_token_from_json(v, false))
                .collect()
        })
        .unwrap_or_default();
    Ok((vocab, merges, added))
}

/// An `AddedToken` from its serialized form (a dict with `content` and flags, or a string).
fn added_token_from_json(v: &Value, default_special: bool) -> Option<AddedToken> {
    match v {
        Value::String(s) => Some(AddedToken::from(s.clone(), default_special)),
        Value::Object(o) => {
            let content = o.get("content")?.as_str()?.to_string();
            let flag = |k: &str, d: bool| o.get(k).and_then(Value::as_bool).unwrap_or(d);
            let special = flag("special", default_special);
            Some(
                AddedToken::from(content, special)
                    .single_word(flag("single_word", false))
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .normalized(flag("normalized", !special)),
            )
        }
        _ => None,
    }
}

/// The text of a special token setting, which may be a string or an `AddedToken` dict.
fn token_text(settings: &Map<String, Value>, key: &str) -> Option<String> {
    match settings.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's byte → printable character table, in its own order.
    fn byte_chars() -> Vec<char> {
        let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        cs.into_iter().filter_map(char::from_u32).collect()
    }

    /// A tiny CLIP tokenizer folder (the same one the expected ids below came from, produced by
    /// transformers 5.24 `CLIPTokenizer` with `padding="max_length", truncation=True`).
    fn tiny_tokenizer(name: &str, pad: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pairstyle-tok-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chars = byte_chars();
        let merges = [
            "h e",
            "l l",
            "he ll",
            "hell o</w>",
            "w o",
            "r l",
            "wo rl",
            "worl d</w>",
        ];
        let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
        vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
        let vocab: Map<String, Value> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, Value::from(i)))
            .collect();
        std::fs::write(dir.join("vocab.json"), Value::Object(vocab).to_string()).unwrap();
        std::fs::write(
            dir.join("merges.txt"),
            format!("#version: 0.2\n{}\n", merges.join("\n")),
        )
        .unwrap();
        let cfg = serde_json::json!({
            "model_max_length": 12, "pad_token": pad, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        dir
    }

    const PROMPTS: [&str; 8] = [
        "hello! world",
        "Hello   World!!",
        "a <|endoftext|> b",
        "!",
        "hello hello hello hello hello hello hello hello hello hello hello hello",
        "Ünïcode café 42",
        "don't",
        "",
    ];

    #[test]
    fn matches_transformers_with_endoftext_padding() {
        let dir = tiny_tokenizer("eot", "<|endoftext|>");
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        let want: [&[u32]; 8] = [
            &[520, 515, 256, 519, 521, 521, 521, 521, 521, 521, 521, 521],
            &[520, 515, 519, 0, 256, 521, 521, 521, 521, 521, 521, 521],
            &[520, 320, 521, 321, 521, 521, 521, 521, 521, 521, 521, 521],
            &[520, 256, 521, 521, 521, 521, 521, 521, 521, 521, 521, 521],
            &[520, 515, 515, 515, 515, 515, 515, 515, 515, 515, 515, 521],
            &[520, 127, 120, 77, 127, 107, 66, 78, 67, 324, 66, 521],
            &[520, 67, 78, 333, 6, 339, 521, 521, 521, 521, 521, 521],
            &[520, 521, 521, 521, 521, 521, 521, 521, 521, 521, 521, 521],
        ];
        for (p, w) in PROMPTS.iter().zip(want) {
            assert_eq!(tok.encode(p).unwrap(), w, "{p:?}");
        }
        assert!(tok.is_truncated(PROMPTS[4]).unwrap());
        assert!(!tok.is_truncated(PROMPTS[0]).unwrap());
        let t = tok
            .encode_batch(&PROMPTS[..2], &candle_core::Device::Cpu)
            .unwrap();
        assert_eq!(t.dims(), &[2, 12]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bang_padding_makes_bang_special_as_in_transformers() {
        let dir = tiny_tokenizer("bang", "!");
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.pad().id, 0);
        let want: [&[u32]; 8] = [
            &[520, 515, 0, 519, 521, 0, 0, 0, 0, 0, 0, 0],
            &[520, 515, 519, 0, 0, 521, 0, 0, 0, 0, 0, 0],
            &[520, 320, 521, 321, 521, 0, 0, 0, 0, 0, 0, 0],
            &[520, 0, 521, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[520, 515, 515, 515, 515, 515, 515, 515, 515, 515, 515, 521],
            &[520, 127, 120, 77, 127, 107, 66, 78, 67, 324, 66, 521],
            &[520, 67, 78, 333, 6, 339, 521, 0, 0, 0, 0, 0],
            &[520, 521, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ];
        for (p, w) in PROMPTS.iter().zip(want) {
            assert_eq!(tok.encode(p).unwrap(), w, "{p:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn special_tokens_map_overrides_only_without_added_tokens_decoder() {
        let dir = tiny_tokenizer("map", "<|endoftext|>");
        std::fs::write(
            dir.join("special_tokens_map.json"),
            r#"{"pad_token": {"content": "!", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false}}"#,
        )
        .unwrap();
        assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad().id, 0);
        let cfg = serde_json::json!({
            "model_max_length": 12, "pad_token": "<|endoftext|>",
            "added_tokens_decoder": {"521": {"content": "<|endoftext|>", "special": true}},
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad().id, 521);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tiny_tokenizer("missing", "<|endoftext|>");
        std::fs::remove_file(dir.join("merges.txt")).unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(
            matches!(&err, Error::MissingFile { path } if path.ends_with("merges.txt")),
            "{err}"
        );
        std::fs::remove_file(dir.join("vocab.json")).unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(
            matches!(&err, Error::MissingFile { path } if path.ends_with("vocab.json")),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }));
    }
}
