//! Structured output: the token masks that keep a sequence inside a grammar.
//!
//! Built on llguidance (the grammar engine vLLM, SGLang and llama.cpp use): an Earley
//! parser over a lexer of derivative-based regular expressions, with a token trie of the
//! vocabulary, so a step's mask costs tens of microseconds whatever the vocabulary size
//! and no grammar is ever compiled into a token-level automaton up front. Its Lark front
//! end takes grammars; JSON schemas, regular expressions and choices compile into it.
//!
//! [`GuideFactory`] holds the vocabulary's trie (built once per model); a request's
//! `guided_*` / `response_format` field becomes a [`Guide`] for its sequence, which gives
//! the mask of the next token and follows every token sampled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::messages::{ResponseFormat, SamplingParams, TokenId};

/// Totals of the masks computed in this process (for `pagoda bench`; Prometheus gets
/// `pagoda_guided_mask_seconds`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskTotals {
    /// Steps that computed masks.
    pub steps: u64,
    /// Masks computed (one per guided sequence per step).
    pub masks: u64,
    /// Wall time the steps' mask computations took, in ns.
    pub nanos: u64,
}

static STEPS: AtomicU64 = AtomicU64::new(0);
static MASKS: AtomicU64 = AtomicU64::new(0);
static NANOS: AtomicU64 = AtomicU64::new(0);

impl MaskTotals {
    /// The totals so far.
    pub fn now() -> Self {
        Self {
            steps: STEPS.load(Ordering::Relaxed),
            masks: MASKS.load(Ordering::Relaxed),
            nanos: NANOS.load(Ordering::Relaxed),
        }
    }

    /// Adds one step's masks.
    pub fn record(masks: usize, took: Duration) {
        STEPS.fetch_add(1, Ordering::Relaxed);
        MASKS.fetch_add(masks as u64, Ordering::Relaxed);
        NANOS.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            steps: self.steps - earlier.steps,
            masks: self.masks - earlier.masks,
            nanos: self.nanos - earlier.nanos,
        }
    }
}

/// A guided-decoding field that cannot be used, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct GuideError {
    pub field: &'static str,
    pub message: String,
}

impl GuideError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Structured output for one model: its [`GuideFactory`], or why the model cannot have
/// it. Built once per process with the model's files; cheap to clone.
#[derive(Clone, Debug)]
pub struct Guides(Result<GuideFactory, String>);

impl Guides {
    /// The factory over `tokenizer`'s vocabulary (see [`GuideFactory::new`]); `eos` is
    /// the model's first end-of-sequence token. A failure is logged and kept as the reason.
    pub fn new(tokenizer: &tokenizers::Tokenizer, eos: Option<TokenId>, vocab_size: usize) -> Self {
        let started = std::time::Instant::now();
        let factory = eos
            .ok_or_else(|| "the model has no end-of-sequence token".to_owned())
            .and_then(|eos| GuideFactory::new(tokenizer, eos, vocab_size));
        match &factory {
            Ok(_) => tracing::debug!(
                ms = started.elapsed().as_secs_f64() * 1e3,
                "structured output ready"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "structured output is not available for this model")
            }
        }
        Self(factory)
    }

    /// No structured output, for this reason.
    pub fn unavailable(why: impl Into<String>) -> Self {
        Self(Err(why.into()))
    }

    /// The sequence's guide, `None` when the request sets no guided-decoding field; an
    /// error naming the field when its grammar cannot be compiled or the model cannot
    /// have structured output.
    pub fn guide(&self, params: &SamplingParams) -> Result<Option<Guide>, GuideError> {
        match &self.0 {
            Ok(factory) => factory.guide(params),
            Err(why) => match requested_fields(params).first() {
                Some(&field) => Err(GuideError::new(
                    field,
                    format!("structured output is not available for this model: {why}"),
                )),
                None => Ok(None),
            },
        }
    }
}

/// Compiles requests' grammars against one vocabulary. Cheap to clone.
#[derive(Clone)]
pub struct GuideFactory {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for GuideFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuideFactory").finish_non_exhaustive()
    }
}

impl GuideFactory {
    /// The trie of `tokenizer`'s vocabulary, padded to the model's `vocab_size` (ids the
    /// tokenizer does not know are never allowed); `eos` ends a finished grammar.
    pub fn new(
        tokenizer: &tokenizers::Tokenizer,
        eos: TokenId,
        vocab_size: usize,
    ) -> Result<Self, String> {
        let json = tokenizer
            .to_string(false)
            .map_err(|e| format!("serializing the tokenizer: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| format!("reading the tokenizer: {e}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("the tokenizer's token bytes: {e}"))?;
        if words.len() > vocab_size {
            return Err(format!(
                "the tokenizer has {} tokens, the model {vocab_size}",
                words.len()
            ));
        }
        words.resize(vocab_size, Vec::new());
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv))
            .map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// The sequence's guide, `None` when the request sets no guided-decoding field.
    pub fn guide(&self, params: &SamplingParams) -> Result<Option<Guide>, GuideError> {
        let Some((field, grammar)) = grammar_of(params)? else {
            return Ok(None);
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GuideError::new(field, e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GuideError::new(field, e));
        }
        Ok(Some(Guide { matcher }))
    }
}

