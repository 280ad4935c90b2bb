//! Public request / response types. In-process callers use them directly; the NATS gateway
//! carries them as MessagePack (or JSON) — `docs/protocol.md` documents the wire form.

use serde::{Deserialize, Serialize};

use crate::messages::{FinishReason, SamplingParams, TokenId};

pub use crate::messages::{
    ChatMessage, ErrorBody, ErrorCode, EventLogprobs, GenerateRequest, Prompt, StreamEvent,
    Timings, TokenLogprobs, Usage, MAX_LOGPROBS, MAX_N,
};

// --- wire protocol v1 ------------------------------------------------------------------------
//
// What travels over NATS. `docs/protocol.md` is the field-by-field reference; the types
// below are its source of truth.

/// How a message body is encoded. MessagePack (named fields, i.e. maps) unless the request
/// carries the header `Content-Type: application/json`; the answer uses the request's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WireFormat {
    #[default]
    MsgPack,
    Json,
}

impl WireFormat {
    /// The header that selects the format.
    pub const HEADER: &'static str = "Content-Type";

    /// The format a `Content-Type` value asks for: JSON for `application/json` (any case,
    /// parameters such as `; charset=utf-8` allowed), MessagePack for anything else.
    pub fn from_content_type(value: Option<&str>) -> Self {
        let Some(v) = value else {
            return WireFormat::MsgPack;
        };
        let mime = v.split(';').next().unwrap_or("").trim();
        if mime.eq_ignore_ascii_case("application/json") {
            WireFormat::Json
        } else {
            WireFormat::MsgPack
        }
    }

    /// The format of a message: the `Content-Type` header when present; otherwise a body
    /// whose first non-blank byte is `{` is JSON (a MessagePack map never starts with that
    /// byte), anything else MessagePack.
    pub fn detect(content_type: Option<&str>, body: &[u8]) -> Self {
        if content_type.is_some() {
            return Self::from_content_type(content_type);
        }
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => WireFormat::Json,
            _ => WireFormat::MsgPack,
        }
    }

    /// The `Content-Type` value of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            WireFormat::MsgPack => "application/msgpack",
            WireFormat::Json => "application/json",
        }
    }

    /// Encodes `value` (MessagePack with named fields, or compact JSON).
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, WireError> {
        match self {
            WireFormat::MsgPack => {
                rmp_serde::to_vec_named(value).map_err(|e| WireError::Encode(e.to_string()))
            }
            WireFormat::Json => {
                serde_json::to_vec(value).map_err(|e| WireError::Encode(e.to_string()))
            }
        }
    }

    /// Decodes a body into a generic JSON value (MessagePack maps become objects). Only
    /// string map keys are accepted; binary values and extension types are refused.
    pub fn decode_value(self, bytes: &[u8]) -> Result<serde_json::Value, WireError> {
        match self {
            WireFormat::MsgPack => {
                rmp_serde::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))
            }
            WireFormat::Json => {
                serde_json::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))
            }
        }
    }

    /// Decodes a body straight into `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(self, bytes: &[u8]) -> Result<T, WireError> {
        let value = self.decode_value(bytes)?;
        serde_json::from_value(value).map_err(|e| WireError::Decode(e.to_string()))
    }
}

/// A body that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("cannot decode: {0}")]
    Decode(String),
}

/// Longest accepted request id, in bytes.
pub const MAX_ID_LEN: usize = 256;

fn default_stream() -> bool {
    true
}

/// A generation request as it arrives on `<prefix>.generate`.
///
/// Exactly one of `prompt`, `messages` and `prompt_token_ids` must be set. The sampling
/// fields sit at the top level with the names and defaults of [`SamplingParams`]. Unknown
/// fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRequest {
    /// Caller-chosen request id (echoed in every reply; the handle for cancel). Generated
    /// when absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Raw text to complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// A conversation; the model's chat template is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Pre-tokenized prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<TokenId>>,
    /// Sampling and stopping (top-level fields on the wire).
    #[serde(flatten)]
    pub params: SamplingParams,
    /// `true`: one chunk per engine step; `false`: one message with the whole answer.
    #[serde(default = "default_stream")]
    pub stream: bool,
    /// Where to send the replies when the message has no reply subject of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Abort the request this many milliseconds after the engine received it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Reserved: accepted, not yet used for scheduling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

