//! The per-request path both intakes share — core NATS requests (`crate::gateway`) and
//! JetStream jobs (`crate::intake`): decode → validate → [`Engine::generate`] → one reply
//! per engine step to the reply subject, with the counters and the in-flight registry
//! every request task uses. Both intakes build on this module; neither imports the other's
//! request handling.

mod reply;

pub use reply::{message_format, RecentCancels, ReplyStream};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::service;
use async_nats::{HeaderMap, Subject};
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::FinishReason;
use pagoda_actors::protocol::{
    check_reply_subject, decode_request, new_request_id, ErrorBody, ErrorCode, ErrorReply, Reply,
    StreamEvent, WireFormat,
};
use pagoda_actors::streams::Generation;
use tokio::sync::Notify;
use tokio::time::Instant;

/// One publish may wait this long for room in the connection's buffer (the connection is
/// down and the buffer full) before the request is given up.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a timeout or a shutdown abort, how long the engine gets to confirm the abort
/// before the gateway answers with an error itself.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);
/// Delivery attempt on core NATS (JetStream redeliveries will count up).
pub(crate) const ATTEMPT: u32 = 1;

// --- counters --------------------------------------------------------------------------------

/// What the gateway did, for `$SRV.STATS` (the endpoint's `data`) and the logs.
#[derive(Debug, Default)]
pub struct GatewayStats {
    pub received: AtomicU64,
    pub completed: AtomicU64,
    pub aborted: AtomicU64,
    pub errors: AtomicU64,
    pub no_reply_subject: AtomicU64,
    /// Requests whose reply subject broke the policy (never answered).
    pub refused_reply_subjects: AtomicU64,
    pub publish_failures: AtomicU64,
    pub cancels: AtomicU64,
    errors_by_code: Mutex<HashMap<&'static str, u64>>,
}

impl GatewayStats {
    pub(crate) fn count_error(&self, code: ErrorCode) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::NATS_ERRORS, "code" => code.as_str()).increment(1);
        if let Ok(mut m) = self.errors_by_code.lock() {
            *m.entry(code.as_str()).or_default() += 1;
        }
    }

    /// The counters as JSON.
    pub fn snapshot(&self, in_flight: usize) -> serde_json::Value {
        let by_code = self
            .errors_by_code
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        serde_json::json!({
            "received": self.received.load(Ordering::Relaxed),
            "completed": self.completed.load(Ordering::Relaxed),
            "aborted": self.aborted.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "errors_by_code": by_code,
            "no_reply_subject": self.no_reply_subject.load(Ordering::Relaxed),
            "refused_reply_subjects": self.refused_reply_subjects.load(Ordering::Relaxed),
            "publish_failures": self.publish_failures.load(Ordering::Relaxed),
            "cancels": self.cancels.load(Ordering::Relaxed),
            "in_flight": in_flight,
        })
    }
}

/// What every request task shares.
pub(crate) struct Shared {
    pub(crate) engine: Engine,
    /// The service's subject prefix (reply subjects under it are refused).
    pub(crate) prefix: String,
    pub(crate) nats: async_nats::Client,
    pub(crate) stats: Arc<GatewayStats>,
    pub(crate) in_flight: Mutex<HashSet<String>>,
    pub(crate) idle: Notify,
    pub(crate) recent_cancels: Mutex<RecentCancels>,
    pub(crate) max_in_flight: usize,
    pub(crate) log_prompts: bool,
    /// Set when the gateway stops taking requests: held JetStream jobs are given back.
    pub(crate) stopping: AtomicBool,
    /// Set when a shutdown aborts what is left: JetStream jobs are then given back
    /// instead of answered with an `abort` chunk.
    pub(crate) requeue_aborts: AtomicBool,
}