/// The guided-decoding fields a request sets.
/// Whether the request asks for structured output (any guided-decoding field).
pub fn is_guided(p: &SamplingParams) -> bool {
    !requested_fields(p).is_empty()
}

fn requested_fields(p: &SamplingParams) -> Vec<&'static str> {
    let mut set: Vec<&'static str> = Vec::new();
    if p.guided_choice.is_some() {
        set.push("guided_choice");
    }
    if p.guided_regex.is_some() {
        set.push("guided_regex");
    }
    if p.guided_json.is_some() {
        set.push("guided_json");
    }
    if p.guided_grammar.is_some() {
        set.push("guided_grammar");
    }
    if matches!(
        p.response_format,
        Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. })
    ) {
        set.push("response_format");
    }
    set
}

/// The grammar a request asks for, with the field it came from; at most one field may
/// be set.
fn grammar_of(p: &SamplingParams) -> Result<Option<(&'static str, TopLevelGrammar)>, GuideError> {
    let set = requested_fields(p);
    if set.len() > 1 {
        return Err(GuideError::new(
            set[1],
            format!("only one of guided_choice, guided_regex, guided_json, guided_grammar and a JSON response_format may be set, got {}", set.join(", ")),
        ));
    }
    let Some(&field) = set.first() else {
        return Ok(None);
    };
    if p.ignore_eos {
        return Err(GuideError::new(
            field,
            "cannot be combined with ignore_eos (a finished grammar ends with the end-of-sequence token)",
        ));
    }
    let grammar = match field {
        "guided_choice" => {
            let choices = p.guided_choice.as_deref().unwrap_or_default();
            if choices.is_empty() || choices.iter().any(String::is_empty) {
                return Err(GuideError::new(
                    field,
                    "needs at least one choice, none empty",
                ));
            }
            let alternatives: Vec<String> =
                choices.iter().map(|c| regex_syntax::escape(c)).collect();
            TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
        }
        "guided_regex" => {
            let rx = p.guided_regex.as_deref().unwrap_or_default();
            // llguidance's regex dialect is Rust's: refuse what Rust cannot parse, with
            // its own explanation.
            regex_syntax::Parser::new()
                .parse(rx)
                .map_err(|e| GuideError::new(field, format!("not a regular expression: {e}")))?;
            TopLevelGrammar::from_regex(rx)
        }
        "guided_json" => json_grammar(field, p.guided_json.clone().unwrap_or_default())?,
        "guided_grammar" => {
            TopLevelGrammar::from_lark(p.guided_grammar.clone().unwrap_or_default())
        }
        _ => match &p.response_format {
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                json_grammar(field, json_schema.schema.clone())?
            }
            _ => json_grammar(field, serde_json::json!({"type": "object"}))?,
        },
    };
    Ok(Some((field, grammar)))
}

/// A JSON schema's grammar. Output is compact JSON (no whitespace between tokens) unless
/// the schema's own `x-guidance` options say otherwise.
fn json_grammar(
    field: &'static str,
    mut schema: serde_json::Value,
) -> Result<TopLevelGrammar, GuideError> {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    } else if !schema.is_boolean() {
        return Err(GuideError::new(field, "a JSON schema must be an object"));
    }
    Ok(TopLevelGrammar::from_json_schema(schema))
}

/// One sequence's position in its grammar.
#[derive(Clone)]
pub struct Guide {
    matcher: Matcher,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").finish_non_exhaustive()
    }
}

/// The tokens allowed next.
#[derive(Debug, Clone)]
pub struct Mask(SimpleVob);

impl Mask {
    /// Sets every disallowed logit to −∞ (the bitset is scanned a 32-token word at a
    /// time; the mask covers the model's whole vocabulary, the row's length).
    pub fn apply(&self, logits: &mut [f32]) {
        self.0.iter_unset_entries(|t| {
            if let Some(l) = logits.get_mut(t) {
                *l = f32::NEG_INFINITY;
            }
        });
    }

    pub fn allows(&self, token: TokenId) -> bool {
        self.0.is_allowed(token)
    }

    pub fn num_allowed(&self) -> usize {
        self.0.num_set()
    }
}

