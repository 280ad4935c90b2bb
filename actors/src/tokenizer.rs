//! Tokenizer: text ↔ token ids and chat templates.
//!
//! The pure part (everything above the `--- actor ---` marker) builds a HF
//! [`tokenizers::Tokenizer`] from either
//!
//! - a GGUF file's metadata ([`tokenizer_from_gguf`], [`tokenizer_from_gguf_file`]): byte-level
//!   BPE (`tokenizer.ggml.model = "gpt2"`) from the vocabulary, merges, token types and the
//!   `tokenizer.ggml.pre` name, which picks the pre-tokenizer (see [`pre_tokenizer_for`]); or
//! - a Hugging Face model directory ([`tokenizer_from_hf_dir`]): `tokenizer.json` plus
//!   `tokenizer_config.json`, `config.json` and `generation_config.json` for the special tokens
//!   and the chat template,
//!
//! and renders chat templates with minijinja ([`ChatTemplate`]) the way transformers renders them
//! with jinja2 (`trim_blocks`, `lstrip_blocks`, `raise_exception`, a Python-compatible `tojson`,
//! the common Python string / dict methods).
//!
//! Encoding ([`encode`]) never runs the tokenizer's post-processor: the only special token it adds
//! is an optional BOS. Special tokens written in the text (`<|im_start|>`) are matched as their
//! ids, as HF tokenizers and llama.cpp's `parse_special` do; callers that want user text kept
//! literal must escape it before templating.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Environment, ErrorKind, State};
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Everything that can go wrong loading a tokenizer, rendering a template or encoding text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata has no `{0}`")]
    MissingKey(String),
    #[error("GGUF metadata `{key}` is not {expected}")]
    WrongType { key: String, expected: &'static str },
    #[error(
        "unsupported tokenizer model `{0}`: only byte-level BPE (`gpt2`) GGUF vocabularies are \
         supported; sentencepiece (`llama`) GGUF vocabularies are not yet"
    )]
    UnsupportedModel(String),
    #[error(
        "unknown pre-tokenizer `{0}` (tokenizer.ggml.pre); supported: default, gpt2, smollm, \
         starcoder, refact, llama-bpe, llama3, llama-v3, falcon3, smaug-bpe, qwen2, \
         deepseek-r1-qwen"
    )]
    UnknownPreTokenizer(String),
    #[error("merge #{index} `{merge}` is not two tokens separated by a space")]
    InvalidMerge { index: usize, merge: String },
    #[error("{what} id {id} is outside the vocabulary ({vocab_size} tokens)")]
    TokenIdOutOfRange {
        what: &'static str,
        id: u32,
        vocab_size: usize,
    },
    #[error("{what} token `{token}` is not in the vocabulary")]
    UnknownSpecialToken { what: &'static str, token: String },
    #[error("building the tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("reading GGUF {path}: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("chat template does not compile: {0:#}")]
    TemplateSyntax(#[source] minijinja::Error),
    /// The template itself rejected the conversation with `raise_exception(...)`
    /// (e.g. "Conversation roles must alternate user/assistant/..."): a client error.
    #[error("chat template rejected the conversation: {0}")]
    TemplateRaised(String),
    #[error("rendering the chat template: {0:#}")]
    TemplateRender(#[source] minijinja::Error),
    #[error("encoding text: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("decoding ids: {0}")]
    Decode(#[source] tokenizers::Error),
}

/// The special token ids (and their strings) a model's tokenizer declares.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_id: Option<u32>,
    pub eos_token: Option<String>,
    /// Every id that ends generation: `eos_id` first, then (GGUF) `tokenizer.ggml.eot_token_id`
    /// / `eom_token_id`, or (HF) the `eos_token_id`s of generation_config.json and config.json.
    /// Deduplicated, in that order.
    pub eos_ids: Vec<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Whether a prompt gets a BOS token in front (`add_bos_token`).
    pub add_bos: bool,
}

impl SpecialTokens {
    /// The BOS id to pass to [`encode`]: `Some` only when the model wants one added.
    pub fn bos_to_add(&self) -> Option<u32> {
        if self.add_bos {
            self.bos_id
        } else {
            None
        }
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    fn push_eos(&mut self, id: u32) {
        if !self.eos_ids.contains(&id) {
            self.eos_ids.push(id);
        }
    }
}

/// A loaded tokenizer: the HF tokenizer, its special tokens and its chat template source.
#[derive(Debug, Clone)]
pub struct TokenizerParts {
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    /// The model's own Jinja chat template, if it ships one.
    pub chat_template: Option<String>,
}

impl TokenizerParts {
    /// Compiles the model's chat template, or the ChatML fallback
    /// ([`CHATML_TEMPLATE`]) when the model has none.
    pub fn compile_chat_template(&self) -> Result<ChatTemplate, TokenizerError> {
        let bos = self.special.bos_token.clone().unwrap_or_default();
        let eos = self.special.eos_token.clone().unwrap_or_default();
        match &self.chat_template {
            Some(source) => ChatTemplate::new(source, bos, eos),
            None => ChatTemplate::chatml(bos, eos),
        }
    }

    /// Encodes `text`, adding BOS when the model wants it (see [`encode`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        encode(&self.tokenizer, text, self.special.bos_to_add())
    }

    /// Decodes `ids`, skipping special tokens (see [`decode`]).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        decode(&self.tokenizer, ids)
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding
// ---------------------------------------------------------------------------------------------

/// Encodes `text` to ids without the tokenizer's post-processor (no template special tokens);
/// when `bos` is `Some`, that id is put in front unless the text already starts with it
/// (a chat template that writes `{{ bos_token }}` itself must not get two).
pub fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    bos: Option<u32>,
) -> Result<Vec<u32>, TokenizerError> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(TokenizerError::Encode)?;
    let ids = encoding.get_ids();
    match bos {
        Some(bos) if ids.first() != Some(&bos) => {
            let mut out = Vec::with_capacity(ids.len() + 1);
            out.push(bos);
            out.extend_from_slice(ids);
            Ok(out)
        }
        _ => Ok(ids.to_vec()),
    }
}

/// Decodes `ids` to text, skipping special tokens (`skip_special_tokens = true`).
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
    tokenizer.decode(ids, true).map_err(TokenizerError::Decode)
}

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The GPT-2 pre-tokenizer regex is built into `ByteLevel(use_regex = true)`; these are the
/// others, as in the models' own `tokenizer.json` (and llama.cpp's `llama-vocab.cpp`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level BPE vocabulary splits text before the merges run, picked by GGUF's
/// `tokenizer.ggml.pre`.
#[derive(Debug)]
pub struct PreTokenization {
    pub normalizer: Option<NormalizerWrapper>,
    pub pre_tokenizer: PreTokenizerWrapper,
    /// A pre-token that is already a vocabulary entry is taken whole (Llama 3).
    pub ignore_merges: bool,
    /// The BOS default when the GGUF has no `tokenizer.ggml.add_bos_token`.
    pub default_add_bos: bool,
}

