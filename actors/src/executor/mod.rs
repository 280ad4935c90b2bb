//! The executor: owns the compute backend, the model on it, the KV pool and the
//! per-sequence samplers, and runs one engine step (forward + sampling for the whole
//! batch). It is compute-heavy, so its actor lives on an `Arbiter` (thread) of its own,
//! never on the async reactor.

pub mod backend;
mod draft;
pub mod linear;
pub mod logprobs;
pub mod models;
pub mod sampler;
pub mod weights;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use actix::{Actor, Context, Handler};
use pagoda_kernels::attention::AttnSeq;

use crate::config::{EngineConfig, KvCacheDtype};
use crate::fault;
use crate::guide::{Guide, Guides, Mask};
use crate::messages::{
    ErrorBody, ErrorCode, NewSeqData, RunBatch, SampledToken, SamplingParams, ScheduledSeq,
    SeqFailure, SeqId, StepOutput, TokenId, TokenLogprobs,
};
use crate::supervisor::LifeGuard;
use backend::{Backend, ForwardError};
use models::{BatchInput, CausalLm, Family, ModelSpec};
use sampler::{Sampler, SamplingError};
use weights::{LoadError, WeightSource};

/// Opens a model path — a GGUF file, or a Hugging Face directory with `config.json` —
/// and finds its family; no weight is read yet.
pub fn open_model(path: &Path) -> Result<(WeightSource, &'static Family, ModelSpec), LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    let src = if path.is_dir() {
        WeightSource::open_safetensors(path)?
    } else {
        WeightSource::open_gguf(path)?
    };
    let family = models::family_of(&src)?;
    let spec = (family.spec)(&src)?;
    Ok((src, family, spec))
}

/// How many KV blocks the configuration asks for, for these models (the target, and a
/// draft model whose pool has as many blocks: a block's bytes are both models').
pub fn num_kv_blocks(cfg: &EngineConfig, models: &[&ModelSpec], dtype: KvCacheDtype) -> usize {
    if cfg.cache.num_blocks > 0 {
        return cfg.cache.num_blocks;
    }
    let per_block: usize = models
        .iter()
        .map(|m| backend::kv_bytes_per_block(m.kv, cfg.cache.block_size, dtype))
        .sum();
    ((cfg.cache.kv_cache_bytes as usize) / per_block.max(1)).max(1)
}

struct SeqState {
    params: SamplingParams,
    num_output: usize,
    sampler: Sampler,
    /// Set while a sequence that asked for `prompt_logprobs` computes its prompt.
    prompt_logprobs: Option<PromptLogprobs>,
    /// Structured output: where the sequence stands in its grammar.
    guide: Option<Guide>,
}

/// The prompt log-probabilities of a sequence in its prefill, gathered chunk by chunk and
/// handed on with its first token.
struct PromptLogprobs {
    k: usize,
    prompt: Vec<TokenId>,
    /// One entry per prompt position computed so far (the first token's is `None`).
    entries: Vec<Option<TokenLogprobs>>,
}

impl PromptLogprobs {
    /// For a sequence (re)starting its prompt; `None` when it did not ask, or when it
    /// already produced tokens (its prompt log-probabilities went out with the first).
    fn start(new: &NewSeqData) -> Option<Self> {
        let k = new.params.prompt_logprobs?;
        new.output_token_ids.is_empty().then(|| Self {
            k: k as usize,
            prompt: new.prompt_token_ids.clone(),
            entries: vec![None],
        })
    }

    /// The position the next computed token must have.
    fn next_pos(&self) -> usize {
        self.entries.len() - 1
    }
}

/// What a row of logits is for.
#[derive(Debug, Clone, Copy)]
enum RowUse {
    /// The log-probabilities of prompt token `pos + 1`.
    Prompt { seq_id: SeqId, pos: usize },
    /// Sampling the sequence's next token; with speculation, `draft` is the proposed
    /// token at this position (kept if the sampled one equals it), `None` on the last row.
    Sample {
        seq_id: SeqId,
        draft: Option<TokenId>,
        /// Which draft (the row's index among the sequence's sampling rows).
        index: usize,
    },
}

