//! What a client hands the engine and gets back: the request, its sampling parameters, and
//! the events of its stream (text deltas, then exactly one final event or typed error).

use serde::{Deserialize, Serialize};

/// Engine-internal sequence id (one per request attempt).
pub type SeqId = u64;
/// A vocabulary index.
pub type TokenId = u32;

/// How the next token is chosen, and when generation stops. Defaults mirror vLLM's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling, in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: u32,
    /// Drop tokens whose probability is below `min_p` × the top probability; 0 disables it.
    pub min_p: f32,
    /// Per-request seed: the same seed gives the same output, alone or batched.
    pub seed: Option<u64>,
    /// Multiplicative penalty (> 0) on tokens already in the prompt or output; 1 disables it.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Maximum number of generated tokens.
    pub max_tokens: u32,
    /// EOS and stop tokens are ignored until this many tokens were generated.
    pub min_tokens: u32,
    /// Stop strings: generation ends before the first occurrence, which is never emitted.
    /// Deserializes from a list of strings, one string, or null.
    #[serde(deserialize_with = "string_or_list")]
    pub stop: Vec<String>,
    /// Extra token ids that end generation (the token is not part of the text).
    pub stop_token_ids: Vec<TokenId>,
    /// Keep generating past the model's end-of-sequence token.
    pub ignore_eos: bool,
    /// Per generated token, its log-probability and the `logprobs` most likely tokens
    /// (0: the token's own only). `None`: no log-probabilities. At most [`MAX_LOGPROBS`].
    pub logprobs: Option<u32>,
    /// The same for every prompt token after the first, delivered with the first chunk.
    /// Such a request computes its whole prompt (the prefix cache is not consulted).
    pub prompt_logprobs: Option<u32>,
    /// Structured output (at most one of the five): the text is exactly one of these.
    pub guided_choice: Option<Vec<String>>,
    /// … fully matches this regular expression (Rust `regex` syntax).
    pub guided_regex: Option<String>,
    /// … is JSON valid under this JSON schema.
    pub guided_json: Option<serde_json::Value>,
    /// … is a sentence of this Lark grammar (llguidance's dialect).
    pub guided_grammar: Option<String>,
    /// OpenAI's form: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    /// {"name": …, "schema": {…}}}` (`{"type": "text"}`: unconstrained).
    pub response_format: Option<ResponseFormat>,
    /// Completions of the prompt (1..=[`MAX_N`]): they share the prompt's KV blocks, each
    /// is its own stream (`index` 0..n) and, with `seed`, index `i` samples with seed
    /// `seed + i`.
    pub n: u32,
    /// Let the engine speculate for this request when it is configured to
    /// (`[speculative]`); false opts out.
    pub speculate: bool,
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// The `json_schema` of a `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub name: Option<String>,
    pub schema: serde_json::Value,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// Most alternatives `logprobs` / `prompt_logprobs` may ask for (vLLM's default
/// `max_logprobs`).
pub const MAX_LOGPROBS: u32 = 20;

/// Most completions one request may ask for (`n`).
pub const MAX_N: u32 = 32;

/// The log-probability of one token (generated or in the prompt): the log-softmax of the
/// model's raw logits at that position, before penalties, temperature and the other
/// filters (vLLM's default, `raw_logprobs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The most likely tokens at that position, most likely first (ties to the lower id),
    /// as `[token_id, logprob]` pairs.
    pub top_logprobs: Vec<(TokenId, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: 256,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            guided_choice: None,
            guided_regex: None,
            guided_json: None,
            guided_grammar: None,
            response_format: None,
            n: 1,
            speculate: true,
        }
    }
}

impl SamplingParams {
    /// The parameters of completion `index` of a request with `n` > 1: its own seed
    /// (`seed + index`), and no prompt log-probabilities but for index 0 (the prompt is
    /// the same for all).
    pub fn for_index(&self, index: u32) -> SamplingParams {
        let mut p = self.clone();
        p.seed = self.seed.map(|s| s.wrapping_add(u64::from(index)));
        if index > 0 {
            p.prompt_logprobs = None;
        }
        p
    }
}

/// `"x"` → `["x"]`; a list stays a list; null → empty.
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or a list of strings")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_owned()])
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached (or the context is full).
    Length,
    /// Cancelled by the client, or the engine gave up on it.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Microseconds since the Unix epoch: a timestamp that can cross process boundaries.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

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

/// What to complete: raw text, a conversation (the chat template is applied) or token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    Text(String),
    Messages(Vec<ChatMessage>),
    TokenIds(Vec<TokenId>),
}

/// A generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub id: String,
    pub prompt: Prompt,
    pub params: SamplingParams,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub queue_ms: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
}

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    PromptTooLong,
    Overloaded,
    Cancelled,
    Timeout,
    Internal,
    /// A durable (JetStream) job failed on every delivery attempt (`intake.max_deliver`).
    Failed,
}

impl ErrorCode {
    /// The code as it appears on the wire (`invalid_request`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::PromptTooLong => "prompt_too_long",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// The `overloaded` refusal of a full waiting queue (`scheduler.max_waiting`), the same
/// whoever notices it first (the tokenizer's early check or the scheduler).
pub fn overloaded(waiting: usize, max_waiting: usize) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Overloaded,
        format!(
            "overloaded: {waiting} requests are already waiting (scheduler.max_waiting = {max_waiting})"
        ),
    )
}