impl Shared {
    pub(crate) fn new(
        engine: Engine,
        nats: async_nats::Client,
        prefix: &str,
        stats: Arc<GatewayStats>,
        max_in_flight: usize,
        log_prompts: bool,
    ) -> Self {
        Self {
            engine,
            prefix: prefix.to_owned(),
            nats,
            stats,
            in_flight: Mutex::new(HashSet::new()),
            idle: Notify::new(),
            recent_cancels: Mutex::new(RecentCancels::new(4096, Duration::from_secs(5))),
            max_in_flight: max_in_flight.max(1),
            log_prompts,
            requeue_aborts: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    pub(crate) fn num_in_flight(&self) -> usize {
        self.in_flight.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub(crate) fn is_in_flight(&self, id: &str) -> bool {
        self.in_flight
            .lock()
            .map(|s| s.contains(id))
            .unwrap_or(false)
    }

    pub(crate) fn in_flight_ids(&self) -> Vec<String> {
        self.in_flight
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Registers a request id as in flight; refused when the id is already running here or
    /// the engine is full.
    fn register(self: &Arc<Self>, id: &str) -> Result<InFlight, ErrorBody> {
        let mut set = self
            .in_flight
            .lock()
            .map_err(|_| ErrorBody::new(ErrorCode::Internal, "gateway state poisoned"))?;
        if set.contains(id) {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!("a request with id {id:?} is already running on this engine"),
            ));
        }
        if set.len() >= self.max_in_flight {
            return Err(ErrorBody::new(
                ErrorCode::Overloaded,
                format!(
                    "this engine has {} requests in flight (nats.max_in_flight); retry later",
                    set.len()
                ),
            ));
        }
        set.insert(id.to_owned());
        Ok(InFlight {
            shared: self.clone(),
            id: id.to_owned(),
        })
    }
}

/// An in-flight registration, released on drop (whatever way the task ends).
struct InFlight {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.shared.in_flight.lock() {
            set.remove(&self.id);
            if set.is_empty() {
                self.shared.idle.notify_waiters();
            }
        }
    }
}

/// Where a request's replies go, and in which format.
pub(crate) struct Replier {
    pub(crate) nats: async_nats::Client,
    pub(crate) target: Subject,
    /// True when `target` is the message's own reply subject: the final reply then goes
    /// through the service request, so `$SRV.STATS` counts it.
    pub(crate) via_request: bool,
    pub(crate) format: WireFormat,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("publishing to {target} failed: {message}")]
    Publish { target: String, message: String },
    #[error("publishing to {target} timed out after {PUBLISH_TIMEOUT:?}")]
    Timeout { target: String },
}

impl Replier {
    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(WireFormat::HEADER, self.format.content_type());
        h
    }

    pub(crate) fn encode<T: serde::Serialize + ?Sized>(&self, value: &T) -> Vec<u8> {
        match self.format.encode(value) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding a reply failed");
                Vec::new()
            }
        }
    }

    async fn send(&self, req: Option<&service::Request>, reply: &Reply) -> Result<(), SendError> {
        let bytes = match reply.encode(self.format) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding a reply failed");
                self.encode(&ErrorReply {
                    index: None,
                    id: None,
                    seq: reply.seq(),
                    attempt: ATTEMPT,
                    error: ErrorBody::new(ErrorCode::Internal, format!("encoding the reply: {e}")),
                })
            }
        };
        self.send_bytes(req.filter(|_| reply.is_final()), bytes)
            .await
    }

    pub(crate) async fn send_bytes(
        &self,
        req: Option<&service::Request>,
        bytes: Vec<u8>,
    ) -> Result<(), SendError> {
        let target = self.target.to_string();
        let publish = async {
            match req {
                Some(r) if self.via_request => r
                    .respond_with_headers(Ok(bytes.into()), self.headers())
                    .await
                    .map_err(|e| e.to_string()),
                _ => self
                    .nats
                    .publish_with_headers(self.target.clone(), self.headers(), bytes.into())
                    .await
                    .map_err(|e| e.to_string()),
            }
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(())) => {
                metrics::counter!(crate::metrics::NATS_MESSAGES_PUBLISHED).increment(1);
                Ok(())
            }
            Ok(Err(message)) => Err(SendError::Publish { target, message }),
            Err(_) => Err(SendError::Timeout { target }),
        }
    }
}

/// One request as it arrived, on core NATS or from the JetStream intake.
pub(crate) struct Incoming<'a> {
    pub message: &'a async_nats::Message,
    /// The message's own reply subject (none for a JetStream job: its reply subject is the
    /// server's ack subject, so replies go to `reply_to`).
    pub own_reply: Option<Subject>,
    /// The micro-service request, to answer through it (`$SRV.STATS` counts those).
    pub request: Option<&'a service::Request>,
    /// The delivery attempt the chunks carry.
    pub attempt: u32,
    /// Set for JetStream jobs.
    pub durable: Option<Durable>,
}

/// What a JetStream job's processing needs to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Durable {
    /// This is the job's last delivery (`intake.max_deliver`): a failure now is final.
    pub last_attempt: bool,
}

