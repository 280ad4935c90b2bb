//! What a benchmark sends, and when: the prompts (random token ids with an optional shared
//! prefix, or the lines of a jsonl file) and their arrival times (Poisson, or all at once).
//! Everything here is a pure function of its inputs and the seed, so every target of a run
//! — and every run of a sweep — gets exactly the same requests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Deserialize;

/// Token ids the synthetic prompts draw from: ordinary tokens of any vocabulary of at
/// least 30 000 entries, so every target gets the same prompts.
pub const PROMPT_IDS: std::ops::Range<u32> = 100..30_000;

/// The ids random prompts draw from for a model of `vocab_size` ids: [`PROMPT_IDS`], or
/// for a smaller vocabulary (tiny test models) the ids above its first quarter (at most
/// the first 100, where special tokens live).
pub fn prompt_ids(vocab_size: usize) -> std::ops::Range<u32> {
    let vocab = u32::try_from(vocab_size).unwrap_or(u32::MAX);
    if vocab >= PROMPT_IDS.end {
        PROMPT_IDS
    } else {
        (vocab / 4).min(PROMPT_IDS.start)..vocab.max(1)
    }
}

/// A prompt as sent to the target.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Token ids, sent as ids (pagoda: `prompt_token_ids`; llama-server: a `prompt` array).
    TokenIds(Vec<u32>),
    /// Text, sent as text and tokenized by the target.
    Text(String),
}

/// One request of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRequest {
    pub prompt: PromptInput,
    /// Tokens to generate (exactly that many with `ignore_eos`).
    pub output_len: usize,
}

impl BenchRequest {
    /// The prompt's length in tokens, when the client knows it (token-id prompts).
    pub fn known_input_len(&self) -> Option<usize> {
        match &self.prompt {
            PromptInput::TokenIds(ids) => Some(ids.len()),
            PromptInput::Text(_) => None,
        }
    }
}

/// One line of a dataset file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Tokens to generate for this prompt (default: `--output-len`).
    #[serde(default, alias = "max_tokens")]
    pub output_len: Option<usize>,
}

/// Where the prompts come from.
#[derive(Debug, Clone)]
pub enum Dataset {
    /// `input_len` random token ids per prompt, the first `prefix_len` of them shared by
    /// every prompt.
    Random {
        input_len: usize,
        prefix_len: usize,
        /// The token ids drawn ([`PROMPT_IDS`] unless narrowed by [`Dataset::fit_vocab`]).
        ids: std::ops::Range<u32>,
    },
    /// The lines of a jsonl file, in order, cycled when more requests are asked for.
    File {
        path: PathBuf,
        entries: Vec<DatasetEntry>,
    },
}

impl Dataset {
    /// `random`, or the file's path.
    pub fn name(&self) -> String {
        match self {
            Dataset::Random { .. } => "random".into(),
            Dataset::File { path, .. } => path.display().to_string(),
        }
    }

    /// Loads a jsonl dataset file.
    pub fn load(path: &Path) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let entries = parse_jsonl(&text, &path.display().to_string())?;
        Ok(Dataset::File {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// A random dataset; the prefix must fit in the prompt.
    pub fn random(input_len: usize, prefix_len: usize) -> Result<Self, DatasetError> {
        if input_len == 0 {
            return Err(DatasetError::Invalid(
                "--input-len must be at least 1".into(),
            ));
        }
        if prefix_len > input_len {
            return Err(DatasetError::Invalid(format!(
                "--prefix-len {prefix_len} is longer than --input-len {input_len}"
            )));
        }
        Ok(Dataset::Random {
            input_len,
            prefix_len,
            ids: PROMPT_IDS,
        })
    }

    /// Random prompts draw only ids of a `vocab_size`-id vocabulary ([`prompt_ids`]).
    pub fn fit_vocab(&mut self, vocab_size: usize) {
        if let Dataset::Random { ids, .. } = self {
            *ids = prompt_ids(vocab_size);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("reading the dataset {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("dataset {path}, line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("dataset {path} has no prompts")]
    Empty { path: String },
    #[error("{0}")]
    Invalid(String),
}

/// Parses a jsonl dataset: one JSON object per line, `{"prompt": "…"}` or
/// `{"prompt_token_ids": […]}`, with an optional `"output_len"` (alias `"max_tokens"`).
/// Blank lines are skipped; anything else that is not such an object is an error naming
/// the line.
pub fn parse_jsonl(text: &str, path: &str) -> Result<Vec<DatasetEntry>, DatasetError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let bad = |message: String| DatasetError::Line {
            path: path.to_string(),
            line: line_no,
            message,
        };
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let entry: DatasetEntry = serde_json::from_str(trimmed).map_err(|e| {
            bad(format!(
                "not a JSON object with \"prompt\" or \"prompt_token_ids\" ({e})"
            ))
        })?;
        match (&entry.prompt, &entry.prompt_token_ids) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "has both \"prompt\" and \"prompt_token_ids\"; give one".into(),
                ))
            }
            (None, None) => {
                return Err(bad("needs \"prompt\" (text) or \"prompt_token_ids\"".into()))
            }
            (Some(p), None) if p.is_empty() => return Err(bad("\"prompt\" is empty".into())),
            (None, Some(ids)) if ids.is_empty() => {
                return Err(bad("\"prompt_token_ids\" is empty".into()))
            }
            _ => {}
        }
        if entry.output_len == Some(0) {
            return Err(bad("\"output_len\" must be at least 1".into()));
        }
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_string(),
        });
    }
    Ok(entries)
}

