//! Speculative decoding with a draft model, the executor's half: a second, smaller model
//! with the target's tokenizer fills the draft positions the scheduler reserved (see
//! [`crate::scheduler::speculation`]), and the target verifies them in the same step.
//!
//! The draft's K/V lives in a pool of its own with the target's block count and block
//! size, addressed by the same block tables: block `b` of a sequence holds the target's
//! K/V in one pool and the draft's in the other, so the block manager and the scheduler
//! never see the draft, and a block's memory counts both (the engine sizes the pool with
//! target + draft bytes per block).
//!
//! The draft computes only when it proposes. [`DraftTokens`] keeps, per sequence, the
//! tokens the executor knows (prompt, outputs, accepted drafts) and how many leading
//! positions hold the draft's K/V. To propose, the draft first catches up on the positions
//! it lacks — the whole context the first time a sequence speculates, one token after a
//! step whose drafts were all accepted — then runs one-token steps, all speculating
//! sequences batched in each pass.
//!
//! For a greedy request the draft proposes its most likely token, and the target keeps a
//! draft while it equals the target's own greedy token. For a sampled request the draft
//! samples from its distribution q (the request's sampling settings on the draft's logits,
//! with a random stream of its own) and hands q on with the token; the target keeps the
//! draft with probability min(1, p/q) and otherwise samples from max(0, p − q)
//! renormalised ([`super::sampler::Sampler::verify_draft`]) — the standard rejection
//! sampling, so the output follows the target's distribution exactly.
//!
//! A sequence's draft K/V is always computed by that sequence (a new or preempted one
//! starts from position 0), so it never depends on what another sequence sharing a prefix
//! block wrote there; two writers of a shared block write the same values.

use std::collections::HashMap;

use pagoda_kernels::attention::AttnSeq;

use super::backend::ForwardError;
use super::models::BatchInput;
use super::sampler::Sampler;
use super::{slot_of, Device};
use crate::messages::{NewSeqData, ScheduledSeq, SeqId, TokenId};

/// Per-sequence bookkeeping of the draft, no compute: the tokens it needs and how far its
/// K/V is computed.
#[derive(Debug, Default)]
pub struct DraftTokens {
    seqs: HashMap<SeqId, Known>,
}

#[derive(Debug)]
struct Known {
    /// The sequence's tokens as far as the executor knows them.
    tokens: Vec<TokenId>,
    /// Leading positions whose draft K/V is in the pool.
    computed: usize,
}

impl DraftTokens {
    /// A sequence (re)starts: its prompt and the outputs it already has; nothing of it is
    /// computed by the draft.
    pub fn start(&mut self, seq_id: SeqId, prompt: &[TokenId], output: &[TokenId]) {
        let mut tokens = Vec::with_capacity(prompt.len() + output.len());
        tokens.extend_from_slice(prompt);
        tokens.extend_from_slice(output);
        self.seqs.insert(
            seq_id,
            Known {
                tokens,
                computed: 0,
            },
        );
    }

    /// A step runs `tokens` (drafts excluded) from `start_pos`: they are the sequence's
    /// tokens there, and the draft's K/V from `start_pos` on is no longer trusted. A
    /// sequence whose tokens before `start_pos` are unknown is forgotten (it gets no
    /// drafts until it starts again).
    pub fn scheduled(&mut self, seq_id: SeqId, start_pos: usize, tokens: &[TokenId]) {
        let Some(k) = self.seqs.get_mut(&seq_id) else {
            return;
        };
        if k.tokens.len() < start_pos {
            self.seqs.remove(&seq_id);
            return;
        }
        k.tokens.truncate(start_pos);
        k.tokens.extend_from_slice(tokens);
        k.computed = k.computed.min(start_pos);
    }

    /// The target kept these drafts: they follow the sequence's last scheduled token.
    pub fn accepted(&mut self, seq_id: SeqId, tokens: &[TokenId]) {
        if let Some(k) = self.seqs.get_mut(&seq_id) {
            k.tokens.extend_from_slice(tokens);
            k.computed = k.computed.min(k.tokens.len());
        }
    }

    /// What the draft must run before it can propose the token after the last known one:
    /// the first position without draft K/V and the tokens from there on. `None` for an
    /// unknown sequence.
    pub fn pending(&self, seq_id: SeqId) -> Option<(usize, &[TokenId])> {
        let k = self.seqs.get(&seq_id)?;
        let from = k.computed.min(k.tokens.len().checked_sub(1)?);
        Some((from, &k.tokens[from..]))
    }