/// How a request ended (what the JetStream intake does with the job).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The final reply was published: ack.
    Done,
    /// Refused (invalid) and answered, or nothing could be answered: terminate, no retry.
    Rejected,
    /// This engine cannot take it now (full, or the id runs here already); nothing was
    /// sent: give it back for later.
    Busy,
    /// It failed in a way another attempt may fix (nothing final was sent): redeliver.
    Retry(String),
    /// It failed on its last attempt; the client got error code `failed`.
    Failed(String),
}

/// The per-request path shared by both intakes: decode → validate → [`Engine::generate`]
/// → one reply per engine step to the reply subject.
pub(crate) async fn process(shared: &Arc<Shared>, inc: Incoming<'_>) -> Outcome {
    let disconnects_at_start = crate::nats::disconnects();
    shared.stats.received.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(crate::metrics::NATS_MESSAGES_RECEIVED).increment(1);
    let attempt = inc.attempt;
    let req = inc.request;
    let format = message_format(inc.message.headers.as_ref(), &inc.message.payload);
    let own_reply = inc.own_reply.clone();
    let replier = |target: Subject| Replier {
        nats: shared.nats.clone(),
        via_request: own_reply.as_ref() == Some(&target),
        target,
        format,
    };

    // The message's own reply subject must pass the policy, or nothing is answered at all.
    if let Some(own) = &own_reply {
        if let Err(why) = check_reply_subject(own.as_str(), &shared.prefix) {
            refuse_reply_subject(shared, &why);
            return Outcome::Rejected;
        }
    }
    // `reply_to` is used only when it passes the policy too; otherwise the error goes to
    // the message's own reply subject, or nowhere.
    let allowed = |r: &String| check_reply_subject(r, &shared.prefix).is_ok();

    let wire = match decode_request(&inc.message.payload, format) {
        Ok(w) => w,
        Err(rejected) => {
            if own_reply.is_none() {
                if let Some(Err(why)) = rejected
                    .reply_to
                    .as_ref()
                    .map(|r| check_reply_subject(r, &shared.prefix))
                {
                    refuse_reply_subject(shared, &why);
                    return Outcome::Rejected;
                }
            }
            let target = own_reply
                .clone()
                .or_else(|| rejected.reply_to.clone().filter(allowed).map(Subject::from));
            let reply = Reply::Error(ErrorReply {
                index: None,
                id: rejected.id.clone(),
                seq: 0,
                attempt,
                error: rejected.error,
            });
            answer_rejection(shared, target.map(replier), req, reply).await;
            return Outcome::Rejected;
        }
    };
    if let Some(Err(why)) = wire
        .reply_to
        .as_ref()
        .map(|r| check_reply_subject(r, &shared.prefix))
    {
        let Some(own) = own_reply.clone() else {
            refuse_reply_subject(shared, &why);
            return Outcome::Rejected;
        };
        let reply = Reply::Error(ErrorReply {
            index: None,
            id: wire.id.clone(),
            seq: 0,
            attempt,
            error: ErrorBody::new(ErrorCode::InvalidRequest, format!("reply_to: {why}")),
        });
        answer_rejection(shared, Some(replier(own)), req, reply).await;
        return Outcome::Rejected;
    }
    let target = own_reply
        .clone()
        .or_else(|| wire.reply_to.clone().map(Subject::from));
    let Some(target) = target else {
        shared
            .stats
            .no_reply_subject
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            id = wire.id.as_deref().unwrap_or(""),
            "a request with neither a reply subject nor reply_to: nothing to answer, dropped"
        );
        return Outcome::Rejected;
    };
    let out = replier(target);
    let wire_id = wire.id.clone();
    let accepted = match wire.accept(new_request_id) {
        Ok(a) => a,
        Err(error) => {
            let reply = Reply::Error(ErrorReply {
                index: None,
                id: wire_id,
                seq: 0,
                attempt,
                error,
            });
            answer_rejection(shared, Some(out), req, reply).await;
            return Outcome::Rejected;
        }
    };
    let id = accepted.request.id.clone();
    if shared.log_prompts {
        tracing::info!(%id, prompt = ?accepted.request.prompt, "prompt");
    }
    let mut replies = ReplyStream::new(id.clone(), attempt, accepted.stream);
    let mut hold = Hold::new();
    let _guard = loop {
        match shared.register(&id) {
            Ok(g) => break g,
            // A durable job is kept (the intake's in-progress acks go on) until there is
            // room, rather than handed back: a hand-back would count as a delivery.
            Err(error) if inc.durable.is_some() && error.code == ErrorCode::Overloaded => {
                if !hold.wait(shared).await {
                    return Outcome::Busy;
                }
            }
            Err(error) if inc.durable.is_some() && error.code != ErrorCode::Internal => {
                tracing::debug!(%id, message = %error.message, "job given back");
                return Outcome::Busy;
            }
            Err(error) => {
                let reply = replies.error(error);
                answer_rejection(shared, Some(out), req, reply).await;
                return Outcome::Rejected;
            }
        }
    };
    let cancelled_early = shared
        .recent_cancels
        .lock()
        .map(|mut c| c.take(&id, Instant::now()))
        .unwrap_or(false);
    if cancelled_early {
        return abort_before_start(shared, &out, req, &mut replies, &id).await;
    }

    tracing::debug!(%id, stream = accepted.stream, attempt, "request accepted");
    // Only a durable job keeps a copy of its request, to submit it again.
    let retry_copy = inc.durable.map(|_| accepted.request.clone());
    let mut events = shared.engine.generate(accepted.request);
    replies.set_n(events.n());
    // A durable job the engine refuses as overloaded (before anything was sent) is kept
    // and submitted again once there is room; the client never sees the refusal.
    let mut first = None;
    if inc.durable.is_some() {
        loop {
            match events.recv().await {
                Some((_, StreamEvent::Error(e))) if e.code == ErrorCode::Overloaded => {
                    if taken_cancel(shared, &id) {
                        // Refused, then cancelled: it never started.
                        return abort_before_start(shared, &out, req, &mut replies, &id).await;
                    }
                    if !hold.wait(shared).await {
                        return Outcome::Busy;
                    }
                    if let Some(r) = &retry_copy {
                        events = shared.engine.generate(r.clone());
                    }
                }
                other => {
                    first = other;
                    break;
                }
            }
        }
        drop(retry_copy);
        if hold.waited > 0 {
            tracing::debug!(%id, waits = hold.waited, "job held until the engine had room");
        }
    }
    let mut first = first.map(Some);
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let timeout_at = accepted
        .timeout_ms
        .map_or(far, |ms| Instant::now() + Duration::from_millis(ms));
    let mut grace_at: Option<Instant> = None;
    loop {
        let mut reply = tokio::select! {
            ev = next_event(&mut first, &mut events) => match ev {
                Some((index, ev)) => match replies.on_event(index, ev) {
                    Some(r) => r,
                    None => continue,
                },
                None => replies.error(ErrorBody::new(
                    ErrorCode::Internal,
                    "the engine stopped before the request finished",
                )),
            },
            _ = tokio::time::sleep_until(timeout_at), if grace_at.is_none() => {
                tracing::debug!(%id, "timeout_ms expired: aborting");
                shared.engine.cancel(&id).await;
                grace_at = Some(Instant::now() + ABORT_GRACE);
                continue;
            }
            _ = tokio::time::sleep_until(grace_at.unwrap_or(far)), if grace_at.is_some() => {
                replies.error(ErrorBody::new(
                    ErrorCode::Timeout,
                    "timeout_ms expired and the engine did not confirm the abort in time",
                ))
            }
        };
        let mut failed = None;
        if let Some(durable) = inc.durable {
            match &mut reply {
                // Aborted by a shutdown past its drain timeout: another engine takes it.
                Reply::Chunk(c)
                    if c.finish_reason == Some(FinishReason::Abort)
                        && shared.requeue_aborts.load(Ordering::Relaxed) =>
                {
                    return Outcome::Retry("aborted by the engine's shutdown".into());
                }
                Reply::Error(e) if e.error.code == ErrorCode::Internal => {
                    // A job on a failing engine is given back, never answered from here.
                    if !durable.last_attempt || shared.engine.supervisor().is_failed() {
                        return Outcome::Retry(e.error.message.clone());
                    }
                    let reason = format!("attempt {attempt} failed: {}", e.error.message);
                    e.error = ErrorBody::new(ErrorCode::Failed, reason.clone());
                    failed = Some(reason);
                }
                _ => {}
            }
        }
        // The request's last reply (with n > 1, each completion's final chunk is not).
        let is_final = replies.is_done();
        // A durable job whose connection dropped while it was answering may have lost a
        // reply in transit: run it again (the client starts over at attempt + 1) rather
        // than leave a gap.
        if inc.durable.is_some() && crate::nats::disconnects() != disconnects_at_start {
            if !is_final {
                shared.engine.cancel(&id).await;
            }
            return Outcome::Retry("the NATS connection dropped while replying".into());
        }
        if let Err(e) = out.send(req.filter(|_| is_final), &reply).await {
            shared
                .stats
                .publish_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(%id, error = %e, "cannot deliver a reply; aborting the request");
            if !is_final {
                shared.engine.cancel(&id).await;
            }
            return match failed {
                Some(reason) => Outcome::Failed(reason),
                None => Outcome::Retry(format!("cannot deliver a reply: {e}")),
            };
        }
        if is_final {
            count_final(&shared.stats, &reply);
            if inc.durable.is_some_and(|d| !d.last_attempt)
                && failed.is_none()
                && crate::nats::disconnects() != disconnects_at_start
            {
                // The final chunk may not have made it: answer again rather than ack.
                return Outcome::Retry("the NATS connection dropped while replying".into());
            }
            return match failed {
                Some(reason) => Outcome::Failed(reason),
                None => Outcome::Done,
            };
        }
    }
}

