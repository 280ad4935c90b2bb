//! The scheduling policy: which sequences run in the next engine step, and how many tokens
//! each computes. Pure logic, no actors; the scheduler actor owns a [`SchedulerPolicy`].
//!
//! # Model
//!
//! Iteration-level continuous batching in the style of vLLM v1. There are no separate
//! "prefill" and "decode" phases: every sequence has a list of known tokens (prompt, then
//! generated ones) and a count of tokens already computed (their K/V is in the cache). A
//! step gives each scheduled sequence a contiguous run of its uncomputed tokens — the last
//! token for a decoding sequence, a chunk of the prompt for a prefilling one — and samples a
//! new token only for sequences whose run reaches the end of their known tokens.
//!
//! Each step has one token budget (`max_num_batched_tokens`) and a cap on concurrently
//! running sequences (`max_num_seqs`). Running sequences are served first, oldest first;
//! then waiting sequences are admitted in arrival order while budget and seats remain. A
//! prompt longer than the remaining budget is prefilled in chunks over several steps.
//!
//! # Talking to the block manager: plan → apply → commit
//!
//! The block manager is a separate component (possibly another actor or process), and a
//! step makes exactly one round trip to it:
//!
//! 1. [`SchedulerPolicy::plan`] builds a [`StepRequest`]: the blocks to free (sequences that
//!    finished since the last step), every running sequence with the token count its table
//!    must hold after this step, and the waiting sequences it would like to admit.
//! 2. The block manager answers with [`BlockManager::apply`], following fixed rules: when
//!    blocks run out it preempts from the back of the running list (the newest sequence),
//!    and it admits nothing in a step that preempted (vLLM does the same).
//! 3. [`SchedulerPolicy::commit`] folds the answer in and returns the [`ScheduledBatch`]:
//!    preempted sequences go back to the *front* of the waiting queue for recomputation
//!    (their generated tokens are kept, so the recomputation covers prompt + output),
//!    admitted ones skip the tokens the prefix cache already holds.
//!
//! After the executor ran the batch, [`SchedulerPolicy::update`] appends the sampled tokens
//! and decides token-level finishing (EOS, stop token ids, `max_tokens`, context full).
//! Sequences that finish — there, or through [`SchedulerPolicy::finish`] /
//! [`SchedulerPolicy::abort`] — leave the queues at once; their blocks are returned by the
//! `free` part of the next step's request, before anything is allocated, so from the pool's
//! point of view they are freed within the step. When the engine goes idle, send
//! [`SchedulerPolicy::take_free_request`] (or call [`SchedulerPolicy::flush_frees`]) so the
//! pool ends up empty.
//!
//! In one process, [`SchedulerPolicy::schedule`] runs plan → apply → commit against a
//! `&mut BlockManager`.
//!
//! # Prefix caching
//!
//! With prefix caching on, every sequence carries the hash chain of its full blocks,
//! extended as tokens are appended. Admissions send the chain so the block manager can
//! share cached blocks; running sequences report the hashes of blocks that became full of
//! *computed* tokens, so only K/V that really exists becomes shareable.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::block_manager::{
    extend_block_hashes, AdmitRequest, BlockError, BlockHash, BlockId, BlockManager,
    BlockManagerConfig, BlockStats, FreeRequest, GrowRequest, StepRequest, StepResponse,
};
use crate::messages::{FinishReason, SamplingParams, SeqId, TokenId};

/// Limits of the scheduling policy. (The engine builds this from `config::SchedulerConfig`
/// plus the resolved context length; the names differ so the two are never confused.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerLimits {
    /// Most sequences running at once (holding blocks).
    pub max_num_seqs: usize,
    /// Most tokens computed in one step, all sequences together.
    pub max_num_batched_tokens: usize,
    /// Longest context (prompt + generated tokens) of one sequence.
    pub max_model_len: usize,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: 4096,
        }
    }
}

/// Errors of the scheduling policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SchedulerError {
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(String),
    #[error("sequence {0} already exists")]
    DuplicateSequence(SeqId),
    #[error("sequence {0} has an empty prompt")]
    EmptyPrompt(SeqId),
    #[error("invalid sampling parameters for sequence {seq_id}: {reason}")]
    InvalidParams { seq_id: SeqId, reason: String },
    #[error(
        "sequence {seq_id}: prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds max_model_len ({max_model_len})"
    )]
    ExceedsModelLen {
        seq_id: SeqId,
        prompt_len: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error(
        "sequence {seq_id}: prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the KV cache ({capacity} tokens)"
    )]
    ExceedsKvCapacity {
        seq_id: SeqId,
        prompt_len: usize,
        max_tokens: usize,
        capacity: usize,
    },
    #[error("overloaded: {waiting} requests are already waiting (scheduler.max_waiting = {max_waiting})")]
    Overloaded { waiting: usize, max_waiting: usize },
    #[error("a step is already in progress (plan or batch not yet completed)")]
    StepInProgress,
    #[error("no step is planned")]
    NoPlan,
    #[error("no batch is executing")]
    NoBatch,
    #[error("block manager answer does not match the plan: {0}")]
    PlanMismatch(String),
    #[error("executor returned no token for sequence {0}")]
    MissingToken(SeqId),
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// Where a live sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeqStatus {
    Waiting,
    Running,
}

/// A read-only view of one live sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqView<'a> {
    pub seq_id: SeqId,
    pub status: SeqStatus,
    pub prompt_token_ids: &'a [TokenId],
    pub output_token_ids: &'a [TokenId],
    pub num_computed_tokens: usize,
    /// The scheduler's copy of the block table (empty while waiting).
    pub block_table: &'a [BlockId],
    /// Times this sequence was preempted.
    pub num_preemptions: u32,
}

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
}

impl ScheduledBatch {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// A token the executor sampled for a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampledToken {
    pub seq_id: SeqId,
    pub token_id: TokenId,
}

/// The executor's result for a batch: one token per scheduled sequence with `sample` set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutput {
    pub sampled: Vec<SampledToken>,
}

/// What happened to one sequence in [`SchedulerPolicy::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqOutput {
    pub seq_id: SeqId,
    pub token_id: TokenId,
    /// Generated tokens so far, this one included.
    pub num_output_tokens: usize,
    pub finish_reason: Option<FinishReason>,
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
}

#[derive(Debug, Clone)]
struct Sequence {
    tokens: Vec<TokenId>,
    prompt_len: usize,
    num_computed: usize,
    params: SamplingParams,
    status: SeqStatus,
    /// Scheduler's mirror of the block table.
    block_table: Vec<BlockId>,
    /// Hash chain of the full blocks of `tokens` (prefix caching only).
    block_hashes: Vec<BlockHash>,
    /// Leading entries of `block_hashes` the block manager already knows.
    hashes_reported: usize,
    num_preemptions: u32,
}

impl Sequence {
    fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Hashes of full, computed blocks not yet reported, and the new reported count.
    fn unreported_hashes(&self, block_size: usize) -> (Vec<BlockHash>, usize) {
        let upto = (self.num_computed / block_size).min(self.block_hashes.len());
        let from = self.hashes_reported.min(upto);
        (self.block_hashes[from..upto].to_vec(), upto)
    }
}

#[derive(Debug, Clone)]
struct PlannedGrow {
    seq_id: SeqId,
    num_new_tokens: usize,
    hashes_upto: usize,
}

#[derive(Debug, Clone)]
struct Plan {
    grow: Vec<PlannedGrow>,
    admit: Vec<SeqId>,
    freed: Vec<FreeRequest>,
}

#[derive(Debug, Clone)]
struct Exec {
    seq_id: SeqId,
    num_tokens: usize,
    sample: bool,
}

#[derive(Debug, Clone)]
enum Phase {
    Idle,
    Planned(Plan),
    Executing(Vec<Exec>),
}

/// Waiting/running queues and the per-step decisions; see the module docs.
#[derive(Debug, Clone)]
pub struct SchedulerPolicy {
    config: SchedulerLimits,
    cache: BlockManagerConfig,
    eos_token_ids: Vec<TokenId>,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// Oldest admission first; the back is the preemption victim.
    running: Vec<SeqId>,
    pending_free: Vec<FreeRequest>,
    phase: Phase,
    step: u64,
    num_preemptions: u64,
    block_stats: BlockStats,
}

