//! Speculative decoding, the scheduler's half: who proposes draft tokens for a sequence in
//! decode, and when speculation is worth it. The executor verifies the drafts in the same
//! forward pass as the sequence's last token (one logits row per draft, plus one), samples
//! every row in order with the sequence's own sampler and keeps drafts while they equal
//! what it sampled. For a proposer that proposes one token per position (a point mass, as
//! n-gram lookup does), that *is* the standard rejection sampling: a draft `d` is kept
//! with probability p(d), and on rejection the sampled token follows p with `d` removed,
//! renormalised — so the output follows the target's distribution exactly, and with a seed
//! it is the very sequence non-speculative decoding gives.
//!
//! Drafts come from one of two places ([`Drafts`]): a [`Proposer`] here, which sees the
//! sequence's tokens and proposes before the step is planned (n-gram lookup: the blocks
//! are reserved only for what it proposes), or the executor's draft model, which needs
//! compute: the scheduler reserves `num_tokens` positions (budget, blocks, `max_tokens`)
//! and the executor fills them before the target's forward pass
//! (`executor::draft`).

use crate::messages::TokenId;

/// Proposes draft tokens to continue a sequence.
pub trait Proposer: Send + Sync + std::fmt::Debug {
    /// Up to `k` tokens that may follow `tokens` (prompt and output so far), into `out`
    /// (cleared first). Proposing nothing is always allowed.
    fn propose(&self, tokens: &[TokenId], k: usize, out: &mut Vec<TokenId>);
}

/// Prompt lookup: the last `n` tokens (`max_n` down to `min_n`) are searched for earlier
/// in the sequence, and the tokens that followed their most recent earlier occurrence are
/// proposed. Pays off when the answer copies spans of the prompt (extraction, rewriting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramProposer {
    pub min_n: usize,
    pub max_n: usize,
}

impl Proposer for NgramProposer {
    fn propose(&self, tokens: &[TokenId], k: usize, out: &mut Vec<TokenId>) {
        out.clear();
        let len = tokens.len();
        if k == 0 {
            return;
        }
        for n in (self.min_n.max(1)..=self.max_n).rev() {
            if n >= len {
                continue;
            }
            let suffix = &tokens[len - n..];
            // The most recent earlier occurrence that has at least one token after it.
            let found = (0..len - n).rev().find(|&i| &tokens[i..i + n] == suffix);
            if let Some(i) = found {
                let from = i + n;
                let to = (from + k).min(len);
                out.extend_from_slice(&tokens[from..to]);
                return;
            }
        }
    }
}

/// Where the drafts come from.
#[derive(Debug, Clone)]
pub enum Drafts {
    /// Proposed here, from the sequence's tokens.
    Proposer(std::sync::Arc<dyn Proposer>),
    /// Proposed by the executor's draft model into positions reserved here; the reserved
    /// tokens are placeholders ([`PLACEHOLDER`]) until the executor fills them.
    DraftModel,
}

/// The token a reserved draft position carries to the executor, which replaces it with
/// the draft model's proposal.
pub const PLACEHOLDER: TokenId = 0;

impl Drafts {
    /// Up to `k` drafts for a sequence with `tokens`, into `out` (cleared first).
    pub fn propose(&self, tokens: &[TokenId], k: usize, out: &mut Vec<TokenId>) {
        match self {
            Self::Proposer(p) => p.propose(tokens, k, out),
            Self::DraftModel => {
                out.clear();
                out.resize(k, PLACEHOLDER);
            }
        }
    }

    /// How many of `drafts` the executor kept, given the tokens it accepted: a prefix of
    /// the proposal (placeholders stand for whatever the draft model proposed).
    pub fn kept(&self, drafts: &[TokenId], accepted: &[TokenId]) -> usize {
        match self {
            Self::Proposer(_) => accepted
                .iter()
                .zip(drafts)
                .take_while(|(a, d)| a == d)
                .count(),
            Self::DraftModel => accepted.len().min(drafts.len()),
        }
    }
}

/// How the scheduler speculates: where the drafts come from, how many tokens per step,
/// and up to how many running sequences it still pays.
#[derive(Debug, Clone)]
pub struct Speculation {
    pub drafts: Drafts,
    /// Draft tokens per sequence and step at most.
    pub num_tokens: usize,
    /// Speculate only while at most this many sequences run: a large batch already keeps
    /// the weights busy, and verifying drafts would only add work.
    pub max_num_seqs: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(p: &NgramProposer, tokens: &[TokenId], k: usize) -> Vec<TokenId> {
        let mut out = vec![99];
        p.propose(tokens, k, &mut out);
        out
    }

    #[test]
    fn a_draft_model_gets_reserved_positions_and_its_accepted_prefix_counts() {
        let mut out = vec![5];
        Drafts::DraftModel.propose(&[1, 2, 3], 3, &mut out);
        assert_eq!(out, vec![PLACEHOLDER; 3]);
        assert_eq!(Drafts::DraftModel.kept(&out, &[7, 8]), 2);
        assert_eq!(Drafts::DraftModel.kept(&out, &[7, 8, 9, 10]), 3);
        let ngram = Drafts::Proposer(std::sync::Arc::new(NgramProposer { min_n: 1, max_n: 2 }));
        ngram.propose(&[1, 2, 3, 1], 2, &mut out);
        assert_eq!(out, vec![2, 3]);
        assert_eq!(
            ngram.kept(&out, &[2, 9]),
            1,
            "kept up to the first difference"
        );
        assert_eq!(ngram.kept(&out, &[4]), 0);
    }

    #[test]
    fn ngram_lookup_copies_what_followed_the_latest_match() {
        let p = NgramProposer { min_n: 1, max_n: 3 };
        // "… 1 2 3 4 5 … 1 2 3" → propose 4 5 (k = 2).
        assert_eq!(propose(&p, &[9, 1, 2, 3, 4, 5, 6, 1, 2, 3], 2), vec![4, 5]);
        // The longest n wins over a more recent shorter match.
        assert_eq!(
            propose(&p, &[1, 2, 3, 7, 8, 3, 5, 1, 2, 3], 1),
            vec![7],
            "3-gram [1 2 3] beats the 1-gram [3] at 5"
        );
        // Most recent occurrence of the same n-gram; proposals stop at the end.
        assert_eq!(propose(&p, &[5, 6, 1, 5, 6, 2, 5, 6], 4), vec![2, 5, 6]);
        // No match, too short, k = 0: nothing.
        assert!(propose(&p, &[1, 2, 3, 4], 3).is_empty());
        assert!(propose(&p, &[1], 3).is_empty());
        assert!(propose(&p, &[1, 2, 1, 2], 0).is_empty());
        // min_n bounds the shortest suffix tried.
        let strict = NgramProposer { min_n: 2, max_n: 3 };
        assert!(propose(&strict, &[4, 1, 8, 9, 1], 2).is_empty());
        assert_eq!(propose(&p, &[4, 1, 8, 9, 1], 2), vec![8, 9]);
    }
}