impl Default for WireRequest {
    fn default() -> Self {
        Self {
            id: None,
            prompt: None,
            messages: None,
            prompt_token_ids: None,
            params: SamplingParams::default(),
            stream: true,
            reply_to: None,
            timeout_ms: None,
            priority: None,
        }
    }
}

/// A validated request: what the engine runs plus how the gateway answers.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptedRequest {
    pub request: GenerateRequest,
    pub stream: bool,
    pub reply_to: Option<String>,
    pub timeout_ms: Option<u64>,
    pub priority: Option<i32>,
}

impl WireRequest {
    /// A text-completion request with default sampling.
    pub fn text(prompt: impl Into<String>) -> Self {
        Self {
            prompt: Some(prompt.into()),
            ..Self::default()
        }
    }

    /// A chat request with default sampling.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages: Some(messages),
            ..Self::default()
        }
    }

    /// Checks the shape (exactly one prompt form, a usable id) and splits the request into
    /// the engine's [`GenerateRequest`] and the reply options. `new_id` is called when the
    /// request has no id. Sampling values are validated later, by the tokenizer actor.
    pub fn accept(self, new_id: impl FnOnce() -> String) -> Result<AcceptedRequest, ErrorBody> {
        let invalid = |m: String| ErrorBody::new(ErrorCode::InvalidRequest, m);
        let id = match self.id {
            Some(id) if !id.is_empty() => id,
            _ => new_id(),
        };
        if id.len() > MAX_ID_LEN {
            return Err(invalid(format!(
                "id is {} bytes long; at most {MAX_ID_LEN} are allowed",
                id.len()
            )));
        }
        let prompt = match (self.prompt, self.messages, self.prompt_token_ids) {
            (Some(p), None, None) => Prompt::Text(p),
            (None, Some(m), None) => Prompt::Messages(m),
            (None, None, Some(ids)) => Prompt::TokenIds(ids),
            (None, None, None) => {
                return Err(invalid(
                    "missing prompt: set one of prompt, messages, prompt_token_ids".into(),
                ))
            }
            _ => {
                return Err(invalid(
                    "set only one of prompt, messages, prompt_token_ids".into(),
                ))
            }
        };
        if let Some(r) = &self.reply_to {
            if !is_valid_subject(r) {
                return Err(invalid(format!(
                    "reply_to {r:?} is not a valid NATS subject"
                )));
            }
        }
        Ok(AcceptedRequest {
            request: GenerateRequest {
                id,
                prompt,
                params: self.params,
            },
            stream: self.stream,
            reply_to: self.reply_to,
            timeout_ms: self.timeout_ms,
            priority: self.priority,
        })
    }
}

/// Longest reply subject pagoda publishes to.
pub const MAX_REPLY_SUBJECT_LEN: usize = 256;

/// Subject namespaces of the NATS server and its subsystems: JetStream's API and
/// advisories, the system account, micro services, key-value and object stores. A reply
/// there could steer the server (purge a stream, fake an advisory), so it is refused.
pub const RESERVED_SUBJECT_PREFIXES: [&str; 5] = ["$JS.", "$SYS.", "$SRV.", "$KV.", "$O."];

