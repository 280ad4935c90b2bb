//! Scheduler ↔ executor: the work of one engine step and what it produced.

use serde::{Deserialize, Serialize};

use super::blocks::BlockId;
use super::{ErrorBody, SamplingParams, SeqId, TokenId, TokenLogprobs};

/// Sent with a sequence the first time it is scheduled after (re-)admission, so the
/// executor can set up per-sequence state (sampler, penalties) even when the prefix cache
/// means it never sees the first tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewSeqData {
    pub prompt_token_ids: Vec<TokenId>,
    /// Tokens generated before a preemption (empty for a fresh sequence).
    pub output_token_ids: Vec<TokenId>,
    pub params: SamplingParams,
}

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    /// Tokens to run through the model this step.
    pub token_ids: Vec<TokenId>,
    /// Position of `token_ids[0]` (= tokens already computed).
    pub start_pos: usize,
    /// The sequence's whole block table.
    pub block_table: Vec<BlockId>,
    /// Context length after this step (`start_pos + token_ids.len()`).
    pub context_len: usize,
    /// Sample a token from the last position (the run reaches the end of the known
    /// tokens); false for a prefill chunk that stops short of it.
    pub sample: bool,
    /// Set on the first step after admission.
    pub new_seq: Option<NewSeqData>,
    /// Speculative decoding: the last `num_draft` of `token_ids` are proposed tokens, not
    /// known ones. The executor samples a token at each of the last `num_draft + 1`
    /// positions, in order, and keeps drafts while they equal what it sampled.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_draft: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The work of one engine step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduledBatch {
    /// Step counter (starts at 1).
    pub step: u64,
    /// Running sequences first (oldest first), then newly admitted ones.
    pub seqs: Vec<ScheduledSeq>,
    /// Sum of `token_ids.len()` over `seqs`.
    pub num_batched_tokens: usize,
    /// Sequences whose blocks were freed by this step's request (finished or aborted since
    /// the previous step); the executor may drop their state.
    pub finished_seq_ids: Vec<SeqId>,
    /// Sequences preempted in this step; the executor must drop their state (they come
    /// back later with `new_seq` set).
    pub preempted_seq_ids: Vec<SeqId>,
    /// KV blocks to copy, `(src, dst)`, before the forward pass: shared blocks a fork
    /// writes this step get a private copy first (copy on write).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_copies: Vec<(BlockId, BlockId)>,
}

impl ScheduledBatch {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// A token the executor sampled for a sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    pub seq_id: SeqId,
    /// Draft tokens the step verified and kept, in order, before `token_id`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepted: Vec<TokenId>,
    pub token_id: TokenId,
    /// The token's log-probabilities (the request set `logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<TokenLogprobs>,
    /// With a sequence's first token (the request set `prompt_logprobs`): one entry per
    /// prompt token, the first `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

impl SampledToken {
    /// A token without log-probabilities.
    pub fn new(seq_id: SeqId, token_id: TokenId) -> Self {
        Self {
            seq_id,
            accepted: Vec::new(),
            token_id,
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

/// A sequence the executor could not sample for: the failure is its own (every token
/// suppressed by its stop list, NaN logits in its row), so it ends alone with `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqFailure {
    pub seq_id: SeqId,
    pub error: ErrorBody,
}

/// The executor's result for a batch: for every scheduled sequence with `sample` set, one
/// token in `sampled` or one entry in `failed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    pub sampled: Vec<SampledToken>,
    pub failed: Vec<SeqFailure>,
}

/// Scheduler → executor: run one step. `released` lists sequences that ended since the
/// previous batch, whose sampler state can go. An `Err` means the whole forward pass
/// failed: every sequence of the batch ends with `internal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunBatch {
    pub batch: ScheduledBatch,
    pub released: Vec<SeqId>,
}

impl actix::Message for RunBatch {
    type Result = Result<StepOutput, String>;
}