impl SchedulerPolicy {
    /// `cache` must describe the block manager this policy will talk to; `eos_token_ids`
    /// are the model's end-of-sequence tokens.
    pub fn new(
        config: SchedulerLimits,
        cache: BlockManagerConfig,
        eos_token_ids: Vec<TokenId>,
    ) -> Result<Self, SchedulerError> {
        cache.validate()?;
        for (name, v) in [
            ("max_num_seqs", config.max_num_seqs),
            ("max_num_batched_tokens", config.max_num_batched_tokens),
            ("max_model_len", config.max_model_len),
        ] {
            if v == 0 {
                return Err(SchedulerError::InvalidConfig(format!(
                    "{name} must be at least 1"
                )));
            }
        }
        Ok(Self {
            block_stats: BlockStats::empty(cache.num_blocks),
            config,
            cache,
            eos_token_ids,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            pending_free: Vec::new(),
            phase: Phase::Idle,
            step: 0,
            num_preemptions: 0,
        })
    }

    pub fn limits(&self) -> &SchedulerLimits {
        &self.config
    }

    /// Queues a new sequence. Rejects requests that could never run: empty prompt,
    /// `max_tokens` 0 or below `min_tokens`, or prompt + `max_tokens` longer than
    /// `max_model_len` or than the whole KV cache.
    pub fn add(
        &mut self,
        seq_id: SeqId,
        prompt_token_ids: Vec<TokenId>,
        params: SamplingParams,
    ) -> Result<(), SchedulerError> {
        if self.seqs.contains_key(&seq_id) {
            return Err(SchedulerError::DuplicateSequence(seq_id));
        }
        if prompt_token_ids.is_empty() {
            return Err(SchedulerError::EmptyPrompt(seq_id));
        }
        if params.max_tokens == 0 {
            return Err(SchedulerError::InvalidParams {
                seq_id,
                reason: "max_tokens must be at least 1".into(),
            });
        }
        if params.min_tokens > params.max_tokens {
            return Err(SchedulerError::InvalidParams {
                seq_id,
                reason: format!(
                    "min_tokens ({}) exceeds max_tokens ({})",
                    params.min_tokens, params.max_tokens
                ),
            });
        }
        let prompt_len = prompt_token_ids.len();
        let max_tokens = params.max_tokens as usize;
        let total = prompt_len.saturating_add(max_tokens);
        if total > self.config.max_model_len {
            return Err(SchedulerError::ExceedsModelLen {
                seq_id,
                prompt_len,
                max_tokens,
                max_model_len: self.config.max_model_len,
            });
        }
        if total > self.cache.capacity_tokens() {
            return Err(SchedulerError::ExceedsKvCapacity {
                seq_id,
                prompt_len,
                max_tokens,
                capacity: self.cache.capacity_tokens(),
            });
        }
        let mut block_hashes = Vec::new();
        if self.cache.enable_prefix_caching {
            extend_block_hashes(&mut block_hashes, &prompt_token_ids, self.cache.block_size);
        }
        self.seqs.insert(
            seq_id,
            Sequence {
                tokens: prompt_token_ids,
                prompt_len,
                num_computed: 0,
                params,
                status: SeqStatus::Waiting,
                block_table: Vec::new(),
                block_hashes,
                hashes_reported: 0,
                num_preemptions: 0,
            },
        );
        self.waiting.push_back(seq_id);
        Ok(())
    }

    /// Step 1: what to ask the block manager for. Fails while a previous step is not
    /// completed (commit, then update for a non-empty batch).
    pub fn plan(&mut self) -> Result<StepRequest, SchedulerError> {
        if !matches!(self.phase, Phase::Idle) {
            return Err(SchedulerError::StepInProgress);
        }
        let bs = self.cache.block_size;
        let mut budget = self.config.max_num_batched_tokens;

        let mut grow = Vec::with_capacity(self.running.len());
        let mut planned_grow = Vec::with_capacity(self.running.len());
        for &seq_id in &self.running {
            let Some(s) = self.seqs.get(&seq_id) else {
                continue;
            };
            let remaining = s.tokens.len().saturating_sub(s.num_computed);
            let n = remaining.min(budget);
            budget -= n;
            let (computed_hashes, hashes_upto) = s.unreported_hashes(bs);
            grow.push(GrowRequest {
                seq_id,
                num_tokens: s.num_computed + n,
                computed_hashes,
            });
            planned_grow.push(PlannedGrow {
                seq_id,
                num_new_tokens: n,
                hashes_upto,
            });
        }

        let mut admit = Vec::new();
        let mut planned_admit = Vec::new();
        let mut seats = self.config.max_num_seqs.saturating_sub(self.running.len());
        for &seq_id in &self.waiting {
            if budget == 0 || seats == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&seq_id) else {
                continue;
            };
            let n = s.tokens.len().min(budget);
            budget -= n;
            seats -= 1;
            admit.push(AdmitRequest {
                seq_id,
                num_tokens: s.tokens.len(),
                num_new_tokens: n,
                block_hashes: s.block_hashes.clone(),
            });
            planned_admit.push(seq_id);
        }

