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
//!
//! # Files
//!
//! - `policy.rs`: [`SchedulerPolicy`], the pure logic above (unit tests in `policy_tests.rs`);
//! - `actor.rs`: [`SchedulerActor`], the thin shell that runs the loop.

mod actor;
mod policy;
pub mod speculation;

pub use actor::{SchedulerActor, SchedulerLinks, MAX_TOKEN_MESSAGES_IN_FLIGHT};
pub use policy::{SchedulerError, SchedulerLimits, SchedulerPolicy, SeqStatus, SeqView};

// The boundary types live in the message layer; they are re-exported here for callers
// that think of them as the scheduler's.
pub use crate::messages::{
    NewSeqData, SampledToken, ScheduledBatch, ScheduledSeq, SchedulerStats, SeqFailure, SeqOutput,
    StepOutput,
};
