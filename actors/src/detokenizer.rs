//! Incremental, UTF-8-safe detokenization with stop strings.
//!
//! [`IncrementalDetokenizer`] turns a sequence's generated tokens, a few at a time, into text
//! deltas that never split a character, and enforces the request's stop strings: text that
//! might be the beginning of a stop string is held back until it is ruled out, and once a
//! stop string appears nothing from its first character on is ever emitted.
//!
//! Decoding uses the two-offset window of vLLM / TGI. Tokens are decoded in context, as
//! `decode(tokens[prefix_offset..])` minus `decode(tokens[prefix_offset..read_offset])`, so
//! decoders that treat the first token of a string specially (SentencePiece's leading
//! space) or merge bytes across tokens (byte-level BPE) come out right. A delta whose text
//! ends in U+FFFD is an incomplete UTF-8 sequence: it waits for the next token. The window
//! starts on the last few prompt tokens, so the first generated token is decoded in context
//! too.
//!
//! The struct holds no decoder; each call borrows one ([`TokenDecoder`]), so one tokenizer
//! serves every sequence.

use std::error::Error as StdError;
use std::sync::Arc;

use thiserror::Error;

use crate::messages::{FinishReason, TokenId};

/// How many prompt tokens start the decoding window (vLLM uses the same number).
pub const INITIAL_CONTEXT_TOKENS: usize = 5;

/// Turns token ids into text. The engine's implementation is [`tokenizers::Tokenizer`]
/// (special tokens skipped); tests use small fakes.
pub trait TokenDecoder {
    type Error: Into<Box<dyn StdError + Send + Sync>>;

    fn decode(&self, ids: &[TokenId]) -> Result<String, Self::Error>;
}

impl TokenDecoder for tokenizers::Tokenizer {
    type Error = tokenizers::Error;

    /// Decodes with `skip_special_tokens = true`.
    fn decode(&self, ids: &[TokenId]) -> Result<String, Self::Error> {
        // `Tokenizer` derefs to `TokenizerImpl`, which has the inherent `decode`.
        (**self).decode(ids, true)
    }
}

impl<T: TokenDecoder + ?Sized> TokenDecoder for &T {
    type Error = T::Error;

    fn decode(&self, ids: &[TokenId]) -> Result<String, Self::Error> {
        (**self).decode(ids)
    }
}

impl<T: TokenDecoder + ?Sized> TokenDecoder for Arc<T> {
    type Error = T::Error;

    fn decode(&self, ids: &[TokenId]) -> Result<String, Self::Error> {
        (**self).decode(ids)
    }
}

/// Detokenization failed.
#[derive(Debug, Error)]
pub enum DetokError {
    #[error("decoding tokens failed: {0}")]
    Decode(#[source] Box<dyn StdError + Send + Sync>),
}

/// What one call produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DetokOutput {
    /// New text to stream; may be empty.
    pub text_delta: String,
    /// Set exactly once per sequence: by [`IncrementalDetokenizer::push`] when a stop string
    /// ended it (`Stop`), or by [`IncrementalDetokenizer::finish`] otherwise.
    pub finished: Option<FinishReason>,
}

/// The detokenization state of one sequence.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// Prompt context followed by the generated tokens not yet behind `prefix_offset`
    /// (older ones are dropped: they are never decoded again).
    tokens: Vec<TokenId>,
    prefix_offset: usize,
    read_offset: usize,
    stop: Vec<String>,
    /// Decoded, complete text not yet emitted: a possible stop-string start, or text
    /// decoded during the current call.
    pending: String,
    /// Index in `stop` of the stop string that ended the sequence.
    matched_stop: Option<usize>,
    finished: bool,
    num_tokens: usize,
}

impl IncrementalDetokenizer {
    /// State for a new sequence. `prompt_tokens` is the prompt (only its last
    /// [`INITIAL_CONTEXT_TOKENS`] are kept, as decoding context; they are never emitted);
    /// `stop` are the request's stop strings (empty ones are ignored).
    pub fn new(prompt_tokens: &[TokenId], stop: &[String]) -> Self {
        let start = prompt_tokens.len().saturating_sub(INITIAL_CONTEXT_TOKENS);
        let tokens = prompt_tokens[start..].to_vec();
        IncrementalDetokenizer {
            read_offset: tokens.len(),
            prefix_offset: 0,
            tokens,
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            matched_stop: None,
            finished: false,
            num_tokens: 0,
        }
    }