        let free = std::mem::take(&mut self.pending_free);
        self.phase = Phase::Planned(Plan {
            grow: planned_grow,
            admit: planned_admit,
            freed: free.clone(),
        });
        Ok(StepRequest { free, grow, admit })
    }

    /// Step 3: folds the block manager's answer in and returns the batch to execute. An
    /// empty batch completes the step; otherwise call [`Self::update`] (or
    /// [`Self::cancel_step`]) once the executor is done.
    pub fn commit(&mut self, resp: StepResponse) -> Result<ScheduledBatch, SchedulerError> {
        let plan = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Planned(plan) => plan,
            other => {
                self.phase = other;
                return Err(SchedulerError::NoPlan);
            }
        };
        if let Err(e) = check_response(&plan, &resp) {
            self.phase = Phase::Planned(plan);
            return Err(e);
        }
        self.block_stats = resp.stats;
        self.step += 1;

        // Preemptions: newest first in `resp.preempted`; pushing each to the front leaves
        // the oldest preempted sequence first in line.
        let preempted: HashSet<SeqId> = resp.preempted.iter().copied().collect();
        if !preempted.is_empty() {
            self.running.retain(|id| !preempted.contains(id));
        }
        for &seq_id in &resp.preempted {
            self.num_preemptions += 1;
            if let Some(s) = self.seqs.get_mut(&seq_id) {
                s.status = SeqStatus::Waiting;
                s.num_computed = 0;
                s.block_table.clear();
                s.hashes_reported = 0;
                s.num_preemptions += 1;
                self.waiting.push_front(seq_id);
            }
        }

        let mut new_blocks: HashMap<SeqId, Vec<BlockId>> = resp
            .grown
            .into_iter()
            .map(|g| (g.seq_id, g.new_blocks))
            .collect();
        let mut scheduled = Vec::new();
        let mut exec = Vec::new();
        for pg in &plan.grow {
            let Some(blocks) = new_blocks.remove(&pg.seq_id) else {
                continue;
            };
            // A sequence missing here finished or was aborted meanwhile; its free is
            // already pending.
            let Some(s) = self.seqs.get_mut(&pg.seq_id) else {
                continue;
            };
            s.block_table.extend(blocks);
            s.hashes_reported = s.hashes_reported.max(pg.hashes_upto);
            if pg.num_new_tokens > 0 {
                scheduled.push(scheduled_seq(pg.seq_id, s, pg.num_new_tokens, false));
                exec.push(Exec {
                    seq_id: pg.seq_id,
                    num_tokens: pg.num_new_tokens,
                    sample: s.num_computed + pg.num_new_tokens == s.tokens.len(),
                });
            }
        }

        let admitted: HashSet<SeqId> = resp.admitted.iter().map(|a| a.seq_id).collect();
        if !admitted.is_empty() {
            self.waiting.retain(|id| !admitted.contains(id));
        }
        for a in resp.admitted {
            let Some(s) = self.seqs.get_mut(&a.seq_id) else {
                // Aborted while the request was in flight: give the blocks back.
                self.pending_free.push(FreeRequest {
                    seq_id: a.seq_id,
                    computed_hashes: Vec::new(),
                });
                continue;
            };
            s.status = SeqStatus::Running;
            s.num_computed = a.num_cached_tokens;
            s.block_table = a.block_table;
            s.hashes_reported = a.num_cached_tokens / self.cache.block_size;
            self.running.push(a.seq_id);
            scheduled.push(scheduled_seq(a.seq_id, s, a.num_new_tokens, true));
            exec.push(Exec {
                seq_id: a.seq_id,
                num_tokens: a.num_new_tokens,
                sample: s.num_computed + a.num_new_tokens == s.tokens.len(),
            });
        }

        let num_batched_tokens = scheduled
            .iter()
            .map(|s: &ScheduledSeq| s.token_ids.len())
            .sum();
        if !exec.is_empty() {
            self.phase = Phase::Executing(exec);
        }
        Ok(ScheduledBatch {
            step: self.step,
            seqs: scheduled,
            num_batched_tokens,
            finished_seq_ids: plan.freed.iter().map(|f| f.seq_id).collect(),
            preempted_seq_ids: resp.preempted,
        })
    }

    /// plan → [`BlockManager::apply`] → commit, for a block manager in the same process.
    pub fn schedule(&mut self, bm: &mut BlockManager) -> Result<ScheduledBatch, SchedulerError> {
        let req = self.plan()?;
        match bm.apply(req) {
            Ok(resp) => self.commit(resp),
            Err(e) => {
                self.cancel_step();
                Err(e.into())
            }
        }
    }

    /// Abandons the current step: a plan whose request was never applied (its frees are
    /// queued again), or a batch the executor failed to run (nothing advances, so the same
    /// tokens are scheduled again).
    pub fn cancel_step(&mut self) {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Planned(plan) => {
                let mut freed = plan.freed;
                freed.append(&mut self.pending_free);
                self.pending_free = freed;
            }
            Phase::Idle | Phase::Executing(_) => {}
        }
    }

    /// Step 4: the executor's sampled tokens. Advances every scheduled sequence, appends
    /// the tokens, and finishes sequences for token-level reasons, checked in this order:
    ///
    /// * EOS (unless `ignore_eos`) or one of `stop_token_ids` → `Stop`, but only once at
    ///   least `min_tokens` tokens were generated before it (the sampler is expected to
    ///   suppress those tokens until then anyway);
    /// * `max_tokens` generated → `Length`;
    /// * context reached `max_model_len` → `Length`.
    ///
    /// Returns one entry per sampled token. Tokens for sequences that no longer exist
    /// (aborted during the step) are ignored; a missing token is an error that changes
    /// nothing.
    pub fn update(&mut self, output: &StepOutput) -> Result<Vec<SeqOutput>, SchedulerError> {
        let Phase::Executing(exec) = &self.phase else {
            return Err(SchedulerError::NoBatch);
        };
        let sampled: HashMap<SeqId, TokenId> = output
            .sampled
            .iter()
            .map(|t| (t.seq_id, t.token_id))
            .collect();
        if let Some(e) = exec.iter().find(|e| {
            e.sample && self.seqs.contains_key(&e.seq_id) && !sampled.contains_key(&e.seq_id)
        }) {
            return Err(SchedulerError::MissingToken(e.seq_id));
        }
        let Phase::Executing(exec) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return Err(SchedulerError::NoBatch);
        };

        let mut outputs = Vec::new();
        for e in exec {
            let Some(s) = self.seqs.get_mut(&e.seq_id) else {
                continue;
            };
            s.num_computed += e.num_tokens;
            if !e.sample {
                continue;
            }
            let Some(&token_id) = sampled.get(&e.seq_id) else {
                continue;
            };
            s.tokens.push(token_id);
            if self.cache.enable_prefix_caching {
                extend_block_hashes(&mut s.block_hashes, &s.tokens, self.cache.block_size);
            }
            let finish_reason = check_finish(s, &self.eos_token_ids, self.config.max_model_len);
            outputs.push(SeqOutput {
                seq_id: e.seq_id,
                token_id,
                num_output_tokens: s.num_output(),
                finish_reason,
            });
            if finish_reason.is_some() {
                self.retire(e.seq_id);
            }
        }
        Ok(outputs)
    }

    /// Ends a sequence for a reason decided elsewhere (a stop string found by the
    /// detokenizer, a client cancel). Returns whether the sequence was live.
    pub fn finish(&mut self, seq_id: SeqId, _reason: FinishReason) -> bool {
        self.retire(seq_id)
    }

    /// [`Self::finish`] with [`FinishReason::Abort`].
    pub fn abort(&mut self, seq_id: SeqId) -> bool {
        self.finish(seq_id, FinishReason::Abort)
    }

    /// Frees queued since the last request (finished sequences' blocks), as a request of
    /// their own; `None` if there are none. Safe at any time: nothing is allocated until
    /// the next plan.
    pub fn take_free_request(&mut self) -> Option<StepRequest> {
        if self.pending_free.is_empty() {
            return None;
        }
        Some(StepRequest::free_only(std::mem::take(
            &mut self.pending_free,
        )))
    }

    /// Applies [`Self::take_free_request`] to an in-process block manager.
    pub fn flush_frees(&mut self, bm: &mut BlockManager) -> Result<(), SchedulerError> {
        if let Some(req) = self.take_free_request() {
            let resp = bm.apply(req)?;
            self.block_stats = resp.stats;
        }
        Ok(())
    }

    /// Records statistics from a block manager answer the policy did not see (e.g. the
    /// reply to a [`Self::take_free_request`] sent by the actor).
    pub fn observe_block_stats(&mut self, stats: BlockStats) {
        self.block_stats = stats;
    }

    /// Whether the engine loop should keep stepping: sequences to run or frees to send.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty() || !self.pending_free.is_empty()
    }

    /// Whether any sequence is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn has_pending_frees(&self) -> bool {
        !self.pending_free.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// KV cache usage as of the last block manager answer.
    pub fn kv_cache_usage(&self) -> f64 {
        self.block_stats.usage
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            num_running: self.running.len(),
            num_waiting: self.waiting.len(),
            num_preemptions: self.num_preemptions,
            kv_cache_usage: self.block_stats.usage,
            num_free_blocks: self.block_stats.num_free_blocks,
            prefix_cache_queries: self.block_stats.prefix_cache_queries,
            prefix_cache_hits: self.block_stats.prefix_cache_hits,
        }
    }

    /// Running sequence ids, oldest first.
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }

    /// Waiting sequence ids, next to be admitted first.
    pub fn waiting(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    pub fn sequence(&self, seq_id: SeqId) -> Option<SeqView<'_>> {
        let s = self.seqs.get(&seq_id)?;
        Some(SeqView {
            seq_id,
            status: s.status,
            prompt_token_ids: &s.tokens[..s.prompt_len],
            output_token_ids: &s.tokens[s.prompt_len..],
            num_computed_tokens: s.num_computed,
            block_table: &s.block_table,
            num_preemptions: s.num_preemptions,
        })
    }

    /// Removes a live sequence from the queues and, if it holds blocks, queues their
    /// release (with the hashes of its computed full blocks, so they stay reusable).
    fn retire(&mut self, seq_id: SeqId) -> bool {
        let Some(s) = self.seqs.remove(&seq_id) else {
            return false;
        };
        match s.status {
            SeqStatus::Running => {
                self.running.retain(|&id| id != seq_id);
                let (computed_hashes, _) = s.unreported_hashes(self.cache.block_size);
                self.pending_free.push(FreeRequest {
                    seq_id,
                    computed_hashes,
                });
            }
            SeqStatus::Waiting => self.waiting.retain(|&id| id != seq_id),
        }
        true
    }
}

fn check_finish(
    s: &Sequence,
    eos_token_ids: &[TokenId],
    max_model_len: usize,
) -> Option<FinishReason> {
    let last = *s.tokens.last()?;
    let num_output = s.num_output();
    if num_output > s.params.min_tokens as usize {
        let is_eos = !s.params.ignore_eos && eos_token_ids.contains(&last);
        if is_eos || s.params.stop_token_ids.contains(&last) {
            return Some(FinishReason::Stop);
        }
    }
    if num_output >= s.params.max_tokens as usize || s.tokens.len() >= max_model_len {
        return Some(FinishReason::Length);
    }
    None
}

fn scheduled_seq(seq_id: SeqId, s: &Sequence, num_tokens: usize, new: bool) -> ScheduledSeq {
    let start = s.num_computed.min(s.tokens.len());
    let end = (start + num_tokens).min(s.tokens.len());
    ScheduledSeq {
        seq_id,
        token_ids: s.tokens[start..end].to_vec(),
        start_pos: start,
        block_table: s.block_table.clone(),
        context_len: end,
        sample: end == s.tokens.len(),
        new_seq: new.then(|| NewSeqData {
            prompt_token_ids: s.tokens[..s.prompt_len].to_vec(),
            output_token_ids: s.tokens[s.prompt_len..].to_vec(),
            params: s.params.clone(),
        }),
    }
}

