//! Log-probabilities of one row of logits: the log-softmax of the model's raw output,
//! before penalties, temperature and the sampling filters (vLLM's `raw_logprobs`).
//!
//! The normaliser `log Σ exp(l)` is accumulated in f64 around the row's maximum, so the
//! values agree with a float64 reference to a few ulps of f32. Top-k keeps a small sorted
//! buffer while streaming the row once: the vocabulary is never sorted.

use crate::messages::{TokenId, TokenLogprobs};

/// The log-softmax normaliser of a row: `max + ln Σ exp(l − max)`. `None` when the row is
/// empty or holds a NaN or no finite value (nothing can be normalised).
pub fn log_normalizer(row: &[f32]) -> Option<f64> {
    let mut max = f32::NEG_INFINITY;
    for &l in row {
        if l.is_nan() {
            return None;
        }
        max = max.max(l);
    }
    if !max.is_finite() {
        return None;
    }
    let max = f64::from(max);
    let sum: f64 = row.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    Some(max + sum.ln())
}

/// The `k` largest logits of `row` as `(token, logit)`, largest first, equal logits to the
/// lower token id.
pub fn top_k(row: &[f32], k: usize) -> Vec<(TokenId, f32)> {
    let mut best: Vec<(TokenId, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &l) in row.iter().enumerate() {
        // Scanning in id order, a tie never displaces an earlier (lower) id.
        if best.len() == k && best.last().is_some_and(|&(_, worst)| l <= worst) {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= l);
        best.insert(at, (i as TokenId, l));
        best.truncate(k);
    }
    best
}

/// The log-probabilities of `token` in `row` (raw logits) with the `k` most likely tokens;
/// `None` when the row cannot be normalised or `token` is outside it.
pub fn token_logprobs(row: &[f32], token: TokenId, k: usize) -> Option<TokenLogprobs> {
    let lse = log_normalizer(row)?;
    let logit = *row.get(token as usize)?;
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    Some(TokenLogprobs {
        logprob: lp(logit),
        top_logprobs: top_k(row, k).into_iter().map(|(t, l)| (t, lp(l))).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward reference: softmax in f64, then log.
    fn reference(row: &[f32]) -> Vec<f64> {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
        row.iter()
            .map(|&l| ((l as f64 - max).exp() / z).ln())
            .collect()
    }

    #[test]
    fn logprobs_match_a_float64_log_softmax() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 9.0)
            .collect();
        let want = reference(&row);
        for token in [0u32, 17, 999] {
            let got = token_logprobs(&row, token, 3).expect("normalisable");
            assert!(
                (f64::from(got.logprob) - want[token as usize]).abs() < 1e-5,
                "{token}: {} vs {}",
                got.logprob,
                want[token as usize]
            );
        }
        // Probabilities sum to one.
        let lse = log_normalizer(&row).unwrap();
        let total: f64 = row.iter().map(|&l| (l as f64 - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let row = [1000.0f32, 999.0, -1000.0];
        let got = token_logprobs(&row, 1, 2).unwrap();
        let want = reference(&row);
        assert!((f64::from(got.logprob) - want[1]).abs() < 1e-6);
        assert_eq!(got.top_logprobs[0].0, 0);
        assert!((f64::from(got.top_logprobs[0].1) - want[0]).abs() < 1e-6);
    }

    #[test]
    fn top_k_is_sorted_with_ties_to_the_lower_id() {
        let row = [0.5f32, 2.0, 2.0, -1.0, 3.0, 2.0, f32::NEG_INFINITY];
        assert_eq!(top_k(&row, 0), vec![]);
        assert_eq!(top_k(&row, 1), vec![(4, 3.0)]);
        assert_eq!(top_k(&row, 3), vec![(4, 3.0), (1, 2.0), (2, 2.0)]);
        assert_eq!(
            top_k(&row, 10).iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![4, 1, 2, 5, 0, 3, 6]
        );
        // Against a full sort on a pseudo-random row with many ties.
        let row: Vec<f32> = (0..5000).map(|i| ((i * 31) % 97) as f32).collect();
        let mut all: Vec<(TokenId, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as TokenId, l))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(top_k(&row, 20), all[..20].to_vec());
    }

    #[test]
    fn unusable_rows_give_none() {
        assert_eq!(log_normalizer(&[]), None);
        assert_eq!(log_normalizer(&[1.0, f32::NAN]), None);
        assert_eq!(log_normalizer(&[f32::NEG_INFINITY; 3]), None);
        assert!(token_logprobs(&[1.0, 2.0], 2, 1).is_none());
        // A suppressed (−inf) token has logprob −inf, not NaN.
        let got = token_logprobs(&[0.0, f32::NEG_INFINITY], 1, 1).unwrap();
        assert_eq!(got.logprob, f32::NEG_INFINITY);
    }
}