/// The pre-tokenization for a `tokenizer.ggml.pre` value:
///
/// - `default`, `gpt2`: the GPT-2 regex (`ByteLevel(add_prefix_space=false, use_regex=true)`);
/// - `smollm`, `starcoder`, `refact`: every digit on its own, then the GPT-2 regex
///   (HF: `Sequence[Digits(individual_digits=true), ByteLevel]`);
/// - `llama-bpe`, `llama3`, `llama-v3`, `falcon3`, `smaug-bpe`: the Llama 3 regex (numbers in
///   groups of up to three), `ignore_merges` for the Llama 3 family, BOS added by default;
/// - `qwen2`, `deepseek-r1-qwen`: NFC, then the Qwen2 regex (single digits).
pub fn pre_tokenizer_for(pre: &str) -> Result<PreTokenization, TokenizerError> {
    let gpt2 = || PreTokenizerWrapper::from(ByteLevel::new(false, true, true));
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(TokenizerError::Build)?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    let plain = |pre_tokenizer| PreTokenization {
        normalizer: None,
        pre_tokenizer,
        ignore_merges: false,
        default_add_bos: false,
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => plain(gpt2()),
        "smollm" | "starcoder" | "refact" => {
            plain(Sequence::new(vec![Digits::new(true).into(), gpt2()]).into())
        }
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" => PreTokenization {
            normalizer: None,
            pre_tokenizer: split_then_bytes(LLAMA3_SPLIT)?,
            ignore_merges: true,
            default_add_bos: true,
        },
        "smaug-bpe" => plain(split_then_bytes(LLAMA3_SPLIT)?),
        "qwen2" | "deepseek-r1-qwen" => PreTokenization {
            normalizer: Some(NFC.into()),
            ..plain(split_then_bytes(QWEN2_SPLIT)?)
        },
        other => return Err(TokenizerError::UnknownPreTokenizer(other.to_owned())),
    })
}

fn gguf_get<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<&'a gguf_file::Value, TokenizerError> {
    metadata
        .get(key)
        .ok_or_else(|| TokenizerError::MissingKey(key.to_owned()))
}

fn gguf_int(value: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    match *value {
        V::U8(v) => Some(v.into()),
        V::I8(v) => Some(v.into()),
        V::U16(v) => Some(v.into()),
        V::I16(v) => Some(v.into()),
        V::U32(v) => Some(v.into()),
        V::I32(v) => Some(v.into()),
        V::U64(v) => i64::try_from(v).ok(),
        V::I64(v) => Some(v),
        _ => None,
    }
}

fn gguf_str<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<Option<&'a str>, TokenizerError> {
    match metadata.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(TokenizerError::WrongType {
            key: key.to_owned(),
            expected: "a string",
        }),
    }
}

fn gguf_bool(
    metadata: &HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<Option<bool>, TokenizerError> {
    match metadata.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => gguf_int(v)
            .map(|i| Some(i != 0))
            .ok_or(TokenizerError::WrongType {
                key: key.to_owned(),
                expected: "a bool",
            }),
    }
}

/// An optional token id key, checked against the vocabulary size.
fn gguf_token_id(
    metadata: &HashMap<String, gguf_file::Value>,
    key: &str,
    what: &'static str,
    vocab_size: usize,
) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    let raw = gguf_int(value).ok_or(TokenizerError::WrongType {
        key: key.to_owned(),
        expected: "an integer",
    })?;
    // llama.cpp writes -1 (as u32::MAX or i32) for "no such token".
    if raw < 0 || raw == i64::from(u32::MAX) {
        return Ok(None);
    }
    match u32::try_from(raw) {
        Ok(id) if (id as usize) < vocab_size => Ok(Some(id)),
        _ => Err(TokenizerError::TokenIdOutOfRange {
            what,
            id: u32::try_from(raw).unwrap_or(u32::MAX),
            vocab_size,
        }),
    }
}

fn gguf_array<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<&'a [gguf_file::Value], TokenizerError> {
    match gguf_get(metadata, key)? {
        gguf_file::Value::Array(items) => Ok(items),
        _ => Err(TokenizerError::WrongType {
            key: key.to_owned(),
            expected: "an array",
        }),
    }
}

fn gguf_strings<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<Vec<&'a str>, TokenizerError> {
    gguf_array(metadata, key)?
        .iter()
        .map(|v| match v {
            gguf_file::Value::String(s) => Ok(s.as_str()),
            _ => Err(TokenizerError::WrongType {
                key: key.to_owned(),
                expected: "an array of strings",
            }),
        })
        .collect()
}

