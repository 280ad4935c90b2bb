//! The clients' streams, outside every actor: one channel per live sequence, keyed by its
//! sequence id. The tokenizer (refusals), the detokenizer (deltas and the end) and the
//! supervisor (a dead actor) write to it; no message carries a channel, so every actor
//! message stays plain data.
//!
//! The registry enforces the one rule every stream obeys: text deltas, then exactly one
//! final event. [`Streams::end`] removes the stream as it sends the final event, so a second
//! end is a no-op, and a stream nobody ends is ended by [`Streams::fail_all`] when the
//! engine goes down (or, if its channel is dropped, the receiver sees the end of the channel,
//! which front ends turn into an `internal` error).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::messages::{ErrorBody, SeqId, StreamEvent};

/// The live streams of one front end. Cheap to clone (a shared handle).
#[derive(Clone, Debug, Default)]
pub struct Streams {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sinks: Mutex<HashMap<SeqId, UnboundedSender<StreamEvent>>>,
    next_id: AtomicU64,
    /// Set once the engine went down: new streams end at once with this error.
    closed: Mutex<Option<ErrorBody>>,
}

impl Streams {
    pub fn new() -> Self {
        Self::default()
    }

    fn sinks(&self) -> MutexGuard<'_, HashMap<SeqId, UnboundedSender<StreamEvent>>> {
        // A panic while holding the lock leaves the map intact: keep using it.
        self.inner.sinks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a stream under a fresh sequence id (1, 2, 3, …). When the engine is down the
    /// stream is already ended with its error.
    pub fn open(&self) -> (SeqId, UnboundedReceiver<StreamEvent>) {
        let seq_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = unbounded_channel();
        let closed = self
            .inner
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match closed {
            Some(error) => {
                // The receiver is returned below, so it is alive and the send succeeds.
                if tx.send(StreamEvent::Error(error)).is_err() {
                    tracing::debug!(seq_id, "a stream's reader is already gone");
                }
            }
            None => {
                self.sinks().insert(seq_id, tx);
            }
        }
        (seq_id, rx)
    }

    /// Sends a text delta; false when the stream has already ended (or its reader is gone).
    pub fn send(&self, seq_id: SeqId, event: StreamEvent) -> bool {
        debug_assert!(!event.is_final(), "final events go through Streams::end");
        match self.sinks().get(&seq_id) {
            Some(tx) => tx.send(event).is_ok(),
            None => false,
        }
    }

    /// Sends the final event and forgets the stream; false when it had already ended, in
    /// which case nothing is sent.
    pub fn end(&self, seq_id: SeqId, event: StreamEvent) -> bool {
        debug_assert!(event.is_final(), "Streams::end takes a final event");
        match self.sinks().remove(&seq_id) {
            Some(tx) => {
                if tx.send(event).is_err() {
                    // The reader went away: it no longer needs the event.
                    tracing::debug!(seq_id, "a stream ended after its reader left");
                }
                true
            }
            None => false,
        }
    }

    /// Whether the stream is live (opened and not yet ended).
    pub fn is_live(&self, seq_id: SeqId) -> bool {
        self.sinks().contains_key(&seq_id)
    }

    /// Number of live streams.
    pub fn len(&self) -> usize {
        self.sinks().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every live stream with `error`, and every stream opened from now on too.
    /// Returns how many were live.
    pub fn fail_all(&self, error: ErrorBody) -> usize {
        *self.inner.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.clone());
        let sinks: Vec<_> = self.sinks().drain().collect();
        for (seq_id, tx) in &sinks {
            if tx.send(StreamEvent::Error(error.clone())).is_err() {
                tracing::debug!(seq_id, "a failed stream's reader is already gone");
            }
        }
        sinks.len()
    }

    /// Ends the given streams with `error` (those still live); returns how many were.
    pub fn fail(&self, seq_ids: &[SeqId], error: &ErrorBody) -> usize {
        seq_ids
            .iter()
            .filter(|&&id| self.end(id, StreamEvent::Error(error.clone())))
            .count()
    }
}

