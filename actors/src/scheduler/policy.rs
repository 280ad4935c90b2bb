//! The scheduling policy (see the module docs of [`crate::scheduler`]).

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::block_manager::BlockManager;
use crate::messages::blocks::{extend_block_hashes, RELEASED_BLOCK};
use crate::messages::{
    AdmitRequest, BlockError, BlockHash, BlockId, BlockManagerConfig, BlockStats, ErrorBody,
    ErrorCode, FinishReason, ForkRequest, FreeRequest, GrowRequest, NewSeqData, SampledToken,
    SamplingParams, ScheduledBatch, ScheduledSeq, SchedulerStats, SeqId, SeqOutput, SpecCounts,
    StepOutput, StepRequest, StepResponse, TokenId,
};

use super::speculation::Speculation;
use crate::guide::is_guided;

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

impl SchedulerError {
    /// The typed error a client gets when its sequence is refused for this reason.
    pub fn to_error_body(&self) -> ErrorBody {
        let code = match self {
            SchedulerError::ExceedsModelLen { .. } | SchedulerError::ExceedsKvCapacity { .. } => {
                ErrorCode::PromptTooLong
            }
            SchedulerError::EmptyPrompt(_) | SchedulerError::InvalidParams { .. } => {
                ErrorCode::InvalidRequest
            }
            SchedulerError::Overloaded { .. } => ErrorCode::Overloaded,
            _ => ErrorCode::Internal,
        };
        ErrorBody::new(code, self.to_string())
    }
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
    /// Completions of the same request waiting for this sequence's prompt: they are
    /// forked from it (sharing its KV blocks) once the prompt is computed.
    forks: Vec<SeqId>,
    /// Set on such a completion until it is forked: the sequence it waits for.
    held_by: Option<SeqId>,
    /// A forked completion not yet scheduled: its first step carries `new_seq`.
    fresh: bool,
    /// Draft tokens proposed for the step being planned or run (speculative decoding).
    draft: Vec<TokenId>,
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
    fork: Vec<ForkRequest>,
    grow: Vec<PlannedGrow>,
    admit: Vec<SeqId>,
    freed: Vec<FreeRequest>,
}

