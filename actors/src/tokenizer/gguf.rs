//! A tokenizer from a GGUF file's metadata.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::*;

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
