//! The pure parts of the front door: turning one request's engine events into numbered
//! replies ([`ReplyStream`]), remembering cancels that arrive before their request
//! ([`RecentCancels`]), and reading a message's format ([`message_format`]).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use async_nats::HeaderMap;
use pagoda_actors::messages::{FinishReason, TokenId};
use pagoda_actors::protocol::{
    Chunk, ErrorBody, ErrorReply, EventLogprobs, Reply, StreamEvent, TokenLogprobs, Usage,
    WireFormat,
};
use tokio::time::Instant;

/// Turns one request's engine events into numbered replies: `seq` 0, 1, 2, … without gaps.
/// With `stream: false` each completion's deltas are gathered into its final chunk. With
/// `n` > 1 every reply names its completion (`index`), each completion ends with its own
/// final chunk or error, and the request is done once all of them have.
#[derive(Debug)]
pub struct ReplyStream {
    id: String,
    attempt: u32,
    stream: bool,
    next_seq: u64,
    choices: Vec<Choice>,
    done: bool,
}

/// What one completion has gathered (with `stream: false`) and whether it ended.
#[derive(Debug, Default)]
struct Choice {
    text: String,
    token_ids: Vec<TokenId>,
    logprobs: Option<Vec<TokenLogprobs>>,
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    done: bool,
}

impl Choice {
    /// Adds a delta to the answer of a `stream: false` request.
    fn gather(&mut self, text: String, token_ids: Vec<TokenId>, logprobs: EventLogprobs) {
        self.text.push_str(&text);
        self.token_ids.extend(token_ids);
        if let Some(lps) = logprobs.tokens {
            self.logprobs.get_or_insert_with(Vec::new).extend(lps);
        }
        if logprobs.prompt.is_some() {
            self.prompt_logprobs = logprobs.prompt;
        }
    }
}

impl ReplyStream {
    /// A request with one completion (see [`Self::set_n`]).
    pub fn new(id: String, attempt: u32, stream: bool) -> Self {
        Self {
            id,
            attempt,
            stream,
            next_seq: 0,
            choices: vec![Choice::default()],
            done: false,
        }
    }

    /// The number of completions the engine streams (`n`).
    pub fn set_n(&mut self, n: u32) {
        self.choices.resize_with(n.max(1) as usize, Choice::default);
    }

    /// Whether the request's last reply was produced.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// `index` on the wire: only with `n` > 1.
    fn wire_index(&self, index: u32) -> Option<u32> {
        (self.choices.len() > 1).then_some(index)
    }

    /// Marks completion `index` ended; the request is done with the last one.
    fn end_choice(&mut self, index: usize) {
        if let Some(c) = self.choices.get_mut(index) {
            c.done = true;
        }
        self.done = self.choices.iter().all(|c| c.done);
    }

    /// The reply for completion `index`'s engine event, if one is due. Nothing follows
    /// the final reply of a completion, or of the request.
    pub fn on_event(&mut self, index: u32, ev: StreamEvent) -> Option<Reply> {
        let i = index as usize;
        if self.done || self.choices.get(i).is_none_or(|c| c.done) {
            return None;
        }
        let wire_index = self.wire_index(index);
        match ev {
            StreamEvent::Delta {
                text,
                token_ids,
                logprobs,
            } => {
                if !self.stream {
                    self.choices[i].gather(text, token_ids, logprobs);
                    return None;
                }
                Some(Reply::Chunk(Chunk {
                    id: self.id.clone(),
                    seq: self.take_seq(),
                    attempt: self.attempt,
                    text,
                    token_ids,
                    logprobs: logprobs.tokens,
                    prompt_logprobs: logprobs.prompt,
                    index: wire_index,
                    ..Chunk::default()
                }))
            }
            StreamEvent::Finished {
                text,
                token_ids,
                finish_reason,
                usage,
                timings,
                logprobs,
            } => {
                self.end_choice(i);
                let cumulative_logprob = logprobs.cumulative;
                let (text, token_ids, lps) = if self.stream {
                    (text, token_ids, logprobs)
                } else {
                    let c = &mut self.choices[i];
                    c.gather(text, token_ids, logprobs);
                    let lps = EventLogprobs {
                        tokens: c.logprobs.take(),
                        prompt: c.prompt_logprobs.take(),
                        cumulative: None,
                    };
                    (
                        std::mem::take(&mut c.text),
                        std::mem::take(&mut c.token_ids),
                        lps,
                    )
                };
                Some(Reply::Chunk(Chunk {
                    id: self.id.clone(),
                    seq: self.take_seq(),
                    attempt: self.attempt,
                    text,
                    token_ids,
                    finish_reason: Some(finish_reason),
                    usage: Some(usage),
                    timings: Some(timings),
                    logprobs: lps.tokens,
                    prompt_logprobs: lps.prompt,
                    cumulative_logprob,
                    index: wire_index,
                }))
            }
            StreamEvent::Error(error) => {
                if wire_index.is_none() {
                    return Some(self.error(error));
                }
                self.end_choice(i);
                Some(Reply::Error(ErrorReply {
                    id: Some(self.id.clone()),
                    seq: self.take_seq(),
                    attempt: self.attempt,
                    error,
                    index: wire_index,
                }))
            }
        }
    }