#[derive(Debug, Clone)]
struct Exec {
    seq_id: SeqId,
    /// Tokens run, drafts included.
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
    /// Forks decided by the last update, sent with the next plan.
    ready_forks: Vec<ForkRequest>,
    phase: Phase,
    step: u64,
    num_preemptions: u64,
    block_stats: BlockStats,
    /// Speculative decoding, when configured.
    speculation: Option<Speculation>,
    spec_counts: SpecCounts,
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
            ready_forks: Vec::new(),
            phase: Phase::Idle,
            step: 0,
            num_preemptions: 0,
            speculation: None,
            spec_counts: SpecCounts::default(),
        })
    }

    /// Speculates for sequences in decode (see [`super::speculation`]).
    pub fn with_speculation(mut self, speculation: Speculation) -> Self {
        self.speculation = Some(speculation);
        self
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
        self.add_forked(seq_id, prompt_token_ids, params, Vec::new())
    }

    /// [`Self::add`] for a request with `n` > 1: `forks` are the sequences of completions
    /// 1..n. They wait for `seq_id`'s prompt to be computed, then start from its KV blocks
    /// (shared, copied on write) with the parameters of their index
    /// ([`SamplingParams::for_index`]). If `seq_id` ends before that, the first of them takes
    /// its place in the queue.
    pub fn add_forked(
        &mut self,
        seq_id: SeqId,
        prompt_token_ids: Vec<TokenId>,
        params: SamplingParams,
        forks: Vec<SeqId>,
    ) -> Result<(), SchedulerError> {
        let mut ids = HashSet::with_capacity(1 + forks.len());
        for &id in std::iter::once(&seq_id).chain(&forks) {
            if self.seqs.contains_key(&id) || !ids.insert(id) {
                return Err(SchedulerError::DuplicateSequence(id));
            }
        }
        if 1 + forks.len() > self.config.max_num_seqs {
            return Err(SchedulerError::InvalidParams {
                seq_id,
                reason: format!(
                    "n ({}) exceeds this engine's max_num_seqs ({})",
                    1 + forks.len(),
                    self.config.max_num_seqs
                ),
            });
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
        // With a sliding window a sequence holds blocks only for its window and a step.
        let held = self
            .cache
            .tokens_held(total, self.config.max_num_batched_tokens);
        if total > self.config.max_model_len {
            return Err(SchedulerError::ExceedsModelLen {
                seq_id,
                prompt_len,
                max_tokens,
                max_model_len: self.config.max_model_len,
            });
        }
        if held > self.cache.capacity_tokens() {
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
        let sequence = |params: SamplingParams, held_by: Option<SeqId>| Sequence {
            tokens: prompt_token_ids.clone(),
            prompt_len,
            num_computed: 0,
            params,
            status: SeqStatus::Waiting,
            block_table: Vec::new(),
            block_hashes: block_hashes.clone(),
            hashes_reported: 0,
            num_preemptions: 0,
            forks: Vec::new(),
            held_by,
            fresh: false,
            draft: Vec::new(),
        };
        for (i, &child) in forks.iter().enumerate() {
            let params = params.for_index(i as u32 + 1);
            self.seqs.insert(child, sequence(params, Some(seq_id)));
        }
        let mut parent = sequence(params, None);
        parent.forks = forks;
        self.seqs.insert(seq_id, parent);
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
        // Speculation pays while the batch is small.
        let speculation = self
            .speculation
            .as_ref()
            .filter(|sp| self.running.len() <= sp.max_num_seqs);
        for &seq_id in &self.running {
            let Some(s) = self.seqs.get_mut(&seq_id) else {
                continue;
            };
            let remaining = s.tokens.len().saturating_sub(s.num_computed);
            let mut n = remaining.min(budget);
            s.draft.clear();
            if let (Some(sp), 1, 1) = (speculation, remaining, n) {
                // Not for structured output: its masks follow the sampled tokens one by one.
                if s.params.speculate && s.params.logprobs.is_none() && !is_guided(&s.params) {
                    // Room: the budget, and drafts plus the token after them must fit in
                    // max_tokens and max_model_len.
                    let room = sp
                        .num_tokens
                        .min(budget - 1)
                        .min((s.params.max_tokens as usize).saturating_sub(s.num_output() + 1))
                        .min(self.config.max_model_len.saturating_sub(s.tokens.len() + 1));
                    if room > 0 {
                        sp.drafts.propose(&s.tokens, room, &mut s.draft);
                        n += s.draft.len();
                    }
                }
            }
            budget -= n;
            let (computed_hashes, hashes_upto) = s.unreported_hashes(bs);
            // The step's first query sits at `num_computed`; a sliding window never looks
            // further back than that query's window.
            let keep_from = match self.cache.sliding_window {
                Some(w) => (s.num_computed + 1).saturating_sub(w),
                None => 0,
            };
            grow.push(GrowRequest {
                seq_id,
                num_tokens: s.num_computed + n,
                computed_hashes,
                keep_from,
                write_from: s.num_computed,
            });
            planned_grow.push(PlannedGrow {
                seq_id,
                num_new_tokens: n,
                hashes_upto,
            });
        }

        let mut admit = Vec::new();
        let mut planned_admit = Vec::new();
        // Running sequences' completions still to be forked hold their seats.
        let reserved: usize = self
            .running
            .iter()
            .filter_map(|id| self.seqs.get(id))
            .map(|s| s.forks.len())
            .sum();
        let mut seats = self
            .config
            .max_num_seqs
            .saturating_sub(self.running.len() + reserved);
        for &seq_id in &self.waiting {
            if budget == 0 || seats == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&seq_id) else {
                continue;
            };
            // A request with n > 1 takes its completions' seats too.
            if seats < 1 + s.forks.len() {
                break;
            }
            let n = s.tokens.len().min(budget);
            budget -= n;
            seats -= 1 + s.forks.len();
            // Prompt log-probabilities need every prompt position computed: no prefix
            // cache lookup for a sequence that still owes them.
            let wants_whole_prompt = s.params.prompt_logprobs.is_some() && s.num_output() == 0;
            admit.push(AdmitRequest {
                seq_id,
                num_tokens: s.tokens.len(),
                num_new_tokens: n,
                block_hashes: if wants_whole_prompt {
                    Vec::new()
                } else {
                    s.block_hashes.clone()
                },
            });
            planned_admit.push(seq_id);
        }

        let free = std::mem::take(&mut self.pending_free);
        let fork = std::mem::take(&mut self.ready_forks);
        self.phase = Phase::Planned(Plan {
            fork: fork.clone(),
            grow: planned_grow,
            admit: planned_admit,
            freed: free.clone(),
        });
        Ok(StepRequest {
            fork,
            free,
            grow,
            admit,
        })
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
                s.draft.clear();
                s.status = SeqStatus::Waiting;
                s.num_computed = 0;
                s.block_table.clear();
                s.hashes_reported = 0;
                s.num_preemptions += 1;
                self.waiting.push_front(seq_id);
            }
        }

        let mut new_blocks: HashMap<SeqId, _> = resp
            .grown
            .into_iter()
            .map(|g| (g.seq_id, (g.new_blocks, g.released, g.copied, g.trimmed)))
            .collect();
        let mut scheduled = Vec::new();
        let mut exec = Vec::new();
        let mut block_copies = Vec::new();
        for pg in &plan.grow {
            let Some((blocks, released, copied, trimmed)) = new_blocks.remove(&pg.seq_id) else {
                continue;
            };
            // A sequence missing here finished or was aborted meanwhile; its free is
            // already pending.
            let Some(s) = self.seqs.get_mut(&pg.seq_id) else {
                continue;
            };
            let len = s.block_table.len().saturating_sub(trimmed);
            s.block_table.truncate(len);
            for c in copied {
                if let Some(entry) = s.block_table.get_mut(c.index) {
                    *entry = c.dst;
                    block_copies.push((c.src, c.dst));
                }
            }
            s.block_table.extend(blocks);
            // Entries the block manager gave back (before the sliding window).
            let released = released.min(s.block_table.len());
            s.block_table[..released].fill(RELEASED_BLOCK);
            s.hashes_reported = s.hashes_reported.max(pg.hashes_upto);
            if pg.num_new_tokens > 0 {
                let fresh = std::mem::take(&mut s.fresh);
                scheduled.push(scheduled_seq(pg.seq_id, s, pg.num_new_tokens, fresh));
                exec.push(Exec {
                    seq_id: pg.seq_id,
                    num_tokens: pg.num_new_tokens,
                    sample: s.num_computed + pg.num_new_tokens == s.tokens.len() + s.draft.len(),
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
            block_copies,
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
                let mut forks = plan.fork;
                forks.append(&mut self.ready_forks);
                self.ready_forks = forks;
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
        let sampled: HashMap<SeqId, &SampledToken> =
            output.sampled.iter().map(|t| (t.seq_id, t)).collect();
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
            let draft = std::mem::take(&mut s.draft);
            if !e.sample {
                s.num_computed += e.num_tokens;
                continue;
            }
            let Some(&sampled) = sampled.get(&e.seq_id) else {
                s.num_computed += e.num_tokens - draft.len();
                continue;
            };
            // Drafts kept: those the executor sampled too (a prefix of the proposal). Their
            // K/V is valid; the rejected ones' slots are written over by the next step.
            let kept = match &self.speculation {
                Some(sp) => sp.drafts.kept(&draft, &sampled.accepted),
                None => 0,
            };
            s.num_computed += e.num_tokens - draft.len() + kept;
            if !draft.is_empty() {
                self.spec_counts.drafts += 1;
                self.spec_counts.draft_tokens += draft.len() as u64;
                self.spec_counts.accepted_tokens += kept as u64;
            }
            // Its prompt is computed: the completions waiting for it start now, before its
            // own token can end it.
            let forks = std::mem::take(&mut s.forks);
            let fork_from = (!forks.is_empty()).then(|| (s.prompt_len, s.block_table.clone()));
            // The kept drafts, then the sampled token; each may end the sequence.
            let new_tokens = sampled.accepted[..kept]
                .iter()
                .copied()
                .chain(std::iter::once(sampled.token_id));
            let last = kept;
            let mut finish_reason = None;
            for (i, token_id) in new_tokens.enumerate() {
                s.tokens.push(token_id);
                if self.cache.enable_prefix_caching {
                    extend_block_hashes(&mut s.block_hashes, &s.tokens, self.cache.block_size);
                }
                finish_reason = check_finish(s, &self.eos_token_ids, self.config.max_model_len);
                let is_last = i == last || finish_reason.is_some();
                outputs.push(SeqOutput {
                    seq_id: e.seq_id,
                    token_id,
                    num_output_tokens: s.num_output(),
                    finish_reason,
                    logprobs: if is_last {
                        sampled.logprobs.clone()
                    } else {
                        None
                    },
                    prompt_logprobs: if i == 0 {
                        sampled.prompt_logprobs.clone()
                    } else {
                        None
                    },
                });
                if finish_reason.is_some() {
                    break;
                }
            }
            if let Some((prompt_len, table)) = fork_from {
                self.start_forks(e.seq_id, prompt_len, &table, forks);
            }
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

    /// Completions (of requests with `n` > 1) waiting for their first sibling's prompt.
    pub fn num_held(&self) -> usize {
        self.seqs.values().filter(|s| s.held_by.is_some()).count()
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
            spec: self.spec_counts,
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

    /// Starts the completions `forks` of `parent`, whose `prompt_len` prompt tokens are
    /// computed in the blocks of `table`: each shares those blocks and computes the last
    /// prompt token again (into a private copy of its block) to sample its own first token.
    fn start_forks(
        &mut self,
        parent: SeqId,
        prompt_len: usize,
        table: &[BlockId],
        forks: Vec<SeqId>,
    ) {
        let shared = &table[..self.cache.blocks_for(prompt_len).min(table.len())];
        for child in forks {
            let Some(c) = self.seqs.get_mut(&child) else {
                continue;
            };
            c.held_by = None;
            c.status = SeqStatus::Running;
            c.num_computed = prompt_len - 1;
            c.block_table = shared.to_vec();
            c.hashes_reported = 0;
            c.fresh = true;
            self.running.push(child);
            self.ready_forks.push(ForkRequest {
                parent,
                child,
                num_tokens: prompt_len,
            });
        }
    }

    /// Removes a live sequence from the queues and, if it holds blocks, queues their
    /// release (with the hashes of its computed full blocks, so they stay reusable).
    fn retire(&mut self, seq_id: SeqId) -> bool {
        let Some(mut s) = self.seqs.remove(&seq_id) else {
            return false;
        };
        if let Some(parent) = s.held_by {
            // A completion still waiting for its parent's prompt: it holds nothing.
            if let Some(p) = self.seqs.get_mut(&parent) {
                p.forks.retain(|&id| id != seq_id);
            }
            return true;
        }
        if !s.forks.is_empty() {
            // Its completions were waiting for its prompt: the first takes its place.
            let heir = s.forks.remove(0);
            let rest = std::mem::take(&mut s.forks);
            for &id in &rest {
                if let Some(c) = self.seqs.get_mut(&id) {
                    c.held_by = Some(heir);
                }
            }
            if let Some(h) = self.seqs.get_mut(&heir) {
                h.held_by = None;
                h.forks = rest;
                match self.waiting.iter().position(|&id| id == seq_id) {
                    Some(at) => self.waiting.insert(at, heir),
                    None => self.waiting.push_front(heir),
                }
            }
        }
        let unsent_fork = self.ready_forks.iter().position(|f| f.child == seq_id);
        if let Some(at) = unsent_fork {
            // Forked by the last update, not yet told to the block manager: no blocks.
            self.ready_forks.remove(at);
            self.running.retain(|&id| id != seq_id);
            return true;
        }
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
    let sample = end == s.tokens.len();
    let num_draft = if sample { s.draft.len() } else { 0 };
    let mut token_ids = s.tokens[start..end].to_vec();
    token_ids.extend_from_slice(&s.draft[..num_draft]);
    ScheduledSeq {
        seq_id,
        context_len: start + token_ids.len(),
        token_ids,
        start_pos: start,
        block_table: s.block_table.clone(),
        num_draft,
        sample,
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
#[path = "policy_tests.rs"]
mod tests;