/// The reply-subject policy: whether pagoda may publish a request's replies to `subject`.
/// At most [`MAX_REPLY_SUBJECT_LEN`] bytes of non-empty `.`-separated tokens, no
/// whitespace or control characters, no wildcards, not under the service's own
/// `prefix` (its requests, jobs, dead letters and internal subjects), not in a
/// [`RESERVED_SUBJECT_PREFIXES`] namespace. The error says why, for the client.
pub fn check_reply_subject(subject: &str, prefix: &str) -> Result<(), String> {
    if subject.len() > MAX_REPLY_SUBJECT_LEN {
        return Err(format!(
            "the reply subject is {} bytes long; at most {MAX_REPLY_SUBJECT_LEN} are allowed",
            subject.len()
        ));
    }
    if subject
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
    {
        return Err(format!(
            "reply subject {subject:?} contains whitespace, a control character or a wildcard"
        ));
    }
    if subject.is_empty() || subject.split('.').any(str::is_empty) {
        return Err(format!("reply subject {subject:?} has an empty token"));
    }
    let upper = subject.to_ascii_uppercase();
    if let Some(p) = RESERVED_SUBJECT_PREFIXES
        .iter()
        .find(|p| upper.starts_with(*p))
    {
        return Err(format!(
            "reply subject {subject:?} is in the server's reserved namespace {p}"
        ));
    }
    if subject == prefix || subject.starts_with(&format!("{prefix}.")) {
        return Err(format!(
            "reply subject {subject:?} is under the service's own prefix {prefix}"
        ));
    }
    Ok(())
}

/// Whether `s` can be published to: non-empty tokens separated by `.`, no whitespace, no
/// wildcards.
pub fn is_valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(|c| c.is_whitespace()))
}

/// A request body that could not be turned into a [`WireRequest`], with whatever could
/// still be read from it so the error can be addressed.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRequest {
    pub id: Option<String>,
    pub reply_to: Option<String>,
    pub error: ErrorBody,
}

/// Decodes a request body. Never panics; on failure it returns an `invalid_request` error
/// together with the `id` and `reply_to` it could still read.
pub fn decode_request(bytes: &[u8], format: WireFormat) -> Result<WireRequest, RejectedRequest> {
    let invalid = |m: String| RejectedRequest {
        id: None,
        reply_to: None,
        error: ErrorBody::new(ErrorCode::InvalidRequest, m),
    };
    let what = match format {
        WireFormat::MsgPack => "MessagePack (send header Content-Type: application/json for JSON)",
        WireFormat::Json => "JSON",
    };
    let value = format
        .decode_value(bytes)
        .map_err(|e| invalid(format!("the body is not valid {what}: {e}")))?;
    let serde_json::Value::Object(map) = &value else {
        return Err(invalid(format!(
            "the request must be a map with named fields, got {}",
            json_kind(&value)
        )));
    };
    // Deserialize from a reference: the map stays available to address and explain an
    // error, without copying the (possibly large) prompt on the happy path.
    WireRequest::deserialize(&value).map_err(|e| {
        let lenient = |key: &str| match map.get(key) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        RejectedRequest {
            id: lenient("id"),
            reply_to: lenient("reply_to").filter(|r| is_valid_subject(r)),
            error: ErrorBody::new(ErrorCode::InvalidRequest, blame_field(map, e)),
        }
    })
}

/// Names the field that made a request fail to deserialize: each field is tried alone.
fn blame_field(
    map: &serde_json::Map<String, serde_json::Value>,
    whole: serde_json::Error,
) -> String {
    for (key, value) in map {
        let mut one = serde_json::Map::new();
        one.insert(key.clone(), value.clone());
        if let Err(e) = WireRequest::deserialize(&serde_json::Value::Object(one)) {
            return format!("field {key}: {e}");
        }
    }
    whole.to_string()
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "nil",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => {
            "an array (encode structs as maps: rmp_serde::to_vec_named, msgpack.packb(dict))"
        }
        serde_json::Value::Object(_) => "a map",
    }
}

/// One streamed reply. Chunks of a request have `seq` 0, 1, 2, … without gaps; the last
/// one has `finish_reason`, `usage` and `timings` set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: String,
    pub seq: u64,
    /// Delivery attempt of the request (1 on core NATS; JetStream redeliveries count up).
    pub attempt: u32,
    /// Text added since the previous chunk (the whole answer when `stream` was false).
    #[serde(default)]
    pub text: String,
    /// Token ids added since the previous chunk.
    #[serde(default)]
    pub token_ids: Vec<TokenId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// With `logprobs` set: one entry per id in `token_ids`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// With `prompt_logprobs` set, on the first chunk: one entry per prompt token (the
    /// first null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// With `logprobs` set, on the final chunk: the sum over every generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cumulative_logprob: Option<f64>,
    /// With `n` > 1: the completion (0..n) this chunk belongs to. Each completion ends with
    /// its own final chunk (or error); the request ends when all of them have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
}

