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

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

mod actor;
pub mod chat;
mod gguf;
mod hf;
pub mod limits;
mod template;
#[cfg(test)]
mod tests;

pub use crate::messages::ChatMessage;
pub use actor::{TokenizerActor, TokenizerBounds, TokenizerLinks};
pub use gguf::{pre_tokenizer_for, tokenizer_from_gguf, tokenizer_from_gguf_file, PreTokenization};
pub use hf::tokenizer_from_hf_dir;
pub use template::{ChatTemplate, CHATML_TEMPLATE};

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