impl Guide {
    /// The mask of the next token: only the end-of-sequence token once the grammar is
    /// complete. An error when the grammar cannot continue.
    pub fn mask(&mut self) -> Result<Mask, String> {
        let m = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        if m.is_zero() {
            return Err("no token can continue the grammar".into());
        }
        Ok(Mask(m))
    }

    /// Follows a sampled token.
    pub fn advance(&mut self, token: TokenId) -> Result<(), String> {
        if self.matcher.is_stopped() {
            // The grammar was complete: only EOS was allowed, and it ends the sequence.
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE vocabulary of single characters and a few words.
    fn tokenizer() -> tokenizers::Tokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-llama/tokenizer.json");
        tokenizers::Tokenizer::from_file(path).expect("tiny llama tokenizer")
    }

    fn factory() -> (GuideFactory, tokenizers::Tokenizer) {
        let tok = tokenizer();
        let vocab = tok.get_vocab_size(true);
        let eos = tok.token_to_id("<|im_end|>").unwrap_or(0);
        (
            GuideFactory::new(&tok, eos, vocab + 3).expect("factory"),
            tok,
        )
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    /// Walks the grammar greedily, always taking the allowed token with the lowest id
    /// among those the tokenizer can decode, until only EOS is allowed; the text.
    fn walk(guide: &mut Guide, tok: &tokenizers::Tokenizer, eos: TokenId) -> String {
        let mut ids = Vec::new();
        for _ in 0..200 {
            let mask = guide.mask().expect("mask");
            if mask.num_allowed() == 1 && mask.allows(eos) {
                break;
            }
            let next = (0..tok.get_vocab_size(true) as TokenId)
                .rev()
                .find(|&t| t != eos && mask.allows(t))
                .expect("an allowed token");
            guide.advance(next).expect("advance");
            ids.push(next);
        }
        tok.decode(&ids, false).expect("decode")
    }

    #[test]
    fn a_choice_produces_one_of_the_choices() {
        let (f, tok) = factory();
        let eos = tok.token_to_id("<|im_end|>").unwrap_or(0);
        let p = params(|p| p.guided_choice = Some(vec!["fraud".into(), "legit".into()]));
        let mut g = f.guide(&p).unwrap().expect("a guide");
        let text = walk(&mut g, &tok, eos);
        assert!(text == "fraud" || text == "legit", "{text:?}");
    }

    #[test]
    fn a_regex_output_fully_matches() {
        let (f, tok) = factory();
        let eos = tok.token_to_id("<|im_end|>").unwrap_or(0);
        let p = params(|p| p.guided_regex = Some("[a-c]{2}-[0-9]{3}".into()));
        let mut g = f.guide(&p).unwrap().expect("a guide");
        let text = walk(&mut g, &tok, eos);
        assert_eq!(text.len(), 6, "{text:?}");
        assert!(
            text[..2].bytes().all(|b| (b'a'..=b'c').contains(&b)),
            "{text:?}"
        );
        assert!(
            text.as_bytes()[2] == b'-' && text[3..].bytes().all(|b| b.is_ascii_digit()),
            "{text:?}"
        );
    }

    #[test]
    fn a_schema_output_parses() {
        let (f, tok) = factory();
        let eos = tok.token_to_id("<|im_end|>").unwrap_or(0);
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
            "required": ["ok", "n"],
            "additionalProperties": false
        });
        let p = params(|p| p.guided_json = Some(schema));
        let mut g = f.guide(&p).unwrap().expect("a guide");
        let text = walk(&mut g, &tok, eos);
        let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
        assert!(
            v["ok"].is_boolean() && [1, 2, 3].contains(&v["n"].as_i64().unwrap_or(0)),
            "{text}"
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let (f, _) = factory();
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                params(|p| p.guided_regex = Some("(unclosed".into())),
                "guided_regex",
            ),
            (
                params(|p| p.guided_json = Some(serde_json::json!({"type": "nonsense"}))),
                "guided_json",
            ),
            (
                params(|p| p.guided_json = Some(serde_json::json!(7))),
                "guided_json",
            ),
            (
                params(|p| p.guided_grammar = Some("start: undefined_rule".into())),
                "guided_grammar",
            ),
            (params(|p| p.guided_choice = Some(vec![])), "guided_choice"),
            (
                params(|p| {
                    p.guided_choice = Some(vec!["a".into()]);
                    p.guided_regex = Some("a".into());
                }),
                "guided_regex",
            ),
            (
                params(|p| {
                    p.guided_choice = Some(vec!["a".into()]);
                    p.ignore_eos = true;
                }),
                "guided_choice",
            ),
        ];
        for (p, field) in cases {
            let e = f.guide(&p).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
        assert!(f.guide(&SamplingParams::default()).unwrap().is_none());
    }
}