/// Log-probabilities that travel with a stream event (all empty unless the request asked).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventLogprobs {
    /// One entry per id in the event's `token_ids` (`logprobs` was set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<TokenLogprobs>>,
    /// On the first event only (`prompt_logprobs` was set): one entry per prompt token,
    /// the first `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<Option<TokenLogprobs>>>,
    /// On the final event (`logprobs` was set): the sum over every generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cumulative: Option<f64>,
}

impl EventLogprobs {
    pub fn is_empty(&self) -> bool {
        self.tokens.is_none() && self.prompt.is_none() && self.cumulative.is_none()
    }
}

/// What a request's stream carries: text deltas, then exactly one `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEvent {
    Delta {
        text: String,
        token_ids: Vec<TokenId>,
        #[serde(default, skip_serializing_if = "EventLogprobs::is_empty")]
        logprobs: EventLogprobs,
    },
    Finished {
        text: String,
        token_ids: Vec<TokenId>,
        finish_reason: FinishReason,
        usage: Usage,
        timings: Timings,
        #[serde(default, skip_serializing_if = "EventLogprobs::is_empty")]
        logprobs: EventLogprobs,
    },
    Error(ErrorBody),
}

impl StreamEvent {
    pub fn is_final(&self) -> bool {
        !matches!(self, StreamEvent::Delta { .. })
    }
}

/// Invalid sampling parameters, or logits that cannot be sampled from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be finite and >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("repetition_penalty must be finite and > 0, got {0}")]
    RepetitionPenalty(f32),
    #[error("presence_penalty must be finite, got {0}")]
    PresencePenalty(f32),
    #[error("frequency_penalty must be finite, got {0}")]
    FrequencyPenalty(f32),
    #[error("max_tokens must be at least 1, got {0}")]
    MaxTokens(u32),
    #[error("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")]
    MinTokens { min_tokens: u32, max_tokens: u32 },
    #[error("stop_token_ids contains {token}, outside the vocabulary of {vocab_size} tokens")]
    StopTokenId { token: TokenId, vocab_size: usize },
    #[error("stop strings must not be empty")]
    EmptyStopString,
    #[error("{field} must be at most {MAX_LOGPROBS}, got {value}")]
    Logprobs { field: &'static str, value: u32 },
    #[error("n must be between 1 and {MAX_N}, got {0}")]
    N(u32),
    #[error("cannot sample from an empty logits row")]
    EmptyLogits,
    #[error("no token can be sampled: every logit is -inf or NaN after suppression")]
    NoCandidate,
}

impl SamplingError {
    /// The request field at fault (`None` for errors about logits, not parameters).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            SamplingError::Temperature(_) => Some("temperature"),
            SamplingError::TopP(_) => Some("top_p"),
            SamplingError::MinP(_) => Some("min_p"),
            SamplingError::RepetitionPenalty(_) => Some("repetition_penalty"),
            SamplingError::PresencePenalty(_) => Some("presence_penalty"),
            SamplingError::FrequencyPenalty(_) => Some("frequency_penalty"),
            SamplingError::MaxTokens(_) => Some("max_tokens"),
            SamplingError::MinTokens { .. } => Some("min_tokens"),
            SamplingError::StopTokenId { .. } => Some("stop_token_ids"),
            SamplingError::EmptyStopString => Some("stop"),
            SamplingError::Logprobs { field, .. } => Some(field),
            SamplingError::N(_) => Some("n"),
            SamplingError::EmptyLogits | SamplingError::NoCandidate => None,
        }
    }
}

/// Checks every sampling parameter against its allowed range; the first bad field is named
/// in the error.
pub fn validate_params(params: &SamplingParams, vocab_size: usize) -> Result<(), SamplingError> {
    let t = params.temperature;
    if !t.is_finite() || t < 0.0 {
        return Err(SamplingError::Temperature(t));
    }
    // Written so that NaN fails every check.
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(SamplingError::TopP(params.top_p));
    }
    if !(params.min_p >= 0.0 && params.min_p <= 1.0) {
        return Err(SamplingError::MinP(params.min_p));
    }
    let r = params.repetition_penalty;
    if !(r.is_finite() && r > 0.0) {
        return Err(SamplingError::RepetitionPenalty(r));
    }
    if !params.presence_penalty.is_finite() {
        return Err(SamplingError::PresencePenalty(params.presence_penalty));
    }
    if !params.frequency_penalty.is_finite() {
        return Err(SamplingError::FrequencyPenalty(params.frequency_penalty));
    }
    if params.max_tokens < 1 {
        return Err(SamplingError::MaxTokens(params.max_tokens));
    }
    if params.min_tokens > params.max_tokens {
        return Err(SamplingError::MinTokens {
            min_tokens: params.min_tokens,
            max_tokens: params.max_tokens,
        });
    }
    if let Some(&token) = params
        .stop_token_ids
        .iter()
        .find(|&&t| t as usize >= vocab_size)
    {
        return Err(SamplingError::StopTokenId { token, vocab_size });
    }
    if params.stop.iter().any(String::is_empty) {
        return Err(SamplingError::EmptyStopString);
    }
    for (field, value) in [
        ("logprobs", params.logprobs),
        ("prompt_logprobs", params.prompt_logprobs),
    ] {
        if let Some(value) = value.filter(|&v| v > MAX_LOGPROBS) {
            return Err(SamplingError::Logprobs { field, value });
        }
    }
    if !(1..=MAX_N).contains(&params.n) {
        return Err(SamplingError::N(params.n));
    }
    Ok(())
}