/// A model on its backend, with the KV pool it runs on: the executor's view, whatever the
/// backend.
trait Device: Send {
    fn spec(&self) -> &ModelSpec;
    fn num_blocks(&self) -> usize;
    fn forward(&mut self, input: &BatchInput<'_>) -> Result<Vec<f32>, ForwardError>;
    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<(), ForwardError>;
}

struct OnBackend<B: Backend> {
    backend: B,
    model: Box<dyn CausalLm<B>>,
    kv: B::Kv,
}

impl<B: Backend> Device for OnBackend<B> {
    fn spec(&self) -> &ModelSpec {
        self.model.spec()
    }

    fn num_blocks(&self) -> usize {
        self.backend.kv_blocks(&self.kv)
    }

    fn forward(&mut self, input: &BatchInput<'_>) -> Result<Vec<f32>, ForwardError> {
        self.model.forward(&self.backend, input, &mut self.kv)
    }

    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<(), ForwardError> {
        self.backend.kv_copy_blocks(&mut self.kv, pairs)
    }
}

/// Model + KV pool + samplers. Plain struct: the actor below only forwards messages to it.
pub struct Executor {
    device: Box<dyn Device>,
    block_size: usize,
    seqs: HashMap<SeqId, SeqState>,
    /// Tokens that end a sequence, suppressed while it has fewer than `min_tokens` outputs.
    eos_ids: Vec<TokenId>,
    /// Compiles guided requests' grammars (or says why this model cannot have them).
    guides: Guides,
    /// Speculative decoding with a draft model: fills the draft positions the scheduler
    /// reserved.
    draft: Option<draft::DraftModel>,
}

impl Executor {
    /// Allocates the KV pool on `backend` in the model's block shape.
    pub fn new<B: Backend>(
        backend: B,
        model: Box<dyn CausalLm<B>>,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: KvCacheDtype,
        eos_ids: Vec<TokenId>,
    ) -> Result<Self, ForwardError> {
        let layout = model.spec().kv;
        let kv = backend.kv_pool(layout, num_blocks, block_size, kv_dtype)?;
        tracing::info!(
            backend = backend.name(),
            num_blocks,
            block_size,
            dtype = kv_dtype.name(),
            kv_mib = (backend::kv_bytes_per_block(layout, block_size, kv_dtype) * num_blocks)
                as f64
                / (1024.0 * 1024.0),
            "KV pool allocated"
        );
        Ok(Self {
            device: Box::new(OnBackend { backend, model, kv }),
            block_size,
            seqs: HashMap::new(),
            eos_ids,
            guides: Guides::unavailable("no vocabulary was given to the executor"),
            draft: None,
        })
    }

    /// Speculative decoding with a draft model (same tokenizer as the target): its KV pool
    /// has the target's block count and block size and is addressed by the same block
    /// tables (see [`draft`]).
    pub fn with_draft<B: Backend>(
        mut self,
        backend: B,
        model: Box<dyn CausalLm<B>>,
        kv_dtype: KvCacheDtype,
    ) -> Result<Self, ForwardError> {
        let target = self.device.spec();
        if model.spec().vocab_size != target.vocab_size {
            return Err(ForwardError::Shape(format!(
                "the draft model's vocabulary ({}) differs from the target's ({})",
                model.spec().vocab_size,
                target.vocab_size
            )));
        }
        let num_blocks = self.device.num_blocks();
        let layout = model.spec().kv;
        let kv = backend.kv_pool(layout, num_blocks, self.block_size, kv_dtype)?;
        tracing::info!(
            architecture = %model.spec().architecture,
            num_blocks,
            kv_mib = (backend::kv_bytes_per_block(layout, self.block_size, kv_dtype)
                * num_blocks) as f64
                / (1024.0 * 1024.0),
            "draft model's KV pool allocated"
        );
        self.draft = Some(draft::DraftModel::new(
            Box::new(OnBackend { backend, model, kv }),
            self.block_size,
        ));
        Ok(self)
    }