/// Answers a request cancelled before it started with its final `abort` chunk.
async fn abort_before_start(
    shared: &Shared,
    out: &Replier,
    req: Option<&service::Request>,
    replies: &mut ReplyStream,
    id: &str,
) -> Outcome {
    shared.stats.aborted.fetch_add(1, Ordering::Relaxed);
    let reply = replies.aborted_before_start();
    if let Err(e) = out.send(req, &reply).await {
        shared
            .stats
            .publish_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%id, error = %e, "answering a request cancelled before it started");
    }
    Outcome::Done
}

/// The event held back by the durable admission loop, then the channel's.
async fn next_event(
    first: &mut Option<Option<(u32, StreamEvent)>>,
    events: &mut Generation,
) -> Option<(u32, StreamEvent)> {
    match first.take() {
        Some(ev) => ev,
        None => events.recv().await,
    }
}

/// Whether a cancel for `id` arrived (and forget it).
fn taken_cancel(shared: &Shared, id: &str) -> bool {
    shared
        .recent_cancels
        .lock()
        .map(|mut c| c.take(id, Instant::now()))
        .unwrap_or(false)
}

/// Waiting for room with a durable job in hand: backs off from 25 ms to 1 s.
struct Hold {
    delay: Duration,
    waited: u32,
}