    /// The draft wrote its K/V for every position before `upto`; only the known tokens'
    /// positions count once the step's verification is in (see [`Self::accepted`]).
    pub fn computed(&mut self, seq_id: SeqId, upto: usize) {
        if let Some(k) = self.seqs.get_mut(&seq_id) {
            k.computed = upto;
        }
    }

    pub fn forget(&mut self, seq_id: SeqId) {
        self.seqs.remove(&seq_id);
    }

    pub fn contains(&self, seq_id: SeqId) -> bool {
        self.seqs.contains_key(&seq_id)
    }
}

/// The draft model on its backend with its own KV pool, and its bookkeeping.
pub(super) struct DraftModel {
    pub(super) device: Box<dyn Device>,
    pub(super) block_size: usize,
    pub(super) tokens: DraftTokens,
    /// The samplers of sampled (not greedy) requests: the request's settings, a random
    /// stream of their own. Kept through a preemption, like the target's.
    samplers: HashMap<SeqId, Sampler>,
}

/// A sequence's proposals: the tokens, and for a sampled request the distribution each
/// was drawn from (empty for a greedy one).
#[derive(Debug, Default)]
pub(super) struct Proposal {
    pub tokens: Vec<TokenId>,
    pub probs: Vec<Vec<f32>>,
}

/// Mixed into a request's seed for its draft's random stream, so that it does not repeat
/// the target's.
const DRAFT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// One sequence's proposals being made.
struct Job<'a> {
    seq_id: SeqId,
    block_table: &'a [u32],
    /// Position of the sequence's last known token: the first draft goes after it.
    last_pos: usize,
    /// Drafts wanted.
    want: usize,
    out: Proposal,
}

impl DraftModel {
    pub(super) fn new(device: Box<dyn Device>, block_size: usize) -> Self {
        Self {
            device,
            block_size,
            tokens: DraftTokens::default(),
            samplers: HashMap::new(),
        }
    }

    /// A sequence (re)starts.
    pub(super) fn start(&mut self, seq_id: SeqId, new: &NewSeqData) {
        self.tokens
            .start(seq_id, &new.prompt_token_ids, &new.output_token_ids);
        if !self.samplers.contains_key(&seq_id) {
            let mut params = new.params.clone();
            params.seed = params.seed.map(|s| s ^ DRAFT_SEED);
            let sampler = Sampler::new(
                &params,
                self.device.spec().vocab_size,
                &new.prompt_token_ids,
            );
            if !sampler.is_greedy() {
                self.samplers.insert(seq_id, sampler);
            }
        }
    }

    pub(super) fn forget(&mut self, seq_id: SeqId) {
        self.tokens.forget(seq_id);
        self.samplers.remove(&seq_id);
    }

