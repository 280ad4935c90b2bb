//! Speculative decoding, the scheduler's half: who proposes draft tokens for a sequence in
//! decode, and when speculation is worth it. The executor verifies the drafts in the same
//! forward pass as the sequence's last token (one logits row per draft, plus one), samples
//! every row in order with the sequence's own sampler and keeps drafts while they equal
//! what it sampled. For a proposer that proposes one token per position (a point mass, as
//! n-gram lookup does), that *is* the standard rejection sampling: a draft `d` is kept
//! with probability p(d), and on rejection the sampled token follows p with `d` removed,
//! renormalised — so the output follows the target's distribution exactly, and with a seed
//! it is the very sequence non-speculative decoding gives.

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

/// How the scheduler speculates: the proposer, how many tokens per step, and up to how
/// many running sequences it still pays.
#[derive(Debug, Clone)]
pub struct Speculation {
    pub proposer: std::sync::Arc<dyn Proposer>,
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