    /// Enables structured output: `guides` compiles the requests' grammars (or says why
    /// this model cannot have them).
    pub fn with_guides(mut self, guides: Guides) -> Self {
        self.guides = guides;
        self
    }

    /// A new sequence's guide, following the tokens it already produced.
    fn new_guide(&self, new: &NewSeqData) -> Result<Option<Guide>, ErrorBody> {
        let invalid = |m: String| ErrorBody::new(ErrorCode::InvalidRequest, m);
        let Some(mut guide) = self
            .guides
            .guide(&new.params)
            .map_err(|e| invalid(e.to_string()))?
        else {
            return Ok(None);
        };
        for &t in &new.output_token_ids {
            guide
                .advance(t)
                .map_err(|e| invalid(format!("guided decoding: {e}")))?;
        }
        Ok(Some(guide))
    }

    pub fn model_spec(&self) -> &ModelSpec {
        self.device.spec()
    }

    /// Runs one step: forward for every scheduled token, then one sampled token for each
    /// sequence whose run reached its end.
    pub fn execute(&mut self, msg: RunBatch) -> Result<StepOutput, String> {
        let RunBatch { batch, released } = msg;
        for id in &released {
            self.seqs.remove(id);
            if let Some(d) = self.draft.as_mut() {
                d.forget(*id);
            }
        }
        if let Some(id) = fault::forward_error(batch.seqs.iter().map(|s| s.seq_id)) {
            return Err(format!(
                "injected fault: the forward pass of a step with sequence {id} failed"
            ));
        }
        // Before any of the step's writes: shared blocks it writes get their copies.
        if !batch.block_copies.is_empty() {
            self.device
                .copy_blocks(&batch.block_copies)
                .map_err(|e| format!("copying KV blocks: {e}"))?;
            // The draft's pool follows the same tables: its copy is what the draft
            // computed there.
            if let Some(d) = self.draft.as_mut() {
                d.device
                    .copy_blocks(&batch.block_copies)
                    .map_err(|e| format!("copying the draft model's KV blocks: {e}"))?;
            }
        }
        let vocab = self.device.spec().vocab_size;
        let mut failed = Vec::new();
        for s in &batch.seqs {
            if let Some(new) = &s.new_seq {
                if let Some(d) = self.draft.as_mut() {
                    d.start(s.seq_id, new);
                }
                if !self.seqs.contains_key(&s.seq_id) {
                    match self.new_guide(new) {
                        Ok(guide) => {
                            let mut sampler =
                                Sampler::new(&new.params, vocab, &new.prompt_token_ids);
                            for &t in &new.output_token_ids {
                                sampler.record(t);
                            }
                            self.seqs.insert(
                                s.seq_id,
                                SeqState {
                                    params: new.params.clone(),
                                    num_output: new.output_token_ids.len(),
                                    sampler,
                                    prompt_logprobs: PromptLogprobs::start(new),
                                    guide,
                                },
                            );
                        }
                        Err(error) => failed.push(SeqFailure {
                            seq_id: s.seq_id,
                            error,
                        }),
                    }
                    continue;
                }
                // A preempted sequence keeps its sampler (its RNG state is part of it)
                // and its guide (the same tokens come back); its prompt is computed again
                // from the start.
                if let Some(st) = self.seqs.get_mut(&s.seq_id) {
                    st.prompt_logprobs = PromptLogprobs::start(new);
                }
            }
        }
        let mut out = self.run(&batch.seqs, &failed).map_err(|e| e.to_string())?;
        out.failed.extend(failed);
        if let Some(d) = self.draft.as_mut() {
            for t in &out.sampled {
                d.tokens.accepted(t.seq_id, &t.accepted);
            }
        }
        Ok(out)
    }