/// The answer must only mention sequences of the plan: every grow entry exactly once in
/// `grown` or `preempted`, `admitted` a prefix of the planned admissions.
fn check_response(plan: &Plan, resp: &StepResponse) -> Result<(), SchedulerError> {
    let mut grow: HashSet<SeqId> = plan.grow.iter().map(|g| g.seq_id).collect();
    for id in resp
        .grown
        .iter()
        .map(|g| g.seq_id)
        .chain(resp.preempted.iter().copied())
    {
        if !grow.remove(&id) {
            return Err(SchedulerError::PlanMismatch(format!(
                "sequence {id} was not planned to grow, or appears twice"
            )));
        }
    }
    if let Some(id) = grow.into_iter().next() {
        return Err(SchedulerError::PlanMismatch(format!(
            "no answer for running sequence {id}"
        )));
    }
    if resp.admitted.len() > plan.admit.len()
        || resp
            .admitted
            .iter()
            .zip(&plan.admit)
            .any(|(a, &p)| a.seq_id != p)
    {
        return Err(SchedulerError::PlanMismatch(
            "admitted sequences differ from the plan".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EOS: TokenId = 0;
    /// A token that never ends anything.
    const TOK: TokenId = 7;

    struct Engine {
        sched: SchedulerPolicy,
        bm: BlockManager,
    }

    impl Engine {
        fn new(cfg: SchedulerLimits, num_blocks: usize, block_size: usize, caching: bool) -> Self {
            let cache = BlockManagerConfig::new(num_blocks, block_size, caching);
            Self {
                sched: SchedulerPolicy::new(cfg, cache.clone(), vec![EOS]).expect("valid config"),
                bm: BlockManager::new(cache).expect("valid config"),
            }
        }

        fn simple(
            max_num_seqs: usize,
            budget: usize,
            num_blocks: usize,
            block_size: usize,
        ) -> Self {
            let cfg = SchedulerLimits {
                max_num_seqs,
                max_num_batched_tokens: budget,
                max_model_len: 4096,
            };
            Self::new(cfg, num_blocks, block_size, true)
        }

        fn add(&mut self, id: SeqId, prompt: Vec<TokenId>, max_tokens: u32) {
            let params = SamplingParams {
                max_tokens,
                ..SamplingParams::default()
            };
            self.sched.add(id, prompt, params).expect("accepted");
        }

        /// One full step; `sample` picks each sampled token.
        fn step_with(
            &mut self,
            mut sample: impl FnMut(&ScheduledSeq) -> TokenId,
        ) -> (ScheduledBatch, Vec<SeqOutput>) {
            let batch = self.sched.schedule(&mut self.bm).expect("schedule");
            self.check(&batch);
            if batch.is_empty() {
                return (batch, Vec::new());
            }
            let sampled = batch
                .seqs
                .iter()
                .filter(|s| s.sample)
                .map(|s| SampledToken {
                    seq_id: s.seq_id,
                    token_id: sample(s),
                })
                .collect();
            let outs = self.sched.update(&StepOutput { sampled }).expect("update");
            (batch, outs)
        }

        fn step(&mut self) -> (ScheduledBatch, Vec<SeqOutput>) {
            self.step_with(|_| TOK)
        }

        /// Consistency of a batch with the policy and the block manager.
        fn check(&self, batch: &ScheduledBatch) {
            self.bm.check_invariants().expect("block invariants");
            let cfg = self.sched.limits();
            assert!(batch.num_batched_tokens <= cfg.max_num_batched_tokens);
            assert!(batch.seqs.len() <= cfg.max_num_seqs);
            assert!(self.sched.num_running() <= cfg.max_num_seqs);
            assert_eq!(
                batch.num_batched_tokens,
                batch.seqs.iter().map(|s| s.token_ids.len()).sum::<usize>()
            );
            for s in &batch.seqs {
                assert!(!s.token_ids.is_empty());
                assert_eq!(s.context_len, s.start_pos + s.token_ids.len());
                let bs = self.bm.block_size();
                assert!(
                    s.block_table.len() * bs >= s.context_len,
                    "table too short for {s:?}"
                );
                assert_eq!(
                    self.bm.block_table(s.seq_id),
                    Some(s.block_table.as_slice())
                );
            }
            for &id in self.sched.running() {
                let view = self.sched.sequence(id).expect("running sequence exists");
                assert_eq!(
                    self.bm.block_table(id),
                    Some(view.block_table),
                    "mirror table of {id}"
                );
            }
        }

        fn drain_frees(&mut self) {
            self.sched.flush_frees(&mut self.bm).expect("flush");
            self.bm.check_invariants().expect("block invariants");
        }
    }

    fn empty_response(bm: &BlockManager) -> StepResponse {
        StepResponse {
            grown: vec![],
            preempted: vec![],
            admitted: vec![],
            stats: bm.stats(),
        }
    }

    #[test]
    fn config_and_request_validation() {
        let cache = BlockManagerConfig::new(4, 4, true);
        let zero = SchedulerLimits {
            max_num_seqs: 0,
            ..SchedulerLimits::default()
        };
        assert!(matches!(
            SchedulerPolicy::new(zero, cache.clone(), vec![]),
            Err(SchedulerError::InvalidConfig(_))
        ));
        let cfg = SchedulerLimits {
            max_num_seqs: 4,
            max_num_batched_tokens: 8,
            max_model_len: 12,
        };
        let mut s = SchedulerPolicy::new(cfg, cache, vec![EOS]).expect("valid");
        let p = |max_tokens, min_tokens| SamplingParams {
            max_tokens,
            min_tokens,
            ..SamplingParams::default()
        };
        assert_eq!(
            s.add(1, vec![], p(1, 0)),
            Err(SchedulerError::EmptyPrompt(1))
        );
        assert!(matches!(
            s.add(1, vec![1], p(0, 0)),
            Err(SchedulerError::InvalidParams { .. })
        ));
        assert!(matches!(
            s.add(1, vec![1], p(2, 3)),
            Err(SchedulerError::InvalidParams { .. })
        ));
        assert!(matches!(
            s.add(1, vec![1; 10], p(3, 0)),
            Err(SchedulerError::ExceedsModelLen { .. })
        ));
        s.add(1, vec![1; 10], p(2, 0))
            .expect("exactly max_model_len");
        assert_eq!(
            s.add(1, vec![1], p(1, 0)),
            Err(SchedulerError::DuplicateSequence(1))
        );

        // KV capacity (16 tokens) below max_model_len.
        let cfg = SchedulerLimits {
            max_num_seqs: 4,
            max_num_batched_tokens: 8,
            max_model_len: 100,
        };
        let mut s = SchedulerPolicy::new(cfg, BlockManagerConfig::new(4, 4, true), vec![EOS])
            .expect("valid");
        assert!(matches!(
            s.add(2, vec![1; 10], p(7, 0)),
            Err(SchedulerError::ExceedsKvCapacity { .. })
        ));
        s.add(2, vec![1; 10], p(6, 0)).expect("fits exactly");
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn prefill_then_decode_only_batches() {
        let mut e = Engine::simple(8, 64, 32, 4);
        e.add(1, vec![1, 2, 3, 4, 5], 4);
        e.add(2, vec![9, 9, 9], 4);
        let (b, outs) = e.step();
        assert_eq!(b.step, 1);
        assert_eq!(b.seqs.len(), 2);
        assert_eq!(b.seqs[0].token_ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(
            (b.seqs[0].start_pos, b.seqs[0].context_len, b.seqs[0].sample),
            (0, 5, true)
        );
        assert!(b.seqs[0].new_seq.is_some());
        assert_eq!(outs.len(), 2);
        for i in 0..3 {
            let (b, outs) = e.step();
            assert_eq!(b.num_batched_tokens, 2, "decode: one token per sequence");
            let s1 = &b.seqs[0];
            assert_eq!(
                (s1.seq_id, s1.token_ids.clone(), s1.start_pos),
                (1, vec![TOK], 5 + i)
            );
            assert!(s1.sample && s1.new_seq.is_none());
            assert_eq!(outs.len(), 2);
        }
        // max_tokens = 4 reached by both on the fourth token.
        let v = e.sched.sequence(1);
        assert!(v.is_none(), "finished sequences leave the policy");
        assert!(!e.sched.has_unfinished());
        assert!(e.sched.has_pending_frees());
        e.drain_frees();
        assert_eq!(e.bm.num_free_blocks(), 32);
    }

    #[test]
    fn token_budget_is_respected_and_prompts_are_chunked() {
        let mut e = Engine::simple(8, 10, 64, 4);
        for id in 1..=4 {
            e.add(id, vec![id as TokenId; 7], 3);
        }
        let (b, _) = e.step();
        // 7 + 3 (chunk of the second prompt).
        assert_eq!(b.num_batched_tokens, 10);
        assert_eq!(b.seqs.len(), 2);
        assert_eq!((b.seqs[1].token_ids.len(), b.seqs[1].sample), (3, false));
        let (b, _) = e.step();
        // Decode of seq 1 (1) + rest of seq 2 (4) + chunk of seq 3 (5).
        let per: Vec<(SeqId, usize)> = b
            .seqs
            .iter()
            .map(|s| (s.seq_id, s.token_ids.len()))
            .collect();
        assert_eq!(per, vec![(1, 1), (2, 4), (3, 5)]);
        assert_eq!(b.seqs[1].start_pos, 3);
        let mut steps = 2;
        while e.sched.has_unfinished() {
            let (b, _) = e.step();
            assert!(b.num_batched_tokens <= 10);
            steps += 1;
            assert!(steps < 50);
        }
    }

    #[test]
    fn max_num_seqs_is_respected() {
        let mut e = Engine::simple(2, 100, 64, 4);
        for id in 1..=5 {
            e.add(id, vec![1, 2], 3);
        }
        let (b, _) = e.step();
        assert_eq!(b.seqs.len(), 2);
        assert_eq!((e.sched.num_running(), e.sched.num_waiting()), (2, 3));
        let mut finished = Vec::new();
        while e.sched.has_unfinished() {
            let (b, outs) = e.step();
            assert!(b.seqs.len() <= 2);
            finished.extend(
                outs.iter()
                    .filter(|o| o.finish_reason.is_some())
                    .map(|o| o.seq_id),
            );
        }
        finished.sort_unstable();
        assert_eq!(finished, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn long_prompt_is_prefilled_in_chunks() {
        let mut e = Engine::simple(4, 16, 64, 4);
        let prompt: Vec<TokenId> = (1..=40).collect();
        e.add(1, prompt.clone(), 2);
        let mut seen = Vec::new();
        for (i, (start, len, sample)) in [(0, 16, false), (16, 16, false), (32, 8, true)]
            .into_iter()
            .enumerate()
        {
            let (b, outs) = e.step();
            let s = &b.seqs[0];
            assert_eq!(
                (s.start_pos, s.token_ids.len(), s.sample),
                (start, len, sample)
            );
            assert_eq!(s.new_seq.is_some(), i == 0);
            assert_eq!(outs.len(), usize::from(sample));
            seen.extend_from_slice(&s.token_ids);
        }
        assert_eq!(seen, prompt);
        let (b, outs) = e.step();
        assert_eq!(
            (b.seqs[0].start_pos, b.seqs[0].token_ids.clone()),
            (40, vec![TOK])
        );
        assert_eq!(outs[0].finish_reason, Some(FinishReason::Length));
    }

    #[test]
    fn new_arrivals_join_the_running_batch() {
        let mut e = Engine::simple(8, 64, 64, 4);
        e.add(1, vec![1, 2, 3], 10);
        e.step();
        e.step();
        e.add(2, vec![4, 5, 6, 7], 10);
        let (b, _) = e.step();
        let per: Vec<(SeqId, usize, usize)> = b
            .seqs
            .iter()
            .map(|s| (s.seq_id, s.start_pos, s.token_ids.len()))
            .collect();
        assert_eq!(per, vec![(1, 4, 1), (2, 0, 4)]);
        let (b, _) = e.step();
        assert_eq!(b.num_batched_tokens, 2);
    }

    #[test]
    fn pool_exhaustion_preempts_the_newest_and_recomputes_later() {
        // 4 blocks of 2 tokens. Two sequences with 3-token prompts hold 2 blocks each;
        // on the first decode step that needs a fifth block, the newer one is preempted.
        let mut e = Engine::simple(4, 64, 4, 2);
        e.add(1, vec![1, 2, 3], 4);
        e.add(2, vec![4, 5, 6], 4);
        e.step(); // prefill both; each has 4 tokens now, tables of 2 blocks hold them.
        assert_eq!(e.bm.num_free_blocks(), 0);
        let (b, _) = e.step_with(|s| if s.seq_id == 1 { 11 } else { 21 });
        // Seq 1 fits its decode in its own blocks.
        assert_eq!(
            b.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let (b, _) = e.step_with(|s| if s.seq_id == 1 { 12 } else { 22 });
        // Both need a third block for token 5; only seq 1 keeps running.
        assert_eq!(b.preempted_seq_ids, vec![2]);
        assert_eq!(b.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(e.sched.num_preemptions(), 1);
        assert_eq!(e.sched.stats().num_preemptions, 1);
        let v = e.sched.sequence(2).expect("still live");
        assert_eq!(
            (v.status, v.num_computed_tokens, v.num_preemptions),
            (SeqStatus::Waiting, 0, 1)
        );
        assert_eq!(v.output_token_ids, &[TOK, 21]);
        assert_eq!(e.sched.waiting().next(), Some(2));

        // Run seq 1 to completion; then seq 2 recomputes prompt + generated tokens.
        while e.sched.sequence(1).is_some() {
            let (b, _) = e.step();
            assert!(b.seqs.iter().all(|s| s.seq_id == 1));
        }
        let (b, outs) = e.step();
        let s = &b.seqs[0];
        assert_eq!(s.seq_id, 2);
        // The prefix cache still holds the first block of seq 2's prompt.
        let hit = s.start_pos;
        assert_eq!(hit, 2);
        assert_eq!(s.token_ids, vec![6, TOK, 21][..].to_vec());
        let nd = s
            .new_seq
            .as_ref()
            .expect("re-admission carries the history");
        assert_eq!(
            (nd.prompt_token_ids.clone(), nd.output_token_ids.clone()),
            (vec![4, 5, 6], vec![TOK, 21])
        );
        assert!(s.sample);
        assert_eq!(outs[0].num_output_tokens, 3);
        while e.sched.has_unfinished() {
            e.step();
        }
        e.drain_frees();
        assert_eq!(e.bm.num_free_blocks(), 4);
    }

    #[test]
    fn preempted_sequence_without_prefix_cache_recomputes_everything() {
        let cfg = SchedulerLimits {
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
            max_model_len: 64,
        };
        let mut e = Engine::new(cfg, 4, 2, false);
        e.add(1, vec![1, 2, 3], 4);
        e.add(2, vec![4, 5, 6], 4);
        e.step();
        e.step();
        let (b, _) = e.step();
        assert_eq!(b.preempted_seq_ids, vec![2]);
        while e.sched.sequence(1).is_some() {
            e.step();
        }
        let (b, _) = e.step();
        assert_eq!(
            (b.seqs[0].start_pos, b.seqs[0].token_ids.clone()),
            (0, vec![4, 5, 6, TOK, TOK])
        );
    }

    #[test]
    fn the_newest_sequence_preempts_itself() {
        // 4 blocks of 2. Seq 1 holds 2 blocks, seq 2 one; on step 3 seq 1 takes the last
        // free block and seq 2, the newest, needs one more: it preempts itself.
        let mut e = Engine::simple(4, 64, 4, 2);
        e.add(1, vec![1, 2, 3], 3);
        e.add(2, vec![4], 4);
        e.step();
        e.step();
        assert_eq!(e.bm.num_free_blocks(), 1);
        let (b, _) = e.step();
        assert_eq!(b.preempted_seq_ids, vec![2]);
        assert_eq!(b.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(e.sched.num_preemptions(), 1);
        let mut n = 0;
        while e.sched.has_unfinished() {
            e.step();
            n += 1;
            assert!(n < 100);
        }
        e.drain_frees();
        assert_eq!(e.bm.num_free_blocks(), 4);
    }

    #[test]
    fn finished_sequences_free_their_blocks_with_the_next_request() {
        let mut e = Engine::simple(4, 64, 8, 4);
        e.add(1, vec![1, 2, 3, 4, 5], 1);
        e.add(2, vec![1, 2, 3], 3);
        let (_, outs) = e.step();
        assert_eq!(outs[0].finish_reason, Some(FinishReason::Length));
        assert_eq!(outs[1].finish_reason, None);
        assert_eq!(e.sched.running(), &[2]);
        // Seq 1's free rides on the next step's single request.
        let used_before = e.bm.num_blocks() - e.bm.num_free_blocks();
        assert_eq!(used_before, 3);
        let (b, _) = e.step();
        assert_eq!(b.finished_seq_ids, vec![1]);
        assert!(!e.bm.contains(1));
        assert_eq!(e.bm.num_free_blocks(), 8 - 1);
        // Or immediately, e.g. when the engine goes idle.
        e.step();
        assert!(!e.sched.has_unfinished());
        assert!(e.sched.has_work(), "the pending free is still work");
        e.drain_frees();
        assert!(!e.sched.has_work());
        assert_eq!(e.bm.num_free_blocks(), 8);
        assert_eq!(e.sched.stats().num_free_blocks, 8);
        assert_eq!(e.sched.kv_cache_usage(), 0.0);
    }

    fn run_one(params: SamplingParams, tokens: &[TokenId]) -> (Vec<TokenId>, Option<FinishReason>) {
        let mut e = Engine::simple(4, 64, 16, 4);
        e.sched.add(1, vec![3, 3, 3], params).expect("accepted");
        let mut out = Vec::new();
        let mut it = tokens.iter().copied();
        while e.sched.has_unfinished() {
            let (_, outs) = e.step_with(|_| it.next().unwrap_or(TOK));
            for o in outs {
                out.push(o.token_id);
                if o.finish_reason.is_some() {
                    return (out, o.finish_reason);
                }
            }
        }
        (out, None)
    }

    #[test]
    fn eos_stops_unless_ignored() {
        let p = SamplingParams {
            max_tokens: 10,
            ..SamplingParams::default()
        };
        assert_eq!(
            run_one(p.clone(), &[5, 6, EOS, 8]),
            (vec![5, 6, EOS], Some(FinishReason::Stop))
        );
        let ignore = SamplingParams {
            ignore_eos: true,
            max_tokens: 5,
            ..p.clone()
        };
        assert_eq!(
            run_one(ignore, &[EOS, EOS, 1]),
            (vec![EOS, EOS, 1, TOK, TOK], Some(FinishReason::Length))
        );
    }

    #[test]
    fn min_tokens_defers_eos_and_stop_tokens() {
        let p = SamplingParams {
            max_tokens: 10,
            min_tokens: 2,
            stop_token_ids: vec![42],
            ..SamplingParams::default()
        };
        // EOS as 1st and 2nd token is ignored (fewer than 2 generated before it); as 3rd it stops.
        assert_eq!(
            run_one(p.clone(), &[EOS, 42, EOS]),
            (vec![EOS, 42, EOS], Some(FinishReason::Stop))
        );
        assert_eq!(
            run_one(p, &[1, 2, 42]),
            (vec![1, 2, 42], Some(FinishReason::Stop))
        );
    }

    #[test]
    fn stop_token_ids_stop_even_with_ignore_eos() {
        let p = SamplingParams {
            max_tokens: 10,
            stop_token_ids: vec![42, 43],
            ignore_eos: true,
            ..SamplingParams::default()
        };
        assert_eq!(
            run_one(p, &[1, EOS, 43]),
            (vec![1, EOS, 43], Some(FinishReason::Stop))
        );
    }

    #[test]
    fn max_tokens_gives_length_and_stop_wins_on_the_last_token() {
        let p = SamplingParams {
            max_tokens: 3,
            ..SamplingParams::default()
        };
        assert_eq!(
            run_one(p.clone(), &[1, 2, 3, 4]),
            (vec![1, 2, 3], Some(FinishReason::Length))
        );
        assert_eq!(
            run_one(p, &[1, 2, EOS]),
            (vec![1, 2, EOS], Some(FinishReason::Stop))
        );
    }

    #[test]
    fn full_context_gives_length() {
        let s = Sequence {
            tokens: vec![1, 2, 3, 4],
            prompt_len: 3,
            num_computed: 3,
            params: SamplingParams {
                max_tokens: 100,
                ..SamplingParams::default()
            },
            status: SeqStatus::Running,
            block_table: vec![],
            block_hashes: vec![],
            hashes_reported: 0,
            num_preemptions: 0,
        };
        assert_eq!(check_finish(&s, &[EOS], 4), Some(FinishReason::Length));
        assert_eq!(check_finish(&s, &[EOS], 5), None);
    }

    #[test]
    fn abort_and_external_finish() {
        let mut e = Engine::simple(1, 64, 16, 4);
        e.add(1, vec![1, 2, 3], 10);
        e.add(2, vec![1, 2, 3], 10);
        e.step();
        assert_eq!((e.sched.num_running(), e.sched.num_waiting()), (1, 1));
        assert!(e.sched.abort(2), "waiting sequence");
        assert_eq!(e.sched.num_waiting(), 0);
        assert!(
            !e.sched.has_pending_frees(),
            "a waiting sequence holds no blocks"
        );
        assert!(
            e.sched.finish(1, FinishReason::Stop),
            "stop string found by the detokenizer"
        );
        assert!(!e.sched.abort(1));
        assert!(!e.sched.abort(99));
        assert!(!e.sched.has_unfinished());
        let (b, _) = e.step();
        assert!(b.is_empty());
        assert_eq!(b.finished_seq_ids, vec![1]);
        assert_eq!(e.bm.num_free_blocks(), 16);
    }

    #[test]
    fn aborts_while_a_step_is_in_flight() {
        let mut e = Engine::simple(4, 64, 16, 4);
        e.add(1, vec![1, 2, 3], 10);
        e.add(2, vec![4, 5, 6], 10);
        e.step();
        e.add(3, vec![7, 8], 10);
        // Between plan and commit: a running and a to-be-admitted sequence go away.
        let req = e.sched.plan().expect("plan");
        assert!(matches!(
            e.sched.plan(),
            Err(SchedulerError::StepInProgress)
        ));
        assert!(e.sched.abort(1));
        assert!(e.sched.abort(3));
        let resp = e.bm.apply(req).expect("apply");
        let b = e.sched.commit(resp).expect("commit");
        assert_eq!(b.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(), vec![2]);
        // While the batch executes, seq 2 is aborted too; its token is ignored.
        assert!(e.sched.abort(2));
        let outs = e
            .sched
            .update(&StepOutput {
                sampled: vec![SampledToken {
                    seq_id: 2,
                    token_id: 5,
                }],
            })
            .expect("update");
        assert!(outs.is_empty());
        e.drain_frees();
        assert_eq!(e.bm.num_seqs(), 0);
        assert_eq!(e.bm.num_free_blocks(), 16);
    }

    #[test]
    fn step_protocol_errors_change_nothing() {
        let mut e = Engine::simple(4, 64, 16, 4);
        assert!(matches!(
            e.sched.update(&StepOutput::default()),
            Err(SchedulerError::NoBatch)
        ));
        assert!(matches!(
            e.sched.commit(empty_response(&e.bm)),
            Err(SchedulerError::NoPlan)
        ));
        e.add(1, vec![1, 2, 3], 10);
        let b = e.sched.schedule(&mut e.bm).expect("schedule");
        assert_eq!(b.seqs.len(), 1);
        assert!(matches!(
            e.sched.plan(),
            Err(SchedulerError::StepInProgress)
        ));
        assert_eq!(
            e.sched.update(&StepOutput::default()),
            Err(SchedulerError::MissingToken(1))
        );
        // The executor failed: cancel, and the same tokens are scheduled again.
        e.sched.cancel_step();
        let b2 = e.sched.schedule(&mut e.bm).expect("schedule");
        assert_eq!(b2.seqs[0].token_ids, b.seqs[0].token_ids);
        assert_eq!(b2.seqs[0].start_pos, 0);
        e.sched.cancel_step();
        // A response that does not match the plan is refused.
        let _req = e.sched.plan().expect("plan");
        assert!(matches!(
            e.sched.commit(empty_response(&e.bm)),
            Err(SchedulerError::PlanMismatch(_))
        ));
        e.sched.cancel_step();
        e.bm.check_invariants().expect("consistent");
    }

    #[test]
    fn prefix_cache_hit_skips_computed_tokens() {
        let mut e = Engine::simple(4, 64, 32, 4);
        let system: Vec<TokenId> = (100..110).collect(); // 10 tokens: 2 full blocks + 2
        let mut p1 = system.clone();
        p1.push(1);
        e.add(1, p1, 1);
        e.step(); // seq 1 computes its prompt and finishes

        let mut p2 = system.clone();
        p2.extend([2, 3]); // 12 tokens: 3 full blocks
        let mut p3 = p2.clone();
        p3.push(5); // 13 tokens
        e.add(2, p2.clone(), 2);
        e.add(3, p3.clone(), 1);
        let (b, _) = e.step();
        let s2 = &b.seqs[0];
        assert_eq!(s2.seq_id, 2);
        assert_eq!(s2.start_pos, 8, "two cached blocks skipped");
        assert_eq!(s2.token_ids, p2[8..].to_vec());
        assert_eq!(
            s2.new_seq.as_ref().map(|n| n.prompt_token_ids.clone()),
            Some(p2.clone())
        );
        // Seq 2's third block is being computed in this very step: not shareable yet.
        let s3 = &b.seqs[1];
        assert_eq!((s3.seq_id, s3.start_pos, s3.token_ids.len()), (3, 8, 5));
        let st = e.sched.stats();
        assert_eq!(
            (st.prefix_cache_queries, st.prefix_cache_hits),
            (11 + 12 + 13, 8 + 8)
        );

        // One step later it has been computed and reported.
        e.add(4, p3.clone(), 1);
        let (b, _) = e.step();
        let s4 = b.seqs.iter().find(|s| s.seq_id == 4).expect("scheduled");
        assert_eq!((s4.start_pos, s4.token_ids.clone()), (12, vec![5]));
        assert_eq!(
            s4.block_table[..2],
            e.bm.block_table(2).expect("seq 2 runs")[..2]
        );
        // The third block is the copy finished seq 3 computed (freed first in the request,
        // so its block won the index entry).
        assert!(e.bm.pool().block_hash(s4.block_table[2]).is_some());

        // A prompt made only of cached blocks still computes its last token (and so the
        // whole last block).
        e.add(5, p2.clone(), 1);
        let (b, _) = e.step();
        let s5 = b.seqs.iter().find(|s| s.seq_id == 5).expect("scheduled");
        assert_eq!((s5.start_pos, s5.token_ids.len()), (8, 4));
    }

    #[test]
    fn generated_tokens_become_cacheable() {
        let mut e = Engine::simple(4, 64, 32, 4);
        e.add(1, vec![1, 2, 3], 6);
        let mut out = Vec::new();
        while e.sched.has_unfinished() {
            let (_, outs) = e.step_with(|s| 50 + s.context_len as TokenId);
            out.extend(outs.iter().map(|o| o.token_id));
        }
        // A follow-up turn whose prompt is the previous prompt + answer reuses it.
        let mut turn2 = vec![1, 2, 3];
        turn2.extend(&out);
        turn2.push(9);
        e.add(2, turn2, 1);
        let (b, _) = e.step();
        // 3 + 6 tokens, of which the first 8 (2 blocks; the last token was never computed).
        assert_eq!(b.seqs[0].start_pos, 8);
    }

    #[test]
    fn batch_round_trips_through_messagepack() {
        let mut e = Engine::simple(4, 64, 16, 4);
        e.add(1, vec![1, 2, 3, 4, 5], 3);
        let b = e.sched.schedule(&mut e.bm).expect("schedule");
        let bytes = rmp_serde::to_vec_named(&b).expect("encode");
        let back: ScheduledBatch = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, b);
        let out = StepOutput {
            sampled: vec![SampledToken {
                seq_id: 1,
                token_id: 3,
            }],
        };
        let back: StepOutput =
            rmp_serde::from_slice(&rmp_serde::to_vec_named(&out).expect("encode")).expect("decode");
        assert_eq!(back, out);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Arrive {
            prompt: Vec<TokenId>,
            max_tokens: u32,
            min_tokens: u32,
            ignore_eos: bool,
        },
        Step {
            seed: u64,
        },
        Abort {
            i: usize,
        },
        StopString {
            i: usize,
        },
    }

    const PREFIXES: [[TokenId; 16]; 3] = [
        [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1],
        [3, 3, 2, 2, 1, 1, 3, 3, 2, 2, 1, 1, 3, 3, 2, 2],
        [1, 2, 3, 1, 2, 3, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3],
    ];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..3, 0usize..17, prop::collection::vec(1u32..4, 1..14), 1u32..16, 0u32..3, any::<bool>()).prop_map(
                |(pid, plen, tail, max_tokens, min_tokens, ignore_eos)| Op::Arrive {
                    // Shared "system prompts" so that prefixes repeat.
                    prompt: PREFIXES[pid][..plen].iter().copied().chain(tail).collect(),
                    max_tokens,
                    min_tokens: min_tokens.min(max_tokens),
                    ignore_eos,
                }
            ),
            5 => any::<u64>().prop_map(|seed| Op::Step { seed }),
            1 => any::<usize>().prop_map(|i| Op::Abort { i }),
            1 => any::<usize>().prop_map(|i| Op::StopString { i }),
        ]
    }

    /// A step with pseudo-random sampled tokens (EOS about one time in eight).
    fn random_step(e: &mut Engine, seed: u64) -> Result<Vec<SeqOutput>, TestCaseError> {
        let mut x = seed | 1;
        let (_, outs) = e.step_with(|s| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = (x.wrapping_add(s.seq_id) % 8) as TokenId;
            if t == 7 {
                5
            } else {
                t
            } // tokens 0 (EOS) ..= 6
        });
        for o in &outs {
            prop_assert!(o.num_output_tokens >= 1);
        }
        Ok(outs)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_traffic_finishes_and_frees_everything(
            max_num_seqs in 1usize..6,
            budget in 1usize..40,
            num_blocks in 6usize..16,
            block_size in 1usize..5,
            caching in any::<bool>(),
            ops in prop::collection::vec(op(), 1..120),
        ) {
            let cfg = SchedulerLimits { max_num_seqs, max_num_batched_tokens: budget, max_model_len: 48 };
            let mut e = Engine::new(cfg, num_blocks, block_size, caching);
            let mut next_id: SeqId = 0;
            let mut accepted = std::collections::BTreeSet::new();
            let mut ended = std::collections::BTreeSet::new();
            let mut live: Vec<SeqId> = Vec::new();
            for op in ops {
                match op {
                    Op::Arrive { prompt, max_tokens, min_tokens, ignore_eos } => {
                        next_id += 1;
                        let params = SamplingParams { max_tokens, min_tokens, ignore_eos, stop_token_ids: vec![6], ..SamplingParams::default() };
                        let fits = prompt.len() + max_tokens as usize <= (num_blocks * block_size).min(48);
                        match e.sched.add(next_id, prompt, params) {
                            Ok(()) => {
                                prop_assert!(fits);
                                accepted.insert(next_id);
                                live.push(next_id);
                            }
                            Err(_) => prop_assert!(!fits),
                        }
                    }
                    Op::Step { seed } => {
                        for o in random_step(&mut e, seed)? {
                            if o.finish_reason.is_some() {
                                prop_assert!(ended.insert(o.seq_id));
                                live.retain(|&id| id != o.seq_id);
                            }
                        }
                    }
                    Op::Abort { i } | Op::StopString { i } => {
                        if live.is_empty() { continue; }
                        let id = live.remove(i % live.len());
                        let reason = if matches!(op, Op::Abort { .. }) { FinishReason::Abort } else { FinishReason::Stop };
                        prop_assert!(e.sched.finish(id, reason));
                        prop_assert!(ended.insert(id));
                    }
                }
                e.bm.check_invariants().map_err(TestCaseError::fail)?;
                prop_assert_eq!(e.sched.num_running() + e.sched.num_waiting(), live.len());
            }
            let mut steps = 0u64;
            while e.sched.has_unfinished() {
                steps += 1;
                prop_assert!(steps < 5_000, "no progress");
                for o in random_step(&mut e, steps)? {
                    if o.finish_reason.is_some() {
                        prop_assert!(ended.insert(o.seq_id));
                    }
                }
                e.bm.check_invariants().map_err(TestCaseError::fail)?;
            }
            prop_assert_eq!(&accepted, &ended);
            e.drain_frees();
            prop_assert_eq!(e.bm.num_seqs(), 0);
            prop_assert_eq!(e.bm.num_free_blocks(), num_blocks);
            prop_assert!(!e.sched.has_work());
        }
    }
}

// --- actor ---------------------------------------------------------------------------------

mod actor {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
    use std::sync::Arc;
    use std::time::Instant;

    use actix::prelude::*;

    use super::{SchedulerError, SchedulerPolicy, SchedulerStats, SeqOutput};
    use crate::block_manager::BlockManagerActor;
    use crate::detokenizer::{FirstScheduled, StepTokens, StreamEnd};
    use crate::executor::{ExecutorActor, RunBatch};
    use crate::messages::{now_us, FinishReason, SamplingParams, SeqId, TokenId};
    use crate::metrics::{SchedulerMetrics, StepSample};
    use crate::protocol::{ErrorBody, ErrorCode};

    /// Tokenizer → scheduler: queue a new sequence.
    #[derive(Debug, Message)]
    #[rtype(result = "Result<(), SchedulerError>")]
    pub struct AddSequence {
        pub seq_id: SeqId,
        pub prompt: Vec<TokenId>,
        pub params: SamplingParams,
    }

    /// Detokenizer (stop string) or client (cancel) → scheduler: end a sequence.
    #[derive(Debug, Message)]
    #[rtype(result = "()")]
    pub struct FinishSequence {
        pub seq_id: SeqId,
        pub reason: FinishReason,
    }

    /// Snapshot of the queues.
    #[derive(Debug, Message)]
    #[rtype(result = "SchedulerStats")]
    pub struct GetSchedulerStats;

    /// The scheduler actor: owns the [`SchedulerPolicy`] and drives the engine loop —
    /// plan → one message to the block manager → commit → one message to the executor →
    /// update → one message to the detokenizer. One step is in flight at a time; messages
    /// that arrive meanwhile (new sequences, cancels) are folded into the next step.
    pub struct SchedulerActor {
        policy: SchedulerPolicy,
        block_manager: Addr<BlockManagerActor>,
        executor: Addr<ExecutorActor>,
        detokenizer: Recipient<StepTokens>,
        stream_end: Recipient<StreamEnd>,
        in_flight: bool,
        /// Sequences that ended since the last batch: the executor drops their state.
        released: Vec<SeqId>,
        /// Sequences not yet scheduled, with their arrival time (for queue time).
        queued_at: HashMap<SeqId, u64>,
        /// Prometheus series (none in tests and `pagoda generate`).
        metrics: Option<SchedulerMetrics>,
        /// Bound on the waiting queue (`scheduler.max_waiting`); 0 = none.
        max_waiting: usize,
        /// The waiting queue's length, published for the tokenizer's early refusal.
        waiting_gauge: Arc<AtomicUsize>,
        /// When the step in flight was planned.
        step_started: Option<Instant>,
    }

    impl SchedulerActor {
        pub fn new(
            policy: SchedulerPolicy,
            block_manager: Addr<BlockManagerActor>,
            executor: Addr<ExecutorActor>,
            detokenizer: Recipient<StepTokens>,
            stream_end: Recipient<StreamEnd>,
        ) -> Self {
            Self {
                policy,
                block_manager,
                executor,
                detokenizer,
                stream_end,
                in_flight: false,
                released: Vec::new(),
                queued_at: HashMap::new(),
                max_waiting: 0,
                waiting_gauge: Arc::new(AtomicUsize::new(0)),
                metrics: None,
                step_started: None,
            }
        }

        /// Records the engine's per-step series into `metrics`.
        pub fn with_metrics(mut self, metrics: SchedulerMetrics) -> Self {
            self.metrics = Some(metrics);
            self
        }

        /// Answer `Overloaded` to new sequences while `max_waiting` are already waiting.
        pub fn with_max_waiting(mut self, max_waiting: usize) -> Self {
            self.max_waiting = max_waiting;
            self
        }

        /// The length of the waiting queue, kept current after every change, so that the
        /// tokenizer can refuse a request before spending time on encoding it.
        pub fn waiting_gauge(&self) -> Arc<AtomicUsize> {
            self.waiting_gauge.clone()
        }

        fn record_stats(&self) {
            self.waiting_gauge
                .store(self.policy.num_waiting(), AtomicOrdering::Relaxed);
            if let Some(m) = &self.metrics {
                m.record_stats(&self.policy.stats());
            }
        }

        /// Starts a step unless one is running or there is nothing to do.
        fn kick(&mut self, ctx: &mut Context<Self>) {
            if self.in_flight || !self.policy.has_work() {
                return;
            }
            let req = match self.policy.plan() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "planning a step failed");
                    return;
                }
            };
            self.in_flight = true;
            self.step_started = Some(Instant::now());
            self.block_manager
                .send(req)
                .into_actor(self)
                .map(|res, act, ctx| act.on_blocks(res, ctx))
                .spawn(ctx);
        }

        fn on_blocks(
            &mut self,
            res: Result<
                Result<super::StepResponse, crate::block_manager::BlockError>,
                MailboxError,
            >,
            ctx: &mut Context<Self>,
        ) {
            let resp = match res {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => return self.fail_step(format!("block manager: {e}"), ctx),
                Err(e) => return self.fail_step(format!("block manager unreachable: {e}"), ctx),
            };
            let cached: HashMap<SeqId, usize> = resp
                .admitted
                .iter()
                .map(|a| (a.seq_id, a.num_cached_tokens))
                .collect();
            let batch = match self.policy.commit(resp) {
                Ok(b) => b,
                Err(e) => return self.fail_step(format!("commit: {e}"), ctx),
            };
            if batch.is_empty() {
                self.in_flight = false;
                self.record_stats();
                // Nothing runnable (e.g. only frees were sent): don't spin on waiting
                // sequences that cannot be admitted until something else changes.
                if self.policy.num_running() > 0 {
                    self.kick(ctx);
                }
                return;
            }
            let now = now_us();
            let mut first_scheduled = Vec::new();
            for s in &batch.seqs {
                if let Some(t) = self.queued_at.remove(&s.seq_id) {
                    first_scheduled.push(FirstScheduled {
                        seq_id: s.seq_id,
                        scheduled_us: now,
                        queue_us: now.saturating_sub(t),
                        cached_tokens: cached.get(&s.seq_id).copied().unwrap_or(0),
                    });
                }
            }
            let released = std::mem::take(&mut self.released);
            let seq_ids: Vec<SeqId> = batch.seqs.iter().map(|s| s.seq_id).collect();
            let num_tokens = batch.num_batched_tokens;
            self.executor
                .send(RunBatch { batch, released })
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.on_executed(res, seq_ids, num_tokens, first_scheduled, ctx)
                })
                .spawn(ctx);
        }

        fn on_executed(
            &mut self,
            res: Result<Result<super::StepOutput, String>, MailboxError>,
            seq_ids: Vec<SeqId>,
            num_tokens: usize,
            first_scheduled: Vec<FirstScheduled>,
            ctx: &mut Context<Self>,
        ) {
            self.in_flight = false;
            if let (Some(m), Some(t0)) = (&self.metrics, self.step_started.take()) {
                m.record_step(StepSample {
                    num_seqs: seq_ids.len(),
                    num_tokens,
                    duration_s: t0.elapsed().as_secs_f64(),
                });
            }
            let out = match res {
                Ok(Ok(out)) => out,
                Ok(Err(e)) => return self.fail_batch(e, seq_ids, ctx),
                Err(e) => {
                    return self.fail_batch(format!("executor unreachable: {e}"), seq_ids, ctx)
                }
            };
            let outputs: Vec<SeqOutput> = match self.policy.update(&out) {
                Ok(o) => o,
                Err(e) => return self.fail_batch(format!("update: {e}"), seq_ids, ctx),
            };
            for o in &outputs {
                if o.finish_reason.is_some() {
                    self.released.push(o.seq_id);
                }
            }
            self.record_stats();
            let _ = self.detokenizer.try_send(StepTokens {
                outputs,
                first_scheduled,
            });
            self.kick(ctx);
        }

        /// The block manager round trip failed: nothing ran; try again on the next message.
        fn fail_step(&mut self, error: String, _ctx: &mut Context<Self>) {
            tracing::error!(%error, "engine step failed");
            self.policy.cancel_step();
            self.in_flight = false;
        }

        /// The executor failed on a batch: its sequences end with an error, the engine goes on.
        fn fail_batch(&mut self, error: String, seq_ids: Vec<SeqId>, ctx: &mut Context<Self>) {
            tracing::error!(%error, sequences = seq_ids.len(), "batch failed; aborting its sequences");
            self.policy.cancel_step();
            for id in seq_ids {
                if self.policy.abort(id) {
                    self.released.push(id);
                    let _ = self.stream_end.try_send(StreamEnd {
                        seq_id: id,
                        reason: FinishReason::Abort,
                        error: Some(ErrorBody::new(ErrorCode::Internal, error.clone())),
                    });
                }
            }
            self.kick(ctx);
        }
    }

    impl Actor for SchedulerActor {
        type Context = Context<Self>;
    }

    impl Handler<AddSequence> for SchedulerActor {
        type Result = Result<(), SchedulerError>;
        fn handle(&mut self, msg: AddSequence, ctx: &mut Context<Self>) -> Self::Result {
            let waiting = self.policy.num_waiting();
            if self.max_waiting > 0 && waiting >= self.max_waiting {
                return Err(SchedulerError::Overloaded {
                    waiting,
                    max_waiting: self.max_waiting,
                });
            }
            self.policy.add(msg.seq_id, msg.prompt, msg.params)?;
            self.queued_at.insert(msg.seq_id, now_us());
            self.kick(ctx);
            self.record_stats();
            Ok(())
        }
    }

    impl Handler<FinishSequence> for SchedulerActor {
        type Result = ();
        fn handle(&mut self, msg: FinishSequence, ctx: &mut Context<Self>) {
            if self.policy.finish(msg.seq_id, msg.reason) {
                self.released.push(msg.seq_id);
                self.queued_at.remove(&msg.seq_id);
                if msg.reason == FinishReason::Abort {
                    let _ = self.stream_end.try_send(StreamEnd {
                        seq_id: msg.seq_id,
                        reason: FinishReason::Abort,
                        error: None,
                    });
                }
            }
            self.kick(ctx);
            self.record_stats();
        }
    }

    impl Handler<GetSchedulerStats> for SchedulerActor {
        type Result = MessageResult<GetSchedulerStats>;
        fn handle(&mut self, _: GetSchedulerStats, _: &mut Context<Self>) -> Self::Result {
            MessageResult(self.policy.stats())
        }
    }
}

pub use actor::{AddSequence, FinishSequence, GetSchedulerStats, SchedulerActor};