/// The streams of one request: one per completion (`n` of them, index 0..n), read as one.
#[derive(Debug)]
pub struct Generation {
    /// Open streams with their index; a stream leaves once its channel is closed.
    streams: Vec<(u32, UnboundedReceiver<StreamEvent>)>,
    n: u32,
    /// Where the next poll starts (so that no stream starves another).
    next: usize,
}

impl Generation {
    /// The streams of completions 0, 1, … in order.
    pub fn new(streams: Vec<UnboundedReceiver<StreamEvent>>) -> Self {
        let n = streams.len() as u32;
        Self {
            streams: (0..n).zip(streams).collect(),
            n,
            next: 0,
        }
    }

    /// Number of completions.
    pub fn n(&self) -> u32 {
        self.n
    }

    /// The next event of any completion, with its index; `None` once every stream is
    /// closed (after its final event, or when the engine dropped it).
    pub async fn recv(&mut self) -> Option<(u32, StreamEvent)> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next event, whatever its completion (for requests with `n` = 1).
    pub async fn next_event(&mut self) -> Option<StreamEvent> {
        self.recv().await.map(|(_, ev)| ev)
    }

    fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<(u32, StreamEvent)>> {
        use std::task::Poll;
        let mut k = 0;
        while k < self.streams.len() {
            let i = (self.next + k) % self.streams.len();
            match self.streams[i].1.poll_recv(cx) {
                Poll::Ready(Some(ev)) => {
                    self.next = i + 1;
                    return Poll::Ready(Some((self.streams[i].0, ev)));
                }
                Poll::Ready(None) => {
                    self.streams.remove(i);
                    // The stream now at `i` has not been polled: look at it next.
                    self.next = i;
                    k = 0;
                    if self.streams.is_empty() {
                        return Poll::Ready(None);
                    }
                    continue;
                }
                Poll::Pending => k += 1,
            }
        }
        if self.streams.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ErrorCode, FinishReason, Timings, Usage};

    fn finished() -> StreamEvent {
        StreamEvent::Finished {
            text: String::new(),
            token_ids: vec![],
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
            timings: Timings::default(),
            logprobs: Default::default(),
        }
    }

    fn delta(t: &str) -> StreamEvent {
        StreamEvent::Delta {
            text: t.into(),
            token_ids: vec![],
            logprobs: Default::default(),
        }
    }

    fn drain(rx: &mut UnboundedReceiver<StreamEvent>) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            out.push(ev);
        }
        out
    }

    #[test]
    fn one_final_event_per_stream() {
        let s = Streams::new();
        let (a, mut rx) = s.open();
        let (b, _rx_b) = s.open();
        assert_ne!(a, b);
        assert!(s.send(a, delta("x")));
        assert!(s.end(a, finished()));
        assert!(!s.end(a, StreamEvent::Error(ErrorBody::internal("late"))));
        assert!(!s.send(a, delta("late")));
        let got = drain(&mut rx);
        assert_eq!(got, vec![delta("x"), finished()]);
        assert!(rx.try_recv().is_err());
        assert!(!s.is_live(a));
        assert!(s.is_live(b));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn fail_all_ends_live_streams_and_later_ones() {
        let s = Streams::new();
        let (a, mut rx_a) = s.open();
        let (b, mut rx_b) = s.open();
        assert!(s.end(b, finished()));
        let err = ErrorBody::new(ErrorCode::Internal, "the scheduler actor stopped");
        assert_eq!(s.fail_all(err.clone()), 1);
        assert_eq!(drain(&mut rx_a), vec![StreamEvent::Error(err.clone())]);
        assert_eq!(drain(&mut rx_b), vec![finished()]);
        assert!(!s.send(a, delta("x")));
        let (_, mut rx_c) = s.open();
        assert_eq!(drain(&mut rx_c), vec![StreamEvent::Error(err)]);
        assert!(s.is_empty());
    }

    #[test]
    fn fail_ends_only_the_named_live_streams() {
        let s = Streams::new();
        let (a, mut rx_a) = s.open();
        let (b, mut rx_b) = s.open();
        let err = ErrorBody::internal("engine lost");
        assert_eq!(s.fail(&[a, 999], &err), 1);
        assert_eq!(drain(&mut rx_a), vec![StreamEvent::Error(err)]);
        assert!(drain(&mut rx_b).is_empty());
        assert!(s.is_live(b));
    }
}