    /// Records the step's tokens, then proposes `num_draft` tokens for every sequence of
    /// the batch that reserved draft positions, one position after another: the draft
    /// model's most likely token, or for a sampled request a draw from its distribution.
    pub(super) fn propose(
        &mut self,
        seqs: &[ScheduledSeq],
    ) -> Result<HashMap<SeqId, Proposal>, ForwardError> {
        let mut jobs = Vec::new();
        for s in seqs {
            let real = &s.token_ids[..s.token_ids.len() - s.num_draft.min(s.token_ids.len())];
            self.tokens.scheduled(s.seq_id, s.start_pos, real);
            if s.sample && s.num_draft > 0 && !real.is_empty() && self.tokens.contains(s.seq_id) {
                jobs.push(Job {
                    seq_id: s.seq_id,
                    block_table: &s.block_table,
                    last_pos: s.start_pos + real.len() - 1,
                    want: s.num_draft,
                    out: Proposal::default(),
                });
            }
        }
        let bs = self.block_size;
        let num_blocks = self.device.num_blocks();
        let vocab = self.device.spec().vocab_size;
        let passes = jobs.iter().map(|j| j.want).max().unwrap_or(0);
        let (mut tokens, mut positions, mut slots, mut rows) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut ranges = Vec::new();
        for pass in 0..passes {
            tokens.clear();
            positions.clear();
            slots.clear();
            rows.clear();
            ranges.clear();
            for (i, job) in jobs.iter().enumerate() {
                // A job takes part while it has a draft from every earlier pass.
                if job.out.tokens.len() >= job.want || job.out.tokens.len() != pass {
                    continue;
                }
                let start = tokens.len();
                if pass == 0 {
                    // Catch up on what the draft has not computed, through the last token.
                    let Some((from, pending)) = self.tokens.pending(job.seq_id) else {
                        continue;
                    };
                    tokens.extend_from_slice(pending);
                    positions.extend(from..from + pending.len());
                } else {
                    tokens.push(job.out.tokens[pass - 1]);
                    positions.push(job.last_pos + pass);
                }
                for &pos in &positions[start..] {
                    slots.push(slot_of(job.block_table, pos, bs, num_blocks, job.seq_id)?);
                }
                rows.push(tokens.len() - 1);
                ranges.push((i, start, tokens.len() - start));
            }
            if ranges.is_empty() {
                break;
            }
            let attn: Vec<AttnSeq<'_>> = ranges
                .iter()
                .map(|&(i, start, len)| AttnSeq {
                    query_start: start,
                    query_len: len,
                    context_len: positions[start + len - 1] + 1,
                    block_table: jobs[i].block_table,
                })
                .collect();
            let input = BatchInput {
                tokens: &tokens,
                positions: &positions,
                slots: &slots,
                seqs: &attn,
                logit_rows: &rows,
            };
            let mut logits = self.device.forward(&input)?;
            for (&(i, _, _), row) in ranges.iter().zip(logits.chunks_exact_mut(vocab)) {
                let job = &mut jobs[i];
                let sampled = match self.samplers.get_mut(&job.seq_id) {
                    // A row the sampler cannot use (NaN) falls back to the greedy proposal,
                    // which the target verifies just as exactly.
                    Some(sampler) if job.out.probs.len() == job.out.tokens.len() => {
                        let mut q = row.to_vec();
                        sampler.draw(&mut q).ok().map(|t| (t, q))
                    }
                    _ => None,
                };
                match sampled {
                    Some((t, q)) => {
                        job.out.tokens.push(t);
                        job.out.probs.push(q);
                    }
                    None => job.out.tokens.push(argmax(row)),
                }
            }
        }
        let mut proposals = HashMap::with_capacity(jobs.len());
        for job in jobs {
            // Positions last_pos .. last_pos + drafts − 1 now hold the draft's K/V (the
            // last draft itself was never fed).
            self.tokens
                .computed(job.seq_id, job.last_pos + job.out.tokens.len());
            proposals.insert(job.seq_id, job.out);
        }
        Ok(proposals)
    }
}

/// The index of the largest value (the first of equals; NaN never wins).
fn argmax(row: &[f32]) -> TokenId {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as TokenId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_draft_catches_up_on_what_it_has_not_computed() {
        let mut d = DraftTokens::default();
        // Unknown sequences have nothing pending and are not tracked by a step.
        d.scheduled(7, 0, &[1, 2]);
        assert!(d.pending(7).is_none());

        // A prompt of 5 (prefix-cached: the step starts at 4): the draft needs all of it.
        d.start(1, &[10, 11, 12, 13, 14], &[]);
        d.scheduled(1, 4, &[14]);
        assert_eq!(d.pending(1), Some((0, &[10, 11, 12, 13, 14][..])));
        // It proposes 3 drafts after position 4: positions 4..7 hold its K/V.
        d.computed(1, 4 + 3);
        // The target kept 1 of them (20), then sampled 30 at position 6.
        d.accepted(1, &[20]);
        d.scheduled(1, 6, &[30]);
        assert_eq!(
            d.pending(1),
            Some((6, &[30][..])),
            "positions 0..6 are known"
        );

        // Every draft kept (3 of 3): the last one was never fed, so it is pending with
        // the next token.
        d.computed(1, 6 + 3);
        d.accepted(1, &[21, 22, 23]);
        d.scheduled(1, 10, &[31]);
        assert_eq!(d.pending(1), Some((9, &[23, 31][..])));

        // A step without speculation (large batch) leaves the draft behind; it catches up.
        d.computed(1, 10);
        d.scheduled(1, 11, &[32]);
        d.scheduled(1, 12, &[33]);
        assert_eq!(d.pending(1), Some((10, &[31, 32, 33][..])));

        // Preempted and restarted: everything again, with the outputs it had.
        d.start(1, &[10, 11], &[5, 6]);
        d.scheduled(1, 0, &[10, 11, 5, 6]);
        assert_eq!(d.pending(1), Some((0, &[10, 11, 5, 6][..])));

        // A gap (a step starting past what is known) forgets the sequence.
        d.scheduled(1, 9, &[1]);
        assert!(d.pending(1).is_none());
        d.start(2, &[1], &[]);
        d.forget(2);
        assert!(!d.contains(2));
    }

    #[test]
    fn argmax_takes_the_first_largest_and_ignores_nan() {
        assert_eq!(argmax(&[0.1, 0.9, 0.9, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -5.0, -4.0]), 2);
        assert_eq!(argmax(&[f32::NAN]), 0);
    }
}
