//! The life of a sequence across the actors: submission and cancel (client → tokenizer),
//! registration of its output stream (tokenizer → detokenizer), admission and finish
//! (→ scheduler), its tokens and its end (scheduler → detokenizer).
//!
//! A client's stream is not in any message: it stays in the [`crate::streams::Streams`]
//! registry, keyed by the sequence id, so every message here is plain data.

use serde::{Deserialize, Serialize};

use super::{
    ErrorBody, FinishReason, GenerateRequest, SamplingParams, SeqId, TokenId, TokenLogprobs,
};

/// Client → tokenizer: a request, whose stream is already open under `seq_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "()")]
pub struct Submit {
    pub seq_id: SeqId,
    /// With `n` > 1: the streams of completions 1..n, already open (`seq_id` is index 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forks: Vec<SeqId>,
    pub request: GenerateRequest,
    /// When the request arrived (µs since the epoch).
    pub arrival_us: u64,
}

/// Client → tokenizer: cancel a request by id. It goes through the tokenizer, after any
/// `Submit` sent before it, so a cancel never overtakes its own request; the answer says
/// whether a live sequence had that id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "bool")]
pub struct Cancel {
    pub request_id: String,
}

/// Tokenizer → detokenizer: a new sequence's output stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "()")]
pub struct RegisterStream {
    pub seq_id: SeqId,
    /// The client's request id (what a cancel names).
    pub request_id: String,
    /// The prompt (its last tokens give the first output token its context).
    pub prompt_tokens: Vec<TokenId>,
    pub stop: Vec<String>,
    /// When the request arrived (µs since the epoch).
    pub arrival_us: u64,
}

/// Tokenizer → scheduler: queue a new sequence. A refusal (overloaded, too long, …) is the
/// typed error the client gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "Result<(), ErrorBody>")]
pub struct AddSequence {
    pub seq_id: SeqId,
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    /// With `n` > 1: the sequences of completions 1..n. They are forked from this one
    /// once its prompt is computed, sharing its KV blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forks: Vec<SeqId>,
}

/// Detokenizer (stop string, cancel, failure) → scheduler: end a sequence. The answer says
/// whether it was live; for a live one ended with `Abort` a [`StreamEnd`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "bool")]
pub struct FinishSequence {
    pub seq_id: SeqId,
    pub reason: FinishReason,
}

/// One sampled token of a sequence, after the scheduler decided whether it ends the sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqOutput {
    pub seq_id: SeqId,
    pub token_id: TokenId,
    /// Generated tokens so far, this one included.
    pub num_output_tokens: usize,
    pub finish_reason: Option<FinishReason>,
    /// As in [`super::SampledToken`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<TokenLogprobs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

/// Counters for metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerStats {
    pub num_running: usize,
    pub num_waiting: usize,
    /// Preemptions since start.
    pub num_preemptions: u64,
    /// KV cache usage in [0, 1] as of the last block manager answer.
    pub kv_cache_usage: f64,
    pub num_free_blocks: usize,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Speculative decoding since start.
    #[serde(default)]
    pub spec: SpecCounts,
}

/// Speculative decoding counters (vLLM's spec-decode metrics): verification runs, draft
/// tokens proposed, draft tokens accepted. The acceptance rate is accepted / proposed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecCounts {
    /// Sequence-steps that verified at least one draft token.
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
}

/// A sequence's first step: how long it waited and how much of its prompt the prefix
/// cache already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirstScheduled {
    pub seq_id: SeqId,
    /// When the step that first scheduled it was planned (µs since the epoch).
    pub scheduled_us: u64,
    pub queue_us: u64,
    pub cached_tokens: usize,
}

/// Scheduler → detokenizer, once per step: every sampled token of the step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "()")]
pub struct StepTokens {
    pub outputs: Vec<SeqOutput>,
    /// Sequences scheduled for the first time in this step.
    pub first_scheduled: Vec<FirstScheduled>,
}

/// Scheduler → detokenizer: a stream ends without a token — cancelled (`error` none), or
/// failed (`error` set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "()")]
pub struct StreamEnd {
    pub seq_id: SeqId,
    pub reason: FinishReason,
    pub error: Option<ErrorBody>,
}

/// (Tokenizer →) detokenizer: cancel every live sequence of a request. Each one is
/// finished with `abort` by the scheduler within one step; its stream then ends with a
/// `Finished { finish_reason: Abort }` event. Unknown ids are ignored (another engine may
/// be running the request, or it already finished); the answer says whether one was live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "bool")]
pub struct CancelStreams {
    pub request_id: String,
}

/// Snapshot of the scheduler's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "SchedulerStats")]
pub struct GetSchedulerStats;