    /// A final error reply for the whole request (the engine failed, or the gateway gave
    /// up on it).
    pub fn error(&mut self, error: ErrorBody) -> Reply {
        self.done = true;
        Reply::Error(ErrorReply {
            id: Some(self.id.clone()),
            seq: self.take_seq(),
            attempt: self.attempt,
            error,
            index: None,
        })
    }

    /// A final `abort` chunk for a request that never reached the engine (no `index`: it
    /// ends every completion).
    pub fn aborted_before_start(&mut self) -> Reply {
        self.done = true;
        Reply::Chunk(Chunk {
            id: self.id.clone(),
            seq: self.take_seq(),
            attempt: self.attempt,
            finish_reason: Some(FinishReason::Abort),
            usage: Some(Usage::default()),
            timings: Some(Default::default()),
            ..Chunk::default()
        })
    }
}

/// Cancels whose request this engine has not seen (yet): the cancel subscription and the
/// generate endpoint are separate streams, so a cancel can overtake its request. Bounded
/// in size and age.
#[derive(Debug)]
pub struct RecentCancels {
    capacity: usize,
    ttl: Duration,
    order: VecDeque<(Instant, String)>,
    ids: HashSet<String>,
}

impl RecentCancels {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            order: VecDeque::new(),
            ids: HashSet::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((t, _)) = self.order.front() {
            if now.duration_since(*t) < self.ttl && self.order.len() <= self.capacity {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
    }

    pub fn insert(&mut self, id: &str, now: Instant) {
        self.expire(now);
        if self.ids.insert(id.to_owned()) {
            self.order.push_back((now, id.to_owned()));
            self.expire(now);
        }
    }

    /// Whether `id` was cancelled recently; forgets it.
    pub fn take(&mut self, id: &str, now: Instant) -> bool {
        self.expire(now);
        if self.ids.remove(id) {
            self.order.retain(|(_, i)| i != id);
            true
        } else {
            false
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The format a message asks for (its `Content-Type` header, any case; else the body).
pub fn message_format(headers: Option<&HeaderMap>, body: &[u8]) -> WireFormat {
    let content_type = headers.and_then(|h| {
        h.iter()
            .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(WireFormat::HEADER))
            .and_then(|(_, values)| values.first())
            .map(|v| v.as_str())
    });
    WireFormat::detect(content_type, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_actors::protocol::{ErrorCode, Timings};

    fn delta(text: &str, ids: &[TokenId]) -> StreamEvent {
        StreamEvent::Delta {
            text: text.into(),
            token_ids: ids.to_vec(),
            logprobs: Default::default(),
        }
    }

    fn finished(text: &str, ids: &[TokenId], reason: FinishReason) -> StreamEvent {
        StreamEvent::Finished {
            text: text.into(),
            token_ids: ids.to_vec(),
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: 3,
                cached_tokens: 0,
            },
            timings: Timings::default(),
            logprobs: Default::default(),
        }
    }

    fn chunk(r: Option<Reply>) -> Chunk {
        match r {
            Some(Reply::Chunk(c)) => c,
            other => panic!("expected a chunk, got {other:?}"),
        }
    }

    #[test]
    fn streamed_replies_are_numbered_and_end_once() {
        let mut s = ReplyStream::new("r".into(), 1, true);
        let a = chunk(s.on_event(0, delta("Pa", &[1])));
        let b = chunk(s.on_event(0, delta("ris", &[2])));
        let c = chunk(s.on_event(0, finished("", &[3], FinishReason::Stop)));
        assert_eq!((a.seq, b.seq, c.seq), (0, 1, 2));
        assert_eq!((a.text.as_str(), b.text.as_str()), ("Pa", "ris"));
        assert!(!a.is_final() && !b.is_final() && c.is_final());
        assert_eq!(c.token_ids, vec![3]);
        assert_eq!(c.usage.map(|u| u.completion_tokens), Some(3));
        assert!(s.is_done());
        assert_eq!(s.on_event(0, delta("late", &[4])), None);
        assert_eq!(
            s.on_event(
                0,
                StreamEvent::Error(ErrorBody::new(ErrorCode::Internal, "x"))
            ),
            None
        );
    }

    #[test]
    fn unstreamed_replies_are_one_message() {
        let mut s = ReplyStream::new("r".into(), 1, false);
        assert_eq!(s.on_event(0, delta("Pa", &[1])), None);
        assert_eq!(s.on_event(0, delta("ris", &[2])), None);
        let c = chunk(s.on_event(0, finished(".", &[3], FinishReason::Length)));
        assert_eq!(c.seq, 0);
        assert_eq!(c.text, "Paris.");
        assert_eq!(c.token_ids, vec![1, 2, 3]);
        assert_eq!(c.finish_reason, Some(FinishReason::Length));
    }

    fn lp(v: f32) -> TokenLogprobs {
        TokenLogprobs {
            logprob: v,
            top_logprobs: vec![(1, v)],
        }
    }

    fn with_logprobs(mut ev: StreamEvent, lps: EventLogprobs) -> StreamEvent {
        match &mut ev {
            StreamEvent::Delta { logprobs, .. } | StreamEvent::Finished { logprobs, .. } => {
                *logprobs = lps
            }
            StreamEvent::Error(_) => {}
        }
        ev
    }

    #[test]
    fn logprobs_follow_their_token_ids_streamed_or_gathered() {
        let prompt = vec![None, Some(lp(-3.0))];
        let events = || {
            vec![
                with_logprobs(
                    delta("Pa", &[1]),
                    EventLogprobs {
                        tokens: Some(vec![lp(-0.5)]),
                        prompt: Some(prompt.clone()),
                        cumulative: None,
                    },
                ),
                with_logprobs(
                    finished("ris", &[2, 3], FinishReason::Stop),
                    EventLogprobs {
                        tokens: Some(vec![lp(-1.0), lp(-2.0)]),
                        prompt: None,
                        cumulative: Some(-3.5),
                    },
                ),
            ]
        };
        let mut s = ReplyStream::new("r".into(), 1, true);
        let chunks: Vec<Chunk> = events()
            .into_iter()
            .map(|e| chunk(s.on_event(0, e)))
            .collect();
        assert_eq!(chunks[0].logprobs, Some(vec![lp(-0.5)]));
        assert_eq!(chunks[0].prompt_logprobs, Some(prompt.clone()));
        assert_eq!(chunks[0].cumulative_logprob, None);
        assert_eq!(chunks[1].logprobs, Some(vec![lp(-1.0), lp(-2.0)]));
        assert_eq!(chunks[1].prompt_logprobs, None);
        assert_eq!(chunks[1].cumulative_logprob, Some(-3.5));

        let mut s = ReplyStream::new("r".into(), 1, false);
        let mut replies: Vec<Reply> = events()
            .into_iter()
            .filter_map(|e| s.on_event(0, e))
            .collect();
        assert_eq!(replies.len(), 1);
        let Some(Reply::Chunk(c)) = replies.pop() else {
            panic!("one chunk");
        };
        assert_eq!(c.token_ids, vec![1, 2, 3]);
        assert_eq!(c.logprobs, Some(vec![lp(-0.5), lp(-1.0), lp(-2.0)]));
        assert_eq!(c.prompt_logprobs, Some(prompt));
        assert_eq!(c.cumulative_logprob, Some(-3.5));
        // Without logprobs, nothing is added.
        let mut s = ReplyStream::new("r".into(), 1, false);
        s.on_event(0, delta("a", &[1]));
        let c = chunk(s.on_event(0, finished("b", &[2], FinishReason::Length)));
        assert_eq!(
            (c.logprobs, c.prompt_logprobs, c.cumulative_logprob),
            (None, None, None)
        );
    }

    #[test]
    fn errors_take_the_next_seq_and_end_the_stream() {
        let mut s = ReplyStream::new("r".into(), 1, true);
        chunk(s.on_event(0, delta("a", &[1])));
        let e = s.on_event(
            0,
            StreamEvent::Error(ErrorBody::new(ErrorCode::Internal, "boom")),
        );
        match e {
            Some(Reply::Error(e)) => {
                assert_eq!(e.seq, 1);
                assert_eq!(e.id.as_deref(), Some("r"));
                assert_eq!(e.error.code, ErrorCode::Internal);
            }
            other => panic!("{other:?}"),
        }
        assert!(s.is_done());
        let mut s = ReplyStream::new("q".into(), 1, true);
        let c = chunk(Some(s.aborted_before_start()));
        assert_eq!((c.seq, c.finish_reason), (0, Some(FinishReason::Abort)));
    }

    #[test]
    fn n_completions_carry_their_index_and_end_one_by_one() {
        let mut s = ReplyStream::new("r".into(), 1, true);
        s.set_n(3);
        let a = chunk(s.on_event(1, delta("x", &[1])));
        assert_eq!((a.seq, a.index), (0, Some(1)));
        let b = chunk(s.on_event(0, finished("y", &[2], FinishReason::Stop)));
        assert_eq!((b.seq, b.index, b.is_final()), (1, Some(0), true));
        assert!(!s.is_done());
        // An error ends its own completion only.
        let e = s.on_event(
            2,
            StreamEvent::Error(ErrorBody::new(ErrorCode::InvalidRequest, "stuck")),
        );
        match e {
            Some(Reply::Error(e)) => assert_eq!((e.seq, e.index), (2, Some(2))),
            other => panic!("expected an error reply, got {other:?}"),
        }
        assert!(!s.is_done());
        assert_eq!(
            s.on_event(0, delta("late", &[9])),
            None,
            "completion 0 has ended"
        );
        let c = chunk(s.on_event(1, finished("z", &[3], FinishReason::Length)));
        assert_eq!((c.seq, c.index), (3, Some(1)));
        assert!(s.is_done());
        assert_eq!(s.on_event(1, delta("after", &[4])), None);

        // Gathered: one final chunk per completion, each with its own text.
        let mut s = ReplyStream::new("r".into(), 1, false);
        s.set_n(2);
        assert_eq!(s.on_event(0, delta("a", &[1])), None);
        assert_eq!(s.on_event(1, delta("b", &[2])), None);
        let x = chunk(s.on_event(1, finished("c", &[3], FinishReason::Stop)));
        let y = chunk(s.on_event(0, finished("d", &[4], FinishReason::Stop)));
        assert_eq!(
            (x.text.as_str(), x.token_ids.clone(), x.index),
            ("bc", vec![2, 3], Some(1))
        );
        assert_eq!(
            (y.text.as_str(), y.token_ids.clone(), y.index),
            ("ad", vec![1, 4], Some(0))
        );
        assert!(s.is_done());
    }

    #[test]
    fn recent_cancels_expire_and_are_bounded() {
        let t0 = Instant::now();
        let mut rc = RecentCancels::new(2, Duration::from_secs(10));
        rc.insert("a", t0);
        assert!(rc.take("a", t0));
        assert!(!rc.take("a", t0));
        rc.insert("b", t0);
        assert!(!rc.take("b", t0 + Duration::from_secs(11)), "expired");
        rc.insert("c", t0);
        rc.insert("d", t0);
        rc.insert("e", t0);
        assert_eq!(rc.len(), 2, "capacity");
        assert!(!rc.take("c", t0), "oldest dropped");
        assert!(rc.take("e", t0));
        rc.insert("d", t0);
        assert_eq!(rc.len(), 1, "no duplicates");
    }

    #[test]
    fn format_comes_from_the_header_in_any_case() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json");
        assert_eq!(message_format(Some(&h), b"\x80"), WireFormat::Json);
        let mut h = HeaderMap::new();
        h.insert("Content-Type", "application/msgpack");
        assert_eq!(message_format(Some(&h), b"{}"), WireFormat::MsgPack);
        assert_eq!(
            message_format(None, b"{\"prompt\":\"x\"}"),
            WireFormat::Json
        );
        assert_eq!(message_format(None, b"\x81"), WireFormat::MsgPack);
    }
}
