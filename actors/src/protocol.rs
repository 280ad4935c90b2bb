//! Public request / response types. In-process callers use them directly; the NATS gateway
//! carries them as MessagePack (or JSON) — `docs/protocol.md` documents the wire form.

use serde::{Deserialize, Serialize};

use crate::messages::{FinishReason, SamplingParams, TokenId};

pub use crate::tokenizer::ChatMessage;

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
}

/// What a request's stream carries: text deltas, then exactly one `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEvent {
    Delta {
        text: String,
        token_ids: Vec<TokenId>,
    },
    Finished {
        text: String,
        token_ids: Vec<TokenId>,
        finish_reason: FinishReason,
        usage: Usage,
        timings: Timings,
    },
    Error(ErrorBody),
}

impl StreamEvent {
    pub fn is_final(&self) -> bool {
        !matches!(self, StreamEvent::Delta { .. })
    }
}