    /// The forward pass and sampling; sequences in `failed` already failed (they run
    /// through the model with the rest, nothing is sampled for them).
    fn run(
        &mut self,
        seqs: &[ScheduledSeq],
        failed: &[SeqFailure],
    ) -> Result<StepOutput, ForwardError> {
        if seqs.is_empty() {
            return Ok(StepOutput::default());
        }
        let started = Instant::now();
        // The draft model proposes first (its own forward passes, on its own pool).
        let proposals = match self.draft.as_mut() {
            Some(d) => d.propose(seqs)?,
            None => HashMap::new(),
        };
        let bs = self.block_size;
        let num_blocks = self.device.num_blocks();
        let total: usize = seqs.iter().map(|s| s.token_ids.len()).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut attn = Vec::with_capacity(seqs.len());
        let mut logit_rows = Vec::new();
        let mut uses = Vec::new();
        let mut out = StepOutput::default();
        for s in seqs {
            let start = tokens.len();
            // A sequence gathering prompt log-probabilities needs a row per prompt token.
            let prompt_len = match self.seqs.get(&s.seq_id) {
                Some(SeqState {
                    prompt_logprobs: Some(pl),
                    ..
                }) => {
                    if s.start_pos != pl.next_pos() {
                        out.failed.push(SeqFailure {
                            seq_id: s.seq_id,
                            error: ErrorBody::internal(format!(
                                "prompt_logprobs: the step computes positions from {}, but {} were computed before",
                                s.start_pos,
                                pl.next_pos()
                            )),
                        });
                    }
                    Some(pl.prompt.len())
                }
                _ => None,
            };
            // The scheduled tokens, then the drafts: the scheduler's, or the draft model's
            // in the positions the scheduler reserved for them.
            let n = s.token_ids.len();
            let reserved = if s.sample { s.num_draft.min(n - 1) } else { 0 };
            let (real, drafts) = s.token_ids.split_at(n - reserved);
            let drafts = proposals
                .get(&s.seq_id)
                .map_or(drafts, |p| &p.tokens[..p.tokens.len().min(reserved)]);
            for (i, &t) in real.iter().chain(drafts).enumerate() {
                let pos = s.start_pos + i;
                tokens.push(t);
                positions.push(pos);
                slots.push(slot_of(&s.block_table, pos, bs, num_blocks, s.seq_id)?);
                if prompt_len.is_some_and(|n| pos + 1 < n) {
                    logit_rows.push(tokens.len() - 1);
                    uses.push(RowUse::Prompt {
                        seq_id: s.seq_id,
                        pos,
                    });
                }
            }
            let len = real.len() + drafts.len();
            attn.push(AttnSeq {
                query_start: start,
                query_len: len,
                context_len: s.start_pos + len,
                block_table: &s.block_table,
            });
            if s.sample {
                // One row per draft (it checks the draft), and the last one.
                let num_draft = drafts.len();
                for j in 0..=num_draft {
                    logit_rows.push(start + len - 1 - num_draft + j);
                    uses.push(RowUse::Sample {
                        seq_id: s.seq_id,
                        draft: drafts.get(j).copied(),
                        index: j,
                    });
                }
            }
        }
        let input = BatchInput {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            seqs: &attn,
            logit_rows: &logit_rows,
        };
        // Guided sequences' masks are computed on another thread while the forward pass
        // runs: they depend only on the tokens sampled so far.
        let guided: Vec<SeqId> = seqs
            .iter()
            .filter(|s| s.sample)
            .filter(|s| {
                self.seqs
                    .get(&s.seq_id)
                    .is_some_and(|st| st.guide.is_some())
            })
            .map(|s| s.seq_id)
            .collect();
        let (logits, mut masks) = if guided.is_empty() {
            (self.device.forward(&input), HashMap::new())
        } else {
            let device = &mut self.device;
            let states = &mut self.seqs;
            std::thread::scope(|scope| {
                let masker = scope.spawn(|| guide_masks(states, &guided));
                let logits = device.forward(&input);
                let masks = masker.join().unwrap_or_else(|_| {
                    guided
                        .iter()
                        .map(|&id| (id, Err("computing the token mask panicked".to_owned())))
                        .collect()
                });
                (logits, masks)
            })
        };
        let mut logits = logits?;
        let vocab = self.device.spec().vocab_size;
        let mut suppress: Vec<TokenId> = Vec::new();
        // Speculating sequences: the drafts kept so far.
        let mut kept: HashMap<SeqId, Vec<TokenId>> = HashMap::new();
        for (row, row_use) in logits.chunks_exact_mut(vocab).zip(uses) {
            let (seq_id, draft, index) = match row_use {
                RowUse::Prompt { seq_id, .. } => (seq_id, None, 0),
                RowUse::Sample {
                    seq_id,
                    draft,
                    index,
                } => (seq_id, draft, index),
            };
            // A sequence fails once, alone; the rest of the batch goes on.
            if out.failed.iter().chain(failed).any(|f| f.seq_id == seq_id) {
                continue;
            }
            // A sequence's rows are consecutive: once its token is out, the rest of its rows
            // checked drafts after a rejected one.
            if out.sampled.last().is_some_and(|t| t.seq_id == seq_id) {
                continue;
            }
            let st = self.seqs.get_mut(&seq_id).ok_or_else(|| {
                ForwardError::Shape(format!("sequence {seq_id} has no sampler state"))
            })?;
            if fault::nan_logits(seq_id) {
                row.fill(f32::NAN);
            }
            if let RowUse::Prompt { pos, .. } = row_use {
                if let Some(pl) = st.prompt_logprobs.as_mut() {
                    match logprobs::token_logprobs(row, pl.prompt[pos + 1], pl.k) {
                        Some(lp) => pl.entries.push(Some(lp)),
                        None => out.failed.push(SeqFailure {
                            seq_id,
                            error: ErrorBody::internal(format!(
                                "the model produced no usable logits at prompt position {pos}"
                            )),
                        }),
                    }
                }
                continue;
            }
            suppress.clear();
            if (st.num_output as u32) < st.params.min_tokens {
                if !st.params.ignore_eos {
                    suppress.extend_from_slice(&self.eos_ids);
                }
                suppress.extend_from_slice(&st.params.stop_token_ids);
            }
            // The sampler works in place: keep the raw row for the log-probabilities.
            let raw = st.params.logprobs.map(|k| (k as usize, row.to_vec()));
            if st.guide.is_some() {
                match masks.remove(&seq_id) {
                    Some(Ok(mask)) => mask.apply(row),
                    Some(Err(e)) => {
                        out.failed.push(guide_failure(seq_id, &e));
                        continue;
                    }
                    None => {
                        out.failed.push(SeqFailure {
                            seq_id,
                            error: ErrorBody::internal("guided decoding: no mask was computed"),
                        });
                        continue;
                    }
                }
            }
            // A sampled draft comes with the distribution it was drawn from: rejection
            // sampling against it. Otherwise (greedy, n-gram) a draft is kept when the
            // target samples it.
            let q = proposals
                .get(&seq_id)
                .and_then(|p| p.probs.get(index))
                .filter(|_| draft.is_some());
            let sampled = match (draft, q) {
                (Some(d), Some(q)) => st.sampler.verify_draft(row, &suppress, d, q),
                _ => st
                    .sampler
                    .sample(row, &suppress)
                    .map(|t| (t, draft == Some(t))),
            };
            match sampled {
                Ok((token_id, true)) => {
                    // The draft is what the target samples here: keep it, check the next.
                    st.num_output += 1;
                    kept.entry(seq_id).or_default().push(token_id);
                }
                Ok((token_id, false)) => {
                    if let Some(guide) = st.guide.as_mut() {
                        if let Err(e) = guide.advance(token_id) {
                            out.failed.push(guide_failure(seq_id, &e));
                            continue;
                        }
                    }
                    st.num_output += 1;
                    let mut sampled = SampledToken::new(seq_id, token_id);
                    sampled.accepted = kept.remove(&seq_id).unwrap_or_default();
                    if let Some((k, raw)) = raw {
                        let Some(lp) = logprobs::token_logprobs(&raw, token_id, k) else {
                            out.failed.push(SeqFailure {
                                seq_id,
                                error: ErrorBody::internal(
                                    "the model produced logits with NaN: no log-probabilities",
                                ),
                            });
                            continue;
                        };
                        sampled.logprobs = Some(lp);
                    }
                    sampled.prompt_logprobs = st.prompt_logprobs.take().map(|pl| pl.entries);
                    out.sampled.push(sampled);
                }
                Err(e) => out.failed.push(SeqFailure {
                    seq_id,
                    error: sampling_failure(&e, row, &suppress),
                }),
            }
        }
        tracing::debug!(
            tokens = total,
            seqs = seqs.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "step"
        );
        Ok(out)
    }
}

/// The KV-pool slot of position `pos` of a sequence with `block_table`.
fn slot_of(
    block_table: &[u32],
    pos: usize,
    block_size: usize,
    num_blocks: usize,
    seq_id: SeqId,
) -> Result<usize, ForwardError> {
    let block = *block_table.get(pos / block_size).ok_or_else(|| {
        ForwardError::Shape(format!(
            "sequence {seq_id}: block table too short for position {pos}"
        ))
    })? as usize;
    if block >= num_blocks {
        return Err(ForwardError::Shape(format!(
            "block id {block} out of range"
        )));
    }
    Ok(block * block_size + pos % block_size)
}

/// A guided sequence whose grammar cannot go on: its own request's fault.
fn guide_failure(seq_id: SeqId, error: &str) -> SeqFailure {
    SeqFailure {
        seq_id,
        error: ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("guided decoding: {error}"),
        ),
    }
}