/// The `num_prompts` requests of a run. Random prompts: the shared prefix comes first from
/// the seeded generator, then each prompt's own `input_len - prefix_len` ids; with
/// `prefix_len` 0 the prompts are the same as before prefixes existed.
pub fn build_requests(
    dataset: &Dataset,
    num_prompts: usize,
    default_output_len: usize,
    seed: u64,
) -> Vec<BenchRequest> {
    match dataset {
        Dataset::Random {
            input_len,
            prefix_len,
            ids: range,
        } => {
            let mut rng = StdRng::seed_from_u64(seed);
            let prefix: Vec<u32> = (0..*prefix_len)
                .map(|_| rng.gen_range(range.clone()))
                .collect();
            (0..num_prompts)
                .map(|_| {
                    let mut ids = prefix.clone();
                    ids.extend((*prefix_len..*input_len).map(|_| rng.gen_range(range.clone())));
                    BenchRequest {
                        prompt: PromptInput::TokenIds(ids),
                        output_len: default_output_len,
                    }
                })
                .collect()
        }
        Dataset::File { entries, .. } => (0..num_prompts)
            .map(|i| {
                let e = &entries[i % entries.len()];
                let prompt = match (&e.prompt, &e.prompt_token_ids) {
                    (_, Some(ids)) => PromptInput::TokenIds(ids.clone()),
                    (Some(text), None) => PromptInput::Text(text.clone()),
                    (None, None) => PromptInput::Text(String::new()),
                };
                BenchRequest {
                    prompt,
                    output_len: e.output_len.unwrap_or(default_output_len),
                }
            })
            .collect(),
    }
}