    /// Whether the sequence ended (its `finished` was already reported).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The stop string that ended the sequence, if one did.
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched_stop
            .and_then(|i| self.stop.get(i))
            .map(String::as_str)
    }

    /// Generated tokens received so far.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Feeds newly generated tokens and returns the text that is now safe to stream.
    ///
    /// Do not pass the EOS / stop token id that ended a sequence: it is not part of the
    /// text. When a stop string completes, the result has `finished: Some(Stop)` and the
    /// tokens after the one that completed it are ignored. After the sequence finished,
    /// calls return an empty output.
    ///
    /// On a decode error nothing is lost: the tokens are kept and decoded on the next call.
    pub fn push<D: TokenDecoder + ?Sized>(
        &mut self,
        decoder: &D,
        new_tokens: &[TokenId],
    ) -> Result<DetokOutput, DetokError> {
        if self.finished {
            return Ok(DetokOutput::default());
        }
        for (i, &token) in new_tokens.iter().enumerate() {
            self.tokens.push(token);
            self.num_tokens += 1;
            if let Err(e) = self.decode_window(decoder, false) {
                // Keep the rest too: the next call decodes them with the failed one.
                let rest = new_tokens.get(i + 1..).unwrap_or_default();
                self.tokens.extend_from_slice(rest);
                self.num_tokens += rest.len();
                return Err(e);
            }
            if self.cut_at_stop() {
                return Ok(self.finish_output(FinishReason::Stop));
            }
        }
        let hold = self.held_back_start();
        let text_delta = self.pending.drain(..hold).collect();
        // `drain(..hold)` removed the emitted head; what is left is the held suffix.
        Ok(DetokOutput {
            text_delta,
            finished: None,
        })
    }

    /// Ends the sequence for `reason` (length, EOS / stop token, abort): emits the text
    /// held back for stop strings and whatever the last tokens decode to, an incomplete
    /// UTF-8 sequence included (as U+FFFD, as a full decode would show it). If that text
    /// completes a stop string after all, it is cut there and the reason becomes `Stop`.
    pub fn finish<D: TokenDecoder + ?Sized>(
        &mut self,
        decoder: &D,
        reason: FinishReason,
    ) -> Result<DetokOutput, DetokError> {
        if self.finished {
            return Ok(DetokOutput::default());
        }
        if self.read_offset < self.tokens.len() {
            self.decode_window(decoder, true)?;
        }
        let reason = if self.cut_at_stop() {
            FinishReason::Stop
        } else {
            reason
        };
        Ok(self.finish_output(reason))
    }

    fn finish_output(&mut self, reason: FinishReason) -> DetokOutput {
        self.finished = true;
        self.tokens = Vec::new();
        DetokOutput {
            text_delta: std::mem::take(&mut self.pending),
            finished: Some(reason),
        }
    }

    /// Decodes the window and moves its new complete text to `pending`. With `force`, text
    /// ending in an incomplete character is taken too (the sequence is over).
    fn decode_window<D: TokenDecoder + ?Sized>(
        &mut self,
        decoder: &D,
        force: bool,
    ) -> Result<(), DetokError> {
        let decode = |ids: &[TokenId]| {
            decoder
                .decode(ids)
                .map_err(|e| DetokError::Decode(e.into()))
        };
        let prefix = decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.tokens[self.prefix_offset..])?;
        if full.len() <= prefix.len() || (!force && full.ends_with('\u{FFFD}')) {
            // Nothing new yet (a skipped special token) or half a character: wait.
            return Ok(());
        }
        self.pending.push_str(suffix_from(&full, prefix.len()));
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        // Tokens before the window are never decoded again.
        self.tokens.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(())
    }

    /// Truncates `pending` before the earliest stop string in it; true if there was one.
    ///
    /// Everything before `pending` was emitted only after being ruled out as a stop-string
    /// start, so an occurrence can only begin inside `pending`.
    fn cut_at_stop(&mut self) -> bool {
        let earliest = self
            .stop
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.pending.find(s.as_str()).map(|pos| (pos, i)))
            .min();
        match earliest {
            Some((pos, i)) => {
                self.pending.truncate(pos);
                self.matched_stop = Some(i);
                true
            }
            None => false,
        }
    }

    /// Where the longest suffix of `pending` that is a proper prefix of some stop string
    /// begins (`pending.len()` if none). That suffix is shorter than the longest stop
    /// string, so at most (longest stop − 1) bytes are ever held back.
    fn held_back_start(&self) -> usize {
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        if longest == 0 {
            return self.pending.len();
        }
        let earliest = self.pending.len().saturating_sub(longest - 1);
        self.pending
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stop
                    .iter()
                    .any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(self.pending.len())
    }
}