/// The token masks of the `guided` sequences, and how long they took (recorded as
/// [`crate::metrics::GUIDE_MASK_DURATION`]).
fn guide_masks(
    states: &mut HashMap<SeqId, SeqState>,
    guided: &[SeqId],
) -> HashMap<SeqId, Result<Mask, String>> {
    let started = Instant::now();
    let masks: HashMap<SeqId, Result<Mask, String>> = guided
        .iter()
        .filter_map(|id| {
            let guide = states.get_mut(id)?.guide.as_mut()?;
            Some((*id, guide.mask()))
        })
        .collect();
    let took = started.elapsed();
    metrics::histogram!(crate::metrics::GUIDE_MASK_DURATION).record(took.as_secs_f64());
    crate::guide::MaskTotals::record(masks.len(), took);
    masks
}

/// The typed error of a sequence that could not be sampled: the engine's when the model
/// gave it NaN logits, its own request's when the tokens it suppresses (stop token ids,
/// EOS before `min_tokens`) left nothing to choose.
fn sampling_failure(e: &SamplingError, row: &[f32], suppress: &[TokenId]) -> ErrorBody {
    if row.iter().any(|x| x.is_nan()) || suppress.is_empty() {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the model produced no usable logits for this sequence ({e})"),
        )
    } else {
        ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!(
                "no token can be sampled: stop_token_ids (and EOS, before min_tokens) exclude every candidate ({e})"
            ),
        )
    }
}

/// The executor actor: a thin shell around [`Executor`] on its own thread (which takes
/// part in the kernels' parallel calls: see `pagoda_kernels::pool`).
pub struct ExecutorActor {
    pub executor: Executor,
    guard: LifeGuard,
}

impl ExecutorActor {
    pub fn new(executor: Executor, guard: LifeGuard) -> Self {
        Self { executor, guard }
    }
}

impl Actor for ExecutorActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.guard.watch_this_thread();
    }
}

impl Handler<RunBatch> for ExecutorActor {
    type Result = Result<StepOutput, String>;
    fn handle(&mut self, msg: RunBatch, _: &mut Context<Self>) -> Self::Result {
        fault::panic_if_armed("executor", msg.batch.seqs.iter().map(|s| s.seq_id));
        self.executor.execute(msg)
    }
}
