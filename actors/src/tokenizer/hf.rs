//! A tokenizer from a Hugging Face model directory.

use std::path::Path;

use tokenizers::Tokenizer;

use super::*;

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