/// Builds the tokenizer a GGUF file describes from its metadata (`Content::metadata`).
///
/// Byte-level BPE only (`tokenizer.ggml.model = "gpt2"`): the vocabulary and merges as stored,
/// the pre-tokenizer named by `tokenizer.ggml.pre` ([`pre_tokenizer_for`]), a `ByteLevel`
/// decoder, no post-processor. Control tokens (type 3) become special added tokens and
/// user-defined tokens (type 4) plain added tokens, so both are matched whole in text; decoding
/// skips the control ones only.
pub fn tokenizer_from_gguf(
    metadata: &HashMap<String, gguf_file::Value>,
) -> Result<TokenizerParts, TokenizerError> {
    let model = gguf_str(metadata, "tokenizer.ggml.model")?
        .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.model".into()))?;
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel(model.to_owned()));
    }
    let pre = gguf_str(metadata, "tokenizer.ggml.pre")?.unwrap_or("default");
    let pre = pre_tokenizer_for(pre)?;

    let tokens = gguf_strings(metadata, "tokenizer.ggml.tokens")?;
    let vocab_size = tokens.len();
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| TokenizerError::TokenIdOutOfRange {
            what: "vocabulary",
            id: u32::MAX,
            vocab_size,
        })?;
        // A duplicated spelling keeps its first id, as llama.cpp's token_to_id does.
        vocab.entry((*token).to_owned()).or_insert(id);
    }
    let merges = gguf_strings(metadata, "tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(index, merge)| match merge.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
            _ => Err(TokenizerError::InvalidMerge {
                index,
                merge: (*merge).to_owned(),
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(TokenizerError::Build)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(pre.normalizer)
        .with_pre_tokenizer(Some(pre.pre_tokenizer))
        .with_decoder(Some(ByteLevelDecoder::default()));

    // Token types are optional (old files); without them nothing is special.
    let mut control = Vec::new();
    let mut user_defined = Vec::new();
    if metadata.contains_key("tokenizer.ggml.token_type") {
        let types = gguf_array(metadata, "tokenizer.ggml.token_type")?;
        for (token, ty) in tokens.iter().zip(types) {
            match gguf_int(ty) {
                Some(TOKEN_TYPE_CONTROL) => {
                    control.push(AddedToken::from(*token, true).normalized(false))
                }
                Some(TOKEN_TYPE_USER_DEFINED) => {
                    user_defined.push(AddedToken::from(*token, false).normalized(false))
                }
                Some(_) => {}
                None => {
                    return Err(TokenizerError::WrongType {
                        key: "tokenizer.ggml.token_type".into(),
                        expected: "an array of integers",
                    })
                }
            }
        }
    }
    tokenizer.add_special_tokens(&control);
    tokenizer.add_tokens(&user_defined);

    let id = |key: &str, what| gguf_token_id(metadata, key, what, vocab_size);
    let bos_id = id("tokenizer.ggml.bos_token_id", "BOS")?;
    let eos_id = id("tokenizer.ggml.eos_token_id", "EOS")?;
    let token_of = |id: Option<u32>| {
        id.and_then(|id| tokens.get(id as usize))
            .map(|t| (*t).to_owned())
    };
    let mut special = SpecialTokens {
        bos_id,
        bos_token: token_of(bos_id),
        eos_id,
        eos_token: token_of(eos_id),
        eos_ids: Vec::new(),
        unk_id: id("tokenizer.ggml.unknown_token_id", "UNK")?,
        pad_id: id("tokenizer.ggml.padding_token_id", "PAD")?,
        add_bos: gguf_bool(metadata, "tokenizer.ggml.add_bos_token")?
            .unwrap_or(pre.default_add_bos),
    };
    for (key, what) in [
        ("tokenizer.ggml.eos_token_id", "EOS"),
        ("tokenizer.ggml.eot_token_id", "EOT"),
        ("tokenizer.ggml.eom_token_id", "EOM"),
    ] {
        if let Some(id) = id(key, what)? {
            special.push_eos(id);
        }
    }
    let chat_template = gguf_str(metadata, "tokenizer.chat_template")?.map(str::to_owned);
    Ok(TokenizerParts {
        tokenizer,
        special,
        chat_template,
    })
}

/// Reads a GGUF file's header and builds its tokenizer ([`tokenizer_from_gguf`]).
pub fn tokenizer_from_gguf_file(path: &Path) -> Result<TokenizerParts, TokenizerError> {
    let mut file = File::open(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(|source| TokenizerError::Gguf {
        path: path.to_owned(),
        source,
    })?;
    tokenizer_from_gguf(&content.metadata)
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directory
// ---------------------------------------------------------------------------------------------

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// A special token in tokenizer_config.json: `"<s>"`, `{"content": "<s>", ...}` or null.
fn config_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` in config.json / generation_config.json: an int, a list of ints or null.
fn config_ids(config: Option<&serde_json::Value>, key: &str) -> Vec<u32> {
    let as_id = |v: &serde_json::Value| v.as_u64().and_then(|i| u32::try_from(i).ok());
    match config.and_then(|c| c.get(key)) {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(as_id).collect(),
        Some(v) => as_id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of `{name, template}` of which
/// the one named `default` is taken (the first when none is).
fn config_chat_template(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => {
            let template = |item: &serde_json::Value| {
                item.get("template")
                    .and_then(|t| t.as_str())
                    .map(str::to_owned)
            };
            items
                .iter()
                .find(|item| item.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| items.first())
                .and_then(template)
        }
        _ => None,
    }
}

/// Loads a Hugging Face model directory's tokenizer.
///
/// - `tokenizer.json` (required): the tokenizer itself;
/// - `tokenizer_config.json`: `bos_token` / `eos_token` (strings or `{"content": ...}`),
///   `add_bos_token`, `chat_template`;
/// - `chat_template.jinja` or `chat_template.json` (newer transformers): the chat template
///   when tokenizer_config.json has none;
/// - `generation_config.json`, `config.json`: `eos_token_id` (int or list) merged into
///   `eos_ids`, and `bos_token_id` / `eos_token_id` when tokenizer_config.json names none.
///
/// When `add_bos_token` is not given, BOS is added iff the tokenizer's own post-processor adds
/// it (Llama 3's `TemplateProcessing`).
pub fn tokenizer_from_hf_dir(dir: &Path) -> Result<TokenizerParts, TokenizerError> {
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
        match e.downcast::<std::io::Error>() {
            Ok(source) => TokenizerError::Io {
                path: tokenizer_path.clone(),
                source: *source,
            },
            Err(e) => TokenizerError::Parse {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            },
        }
    })?;
    let tokenizer_config =
        read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(serde_json::Value::Null);
    let generation_config = read_json(&dir.join("generation_config.json"))?;
    let model_config = read_json(&dir.join("config.json"))?;

    let lookup = |what: &'static str, token: String| match tokenizer.token_to_id(&token) {
        Some(id) => Ok((id, token)),
        None => Err(TokenizerError::UnknownSpecialToken { what, token }),
    };
    let by_id = |id: u32| tokenizer.id_to_token(id).map(|t| (id, t));
    let from_configs = |key: &str| {
        config_ids(generation_config.as_ref(), key)
            .into_iter()
            .chain(config_ids(model_config.as_ref(), key))
            .next()
    };

    let bos = match config_token(&tokenizer_config, "bos_token") {
        Some(token) => Some(lookup("BOS", token)?),
        None => from_configs("bos_token_id").and_then(by_id),
    };
    let eos = match config_token(&tokenizer_config, "eos_token") {
        Some(token) => Some(lookup("EOS", token)?),
        None => from_configs("eos_token_id").and_then(by_id),
    };
    let add_bos = match tokenizer_config
        .get("add_bos_token")
        .and_then(|v| v.as_bool())
    {
        Some(add) => add,
        None => match &bos {
            Some((bos_id, _)) => tokenizer
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(bos_id))
                .unwrap_or(false),
            None => false,
        },
    };
    let token_id =
        |key: &str| config_token(&tokenizer_config, key).and_then(|t| tokenizer.token_to_id(&t));
    let mut special = SpecialTokens {
        bos_id: bos.as_ref().map(|(id, _)| *id),
        bos_token: bos.map(|(_, t)| t),
        eos_id: eos.as_ref().map(|(id, _)| *id),
        eos_token: eos.map(|(_, t)| t),
        eos_ids: Vec::new(),
        unk_id: token_id("unk_token"),
        pad_id: token_id("pad_token"),
        add_bos,
    };
    let more_eos: Vec<u32> = special
        .eos_id
        .into_iter()
        .chain(config_ids(generation_config.as_ref(), "eos_token_id"))
        .chain(config_ids(model_config.as_ref(), "eos_token_id"))
        .collect();
    for id in more_eos {
        special.push_eos(id);
    }

    let chat_template = match config_chat_template(&tokenizer_config) {
        Some(t) => Some(t),
        None => {
            let jinja = dir.join("chat_template.jinja");
            match std::fs::read_to_string(&jinja) {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    read_json(&dir.join("chat_template.json"))?
                        .as_ref()
                        .and_then(config_chat_template)
                }
                Err(source) => {
                    return Err(TokenizerError::Io {
                        path: jinja,
                        source,
                    })
                }
            }
        }
    };
    Ok(TokenizerParts {
        tokenizer,
        special,
        chat_template,
    })
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// The template used when a model ships none: ChatML (`<|im_start|>role\ncontent<|im_end|>\n`
/// per message, then `<|im_start|>assistant\n` for the generation prompt) — transformers' old
/// default. Models not trained on ChatML will see unfamiliar markers; serving such a model
/// should configure a template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template, rendered as transformers' `apply_chat_template` renders it:
/// jinja2 with `trim_blocks` and `lstrip_blocks`; the variables `messages`,
/// `add_generation_prompt`, `bos_token`, `eos_token`, `tools` (none) and `documents` (none);
/// the function `raise_exception(msg)`; a `tojson` filter that writes what Python's
/// `json.dumps` writes (`ensure_ascii=False`, `indent`, `sort_keys`); and the Python methods
/// templates call on strings (`strip`, `startswith`, `split`, ...) and dicts (`items`, `get`, ...).
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// The error `raise_exception` attaches, so a render failure it caused is told apart.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

impl ChatTemplate {
    /// Compiles `source`; a template minijinja cannot parse is a
    /// [`TokenizerError::TemplateSyntax`].
    pub fn new(
        source: &str,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(python_method);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        // jinja2 prints Python's `None`; minijinja would print `none`.
        env.set_formatter(|out, state, value| {
            if value.is_none() {
                out.write_str("None").map_err(minijinja::Error::from)
            } else {
                minijinja::escape_formatter(out, state, value)
            }
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(TokenizerError::TemplateSyntax)?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The ChatML fallback ([`CHATML_TEMPLATE`]).
    pub fn chatml(
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, TokenizerError> {
        Self::new(CHATML_TEMPLATE, bos_token, eos_token)
    }

    /// Renders the conversation; `add_generation_prompt` appends the assistant turn's opening.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(TokenizerError::TemplateRender)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => JValue::from(()),
            documents => JValue::from(()),
        };
        template.render(ctx).map_err(|err| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
            while let Some(e) = source {
                if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
                    return TokenizerError::TemplateRaised(raised.0.clone());
                }
                source = e.source();
            }
            TokenizerError::TemplateRender(err)
        })
    }
}

fn raise_exception(message: String) -> Result<JValue, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedByTemplate(message)),
    )
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, as transformers defines its `tojson` filter.
fn tojson(value: &JValue, kwargs: Kwargs) -> Result<JValue, minijinja::Error> {
    let indent: Option<JValue> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<JValue> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(" ".repeat(v.as_usize().ok_or_else(|| {
                minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: bad indent")
            })?)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() && !seps.is_undefined() => {
            let item = seps.get_item_by_index(0)?;
            let key = seps.get_item_by_index(1)?;
            (item.to_string(), key.to_string())
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let mut writer = PyJson {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    writer.value(value, 0)?;
    Ok(JValue::from_safe_string(writer.out))
}

struct PyJson {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&mut self, depth: usize) {
        if let Some(indent) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(indent);
            }
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn value(&mut self, value: &JValue, depth: usize) -> Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                let text = serde_json::to_string(value).map_err(|e| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
                })?;
                self.out.push_str(&text);
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<JValue> = value.try_iter()?.collect();
                if keys.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                self.out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.string(&key.to_string());
                    let sep = self.key_sep.clone();
                    self.out.push_str(&sep);
                    self.value(&value.get_item(key)?, depth + 1)?;
                }
                self.newline(depth);
                self.out.push('}');
            }
            _ => {
                let items: Vec<JValue> = value.try_iter()?.collect();
                if items.is_empty() {
                    self.out.push_str("[]");
                    return Ok(());
                }
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.value(item, depth + 1)?;
                }
                self.newline(depth);
                self.out.push(']');
            }
        }
        Ok(())
    }
}

fn str_arg(args: &[JValue], i: usize) -> Option<&str> {
    args.get(i).and_then(|v| v.as_str())
}

/// Python's `str.split(sep=None, maxsplit=-1)`.
fn py_split(s: &str, sep: Option<&str>, maxsplit: Option<usize>) -> Vec<JValue> {
    let max = maxsplit.unwrap_or(usize::MAX);
    match sep {
        Some(sep) => {
            if max == usize::MAX {
                s.split(sep).map(JValue::from).collect()
            } else {
                s.splitn(max.saturating_add(1), sep)
                    .map(JValue::from)
                    .collect()
            }
        }
        None => {
            let mut out = Vec::new();
            let mut rest = s.trim_start();
            while !rest.is_empty() {
                if out.len() == max {
                    out.push(JValue::from(rest));
                    break;
                }
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                out.push(JValue::from(&rest[..end]));
                rest = rest[end..].trim_start();
            }
            out
        }
    }
}

/// A prefix argument of `startswith` / `endswith`: a string or a tuple (list) of strings.
fn any_affix(arg: Option<&JValue>, test: impl Fn(&str) -> bool) -> Result<bool, minijinja::Error> {
    let Some(arg) = arg else {
        return Err(minijinja::Error::new(
            ErrorKind::MissingArgument,
            "startswith/endswith needs an argument",
        ));
    };
    if let Some(s) = arg.as_str() {
        return Ok(test(s));
    }
    Ok(arg.try_iter()?.any(|v| v.as_str().is_some_and(&test)))
}

/// The Python `str` and `dict` methods chat templates call that minijinja lacks.
fn python_method(
    _state: &State,
    value: &JValue,
    method: &str,
    args: &[JValue],
) -> Result<JValue, minijinja::Error> {
    let unknown = || {
        Err(minijinja::Error::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method named {method}", value.kind()),
        ))
    };
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let chars = str_arg(args, 0).map(|c| c.chars().collect::<Vec<_>>());
            let strip_set = |c: char| match &chars {
                Some(set) => set.contains(&c),
                None => c.is_whitespace(),
            };
            Ok(match method {
                "strip" => JValue::from(s.trim_matches(strip_set)),
                "lstrip" => JValue::from(s.trim_start_matches(strip_set)),
                "rstrip" => JValue::from(s.trim_end_matches(strip_set)),
                "upper" => JValue::from(s.to_uppercase()),
                "lower" => JValue::from(s.to_lowercase()),
                "capitalize" => {
                    let mut it = s.chars();
                    let first = it.next().map(|c| c.to_uppercase().collect::<String>());
                    JValue::from(first.unwrap_or_default() + &it.as_str().to_lowercase())
                }
                "title" => {
                    let mut out = String::with_capacity(s.len());
                    let mut prev_cased = false;
                    for c in s.chars() {
                        if prev_cased {
                            out.extend(c.to_lowercase());
                        } else {
                            out.extend(c.to_uppercase());
                        }
                        prev_cased = c.is_alphabetic();
                    }
                    JValue::from(out)
                }
                "startswith" => JValue::from(any_affix(args.first(), |p| s.starts_with(p))?),
                "endswith" => JValue::from(any_affix(args.first(), |p| s.ends_with(p))?),
                "split" => {
                    let maxsplit = args
                        .get(1)
                        .and_then(|v| v.as_i64())
                        .and_then(|m| usize::try_from(m).ok());
                    JValue::from(py_split(s, str_arg(args, 0), maxsplit))
                }
                "splitlines" => JValue::from(s.lines().map(JValue::from).collect::<Vec<_>>()),
                "replace" => {
                    let (Some(old), Some(new)) = (str_arg(args, 0), str_arg(args, 1)) else {
                        return Err(minijinja::Error::new(
                            ErrorKind::MissingArgument,
                            "replace(old, new[, count])",
                        ));
                    };
                    match args.get(2).and_then(|v| v.as_i64()) {
                        Some(n) if n >= 0 => {
                            JValue::from(s.replacen(old, new, usize::try_from(n).unwrap_or(0)))
                        }
                        _ => JValue::from(s.replace(old, new)),
                    }
                }
                "find" => {
                    let sub = str_arg(args, 0).unwrap_or_default();
                    JValue::from(
                        s.find(sub)
                            .map(|byte| s[..byte].chars().count() as i64)
                            .unwrap_or(-1),
                    )
                }
                "count" => JValue::from(s.matches(str_arg(args, 0).unwrap_or_default()).count()),
                "join" => {
                    let Some(items) = args.first() else {
                        return unknown();
                    };
                    let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
                    JValue::from(parts.join(s))
                }
                "isdigit" => JValue::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
                "isalpha" => JValue::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
                "isalnum" => JValue::from(!s.is_empty() && s.chars().all(char::is_alphanumeric)),
                "isspace" => JValue::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
                "islower" => JValue::from(
                    s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase),
                ),
                "isupper" => JValue::from(
                    s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase),
                ),
                _ => return unknown(),
            })
        }
        ValueKind::Map => match method {
            "items" => Ok(JValue::from(
                value
                    .try_iter()?
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        JValue::from(vec![k, v])
                    })
                    .collect::<Vec<_>>(),
            )),
            "keys" => Ok(JValue::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => Ok(JValue::from(
                value
                    .try_iter()?
                    .map(|k| value.get_item(&k).unwrap_or_default())
                    .collect::<Vec<_>>(),
            )),
            "get" => {
                let Some(key) = args.first() else {
                    return unknown();
                };
                let found = value.get_item(key)?;
                Ok(if found.is_undefined() {
                    args.get(1).cloned().unwrap_or(JValue::from(()))
                } else {
                    found
                })
            }
            _ => unknown(),
        },
        _ => unknown(),
    }
}

// --- actor ---
mod actor {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use actix::prelude::*;
    use tokio::sync::mpsc::UnboundedSender;

    use super::{ChatTemplate, TokenizerParts};
    use crate::detokenizer::{CancelRequest, DetokenizerActor, RegisterStream, StreamEnd};
    use crate::executor::sampler::validate_params;
    use crate::messages::{now_us, FinishReason, SeqId, TokenId};
    use crate::protocol::{ErrorBody, ErrorCode, GenerateRequest, Prompt, StreamEvent};
    use crate::scheduler::{AddSequence, SchedulerActor, SchedulerError};

    /// Client → tokenizer: a request and where its stream goes.
    #[derive(Message)]
    #[rtype(result = "()")]
    pub struct Submit {
        pub request: GenerateRequest,
        pub sink: UnboundedSender<StreamEvent>,
    }

    /// Client → tokenizer: cancel a request by id. It goes through the tokenizer, after any
    /// `Submit` sent before it, so a cancel never overtakes its own request; the answer says
    /// whether a live sequence had that id.
    #[derive(Debug, Message)]
    #[rtype(result = "bool")]
    pub struct Cancel {
        pub request_id: String,
    }

    /// The tokenizer actor: validates a request, applies the chat template, encodes the
    /// prompt, then hands the sequence to the detokenizer (its stream) and the scheduler.
    pub struct TokenizerActor {
        parts: Arc<TokenizerParts>,
        template: Arc<ChatTemplate>,
        vocab_size: usize,
        max_model_len: usize,
        /// Prompts longer than this many bytes cannot fit in `max_model_len` tokens: they
        /// are refused before encoding (which would cost seconds for megabytes of text).
        max_prompt_bytes: usize,
        next_seq_id: Arc<AtomicU64>,
        scheduler: Addr<SchedulerActor>,
        detokenizer: Addr<DetokenizerActor>,
        /// The scheduler's waiting-queue length and `scheduler.max_waiting` (0 = no bound):
        /// a full queue refuses new requests here, before they cost an encoding.
        overload_gate: Option<(Arc<std::sync::atomic::AtomicUsize>, usize)>,
    }

    impl TokenizerActor {
        pub fn new(
            parts: Arc<TokenizerParts>,
            template: Arc<ChatTemplate>,
            vocab_size: usize,
            max_model_len: usize,
            scheduler: Addr<SchedulerActor>,
            detokenizer: Addr<DetokenizerActor>,
        ) -> Self {
            let max_prompt_bytes = max_prompt_bytes(&parts.tokenizer, max_model_len);
            Self {
                parts,
                template,
                vocab_size,
                max_model_len,
                max_prompt_bytes,
                next_seq_id: Arc::new(AtomicU64::new(1)),
                scheduler,
                detokenizer,
                overload_gate: None,
            }
        }

        /// Refuse requests as `overloaded` before encoding them while the scheduler's
        /// waiting queue (`gauge`) holds `max_waiting` or more (0 = no bound). The
        /// scheduler still checks on admission; this only saves the encoding work.
        pub fn with_overload_gate(
            mut self,
            gauge: Arc<std::sync::atomic::AtomicUsize>,
            max_waiting: usize,
        ) -> Self {
            self.overload_gate = Some((gauge, max_waiting));
            self
        }

        /// Prompt token ids of a request, or the error to answer with.
        fn prompt_ids(&self, req: &GenerateRequest) -> Result<Vec<TokenId>, ErrorBody> {
            let invalid = |m: String| ErrorBody::new(ErrorCode::InvalidRequest, m);
            validate_params(&req.params, self.vocab_size).map_err(|e| invalid(e.to_string()))?;
            let text_bytes = match &req.prompt {
                Prompt::Text(text) => text.len(),
                Prompt::Messages(messages) => messages.iter().map(|m| m.content.len()).sum(),
                Prompt::TokenIds(_) => 0,
            };
            if text_bytes > self.max_prompt_bytes {
                return Err(ErrorBody::new(
                    ErrorCode::PromptTooLong,
                    format!(
                        "the prompt is {text_bytes} bytes long, more than {} tokens can hold; this engine serves at most {} tokens per sequence",
                        self.max_model_len, self.max_model_len
                    ),
                ));
            }
            let ids = match &req.prompt {
                Prompt::Text(text) => self
                    .parts
                    .encode(text)
                    .map_err(|e| invalid(format!("tokenizing the prompt: {e}")))?,
                Prompt::Messages(messages) => {
                    if messages.is_empty() {
                        return Err(invalid("messages is empty".into()));
                    }
                    let text = self
                        .template
                        .render(messages, true)
                        .map_err(|e| invalid(format!("chat template: {e}")))?;
                    self.parts
                        .encode(&text)
                        .map_err(|e| invalid(format!("tokenizing the prompt: {e}")))?
                }
                Prompt::TokenIds(ids) => {
                    if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
                        return Err(invalid(format!(
                            "prompt token id {bad} is outside the vocabulary (size {})",
                            self.vocab_size
                        )));
                    }
                    ids.clone()
                }
            };
            if ids.is_empty() {
                return Err(invalid("the prompt is empty".into()));
            }
            if ids.len() >= self.max_model_len {
                return Err(ErrorBody::new(
                    ErrorCode::PromptTooLong,
                    format!(
                        "the prompt has {} tokens; this engine serves at most {} tokens per sequence (prompt + output)",
                        ids.len(),
                        self.max_model_len
                    ),
                ));
            }
            let total = ids.len() as u64 + u64::from(req.params.max_tokens);
            if total > self.max_model_len as u64 {
                return Err(invalid(format!(
                    "prompt ({} tokens) + max_tokens ({}) exceeds the maximum sequence length {}",
                    ids.len(),
                    req.params.max_tokens,
                    self.max_model_len
                )));
            }
            Ok(ids)
        }
    }

    impl Actor for TokenizerActor {
        type Context = Context<Self>;
    }

    impl Handler<Submit> for TokenizerActor {
        type Result = ();
        fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
            let arrival_us = now_us();
            let Submit { request, sink } = msg;
            if let Some((gauge, max_waiting)) = &self.overload_gate {
                let waiting = gauge.load(Ordering::Relaxed);
                if *max_waiting > 0 && waiting >= *max_waiting {
                    let e = SchedulerError::Overloaded {
                        waiting,
                        max_waiting: *max_waiting,
                    };
                    let _ = sink.send(StreamEvent::Error(scheduler_error(e)));
                    return;
                }
            }
            let prompt = match self.prompt_ids(&request) {
                Ok(ids) => ids,
                Err(e) => {
                    let _ = sink.send(StreamEvent::Error(e));
                    return;
                }
            };
            let seq_id: SeqId = self.next_seq_id.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(request_id = %request.id, seq_id, prompt_tokens = prompt.len(), "request accepted");
            // Register the stream first: the detokenizer must know the sequence before the
            // scheduler's first tokens for it arrive.
            self.detokenizer.do_send(RegisterStream {
                seq_id,
                request_id: request.id.clone(),
                prompt_tokens: prompt.clone(),
                stop: request.params.stop.clone(),
                sink,
                arrival_us,
            });
            let detok = self.detokenizer.clone();
            self.scheduler
                .send(AddSequence {
                    seq_id,
                    prompt,
                    params: request.params,
                })
                .into_actor(self)
                .map(move |res, _, _| {
                    let error = match res {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => scheduler_error(e),
                        Err(e) => ErrorBody::new(
                            ErrorCode::Internal,
                            format!("scheduler unreachable: {e}"),
                        ),
                    };
                    detok.do_send(StreamEnd {
                        seq_id,
                        reason: FinishReason::Abort,
                        error: Some(error),
                    });
                })
                .spawn(ctx);
        }
    }

    impl Handler<Cancel> for TokenizerActor {
        type Result = ResponseFuture<bool>;
        fn handle(&mut self, msg: Cancel, _: &mut Context<Self>) -> Self::Result {
            let answer = self.detokenizer.send(CancelRequest {
                request_id: msg.request_id,
            });
            Box::pin(async move { answer.await.unwrap_or(false) })
        }
    }

    /// An upper bound on the bytes of text that `max_model_len` tokens can stand for:
    /// twice the longest vocabulary entry (whose spelling is never shorter than the text
    /// it decodes to) per token.
    fn max_prompt_bytes(tokenizer: &tokenizers::Tokenizer, max_model_len: usize) -> usize {
        let longest = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(16);
        max_model_len.saturating_mul(longest).saturating_mul(2)
    }

    fn scheduler_error(e: SchedulerError) -> ErrorBody {
        let code = match &e {
            SchedulerError::ExceedsModelLen { .. } | SchedulerError::ExceedsKvCapacity { .. } => {
                ErrorCode::PromptTooLong
            }
            SchedulerError::EmptyPrompt(_) | SchedulerError::InvalidParams { .. } => {
                ErrorCode::InvalidRequest
            }
            SchedulerError::Overloaded { .. } => ErrorCode::Overloaded,
            _ => ErrorCode::Internal,
        };
        ErrorBody::new(code, e.to_string())
    }
}

pub use actor::{Cancel, Submit, TokenizerActor};

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    const MODEL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    const GOLDENS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/goldens/smollm2_tokenizer.json"
    );
    const TINY_LLAMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-llama");

    fn smollm2() -> &'static TokenizerParts {
        static PARTS: OnceLock<TokenizerParts> = OnceLock::new();
        PARTS.get_or_init(|| {
            let path = Path::new(MODEL);
            assert!(
                path.exists(),
                "model file {MODEL} is missing: run scripts/fetch-model.sh"
            );
            tokenizer_from_gguf_file(path).expect("SmolLM2 GGUF tokenizer loads")
        })
    }

    fn goldens() -> serde_json::Value {
        let text = std::fs::read_to_string(GOLDENS).unwrap_or_else(|e| {
            panic!("goldens {GOLDENS} unreadable ({e}): run tools/reference/make_goldens.py")
        });
        serde_json::from_str(&text).expect("goldens are JSON")
    }

    fn ids_of(value: &serde_json::Value) -> Vec<u32> {
        value
            .as_array()
            .expect("ids array")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    }

    fn messages_of(value: &serde_json::Value) -> Vec<ChatMessage> {
        serde_json::from_value(value.clone()).expect("messages")
    }

    #[test]
    fn types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TokenizerParts>();
        check::<ChatTemplate>();
        check::<TokenizerError>();
    }

    #[test]
    fn smollm2_special_tokens() {
        let parts = smollm2();
        let s = &parts.special;
        assert_eq!(s.bos_id, Some(1));
        assert_eq!(s.bos_token.as_deref(), Some("<|im_start|>"));
        assert_eq!(s.eos_id, Some(2));
        assert_eq!(s.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(s.eos_ids, vec![2]);
        assert_eq!(s.unk_id, Some(0));
        assert_eq!(s.pad_id, Some(2));
        assert!(!s.add_bos);
        assert_eq!(s.bos_to_add(), None);
        assert!(s.is_eos(2) && !s.is_eos(0));
        assert_eq!(parts.tokenizer.get_vocab_size(true), 49152);
        assert!(parts
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("<|im_start|>")));
    }

    #[test]
    fn smollm2_matches_goldens() {
        let parts = smollm2();
        let g = goldens();
        assert_eq!(g["bos_id"].as_u64(), parts.special.bos_id.map(u64::from));
        assert_eq!(g["eos_id"].as_u64(), parts.special.eos_id.map(u64::from));
        assert_eq!(g["unk_id"].as_u64(), parts.special.unk_id.map(u64::from));
        assert_eq!(g["pad_id"].as_u64(), parts.special.pad_id.map(u64::from));
        assert_eq!(g["add_bos"].as_bool(), Some(parts.special.add_bos));
        assert_eq!(
            g["vocab_size"].as_u64(),
            Some(parts.tokenizer.get_vocab_size(true) as u64)
        );
        for special in g["special_tokens"].as_array().expect("special_tokens") {
            let content = special["content"].as_str().expect("content");
            assert_eq!(
                parts.tokenizer.token_to_id(content).map(u64::from),
                special["id"].as_u64(),
                "{content}"
            );
        }
        let cases = g["cases"].as_array().expect("cases");
        assert!(cases.len() >= 20);
        let mut failures = Vec::new();
        for case in cases {
            let text = case["text"].as_str().expect("text");
            let want = ids_of(&case["ids"]);
            let got = parts.encode(text).expect("encode");
            if got != want {
                failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
                continue;
            }
            let decoded = parts.decode(&got).expect("decode");
            let want_decoded = case["decoded_skip_special"].as_str().expect("decoded");
            if decoded != want_decoded {
                failures.push(format!("decode {text:?}: {decoded:?} != {want_decoded:?}"));
            }
        }
        for case in g["decode_cases"].as_array().expect("decode_cases") {
            let ids = ids_of(&case["ids"]);
            let want = case["decoded_skip_special"].as_str().expect("decoded");
            let got = parts.decode(&ids).expect("decode");
            if got != want {
                failures.push(format!("decode {ids:?}: {got:?} != {want:?}"));
            }
        }
        assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
    }

    #[test]
    fn smollm2_chat_template_matches_goldens() {
        let parts = smollm2();
        let g = goldens();
        assert_eq!(
            g["chat_template"]["template"].as_str(),
            parts.chat_template.as_deref()
        );
        let template = parts.compile_chat_template().expect("template compiles");
        for case in g["chat_template"]["cases"].as_array().expect("cases") {
            let messages = messages_of(&case["messages"]);
            let agp = case["add_generation_prompt"].as_bool().expect("agp");
            let rendered = template.render(&messages, agp).expect("renders");
            assert_eq!(Some(rendered.as_str()), case["rendered"].as_str());
            assert_eq!(
                parts.encode(&rendered).expect("encode"),
                ids_of(&case["ids"])
            );
        }
    }

    #[test]
    fn smollm2_chat_template_exact() {
        // Expected strings from transformers' apply_chat_template (jinja2, trim/lstrip blocks).
        let template = smollm2().compile_chat_template().expect("compiles");
        let hello = [ChatMessage::new("user", "Hello!")];
        assert_eq!(
            template.render(&hello, false).expect("renders"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
        );
        let convo = [
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", "What is 2+2?"),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "And 3+3?"),
        ];
        assert_eq!(
            template.render(&convo, true).expect("renders"),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is \
             2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd \
             3+3?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_reference_ids() {
        // From tools/reference/tokenizer/ref_tokenizer.py (HF tokenizers, Digits + ByteLevel).
        let cases: &[(&str, &[u32])] = &[
            (" 123", &[216, 33, 34, 35]),
            (
                "a 1 b 22 c 333",
                &[81, 216, 33, 278, 216, 34, 34, 265, 216, 35, 35, 35],
            ),
            ("\n\n\n", &[16506]),
            ("double  space", &[21414, 216, 1898]),
            ("   three leading", &[256, 1296, 2899]),
            ("trailing space ", &[4861, 4966, 1898, 216]),
            ("CAPS'S AND 'LL", &[33467, 67, 23, 67, 7485, 637, 16421]),
            ("text<|endoftext|>more", &[2692, 0, 3143]),
            ("<|im_start", &[44, 108, 306, 79, 3738]),
            ("\u{200b}zero width", &[321, 229, 13723, 8068]),
            ("!!!???...", &[29646, 16693, 47, 2026]),
            ("", &[]),
        ];
        let parts = smollm2();
        for (text, want) in cases {
            assert_eq!(&parts.encode(text).expect("encode"), want, "{text:?}");
        }
    }

    #[test]
    fn bos_is_added_once() {
        let tok = &smollm2().tokenizer;
        assert_eq!(
            encode(tok, "hello world", Some(1)).expect("encode"),
            [1, 28120, 905]
        );
        // The text already starts with BOS (a template wrote it): not doubled.
        assert_eq!(
            encode(tok, "<|im_start|>user", Some(1)).expect("encode"),
            [1, 4093]
        );
        assert_eq!(
            encode(tok, "hello world", None).expect("encode"),
            [28120, 905]
        );
    }

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let p = pre_tokenizer_for(pre).expect("known pre");
        let mut s = PreTokenizedString::from(text);
        if let Some(n) = &p.normalizer {
            s.normalize(|ns| tokenizers::Normalizer::normalize(n, ns))
                .expect("normalizes");
        }
        p.pre_tokenizer.pre_tokenize(&mut s).expect("pre-tokenizes");
        s.get_splits(OffsetReferential::Original, OffsetType::Char)
            .into_iter()
            .map(|(piece, _, _)| piece.to_owned())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_digits_as_their_models_do() {
        assert_eq!(pieces("gpt2", "x 12345"), ["x", "Ġ12345"]);
        assert_eq!(pieces("default", "x 12345"), ["x", "Ġ12345"]);
        assert_eq!(
            pieces("smollm", "x 12345"),
            ["x", "Ġ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(pieces("llama-bpe", "x 12345"), ["x", "Ġ", "123", "45"]);
        assert_eq!(pieces("qwen2", "x 123"), ["x", "Ġ", "1", "2", "3"]);
        assert_eq!(pieces("llama-bpe", "I'LL go"), ["I", "'LL", "Ġgo"]);
        assert_eq!(pieces("gpt2", "I'LL go"), ["I", "'", "LL", "Ġgo"]);
        assert_eq!(pieces("llama3", "a\n\nb"), ["a", "ĊĊ", "b"]);
    }

    /// A tiny byte-level GGUF vocabulary: the 256 byte symbols, a few merges, two control
    /// tokens and a user-defined one.
    fn tiny_metadata(pre: &str) -> HashMap<String, gguf_file::Value> {
        use gguf_file::Value as V;
        let mut tokens: Vec<String> = Vec::new();
        // GPT-2's bytes_to_unicode alphabet.
        let mut shifted = 0u32;
        for b in 0u32..256 {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            let c = if printable {
                char::from_u32(b)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted)
            };
            tokens.push(c.expect("valid char").to_string());
        }
        for t in ["he", "ll", "hell", "hello", "Ġhello"] {
            tokens.push(t.to_owned());
        }
        tokens.push("<s>".into()); // 261
        tokens.push("</s>".into()); // 262
        tokens.push("<think>".into()); // 263
        tokens.push("<eot>".into()); // 264
        let types: Vec<V> = tokens
            .iter()
            .map(|t| match t.as_str() {
                "<s>" | "</s>" | "<eot>" => V::I32(3),
                "<think>" => V::I32(4),
                _ => V::I32(1),
            })
            .collect();
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ hello"];
        let mut m = HashMap::new();
        m.insert("tokenizer.ggml.model".into(), V::String("gpt2".into()));
        m.insert("tokenizer.ggml.pre".into(), V::String(pre.into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        );
        m.insert("tokenizer.ggml.token_type".into(), V::Array(types));
        m.insert(
            "tokenizer.ggml.merges".into(),
            V::Array(merges.iter().map(|s| V::String((*s).into())).collect()),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), V::U32(261));
        m.insert("tokenizer.ggml.eos_token_id".into(), V::U32(262));
        m.insert("tokenizer.ggml.eot_token_id".into(), V::U32(264));
        m
    }

    #[test]
    fn tiny_gguf_builds_and_encodes() {
        let parts = tokenizer_from_gguf(&tiny_metadata("llama-bpe")).expect("builds");
        let s = &parts.special;
        assert_eq!((s.bos_id, s.eos_id), (Some(261), Some(262)));
        assert_eq!(s.eos_ids, vec![262, 264]);
        assert!(s.add_bos, "llama-bpe adds BOS when the GGUF does not say");
        assert_eq!(parts.chat_template, None);
        let ids = parts.encode("hello hello<think></s>").expect("encode");
        assert_eq!(ids, [261, 259, 260, 263, 262]);
        // Control tokens are skipped, user-defined ones kept.
        assert_eq!(parts.decode(&ids).expect("decode"), "hello hello<think>");
        // The template falls back to ChatML.
        let chat = parts.compile_chat_template().expect("chatml");
        assert_eq!(
            chat.render(&[ChatMessage::new("user", "hi")], true)
                .expect("renders"),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gguf_errors_are_typed() {
        use gguf_file::Value as V;
        let err = |m: &HashMap<String, V>| tokenizer_from_gguf(m).expect_err("must fail");

        let mut m = tiny_metadata("tekken-9000");
        assert!(matches!(err(&m), TokenizerError::UnknownPreTokenizer(p) if p == "tekken-9000"));
        assert!(err(&m).to_string().contains("tekken-9000"));

        m = tiny_metadata("gpt2");
        m.insert("tokenizer.ggml.model".into(), V::String("llama".into()));
        assert!(matches!(err(&m), TokenizerError::UnsupportedModel(p) if p == "llama"));

        m = tiny_metadata("gpt2");
        m.remove("tokenizer.ggml.tokens");
        assert!(matches!(err(&m), TokenizerError::MissingKey(k) if k == "tokenizer.ggml.tokens"));

        m = tiny_metadata("gpt2");
        m.insert("tokenizer.ggml.eos_token_id".into(), V::U32(100_000));
        assert!(matches!(
            err(&m),
            TokenizerError::TokenIdOutOfRange {
                what: "EOS",
                id: 100_000,
                ..
            }
        ));

        m = tiny_metadata("gpt2");
        m.insert(
            "tokenizer.ggml.merges".into(),
            V::Array(vec![V::String("nospace".into())]),
        );
        assert!(matches!(
            err(&m),
            TokenizerError::InvalidMerge { index: 0, .. }
        ));

        m = tiny_metadata("gpt2");
        m.insert(
            "tokenizer.ggml.merges".into(),
            V::Array(vec![V::String("zz qq".into())]),
        );
        assert!(matches!(err(&m), TokenizerError::Build(_)));

        m = tiny_metadata("gpt2");
        m.insert("tokenizer.ggml.tokens".into(), V::U32(3));
        assert!(matches!(err(&m), TokenizerError::WrongType { .. }));

        let missing = tokenizer_from_gguf_file(Path::new("/nonexistent/model.gguf"));
        assert!(matches!(missing, Err(TokenizerError::Io { .. })));
    }

    #[test]
    fn missing_eos_id_sentinel_is_none() {
        use gguf_file::Value as V;
        let mut m = tiny_metadata("gpt2");
        m.insert("tokenizer.ggml.eot_token_id".into(), V::I32(-1));
        m.insert("tokenizer.ggml.add_bos_token".into(), V::Bool(true));
        let parts = tokenizer_from_gguf(&m).expect("builds");
        assert_eq!(parts.special.eos_ids, vec![262]);
        assert!(parts.special.add_bos);
        assert_eq!(parts.encode("hello").expect("encode"), [261, 259]);
    }

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, true)
    }

    #[test]
    fn templates_get_special_tokens_and_whitespace_control() {
        let msgs = [ChatMessage::new("user", "  hi  ")];
        let source = "{{ bos_token }}\n{% for m in messages %}\n  [{{ m.role }}] {{ m['content'].strip() }}\n{% endfor %}\n{% if add_generation_prompt %}{{ eos_token }}{% endif %}\n";
        // trim_blocks + lstrip_blocks, and the final newline dropped, as in jinja2.
        assert_eq!(
            render(source, &msgs).expect("renders"),
            "<s>\n  [user] hi\n</s>"
        );
        assert_eq!(
            render(
                "{% if tools is none and documents is none %}ok{% endif %}",
                &msgs
            )
            .expect("renders"),
            "ok"
        );
    }

    #[test]
    fn raise_exception_is_a_typed_rejection() {
        let source = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System first!') }}{% endif %}ok";
        let err = render(source, &[ChatMessage::new("user", "x")]).expect_err("rejects");
        assert!(
            matches!(&err, TokenizerError::TemplateRaised(m) if m == "System first!"),
            "{err:?}"
        );
        assert_eq!(
            render(source, &[ChatMessage::new("system", "x")]).expect("renders"),
            "ok"
        );
    }

    #[test]
    fn broken_templates_fail_at_load() {
        for source in [
            "{% for m in messages %}",
            "{{ 1 + }}",
            "{% generation %}x{% endgeneration %}",
        ] {
            let err = ChatTemplate::new(source, "", "").expect_err("does not compile");
            assert!(
                matches!(err, TokenizerError::TemplateSyntax(_)),
                "{source}: {err:?}"
            );
        }
        let err = render(
            "{{ messages[0].content.nosuchmethod() }}",
            &[ChatMessage::new("u", "c")],
        )
        .expect_err("unknown method");
        assert!(matches!(err, TokenizerError::TemplateRender(_)), "{err:?}");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let env_render = |src: &str| render(src, &[]).expect("renders");
        // json.dumps({'a': [1, 2.5, 'é\n"'], 'b': None, 'c': {}}, ensure_ascii=False)
        assert_eq!(
            env_render(r#"{{ {"a": [1, 2.5, "é\n\""], "b": none, "c": {}} | tojson }}"#),
            r#"{"a": [1, 2.5, "é\n\""], "b": null, "c": {}}"#
        );
        // json.dumps({'a': [1, {'x': True}], 'b': []}, indent=2)
        assert_eq!(
            env_render(r#"{{ {"a": [1, {"x": true}], "b": []} | tojson(indent=2) }}"#),
            "{\n  \"a\": [\n    1,\n    {\n      \"x\": true\n    }\n  ],\n  \"b\": []\n}"
        );
        assert_eq!(
            env_render(r#"{{ "é😀" | tojson(ensure_ascii=true) }}"#),
            r#""\u00e9\ud83d\ude00""#
        );
        assert_eq!(env_render(r#"{{ "<&>" | tojson }}"#), r#""<&>""#);
    }

    #[test]
    fn python_methods_work_in_templates() {
        let r = |src: &str| render(src, &[]).expect("renders");
        assert_eq!(
            r(r#"{{ "  x  ".strip() }}|{{ "xxayxx".strip("x") }}"#),
            "x|ay"
        );
        assert_eq!(
            r(r#"{{ "  x ".lstrip() }}|{{ " x  ".rstrip() }}|"#),
            "x | x|"
        );
        assert_eq!(
            r(r#"{{ "<tool>x".startswith("<tool>") }} {{ "a.py".endswith((".rs", ".py")) }}"#),
            "True True"
        );
        assert_eq!(r(r#"{{ " a  b c ".split() }}"#), r#"["a", "b", "c"]"#);
        assert_eq!(r(r#"{{ "a,b,c".split(",", 1) }}"#), r#"["a", "b,c"]"#);
        assert_eq!(
            r(r#"{{ "hello world".title() }} {{ "ABC".lower() }}"#),
            "Hello World abc"
        );
        assert_eq!(
            r(r#"{{ "aaa".replace("a", "b", 2) }} {{ "abc".find("c") }}"#),
            "bba 2"
        );
        assert_eq!(r(r#"{{ "-".join(["a", "b"]) }}"#), "a-b");
        assert_eq!(
            r(r#"{% for k, v in {"a": 1, "b": 2}.items() %}{{ k }}={{ v }};{% endfor %}"#),
            "a=1;b=2;"
        );
        assert_eq!(
            r(r#"{{ {"a": 1}.get("a") }} {{ {"a": 1}.get("z", "d") }} {{ {"a": 1}.get("z") }}"#),
            "1 d None"
        );
        assert_eq!(
            r(r#"{{ {"a": 1, "b": 2}.keys() | list }}"#),
            r#"["a", "b"]"#
        );
    }

    #[test]
    fn hf_dir_round_trip() {
        let dir = std::env::temp_dir().join(format!("pagoda-tok-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let parts = tokenizer_from_gguf(&tiny_metadata("gpt2")).expect("builds");
        parts
            .tokenizer
            .save(dir.join("tokenizer.json"), false)
            .expect("saves");
        let write = |name: &str, json: serde_json::Value| {
            std::fs::write(dir.join(name), json.to_string()).expect("writes")
        };
        write(
            "tokenizer_config.json",
            serde_json::json!({
                "bos_token": "<s>",
                "eos_token": {"content": "</s>", "special": true},
                "add_bos_token": true,
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}
                ]
            }),
        );
        write(
            "config.json",
            serde_json::json!({"eos_token_id": [262, 264]}),
        );
        write(
            "generation_config.json",
            serde_json::json!({"eos_token_id": 264}),
        );
        let loaded = tokenizer_from_hf_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let loaded = loaded.expect("loads");
        let s = &loaded.special;
        assert_eq!(
            (
                s.bos_id,
                s.bos_token.as_deref(),
                s.eos_id,
                s.eos_token.as_deref()
            ),
            (Some(261), Some("<s>"), Some(262), Some("</s>"))
        );
        assert_eq!(s.eos_ids, vec![262, 264]);
        assert!(s.add_bos);
        assert_eq!(loaded.encode("hello").expect("encode"), [261, 259]);
        let chat = loaded.compile_chat_template().expect("compiles");
        assert_eq!(
            chat.render(&[ChatMessage::new("user", "x")], false)
                .expect("renders"),
            "<s>x"
        );
    }

    #[test]
    fn hf_dir_errors_are_typed() {
        let missing = tokenizer_from_hf_dir(Path::new("/nonexistent/model-dir"));
        assert!(
            matches!(missing, Err(TokenizerError::Io { .. })),
            "{missing:?}"
        );
    }

    #[test]
    fn tiny_llama_fixture_loads() {
        // tests/fixtures/tiny-llama carries SmolLM2's tokenizer.json / tokenizer_config.json, so
        // the HF-directory path must agree with the GGUF path and the goldens.
        let dir = Path::new(TINY_LLAMA);
        assert!(
            dir.join("tokenizer.json").exists(),
            "fixture {TINY_LLAMA} is missing (tests/fixtures/tiny-llama is checked in)"
        );
        let parts = tokenizer_from_hf_dir(dir).expect("tiny-llama tokenizer loads");
        let s = &parts.special;
        assert_eq!(
            (
                s.bos_id,
                s.bos_token.as_deref(),
                s.eos_id,
                s.eos_token.as_deref()
            ),
            (Some(1), Some("<|im_start|>"), Some(2), Some("<|im_end|>"))
        );
        assert_eq!(s.eos_ids, vec![2]);
        assert_eq!((s.unk_id, s.pad_id), (Some(0), Some(2)));
        // No add_bos_token in tokenizer_config.json and a ByteLevel post-processor: no BOS.
        assert!(!s.add_bos);
        let g = goldens();
        for case in g["cases"].as_array().expect("cases") {
            let text = case["text"].as_str().expect("text");
            let ids = parts.encode(text).expect("encode");
            assert_eq!(ids, ids_of(&case["ids"]), "{text:?}");
            assert_eq!(
                Some(parts.decode(&ids).expect("decode").as_str()),
                case["decoded_skip_special"].as_str()
            );
        }
        let chat = parts.compile_chat_template().expect("template compiles");
        for case in g["chat_template"]["cases"].as_array().expect("cases") {
            let messages = messages_of(&case["messages"]);
            let agp = case["add_generation_prompt"].as_bool().expect("agp");
            let rendered = chat.render(&messages, agp).expect("renders");
            assert_eq!(Some(rendered.as_str()), case["rendered"].as_str());
        }
    }
}