/// When each request is sent, relative to the start of the run: all at once for an
/// infinite rate, else a Poisson process of `rate` requests per second — exponential gaps
/// from a generator seeded with `seed` (its own stream, so the prompts do not depend on
/// the rate). The first request goes at 0.
pub fn arrival_offsets(n: usize, rate: f64, seed: u64) -> Vec<Duration> {
    if !rate.is_finite() {
        return vec![Duration::ZERO; n];
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_a771_7a15_0000);
    let mut t = 0.0f64;
    (0..n)
        .map(|i| {
            if i > 0 {
                let u: f64 = rng.gen(); // [0, 1)
                t += -(1.0 - u).ln() / rate;
            }
            Duration::from_secs_f64(t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_gaps_are_exponential_with_the_requested_rate() {
        let rate = 20.0;
        let n = 20_000;
        let offs = arrival_offsets(n, rate, 7);
        assert_eq!(offs.len(), n);
        assert_eq!(offs[0], Duration::ZERO);
        let gaps: Vec<f64> = offs
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        assert!(gaps.iter().all(|g| *g >= 0.0));
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean - 1.0 / rate).abs() < 0.03 / rate, "mean gap {mean}");
        // Exponential: standard deviation equals the mean, and P(gap > mean) = 1/e.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        let cv = var.sqrt() / mean;
        assert!((cv - 1.0).abs() < 0.05, "coefficient of variation {cv}");
        let above = gaps.iter().filter(|g| **g > mean).count() as f64 / gaps.len() as f64;
        assert!(
            (above - (-1.0f64).exp()).abs() < 0.02,
            "P(gap > mean) = {above}"
        );
        // Deterministic for a seed, different for another.
        assert_eq!(offs, arrival_offsets(n, rate, 7));
        assert_ne!(offs, arrival_offsets(n, rate, 8));
    }

    #[test]
    fn infinite_rate_sends_everything_at_once() {
        assert_eq!(
            arrival_offsets(5, f64::INFINITY, 0),
            vec![Duration::ZERO; 5]
        );
        assert!(arrival_offsets(0, 3.0, 0).is_empty());
    }

    /// A small vocabulary narrows the ids (tiny test models); a large one keeps the
    /// shared range, so prompts for real models do not change.
    #[test]
    fn random_prompts_fit_the_model_vocabulary() {
        assert_eq!(prompt_ids(49_152), PROMPT_IDS);
        assert_eq!(prompt_ids(30_000), PROMPT_IDS);
        assert_eq!(prompt_ids(400), 100..400);
        assert_eq!(prompt_ids(40), 10..40);
        assert_eq!(prompt_ids(0), 0..1);
        let mut ds = Dataset::random(64, 8).unwrap();
        let wide = build_requests(&ds, 4, 4, 1);
        ds.fit_vocab(400);
        for r in build_requests(&ds, 4, 4, 1) {
            match r.prompt {
                PromptInput::TokenIds(ids) => assert!(ids.iter().all(|t| (100..400).contains(t))),
                PromptInput::Text(_) => panic!("random prompts are token ids"),
            }
        }
        ds.fit_vocab(100_000);
        assert_eq!(build_requests(&ds, 4, 4, 1), wide);
    }

    #[test]
    fn random_prompts_share_exactly_the_prefix() {
        let ds = Dataset::random(32, 12).unwrap();
        let reqs = build_requests(&ds, 6, 9, 3);
        assert_eq!(reqs.len(), 6);
        let ids: Vec<&Vec<u32>> = reqs
            .iter()
            .map(|r| match &r.prompt {
                PromptInput::TokenIds(ids) => ids,
                PromptInput::Text(_) => panic!("random prompts are token ids"),
            })
            .collect();
        for (r, p) in reqs.iter().zip(&ids) {
            assert_eq!(p.len(), 32);
            assert_eq!(r.output_len, 9);
            assert_eq!(r.known_input_len(), Some(32));
            assert!(p.iter().all(|t| PROMPT_IDS.contains(t)));
            assert_eq!(p[..12], ids[0][..12]);
        }
        // The parts after the prefix differ (random ids from a 30k range).
        for a in 0..ids.len() {
            for b in a + 1..ids.len() {
                assert_ne!(ids[a][12..], ids[b][12..]);
            }
        }
        // Same seed, same prompts; no prefix: no shared head.
        assert_eq!(reqs, build_requests(&ds, 6, 9, 3));
        let plain = build_requests(&Dataset::random(32, 0).unwrap(), 2, 9, 3);
        match (&plain[0].prompt, &plain[1].prompt) {
            (PromptInput::TokenIds(a), PromptInput::TokenIds(b)) => assert_ne!(a[..4], b[..4]),
            _ => unreachable!(),
        }
        // The whole prompt may be shared.
        let all = build_requests(&Dataset::random(8, 8).unwrap(), 3, 1, 0);
        assert!(all.windows(2).all(|w| w[0].prompt == w[1].prompt));
    }

    #[test]
    fn random_dataset_rejects_a_prefix_longer_than_the_prompt() {
        let e = Dataset::random(8, 9).unwrap_err().to_string();
        assert!(
            e.contains("--prefix-len 9") && e.contains("--input-len 8"),
            "{e}"
        );
        assert!(Dataset::random(0, 0).is_err());
    }

    #[test]
    fn jsonl_text_and_token_prompts() {
        let text = concat!(
            "{\"prompt\": \"Hello there\", \"output_len\": 5}\n",
            "\n",
            "{\"prompt_token_ids\": [1, 2, 3]}\n",
            "  {\"prompt\": \"x\", \"max_tokens\": 2}  \n",
        );
        let entries = parse_jsonl(text, "d.jsonl").unwrap();
        assert_eq!(entries.len(), 3);
        let ds = Dataset::File {
            path: "d.jsonl".into(),
            entries,
        };
        let reqs = build_requests(&ds, 5, 7, 0);
        assert_eq!(reqs[0].prompt, PromptInput::Text("Hello there".into()));
        assert_eq!(reqs[0].output_len, 5);
        assert_eq!(reqs[0].known_input_len(), None);
        assert_eq!(reqs[1].prompt, PromptInput::TokenIds(vec![1, 2, 3]));
        assert_eq!(reqs[1].output_len, 7);
        assert_eq!(reqs[1].known_input_len(), Some(3));
        assert_eq!(reqs[2].output_len, 2);
        // Cycled when more requests than lines are asked for.
        assert_eq!(reqs[3], reqs[0]);
        assert_eq!(reqs[4], reqs[1]);
        assert_eq!(ds.name(), "d.jsonl");
    }

    #[test]
    fn jsonl_bad_lines_are_named() {
        let cases: &[(&str, usize, &str)] = &[
            ("{\"prompt\": \"a\"}\nnot json\n", 2, "not a JSON object"),
            ("{\"prompt\": \"a\"}\n\n{\"text\": \"a\"}\n", 3, "text"),
            ("{\"output_len\": 3}\n", 1, "needs \"prompt\""),
            (
                "{\"prompt\": \"a\", \"prompt_token_ids\": [1]}\n",
                1,
                "both",
            ),
            ("{\"prompt\": \"\"}\n", 1, "empty"),
            ("{\"prompt_token_ids\": []}\n", 1, "empty"),
            ("{\"prompt_token_ids\": [1, -2]}\n", 1, "not a JSON object"),
            ("{\"prompt\": \"a\", \"output_len\": 0}\n", 1, "at least 1"),
            ("[1, 2]\n", 1, "not a JSON object"),
        ];
        for (text, line, word) in cases {
            let e = parse_jsonl(text, "bad.jsonl").unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("bad.jsonl, line {line}:")),
                "{text:?}: {msg}"
            );
            assert!(msg.contains(word), "{text:?}: {msg}");
        }
        let e = parse_jsonl("\n \n", "empty.jsonl").unwrap_err().to_string();
        assert!(e.contains("no prompts"), "{e}");
        let e = Dataset::load(Path::new("/nonexistent/x.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    }
}