impl Hold {
    fn new() -> Self {
        Self {
            delay: Duration::from_millis(25),
            waited: 0,
        }
    }

    /// Waits once; false when the engine stops (shutdown or failure): give the job back.
    async fn wait(&mut self, shared: &Shared) -> bool {
        if shared.stopping.load(Ordering::Relaxed) || shared.engine.supervisor().is_failed() {
            return false;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(1));
        self.waited += 1;
        !shared.stopping.load(Ordering::Relaxed)
    }
}

fn count_final(stats: &GatewayStats, reply: &Reply) {
    match reply {
        Reply::Chunk(c) => {
            stats.completed.fetch_add(1, Ordering::Relaxed);
            if c.finish_reason == Some(FinishReason::Abort) {
                stats.aborted.fetch_add(1, Ordering::Relaxed);
            }
        }
        Reply::Error(e) => stats.count_error(e.error.code),
    }
}

/// A request whose reply subject breaks the policy: nothing is published anywhere; it is
/// counted (`pagoda_nats_refused_reply_subjects_total`, `$SRV.STATS`).
fn refuse_reply_subject(shared: &Shared, why: &str) {
    shared
        .stats
        .refused_reply_subjects
        .fetch_add(1, Ordering::Relaxed);
    metrics::counter!(crate::metrics::NATS_REFUSED_REPLY_SUBJECTS).increment(1);
    tracing::debug!(%why, "a request with a forbidden reply subject: not answered");
}

/// Sends the error for a request that was refused before reaching the engine.
async fn answer_rejection(
    shared: &Shared,
    out: Option<Replier>,
    req: Option<&service::Request>,
    reply: Reply,
) {
    if let Reply::Error(e) = &reply {
        tracing::debug!(id = ?e.id, code = e.error.code.as_str(), message = %e.error.message, "request refused");
    }
    count_final(&shared.stats, &reply);
    let Some(out) = out else {
        shared
            .stats
            .no_reply_subject
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!("an unreadable request without a reply subject: nothing to answer");
        return;
    };
    if let Err(e) = out.send(req, &reply).await {
        shared
            .stats
            .publish_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "cannot deliver an error reply");
    }
}