impl Chunk {
    /// Whether this is the last chunk of its completion (of the request when `n` = 1).
    pub fn is_final(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// A failed request. It ends the request's stream, like a final chunk. `id` is null when
/// the request could not be read far enough to find one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub id: Option<String>,
    /// The position this message takes in the request's stream.
    #[serde(default)]
    pub seq: u64,
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    pub error: ErrorBody,
    /// With `n` > 1: the completion this error ends (the others go on). Absent: the error
    /// ends the whole request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
}

fn first_attempt() -> u32 {
    1
}

/// Anything the engine sends to a reply subject.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Chunk(Chunk),
    Error(ErrorReply),
}

impl Reply {
    pub fn is_final(&self) -> bool {
        match self {
            Reply::Chunk(c) => c.is_final(),
            Reply::Error(_) => true,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Reply::Chunk(c) => c.seq,
            Reply::Error(e) => e.seq,
        }
    }

    pub fn encode(&self, format: WireFormat) -> Result<Vec<u8>, WireError> {
        match self {
            Reply::Chunk(c) => format.encode(c),
            Reply::Error(e) => format.encode(e),
        }
    }
}

/// Decodes a reply: an [`ErrorReply`] when the body has an `error` field, else a [`Chunk`].
pub fn decode_reply(bytes: &[u8], format: WireFormat) -> Result<Reply, WireError> {
    let value = format.decode_value(bytes)?;
    let is_error = value.get("error").is_some_and(|e| !e.is_null());
    let de = |e: serde_json::Error| WireError::Decode(e.to_string());
    if is_error {
        serde_json::from_value(value).map(Reply::Error).map_err(de)
    } else {
        serde_json::from_value(value).map(Reply::Chunk).map_err(de)
    }
}

/// A cancel, published on `<prefix>.cancel` (every engine receives it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub id: String,
}

/// The answer to a cancel that carried a reply subject, sent only by the engine that was
/// running the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    pub id: String,
    pub cancelled: bool,
}