/// `text[at..]`, moved forward to the next character boundary if `at` falls inside one
/// (possible only with decoders whose prefix text is not a prefix of the full text).
fn suffix_from(text: &str, at: usize) -> &str {
    let start = (at..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-level fake: each id maps to raw bytes; decode is the lossy UTF-8 of their
    /// concatenation, like a byte-level BPE decoder.
    struct Bytes(Vec<Vec<u8>>);

    #[derive(Debug, Error)]
    #[error("unknown token {0}")]
    struct UnknownToken(TokenId);

    impl TokenDecoder for Bytes {
        type Error = UnknownToken;

        fn decode(&self, ids: &[TokenId]) -> Result<String, UnknownToken> {
            let mut bytes = Vec::new();
            for &id in ids {
                bytes.extend(self.0.get(id as usize).ok_or(UnknownToken(id))?);
            }
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    /// A vocabulary holding every byte as its own token (id = byte), then `pieces`.
    fn vocab(pieces: &[&str]) -> Bytes {
        let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        v.extend(pieces.iter().map(|p| p.as_bytes().to_vec()));
        Bytes(v)
    }

    /// Ids spelling `text` one byte per token.
    fn byte_ids(text: &str) -> Vec<TokenId> {
        text.bytes().map(TokenId::from).collect()
    }

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    /// Feeds `tokens` one per call and finishes with `Length` if nothing stopped it first.
    /// Returns every delta and the finish reason.
    fn run(
        dec: &impl TokenDecoder,
        prompt: &[TokenId],
        tokens: &[TokenId],
        stop: &[&str],
    ) -> (Vec<String>, Option<FinishReason>) {
        let mut d = IncrementalDetokenizer::new(prompt, &stops(stop));
        let mut deltas = Vec::new();
        for &t in tokens {
            let out = d.push(dec, &[t]).expect("push");
            deltas.push(out.text_delta);
            if out.finished.is_some() {
                return (deltas, out.finished);
            }
        }
        let out = d.finish(dec, FinishReason::Length).expect("finish");
        deltas.push(out.text_delta);
        (deltas, out.finished)
    }

    #[test]
    fn emoji_split_into_byte_tokens_comes_out_whole_once() {
        let dec = vocab(&[]);
        let tokens = byte_ids("a😀b");
        assert_eq!(tokens.len(), 6);
        let (deltas, reason) = run(&dec, &[], &tokens, &[]);
        assert_eq!(deltas, vec!["a", "", "", "", "😀", "b", ""]);
        assert_eq!(reason, Some(FinishReason::Length));
    }

    #[test]
    fn deltas_concatenate_to_the_full_decode() {
        let dec = vocab(&["Ġ", " the", "ö", "\u{1F600}", "ab", "\u{FFFD}"]);
        let texts = [
            "plain ascii text",
            "grüße, wörld — ünïcödé",
            "日本語のテキスト",
            "😀🎉 mixed 👍🏽 emoji",
            "",
        ];
        for text in texts {
            let tokens = byte_ids(text);
            let (deltas, _) = run(&dec, &[], &tokens, &[]);
            assert_eq!(deltas.concat(), text);
        }
        // Tokens mixing whole pieces and loose bytes; ids 256.. are the pieces above.
        let mut tokens = vec![256, 257, 258];
        tokens.extend(byte_ids("x"));
        tokens.extend(&[0xF0, 0x9F]); // half an emoji...
        tokens.extend(&[0x98, 0x80, 259, 260, 261]); // ...its end, a whole one, a literal FFFD
        let want = dec.decode(&tokens).expect("decode");
        let (deltas, _) = run(&dec, &byte_ids("prompt"), &tokens, &[]);
        assert_eq!(deltas.concat(), want);
        assert_eq!(want, "Ġ theöx😀😀ab\u{FFFD}");
    }

    #[test]
    fn several_tokens_per_push_give_the_same_text() {
        let dec = vocab(&[]);
        let text = "héllo 😀 wörld";
        let tokens = byte_ids(text);
        for chunk in 1..=tokens.len() {
            let mut d = IncrementalDetokenizer::new(&[], &[]);
            let mut all = String::new();
            for c in tokens.chunks(chunk) {
                all += &d.push(&dec, c).expect("push").text_delta;
            }
            all += &d
                .finish(&dec, FinishReason::Length)
                .expect("finish")
                .text_delta;
            assert_eq!(all, text, "chunk {chunk}");
            assert_eq!(d.num_tokens(), tokens.len());
        }
    }

    #[test]
    fn no_delta_ever_holds_half_a_character() {
        let dec = vocab(&[]);
        let tokens = byte_ids("€ß😀中");
        let (deltas, _) = run(&dec, &[], &tokens, &[]);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
        assert_eq!(deltas.concat(), "€ß😀中");
    }

    /// SentencePiece-like fake: '▁' stands for a space, and a leading space of the decoded
    /// string is dropped.
    struct Pieces(Vec<&'static str>);

    impl TokenDecoder for Pieces {
        type Error = UnknownToken;

        fn decode(&self, ids: &[TokenId]) -> Result<String, UnknownToken> {
            let mut s = String::new();
            for &id in ids {
                s += self.0.get(id as usize).ok_or(UnknownToken(id))?;
            }
            let s = s.replace('▁', " ");
            Ok(s.strip_prefix(' ').map(str::to_string).unwrap_or(s))
        }
    }

    #[test]
    fn leading_space_survives_thanks_to_prompt_context() {
        let dec = Pieces(vec!["▁Say", "▁hello", "▁world", "!", "▁again"]);
        // Generated "▁world" right after the prompt keeps its space.
        let (deltas, _) = run(&dec, &[0, 1], &[2, 3, 4], &[]);
        assert_eq!(deltas.concat(), " world! again");
        // Without any context the first space is lost, as in a plain decode.
        let (deltas, _) = run(&dec, &[], &[2, 3, 4], &[]);
        assert_eq!(deltas.concat(), "world! again");
        // Only the last INITIAL_CONTEXT_TOKENS prompt tokens are kept.
        let long_prompt = vec![0; 100];
        let d = IncrementalDetokenizer::new(&long_prompt, &[]);
        assert_eq!(d.tokens.len(), INITIAL_CONTEXT_TOKENS);
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_never_emitted() {
        let dec = vocab(&["He", "llo ", "ST", "O", "P there"]);
        // "Hello STOP there" in pieces 256..=260.
        let (deltas, reason) = run(&dec, &[], &[256, 257, 258, 259, 260], &["STOP"]);
        assert_eq!(reason, Some(FinishReason::Stop));
        assert_eq!(deltas.concat(), "Hello ");
        assert!(deltas.iter().all(|d| !d.contains('S')));
        // The held "ST", "STO" were never streamed: they were deltas "", "".
        assert_eq!(deltas, vec!["He", "llo ", "", "", ""]);
    }

    #[test]
    fn stop_detokenizer_reports_the_match_and_goes_quiet() {
        let dec = vocab(&[]);
        let mut d = IncrementalDetokenizer::new(&[], &stops(&["end", "xyz"]));
        let out = d.push(&dec, &byte_ids("the end is near")).expect("push");
        assert_eq!(out.text_delta, "the ");
        assert_eq!(out.finished, Some(FinishReason::Stop));
        assert_eq!(d.matched_stop(), Some("end"));
        assert!(d.is_finished());
        assert_eq!(
            d.push(&dec, &byte_ids("more")).expect("push"),
            DetokOutput::default()
        );
        let out = d.finish(&dec, FinishReason::Length).expect("finish");
        assert_eq!(out, DetokOutput::default());
    }

    #[test]
    fn partial_match_is_released_once_ruled_out() {
        let dec = vocab(&[]);
        let (deltas, reason) = run(&dec, &[], &byte_ids("a STOx STOP"), &["STOP"]);
        assert_eq!(reason, Some(FinishReason::Stop));
        assert_eq!(deltas.concat(), "a STOx ");
        // "STO" was held, then released together with the "x" that ruled it out.
        assert_eq!(deltas[..5].concat(), "a ");
        assert_eq!(deltas[5], "STOx");
    }

    #[test]
    fn first_occurrence_wins_among_several_stop_strings() {
        let dec = vocab(&[]);
        let (deltas, reason) = run(&dec, &[], &byte_ids("hello world"), &["world", "lo w"]);
        assert_eq!(reason, Some(FinishReason::Stop));
        assert_eq!(deltas.concat(), "hel");
        // Both complete on the same token: the one starting earlier wins.
        let mut d = IncrementalDetokenizer::new(&[], &stops(&["cd", "bcd", "abcdef"]));
        let out = d.push(&dec, &byte_ids("xabcdx")).expect("push");
        assert_eq!(out.text_delta, "xa");
        assert_eq!(d.matched_stop(), Some("bcd"));
        // The one completed first wins even when a longer one would start earlier.
        let mut d = IncrementalDetokenizer::new(&[], &stops(&["abcdef", "cd"]));
        let out = d.push(&dec, &byte_ids("abcdef")).expect("push");
        assert_eq!(out.text_delta, "ab");
        assert_eq!(d.matched_stop(), Some("cd"));
    }

    #[test]
    fn finish_for_length_emits_the_held_text() {
        let dec = vocab(&[]);
        let mut d = IncrementalDetokenizer::new(&[], &stops(&["STOP"]));
        let out = d.push(&dec, &byte_ids("go ST")).expect("push");
        assert_eq!(out.text_delta, "go ");
        let out = d.finish(&dec, FinishReason::Length).expect("finish");
        assert_eq!(out.text_delta, "ST");
        assert_eq!(out.finished, Some(FinishReason::Length));
        assert_eq!(d.matched_stop(), None);

        let mut d = IncrementalDetokenizer::new(&[], &stops(&["STOP"]));
        d.push(&dec, &byte_ids("STO")).expect("push");
        let out = d.finish(&dec, FinishReason::Abort).expect("finish");
        assert_eq!(out.text_delta, "STO");
        assert_eq!(out.finished, Some(FinishReason::Abort));
    }

    #[test]
    fn finish_emits_an_incomplete_character_as_replacement() {
        let dec = vocab(&[]);
        let mut tokens = byte_ids("ok");
        tokens.extend([0xF0, 0x9F, 0x98]);
        let (deltas, reason) = run(&dec, &[], &tokens, &[]);
        assert_eq!(reason, Some(FinishReason::Length));
        assert_eq!(deltas.concat(), dec.decode(&tokens).expect("decode"));
        assert_eq!(deltas.last().map(String::as_str), Some("\u{FFFD}"));
    }

    #[test]
    fn a_stop_string_completed_by_a_split_character_is_caught() {
        let dec = vocab(&[]);
        let mut d = IncrementalDetokenizer::new(&[], &stops(&["é"]));
        let out = d.push(&dec, &[b'a'.into(), 0xC3]).expect("push");
        assert_eq!(out.text_delta, "a");
        let out = d.push(&dec, &[0xA9, b'b'.into()]).expect("push");
        let stopped = DetokOutput {
            text_delta: String::new(),
            finished: Some(FinishReason::Stop),
        };
        assert_eq!(out, stopped);
    }

    #[test]
    fn a_stop_string_revealed_by_finish_wins_over_length() {
        // Only the forced final decode shows the U+FFFD this stop string needs.
        let dec = vocab(&[]);
        let mut d = IncrementalDetokenizer::new(&[], &stops(&["x\u{FFFD}"]));
        let out = d
            .push(&dec, &[b'w'.into(), b'x'.into(), 0xF0])
            .expect("push");
        assert_eq!(out.text_delta, "w");
        let out = d.finish(&dec, FinishReason::Length).expect("finish");
        assert_eq!(out.text_delta, "");
        assert_eq!(out.finished, Some(FinishReason::Stop));
    }

    #[test]
    fn hold_back_is_shorter_than_the_longest_stop_string() {
        let dec = vocab(&[]);
        let stop = ["abcd", "xy"];
        let text = "zabcabcabxaabcx xxy";
        let mut d = IncrementalDetokenizer::new(&[], &stops(&stop));
        let mut emitted = String::new();
        for (i, t) in byte_ids(text).into_iter().enumerate() {
            let out = d.push(&dec, &[t]).expect("push");
            emitted += &out.text_delta;
            if out.finished.is_some() {
                break;
            }
            let held = &text[emitted.len()..=i];
            assert!(held.chars().count() <= 3, "held {held:?}");
            // Held text is exactly a prefix of some stop string, or nothing.
            assert!(held.is_empty() || stop.iter().any(|s| s.starts_with(held)));
        }
        assert_eq!(emitted, "zabcabcabxaabcx x");
    }

    #[test]
    fn multibyte_stop_strings_hold_back_on_character_boundaries() {
        let dec = vocab(&[]);
        let (deltas, reason) = run(&dec, &[], &byte_ids("naïve 😀😁 fin"), &["😁 f"]);
        assert_eq!(reason, Some(FinishReason::Stop));
        assert_eq!(deltas.concat(), "naïve 😀");
        let (deltas, reason) = run(&dec, &[], &byte_ids("naïve 😀😁x"), &["😁 f"]);
        assert_eq!(reason, Some(FinishReason::Length));
        assert_eq!(deltas.concat(), "naïve 😀😁x");
    }

    #[test]
    fn stop_at_the_very_start_emits_nothing() {
        let dec = vocab(&[]);
        let (deltas, reason) = run(
            &dec,
            &byte_ids("prompt STOP"),
            &byte_ids("STOP now"),
            &["STOP", ""],
        );
        assert_eq!(reason, Some(FinishReason::Stop));
        assert_eq!(deltas.concat(), "");
    }

    #[test]
    fn decode_errors_surface_and_lose_nothing() {
        let dec = vocab(&[]);
        let mut d = IncrementalDetokenizer::new(&[], &[]);
        assert_eq!(
            d.push(&dec, &byte_ids("ab")).expect("push").text_delta,
            "ab"
        );
        let err = d.push(&dec, &[9999, b'x'.into()]).expect_err("unknown id");
        assert!(err.to_string().contains("9999"), "{err}");
        // A decoder that knows the id picks up where the failed call stopped.
        let mut wider = vocab(&[]);
        wider.0.resize(10_000, b"!".to_vec());
        let out = d.push(&wider, &byte_ids("c")).expect("push");
        assert_eq!(out.text_delta, "!xc");
        assert_eq!(d.num_tokens(), 5);
    }

    #[test]
    fn works_through_references_and_arcs() {
        let dec = Arc::new(vocab(&[]));
        let mut d = IncrementalDetokenizer::new(&[], &[]);
        let out = d.push(&dec, &byte_ids("hi")).expect("push");
        assert_eq!(out.text_delta, "hi");
        let by_ref: &dyn TokenDecoder<Error = UnknownToken> = &*dec;
        let out = d.push(by_ref, &byte_ids("!")).expect("push");
        assert_eq!(out.text_delta, "!");
    }

    /// A tiny byte-level BPE built in memory with the real `tokenizers` crate.
    fn byte_level_bpe() -> tokenizers::Tokenizer {
        use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
        use tokenizers::models::bpe::{Vocab, BPE};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;

        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut tokens: Vec<String> = alphabet.iter().map(char::to_string).collect();
        let merges: Vec<(String, String)> = [
            ("Ġ", "w"),
            ("Ġw", "o"),
            ("r", "l"),
            ("rl", "d"),
            ("Ġwo", "rld"),
            ("S", "T"),
            ("ST", "O"),
            ("STO", "P"),
            ("ð", "Ł"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        let vocab: Vocab = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .expect("bpe");
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        tokenizer
    }

    #[test]
    fn real_byte_level_bpe_tokenizer() {
        let tok = byte_level_bpe();
        let encode =
            |s: &str| -> Vec<TokenId> { tok.encode(s, false).expect("encode").get_ids().to_vec() };
        let prompt = encode("Say:");
        let text = " hello world 😀 grüße STOP world";
        let generated = encode(text);
        // The emoji is split into byte tokens, " world" is a single merged token.
        assert!(generated.len() > 20);
        assert_eq!(
            TokenDecoder::decode(&tok, &generated).expect("decode"),
            text
        );

        let (deltas, reason) = run(&tok, &prompt, &generated, &[]);
        assert_eq!(reason, Some(FinishReason::Length));
        assert_eq!(deltas.concat(), text);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
        assert!(deltas.iter().any(|d| d == "😀"));

        let (deltas, reason) = run(&tok, &prompt, &generated, &["STOP", "grüße!"]);
        assert_eq!(reason, Some(FinishReason::Stop));
        assert_eq!(deltas.concat(), " hello world 😀 grüße ");
    }
}

// --- request ids ---------------------------------------------------------------------------

/// Which live sequences belong to a client request id (cancel is by request id; the engine
/// works with sequence ids). Ids are the client's, so several live sequences may share one.
#[derive(Debug, Default)]
pub struct RequestIndex {
    by_request: std::collections::HashMap<String, Vec<crate::messages::SeqId>>,
}

impl RequestIndex {
    pub fn insert(&mut self, request_id: &str, seq_id: crate::messages::SeqId) {
        self.by_request
            .entry(request_id.to_owned())
            .or_default()
            .push(seq_id);
    }

    /// Forgets one sequence (its stream ended).
    pub fn remove(&mut self, request_id: &str, seq_id: crate::messages::SeqId) {
        if let Some(seqs) = self.by_request.get_mut(request_id) {
            seqs.retain(|&s| s != seq_id);
            if seqs.is_empty() {
                self.by_request.remove(request_id);
            }
        }
    }

    /// The live sequences of a request (empty when none).
    pub fn seqs(&self, request_id: &str) -> &[crate::messages::SeqId] {
        self.by_request.get(request_id).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.by_request.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_request.is_empty()
    }
}

#[cfg(test)]
mod request_index_tests {
    use super::RequestIndex;

    #[test]
    fn tracks_sequences_per_request() {
        let mut idx = RequestIndex::default();
        assert!(idx.seqs("a").is_empty());
        idx.insert("a", 1);
        idx.insert("b", 2);
        idx.insert("a", 3);
        assert_eq!(idx.seqs("a"), &[1, 3]);
        idx.remove("a", 1);
        assert_eq!(idx.seqs("a"), &[3]);
        idx.remove("a", 3);
        idx.remove("a", 3);
        idx.remove("zzz", 9);
        assert!(idx.seqs("a").is_empty());
        assert_eq!(idx.len(), 1);
        idx.remove("b", 2);
        assert!(idx.is_empty());
    }
}

// --- actor ---------------------------------------------------------------------------------

mod actor {
    use std::collections::HashMap;
    use std::sync::Arc;

    use actix::prelude::*;

    use super::{DetokOutput, IncrementalDetokenizer, RequestIndex};
    use crate::fault;
    use crate::messages::{
        now_us, post, CancelStreams, ErrorBody, ErrorCode, EventLogprobs, FinishReason,
        FinishSequence, RegisterStream, SeqId, SeqOutput, StepTokens, StreamEnd, StreamEvent,
        Timings, TokenId, TokenLogprobs, Usage,
    };
    use crate::metrics::{FinishedSample, RequestMetrics};
    use crate::streams::Streams;
    use crate::supervisor::LifeGuard;

    struct Stream {
        request_id: String,
        detok: IncrementalDetokenizer,
        num_prompt_tokens: u32,
        num_output_tokens: u32,
        arrival_us: u64,
        queue_us: u64,
        cached_tokens: u32,
        first_token_us: Option<u64>,
        /// When the latest token arrived (for inter-token latency).
        last_token_us: u64,
        scheduled_us: Option<u64>,
        /// Token ids not yet sent with a text delta.
        unsent_ids: Vec<TokenId>,
        /// Their log-probabilities, one per id (`Some` once a token came with them).
        unsent_logprobs: Option<Vec<TokenLogprobs>>,
        /// The prompt's, until the first event carries them.
        prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
        /// Sum of the generated tokens' log-probabilities.
        cumulative_logprob: Option<f64>,
        /// A cancel was already passed on (repeated cancels send nothing more).
        cancelling: bool,
    }

    /// The detokenizer actor: owns one [`IncrementalDetokenizer`] per live sequence and
    /// turns sampled tokens into stream events in the [`Streams`] registry.
    pub struct DetokenizerActor {
        tokenizer: Arc<tokenizers::Tokenizer>,
        scheduler: Recipient<FinishSequence>,
        streams: Streams,
        live: HashMap<SeqId, Stream>,
        requests: RequestIndex,
        metrics: Option<RequestMetrics>,
        guard: LifeGuard,
    }

    impl DetokenizerActor {
        pub fn new(
            tokenizer: Arc<tokenizers::Tokenizer>,
            scheduler: Recipient<FinishSequence>,
            streams: Streams,
            guard: LifeGuard,
        ) -> Self {
            Self {
                tokenizer,
                scheduler,
                streams,
                live: HashMap::new(),
                requests: RequestIndex::default(),
                metrics: None,
                guard,
            }
        }

        /// Records the per-request series into `metrics`.
        pub fn with_metrics(mut self, metrics: RequestMetrics) -> Self {
            self.metrics = Some(metrics);
            self
        }

        /// Removes a stream that ended, and its request-id entry.
        fn take_stream(&mut self, seq_id: SeqId) -> Option<Stream> {
            let st = self.live.remove(&seq_id)?;
            self.requests.remove(&st.request_id, seq_id);
            fault::disarm(seq_id);
            Some(st)
        }

        /// Tells the scheduler to end a sequence; true when the message is on its way.
        fn finish_in_scheduler(&self, seq_id: SeqId, reason: FinishReason) -> bool {
            match post(&self.scheduler, FinishSequence { seq_id, reason }) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(seq_id, error = %e, "cannot tell the scheduler to end a sequence");
                    false
                }
            }
        }

        fn on_token(&mut self, o: SeqOutput) {
            let Some(st) = self.live.get_mut(&o.seq_id) else {
                return; // already ended (stop string, cancel)
            };
            let now = now_us();
            if let Some(m) = &self.metrics {
                match st.first_token_us {
                    None => m.first_token(st.num_prompt_tokens, now.saturating_sub(st.arrival_us)),
                    Some(_) => m.next_token(now.saturating_sub(st.last_token_us)),
                }
            }
            st.first_token_us.get_or_insert(now);
            st.last_token_us = now;
            st.num_output_tokens += 1;
            st.unsent_ids.push(o.token_id);
            if let Some(lp) = o.logprobs {
                *st.cumulative_logprob.get_or_insert(0.0) += f64::from(lp.logprob);
                st.unsent_logprobs.get_or_insert_with(Vec::new).push(lp);
            }
            if o.prompt_logprobs.is_some() {
                st.prompt_logprobs = o.prompt_logprobs;
            }
            let tok: &tokenizers::Tokenizer = &self.tokenizer;
            let res = match o.finish_reason {
                // The EOS / stop token that ended the sequence is not part of the text.
                Some(FinishReason::Stop) => st.detok.finish(tok, FinishReason::Stop),
                Some(reason) => match st.detok.push(tok, &[o.token_id]) {
                    Ok(out) if out.finished.is_some() => Ok(out),
                    Ok(out) => st.detok.finish(tok, reason).map(|mut fin| {
                        fin.text_delta.insert_str(0, &out.text_delta);
                        fin
                    }),
                    Err(e) => Err(e),
                },
                None => st.detok.push(tok, &[o.token_id]),
            };
            match res {
                Ok(out) => self.emit(o.seq_id, out, o.finish_reason.is_none()),
                Err(e) => self.fail(
                    o.seq_id,
                    ErrorBody::new(ErrorCode::Internal, format!("detokenizing: {e}")),
                    o.finish_reason.is_none(),
                ),
            }
        }

        fn emit(&mut self, seq_id: SeqId, out: DetokOutput, scheduler_still_running: bool) {
            let Some(st) = self.live.get_mut(&seq_id) else {
                return;
            };
            let Some(reason) = out.finished else {
                if !out.text_delta.is_empty() {
                    let logprobs = EventLogprobs {
                        tokens: st.unsent_logprobs.as_mut().map(std::mem::take),
                        prompt: st.prompt_logprobs.take(),
                        cumulative: None,
                    };
                    self.streams.send(
                        seq_id,
                        StreamEvent::Delta {
                            text: out.text_delta,
                            token_ids: std::mem::take(&mut st.unsent_ids),
                            logprobs,
                        },
                    );
                }
                return;
            };
            if scheduler_still_running {
                // A stop string ended it: the scheduler must stop generating.
                self.finish_in_scheduler(seq_id, reason);
            }
            let Some(st) = self.take_stream(seq_id) else {
                return;
            };
            let now = now_us();
            if let Some(m) = &self.metrics {
                m.finished(&FinishedSample {
                    reason: Some(reason),
                    arrival_us: st.arrival_us,
                    queue_us: st.queue_us,
                    scheduled_us: st.scheduled_us,
                    first_token_us: st.first_token_us,
                    finished_us: now,
                    prompt_tokens: st.num_prompt_tokens,
                    output_tokens: st.num_output_tokens,
                });
            }
            let ms = |us: u64| us as f64 / 1e3;
            let timings = Timings {
                queue_ms: ms(st.queue_us),
                ttft_ms: ms(st
                    .first_token_us
                    .unwrap_or(now)
                    .saturating_sub(st.arrival_us)),
                total_ms: ms(now.saturating_sub(st.arrival_us)),
            };
            self.streams.end(
                seq_id,
                StreamEvent::Finished {
                    text: out.text_delta,
                    token_ids: st.unsent_ids,
                    finish_reason: reason,
                    usage: Usage {
                        prompt_tokens: st.num_prompt_tokens,
                        completion_tokens: st.num_output_tokens,
                        cached_tokens: st.cached_tokens,
                    },
                    timings,
                    logprobs: EventLogprobs {
                        tokens: st.unsent_logprobs,
                        prompt: st.prompt_logprobs,
                        cumulative: st.cumulative_logprob,
                    },
                },
            );
        }

        /// Ends a stream with an error; the scheduler is told to stop it when it may still
        /// be running.
        fn fail(&mut self, seq_id: SeqId, error: ErrorBody, scheduler_still_running: bool) {
            if self.take_stream(seq_id).is_some() {
                self.streams.end(seq_id, StreamEvent::Error(error));
                if scheduler_still_running {
                    self.finish_in_scheduler(seq_id, FinishReason::Abort);
                }
            }
        }
    }

    impl Actor for DetokenizerActor {
        type Context = Context<Self>;

        fn started(&mut self, _: &mut Context<Self>) {
            self.guard.watch_this_thread();
        }
    }

    impl Handler<RegisterStream> for DetokenizerActor {
        type Result = ();
        fn handle(&mut self, msg: RegisterStream, _: &mut Context<Self>) {
            fault::panic_if_armed("detokenizer", std::iter::once(msg.seq_id));
            self.requests.insert(&msg.request_id, msg.seq_id);
            self.live.insert(
                msg.seq_id,
                Stream {
                    request_id: msg.request_id,
                    detok: IncrementalDetokenizer::new(&msg.prompt_tokens, &msg.stop),
                    num_prompt_tokens: msg.prompt_tokens.len() as u32,
                    num_output_tokens: 0,
                    arrival_us: msg.arrival_us,
                    queue_us: 0,
                    cached_tokens: 0,
                    first_token_us: None,
                    last_token_us: 0,
                    scheduled_us: None,
                    unsent_ids: Vec::new(),
                    unsent_logprobs: None,
                    prompt_logprobs: None,
                    cumulative_logprob: None,
                    cancelling: false,
                },
            );
        }
    }

    impl Handler<StepTokens> for DetokenizerActor {
        type Result = ();
        fn handle(&mut self, msg: StepTokens, _: &mut Context<Self>) {
            for f in msg.first_scheduled {
                if let Some(st) = self.live.get_mut(&f.seq_id) {
                    st.queue_us = f.queue_us;
                    st.scheduled_us = Some(f.scheduled_us);
                    st.cached_tokens = f.cached_tokens as u32;
                }
            }
            if let Some(m) = &self.metrics {
                m.generated(msg.outputs.len() as u64);
            }
            for o in msg.outputs {
                self.on_token(o);
            }
        }
    }

    impl Handler<CancelStreams> for DetokenizerActor {
        type Result = bool;
        fn handle(&mut self, msg: CancelStreams, _: &mut Context<Self>) -> bool {
            let seqs = self.requests.seqs(&msg.request_id).to_vec();
            for &seq_id in &seqs {
                let Some(st) = self.live.get_mut(&seq_id) else {
                    continue;
                };
                if std::mem::replace(&mut st.cancelling, true) {
                    continue; // already on its way
                }
                tracing::debug!(request_id = %msg.request_id, seq_id, "cancel");
                if !self.finish_in_scheduler(seq_id, FinishReason::Abort) {
                    self.fail(
                        seq_id,
                        ErrorBody::internal("cancelled, but the scheduler is unreachable"),
                        false,
                    );
                }
            }
            !seqs.is_empty()
        }
    }

    impl Handler<StreamEnd> for DetokenizerActor {
        type Result = ();
        fn handle(&mut self, msg: StreamEnd, _: &mut Context<Self>) {
            if let Some(error) = msg.error {
                if self.take_stream(msg.seq_id).is_some() {
                    self.streams.end(msg.seq_id, StreamEvent::Error(error));
                }
                return;
            }
            let tok: &tokenizers::Tokenizer = &self.tokenizer;
            let res = match self.live.get_mut(&msg.seq_id) {
                Some(st) => st.detok.finish(tok, msg.reason),
                None => return,
            };
            match res {
                Ok(mut out) => {
                    // A cancel keeps its reason even if held-back text completes a stop string.
                    out.finished = Some(msg.reason);
                    self.emit(msg.seq_id, out, false)
                }
                Err(e) => self.fail(
                    msg.seq_id,
                    ErrorBody::new(ErrorCode::Internal, format!("detokenizing: {e}")),
                    false,
                ),
            }
        }
    }
}

pub use actor::DetokenizerActor;