/// A fresh request id: 32 hex digits of randomness.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_bytes(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    fn msgpack_bytes(v: serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(&v).unwrap()
    }

    #[test]
    fn minimal_request_takes_defaults() {
        for format in [WireFormat::Json, WireFormat::MsgPack] {
            let body = json!({"prompt": "Hello"});
            let bytes = match format {
                WireFormat::Json => json_bytes(body),
                WireFormat::MsgPack => msgpack_bytes(body),
            };
            let req = decode_request(&bytes, format).unwrap();
            assert_eq!(req, WireRequest::text("Hello"));
            assert!(req.stream);
            assert_eq!(req.params, SamplingParams::default());
            let acc = req.accept(|| "generated".into()).unwrap();
            assert_eq!(acc.request.id, "generated");
            assert_eq!(acc.request.prompt, Prompt::Text("Hello".into()));
            assert!(acc.stream);
        }
    }

    #[test]
    fn full_request_round_trips_in_both_formats() {
        let req = WireRequest {
            id: Some("r-1".into()),
            messages: Some(vec![ChatMessage::new("user", "Hi")]),
            params: SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 40,
                min_p: 0.05,
                seed: Some(7),
                repetition_penalty: 1.1,
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                max_tokens: 32,
                min_tokens: 2,
                stop: vec!["\n\n".into(), "END".into()],
                stop_token_ids: vec![2, 3],
                logprobs: Some(3),
                prompt_logprobs: Some(0),
                guided_choice: None,
                guided_regex: None,
                guided_json: Some(serde_json::json!({"type": "object"})),
                guided_grammar: None,
                response_format: Some(crate::messages::ResponseFormat::JsonObject),
                ignore_eos: true,
                n: 2,
                speculate: false,
            },
            stream: false,
            reply_to: Some("answers.r-1".into()),
            timeout_ms: Some(1500),
            priority: Some(-3),
            ..WireRequest::default()
        };
        for format in [WireFormat::Json, WireFormat::MsgPack] {
            let bytes = format.encode(&req).unwrap();
            assert_eq!(decode_request(&bytes, format).unwrap(), req, "{format:?}");
        }
        // Sampling fields sit at the top level, not under `params`.
        let v: serde_json::Value =
            serde_json::from_slice(&WireFormat::Json.encode(&req).unwrap()).unwrap();
        assert_eq!(v["max_tokens"], 32);
        assert!(v.get("params").is_none());
        // MessagePack uses named fields (maps), also in nested structs.
        let bytes = WireFormat::MsgPack.encode(&req).unwrap();
        let v: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(v["messages"][0]["role"], "user");
    }

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let one = decode_request(
            &json_bytes(json!({"prompt": "x", "stop": "END"})),
            WireFormat::Json,
        )
        .unwrap();
        assert_eq!(one.params.stop, vec!["END".to_string()]);
        let many = decode_request(
            &msgpack_bytes(json!({"prompt": "x", "stop": ["a", "b"]})),
            WireFormat::MsgPack,
        )
        .unwrap();
        assert_eq!(many.params.stop, vec!["a".to_string(), "b".to_string()]);
        let none = decode_request(
            &json_bytes(json!({"prompt": "x", "stop": null})),
            WireFormat::Json,
        )
        .unwrap();
        assert!(none.params.stop.is_empty());
        let bad = decode_request(
            &json_bytes(json!({"prompt": "x", "stop": 5})),
            WireFormat::Json,
        )
        .unwrap_err();
        assert!(bad.error.message.contains("stop"), "{}", bad.error.message);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let req = decode_request(
            &json_bytes(
                json!({"prompt": "x", "model": "whatever", "best_of": 3, "extra": {"a": [1]}}),
            ),
            WireFormat::Json,
        )
        .unwrap();
        assert_eq!(req, WireRequest::text("x"));
    }

    #[test]
    fn wrong_types_are_invalid_requests_that_keep_id_and_reply_to() {
        let cases = [
            (
                json!({"id": "a", "reply_to": "r.a", "prompt": "x", "max_tokens": "many"}),
                "max_tokens",
            ),
            (json!({"id": "a", "reply_to": "r.a", "prompt": 5}), "prompt"),
            (
                json!({"id": "a", "reply_to": "r.a", "prompt": "x", "temperature": [1]}),
                "temperature",
            ),
            (
                json!({"id": "a", "reply_to": "r.a", "prompt": "x", "stream": "yes"}),
                "stream",
            ),
            (
                json!({"id": "a", "reply_to": "r.a", "prompt": "x", "max_tokens": -1}),
                "max_tokens",
            ),
            (
                json!({"id": "a", "reply_to": "r.a", "prompt": "x", "max_tokens": 10_000_000_000u64}),
                "max_tokens",
            ),
            (
                json!({"id": "a", "reply_to": "r.a", "messages": [{"role": "user"}]}),
                "messages",
            ),
            (
                json!({"id": "a", "reply_to": "r.a", "prompt_token_ids": ["1"]}),
                "prompt_token_ids",
            ),
        ];
        for (body, field) in cases {
            for format in [WireFormat::Json, WireFormat::MsgPack] {
                let bytes = match format {
                    WireFormat::Json => json_bytes(body.clone()),
                    WireFormat::MsgPack => msgpack_bytes(body.clone()),
                };
                let err = decode_request(&bytes, format).unwrap_err();
                assert_eq!(err.error.code, ErrorCode::InvalidRequest);
                assert_eq!(err.id.as_deref(), Some("a"));
                assert_eq!(err.reply_to.as_deref(), Some("r.a"));
                assert!(
                    err.error.message.contains(field),
                    "{body}: {}",
                    err.error.message
                );
            }
        }
        // An id of the wrong type is not used, but the error still comes back.
        let err = decode_request(
            &json_bytes(json!({"id": 5, "prompt": "x"})),
            WireFormat::Json,
        )
        .unwrap_err();
        assert_eq!(err.id, None);
        assert!(err.error.message.contains("id"), "{}", err.error.message);
    }

    #[test]
    fn undecodable_bodies_are_invalid_requests() {
        let garbage: &[&[u8]] = &[
            b"",
            b"\xc1\xc1\xc1",
            b"not msgpack at all, just text",
            &[0x82, 0xa6, b'p', b'r'], // truncated map
            &[0x93, 1, 2, 3],          // an array, not a map
            &[0x2a],                   // the number 42
        ];
        for bytes in garbage {
            let err = decode_request(bytes, WireFormat::MsgPack).unwrap_err();
            assert_eq!(err.error.code, ErrorCode::InvalidRequest, "{bytes:?}");
            assert_eq!(err.id, None);
        }
        let err = decode_request(b"{\"prompt\": ", WireFormat::Json).unwrap_err();
        assert_eq!(err.error.code, ErrorCode::InvalidRequest);
        // Invalid UTF-8 inside a MessagePack string.
        let mut bytes = vec![0x81, 0xa6];
        bytes.extend_from_slice(b"prompt");
        bytes.extend_from_slice(&[0xa2, 0xff, 0xfe]);
        let err = decode_request(&bytes, WireFormat::MsgPack).unwrap_err();
        assert_eq!(err.error.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn prompt_forms_must_be_exactly_one() {
        let err = WireRequest::default().accept(new_request_id).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert!(err.message.contains("missing prompt"));
        let both = WireRequest {
            prompt: Some("x".into()),
            prompt_token_ids: Some(vec![1]),
            ..WireRequest::default()
        };
        assert!(both
            .accept(new_request_id)
            .unwrap_err()
            .message
            .contains("only one"));
        let ids = WireRequest {
            id: Some(String::new()),
            prompt_token_ids: Some(vec![1, 2]),
            ..WireRequest::default()
        };
        let acc = ids.accept(|| "fresh".into()).unwrap();
        assert_eq!(acc.request.id, "fresh");
        assert_eq!(acc.request.prompt, Prompt::TokenIds(vec![1, 2]));
    }

    #[test]
    fn bad_ids_and_reply_subjects_are_rejected() {
        let long = WireRequest {
            id: Some("x".repeat(MAX_ID_LEN + 1)),
            ..WireRequest::text("x")
        };
        assert_eq!(
            long.accept(new_request_id).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        for bad in ["", "a..b", "a.*", "a.>", "has space", ".a"] {
            assert!(!is_valid_subject(bad), "{bad:?}");
        }
        for good in ["a", "_INBOX.abc.1", "answers.r-1"] {
            assert!(is_valid_subject(good), "{good:?}");
        }
        let req = WireRequest {
            reply_to: Some("a b".into()),
            ..WireRequest::text("x")
        };
        assert!(req.accept(new_request_id).is_err());
    }

    #[test]
    fn replies_round_trip_in_both_formats() {
        let delta = Chunk {
            id: "r".into(),
            seq: 0,
            attempt: 1,
            text: "Par".into(),
            token_ids: vec![1, 2],
            ..Chunk::default()
        };
        let last = Chunk {
            id: "r".into(),
            seq: 1,
            attempt: 1,
            text: "is".into(),
            token_ids: vec![3],
            finish_reason: Some(FinishReason::Stop),
            usage: Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_tokens: 0,
            }),
            timings: Some(Timings {
                queue_ms: 0.5,
                ttft_ms: 12.25,
                total_ms: 40.0,
            }),
            logprobs: Some(vec![TokenLogprobs {
                logprob: -0.75,
                top_logprobs: vec![(3, -0.75), (8, -1.5)],
            }]),
            prompt_logprobs: Some(vec![
                None,
                Some(TokenLogprobs {
                    logprob: -4.0,
                    top_logprobs: vec![],
                }),
            ]),
            cumulative_logprob: Some(-2.25),
            index: None,
        };
        let err = ErrorReply {
            index: None,
            id: Some("r".into()),
            seq: 0,
            attempt: 1,
            error: ErrorBody::new(ErrorCode::PromptTooLong, "too long"),
        };
        for format in [WireFormat::Json, WireFormat::MsgPack] {
            for reply in [
                Reply::Chunk(delta.clone()),
                Reply::Chunk(last.clone()),
                Reply::Error(err.clone()),
            ] {
                let bytes = reply.encode(format).unwrap();
                assert_eq!(decode_reply(&bytes, format).unwrap(), reply);
            }
        }
        // Non-final chunks carry no finish_reason / usage / timings keys at all.
        let v: serde_json::Value =
            serde_json::from_slice(&WireFormat::Json.encode(&delta).unwrap()).unwrap();
        assert!(v.get("finish_reason").is_none() && v.get("usage").is_none());
        let v: serde_json::Value =
            serde_json::from_slice(&WireFormat::Json.encode(&last).unwrap()).unwrap();
        assert_eq!(v["finish_reason"], "stop");
        assert_eq!(v["usage"]["completion_tokens"], 3);
        let v: serde_json::Value =
            serde_json::from_slice(&WireFormat::Json.encode(&err).unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "prompt_too_long");
        // An error whose request id is unknown says so with null.
        let anon = ErrorReply { id: None, ..err };
        let v: serde_json::Value =
            serde_json::from_slice(&WireFormat::Json.encode(&anon).unwrap()).unwrap();
        assert!(v["id"].is_null());
    }

    #[test]
    fn content_type_selects_the_format() {
        assert_eq!(WireFormat::from_content_type(None), WireFormat::MsgPack);
        assert_eq!(
            WireFormat::from_content_type(Some("application/json")),
            WireFormat::Json
        );
        assert_eq!(
            WireFormat::from_content_type(Some("Application/JSON; charset=utf-8")),
            WireFormat::Json
        );
        assert_eq!(
            WireFormat::from_content_type(Some("application/msgpack")),
            WireFormat::MsgPack
        );
        assert_eq!(
            WireFormat::from_content_type(Some("text/plain")),
            WireFormat::MsgPack
        );
        // Without the header, a JSON object is recognised by its first byte.
        assert_eq!(
            WireFormat::detect(None, b" \n{\"prompt\":\"x\"}"),
            WireFormat::Json
        );
        let packed = WireFormat::MsgPack.encode(&WireRequest::text("x")).unwrap();
        assert_eq!(WireFormat::detect(None, &packed), WireFormat::MsgPack);
        assert_eq!(WireFormat::detect(None, b""), WireFormat::MsgPack);
        assert_eq!(
            WireFormat::detect(Some("application/msgpack"), b"{}"),
            WireFormat::MsgPack
        );
    }

    #[test]
    fn cancel_round_trips() {
        let c = CancelRequest { id: "abc".into() };
        for format in [WireFormat::Json, WireFormat::MsgPack] {
            let bytes = format.encode(&c).unwrap();
            assert_eq!(format.decode::<CancelRequest>(&bytes).unwrap(), c);
        }
        assert!(WireFormat::Json
            .decode::<CancelRequest>(b"{\"idx\":1}")
            .is_err());
    }

    #[test]
    fn request_ids_are_unique() {
        let a = new_request_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_request_id());
    }

    #[test]
    fn reply_subject_policy() {
        let prefix = "pagoda.v1";
        for good in [
            "_INBOX.abc.1",
            "replies.client-7",
            "a",
            "pagoda.v2.x",
            "pagodav1.x",
        ] {
            assert_eq!(check_reply_subject(good, prefix), Ok(()), "{good:?}");
        }
        let long = format!("_INBOX.{}", "x".repeat(MAX_REPLY_SUBJECT_LEN));
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "a b",
            "a\tb",
            "a\u{7}b",
            "_INBOX.*",
            "_INBOX.>",
            "_INBOX.a>b",
            "pagoda.v1",
            "pagoda.v1.jobs.generate",
            "pagoda.v1.dead",
            "pagoda.v1.internal.frontend.x",
            "$JS.API.STREAM.PURGE.PAGODA_JOBS",
            "$js.api.stream.purge.PAGODA_JOBS",
            "$SYS.REQ.SERVER.PING",
            "$SRV.PING",
            "$KV.bucket.key",
            "$O.store.x",
            long.as_str(),
        ] {
            assert!(
                check_reply_subject(bad, prefix).is_err(),
                "{bad:?} must be refused"
            );
        }
    }
}
