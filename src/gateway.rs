//! `pagoda serve`: the NATS front door.
//!
//! The generate endpoint is a NATS micro-service endpoint (service `pagoda`, subject
//! `<prefix>.generate`, queue group `nats.queue_group`), so `$SRV.PING|INFO|STATS` answer
//! and N engines share the requests. Each request runs in its own task: decode → validate
//! → [`Engine::generate`] → one chunk per engine step to the reply subject. Cancels arrive
//! on `<prefix>.cancel`, a plain subscription that every engine sees. `docs/protocol.md`
//! is the reference for what travels.
//!
//! The pure parts — turning engine events into numbered replies ([`ReplyStream`]) and
//! remembering cancels that arrive before their request ([`RecentCancels`]) — are plain
//! structs with unit tests; the rest is I/O.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::service::{self, ServiceExt};
use async_nats::{HeaderMap, Subject};
use futures_util::StreamExt;
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::{FinishReason, TokenId};
use pagoda_actors::protocol::{
    decode_request, new_request_id, CancelReply, CancelRequest, Chunk, ErrorBody, ErrorCode,
    ErrorReply, Reply, StreamEvent, Usage, WireFormat,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{IntakeConfig, NatsConfig};

/// The micro service's name (`$SRV.PING.pagoda`).
pub const SERVICE_NAME: &str = "pagoda";
/// One publish may wait this long for room in the connection's buffer (the connection is
/// down and the buffer full) before the request is given up.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a timeout or a shutdown abort, how long the engine gets to confirm the abort
/// before the gateway answers with an error itself.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);
/// Delivery attempt on core NATS (JetStream redeliveries will count up).
const ATTEMPT: u32 = 1;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("starting the NATS micro service: {0}")]
    Service(String),
    #[error("subscribing to {subject}: {message}")]
    Subscribe { subject: String, message: String },
    #[error(transparent)]
    Intake(#[from] crate::intake::IntakeError),
}

// --- pure logic ------------------------------------------------------------------------------

/// Turns one request's engine events into numbered replies: `seq` 0, 1, 2, … without gaps,
/// the last one final. With `stream: false` the deltas are gathered into the final chunk.
#[derive(Debug)]
pub struct ReplyStream {
    id: String,
    attempt: u32,
    stream: bool,
    next_seq: u64,
    text: String,
    token_ids: Vec<TokenId>,
    done: bool,
}

impl ReplyStream {
    pub fn new(id: String, attempt: u32, stream: bool) -> Self {
        Self {
            id,
            attempt,
            stream,
            next_seq: 0,
            text: String::new(),
            token_ids: Vec::new(),
            done: false,
        }
    }

    /// Whether the final reply was produced.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// The reply for an engine event, if one is due. Nothing follows a final reply.
    pub fn on_event(&mut self, ev: StreamEvent) -> Option<Reply> {
        if self.done {
            return None;
        }
        match ev {
            StreamEvent::Delta { text, token_ids } => {
                if !self.stream {
                    self.text.push_str(&text);
                    self.token_ids.extend(token_ids);
                    return None;
                }
                Some(Reply::Chunk(Chunk {
                    id: self.id.clone(),
                    seq: self.take_seq(),
                    attempt: self.attempt,
                    text,
                    token_ids,
                    ..Chunk::default()
                }))
            }
            StreamEvent::Finished {
                text,
                token_ids,
                finish_reason,
                usage,
                timings,
            } => {
                self.done = true;
                let (text, token_ids) = if self.stream {
                    (text, token_ids)
                } else {
                    let mut all = std::mem::take(&mut self.text);
                    all.push_str(&text);
                    let mut ids = std::mem::take(&mut self.token_ids);
                    ids.extend(token_ids);
                    (all, ids)
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
                }))
            }
            StreamEvent::Error(error) => Some(self.error(error)),
        }
    }

    /// A final error reply (the engine failed, or the gateway gave up on the request).
    pub fn error(&mut self, error: ErrorBody) -> Reply {
        self.done = true;
        Reply::Error(ErrorReply {
            id: Some(self.id.clone()),
            seq: self.take_seq(),
            attempt: self.attempt,
            error,
        })
    }

    /// A final `abort` chunk for a request that never reached the engine.
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

// --- counters --------------------------------------------------------------------------------

/// What the gateway did, for `$SRV.STATS` (the endpoint's `data`) and the logs.
#[derive(Debug, Default)]
pub struct GatewayStats {
    pub received: AtomicU64,
    pub completed: AtomicU64,
    pub aborted: AtomicU64,
    pub errors: AtomicU64,
    pub no_reply_subject: AtomicU64,
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
            "publish_failures": self.publish_failures.load(Ordering::Relaxed),
            "cancels": self.cancels.load(Ordering::Relaxed),
            "in_flight": in_flight,
        })
    }
}

// --- the service -----------------------------------------------------------------------------

/// What every request task shares.
pub(crate) struct Shared {
    pub(crate) engine: Engine,
    pub(crate) nats: async_nats::Client,
    pub(crate) stats: Arc<GatewayStats>,
    in_flight: Mutex<HashSet<String>>,
    idle: Notify,
    recent_cancels: Mutex<RecentCancels>,
    max_in_flight: usize,
    log_prompts: bool,
    /// Set when a shutdown aborts what is left: JetStream jobs are then given back
    /// instead of answered with an `abort` chunk.
    requeue_aborts: AtomicBool,
}

impl Shared {
    fn num_in_flight(&self) -> usize {
        self.in_flight.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn in_flight_ids(&self) -> Vec<String> {
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
struct Replier {
    nats: async_nats::Client,
    target: Subject,
    /// True when `target` is the message's own reply subject: the final reply then goes
    /// through the service request, so `$SRV.STATS` counts it.
    via_request: bool,
    format: WireFormat,
}

#[derive(Debug, thiserror::Error)]
enum SendError {
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

    fn encode<T: serde::Serialize + ?Sized>(&self, value: &T) -> Vec<u8> {
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

    async fn send_bytes(
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

/// The running gateway's knobs, from `[nats]`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub subject_prefix: String,
    pub queue_group: String,
    pub drain_timeout: Duration,
    pub max_in_flight: usize,
    /// Log each request's prompt text (`log.prompts`); off by default.
    pub log_prompts: bool,
    /// The JetStream intake (`intake.mode = "jetstream"`), besides the core endpoint.
    pub intake: Option<IntakeConfig>,
}

impl From<&NatsConfig> for GatewayConfig {
    fn from(c: &NatsConfig) -> Self {
        Self {
            subject_prefix: c.subject_prefix.clone(),
            queue_group: c.queue_group.clone(),
            drain_timeout: Duration::from_millis(c.drain_timeout_ms),
            max_in_flight: c.max_in_flight,
            log_prompts: false,
            intake: None,
        }
    }
}

/// Serves `engine` on `nats` until `shutdown` resolves, then stops taking requests, lets
/// the ones in flight finish (up to `drain_timeout`, after which they are aborted) and
/// returns. Must run inside the engine's actix `System`.
pub async fn serve(
    engine: Engine,
    nats: async_nats::Client,
    cfg: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Arc<GatewayStats>, GatewayError> {
    let stats = Arc::new(GatewayStats::default());
    let shared = Arc::new(Shared {
        engine: engine.clone(),
        nats: nats.clone(),
        stats: stats.clone(),
        in_flight: Mutex::new(HashSet::new()),
        idle: Notify::new(),
        recent_cancels: Mutex::new(RecentCancels::new(4096, Duration::from_secs(5))),
        max_in_flight: cfg.max_in_flight.max(1),
        log_prompts: cfg.log_prompts,
        requeue_aborts: AtomicBool::new(false),
    });

    let weak = Arc::downgrade(&shared);
    let handler_stats = stats.clone();
    let service = nats
        .service_builder()
        .description(format!(
            "pagoda LLM engine: {} ({}); requests on {}.generate, cancels on {}.cancel",
            engine.info.model_path,
            engine.info.architecture,
            cfg.subject_prefix,
            cfg.subject_prefix
        ))
        .metadata(HashMap::from([
            ("model".to_string(), engine.info.model_path.clone()),
            ("architecture".to_string(), engine.info.architecture.clone()),
            (
                "max_model_len".to_string(),
                engine.info.max_model_len.to_string(),
            ),
            ("protocol".to_string(), "v1".to_string()),
        ]))
        .queue_group(&cfg.queue_group)
        .stats_handler(move |_endpoint, _stats| {
            let in_flight = weak.upgrade().map_or(0, |s| s.num_in_flight());
            handler_stats.snapshot(in_flight)
        })
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| GatewayError::Service(e.to_string()))?;
    let generate_subject = format!("{}.generate", cfg.subject_prefix);
    let mut endpoint = service
        .group_with_queue_group(&cfg.subject_prefix, &cfg.queue_group)
        .endpoint_builder()
        .name("generate")
        .metadata(HashMap::from([(
            "formats".to_string(),
            "application/msgpack, application/json".to_string(),
        )]))
        .add("generate")
        .await
        .map_err(|e| GatewayError::Subscribe {
            subject: generate_subject.clone(),
            message: e.to_string(),
        })?;
    let cancel_subject = format!("{}.cancel", cfg.subject_prefix);
    let mut cancels =
        nats.subscribe(cancel_subject.clone())
            .await
            .map_err(|e| GatewayError::Subscribe {
                subject: cancel_subject.clone(),
                message: e.to_string(),
            })?;
    let intake = match &cfg.intake {
        Some(icfg) => {
            let queue = crate::intake::setup(&nats, &cfg.subject_prefix, icfg).await?;
            Some(
                crate::intake::Intake::start(
                    shared.clone(),
                    queue,
                    &cfg.subject_prefix,
                    &cfg.queue_group,
                    icfg,
                )
                .await?,
            )
        }
        None => None,
    };
    tracing::info!(
        generate = %generate_subject,
        cancel = %cancel_subject,
        queue_group = %cfg.queue_group,
        jobs = intake.is_some().then(|| IntakeConfig::jobs_subject(&cfg.subject_prefix)),
        "serving"
    );

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            req = endpoint.next() => match req {
                Some(req) => {
                    tokio::spawn(handle_request(shared.clone(), req));
                }
                None => {
                    tracing::error!("the generate subscription ended; stopping");
                    break;
                }
            },
            msg = cancels.next() => match msg {
                Some(msg) => {
                    tokio::spawn(handle_cancel(shared.clone(), msg));
                }
                None => {
                    tracing::error!("the cancel subscription ended; stopping");
                    break;
                }
            },
        }
    }

    // Shutdown: no new requests; requests already delivered to us are still served.
    let intake_drain = match intake {
        Some(i) => Some(i.stop().await),
        None => None,
    };
    tracing::info!(
        in_flight = shared.num_in_flight(),
        "shutting down: no new requests"
    );
    if let Err(e) = endpoint.stop().await {
        tracing::warn!(error = %e, "unsubscribing from the generate subject");
    }
    while let Ok(Some(req)) =
        tokio::time::timeout(Duration::from_millis(200), endpoint.next()).await
    {
        tokio::spawn(handle_request(shared.clone(), req));
    }
    // Cancels keep working while the in-flight requests finish.
    let cancel_task = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(msg) = cancels.next().await {
                tokio::spawn(handle_cancel(shared.clone(), msg));
            }
        })
    };
    if !wait_idle(&shared, cfg.drain_timeout).await {
        let ids = shared.in_flight_ids();
        tracing::warn!(
            remaining = ids.len(),
            "drain timeout: aborting the requests still running"
        );
        // JetStream jobs aborted now are given back (nak) for another engine.
        shared.requeue_aborts.store(true, Ordering::Relaxed);
        for id in &ids {
            engine.cancel(id).await;
        }
        if !wait_idle(&shared, ABORT_GRACE).await {
            tracing::error!(
                remaining = shared.num_in_flight(),
                "requests did not end after the abort; leaving them"
            );
        }
    }
    if let Some(drain) = intake_drain {
        if !drain.wait(ABORT_GRACE).await {
            tracing::warn!("some JetStream jobs were not settled; the server redelivers them");
        }
    }
    cancel_task.abort();
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "stopping the micro service");
    }
    match tokio::time::timeout(Duration::from_secs(5), nats.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "flushing the NATS connection"),
        Err(_) => tracing::warn!("flushing the NATS connection timed out"),
    }
    tracing::info!(stats = %stats.snapshot(0), "stopped");
    Ok(stats)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}

/// Waits until no request is in flight, at most `limit`. Returns whether that happened.
async fn wait_idle(shared: &Shared, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let notified = shared.idle.notified();
        if shared.num_in_flight() == 0 {
            return true;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => return shared.num_in_flight() == 0,
        }
    }
}

async fn handle_request(shared: Arc<Shared>, req: service::Request) {
    let incoming = Incoming {
        message: &req.message,
        own_reply: req.message.reply.clone(),
        request: Some(&req),
        attempt: ATTEMPT,
        durable: None,
    };
    process(&shared, incoming).await;
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

    let wire = match decode_request(&inc.message.payload, format) {
        Ok(w) => w,
        Err(rejected) => {
            let target = own_reply
                .clone()
                .or_else(|| rejected.reply_to.clone().map(Subject::from));
            let reply = Reply::Error(ErrorReply {
                id: rejected.id.clone(),
                seq: 0,
                attempt,
                error: rejected.error,
            });
            answer_rejection(shared, target.map(replier), req, reply).await;
            return Outcome::Rejected;
        }
    };
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
    let _guard = match shared.register(&id) {
        Ok(g) => g,
        Err(error) if inc.durable.is_some() && error.code != ErrorCode::Internal => {
            tracing::debug!(%id, message = %error.message, "job given back");
            return Outcome::Busy;
        }
        Err(error) => {
            let reply = replies.error(error);
            answer_rejection(shared, Some(out), req, reply).await;
            return Outcome::Rejected;
        }
    };
    let cancelled_early = shared
        .recent_cancels
        .lock()
        .map(|mut c| c.take(&id, Instant::now()))
        .unwrap_or(false);
    if cancelled_early {
        shared.stats.aborted.fetch_add(1, Ordering::Relaxed);
        let reply = replies.aborted_before_start();
        if let Err(e) = out.send(req, &reply).await {
            shared
                .stats
                .publish_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%id, error = %e, "answering a request cancelled before it started");
        }
        return Outcome::Done;
    }

    tracing::debug!(%id, stream = accepted.stream, attempt, "request accepted");
    let mut events = shared.engine.generate(accepted.request);
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let timeout_at = accepted
        .timeout_ms
        .map_or(far, |ms| Instant::now() + Duration::from_millis(ms));
    let mut grace_at: Option<Instant> = None;
    loop {
        let mut reply = tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => match replies.on_event(ev) {
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
                    if !durable.last_attempt {
                        return Outcome::Retry(e.error.message.clone());
                    }
                    let reason = format!("attempt {attempt} failed: {}", e.error.message);
                    e.error = ErrorBody::new(ErrorCode::Failed, reason.clone());
                    failed = Some(reason);
                }
                _ => {}
            }
        }
        let is_final = reply.is_final();
        if let Err(e) = out.send(req, &reply).await {
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
            return match failed {
                Some(reason) => Outcome::Failed(reason),
                None => Outcome::Done,
            };
        }
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

async fn handle_cancel(shared: Arc<Shared>, msg: async_nats::Message) {
    shared.stats.cancels.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(crate::metrics::NATS_MESSAGES_RECEIVED).increment(1);
    let format = message_format(msg.headers.as_ref(), &msg.payload);
    let out = msg.reply.clone().map(|target| Replier {
        nats: shared.nats.clone(),
        target,
        via_request: false,
        format,
    });
    let cancel: CancelRequest = match format.decode(&msg.payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "unreadable cancel");
            if let Some(out) = out {
                let bytes = out.encode(&ErrorReply {
                    id: None,
                    seq: 0,
                    attempt: ATTEMPT,
                    error: ErrorBody::new(
                        ErrorCode::InvalidRequest,
                        format!("a cancel is {{\"id\": \"…\"}}: {e}"),
                    ),
                });
                let _ = out.send_bytes(None, bytes).await;
            }
            return;
        }
    };
    let running_here = shared
        .in_flight
        .lock()
        .map(|s| s.contains(&cancel.id))
        .unwrap_or(false);
    let cancelled = running_here && shared.engine.cancel(&cancel.id).await;
    tracing::debug!(id = %cancel.id, cancelled, "cancel");
    if !running_here {
        // Perhaps its request has not reached us yet: remember the cancel for a while.
        if let Ok(mut recent) = shared.recent_cancels.lock() {
            recent.insert(&cancel.id, Instant::now());
        }
    }
    // Only the engine that had the request answers (the others stay silent), so that
    // `nats req <prefix>.cancel` gets one answer.
    if let (true, Some(out)) = (cancelled, out) {
        let bytes = out.encode(&CancelReply {
            id: cancel.id,
            cancelled: true,
        });
        if let Err(e) = out.send_bytes(None, bytes).await {
            tracing::debug!(error = %e, "answering a cancel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_actors::protocol::Timings;

    fn delta(text: &str, ids: &[TokenId]) -> StreamEvent {
        StreamEvent::Delta {
            text: text.into(),
            token_ids: ids.to_vec(),
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
        let a = chunk(s.on_event(delta("Pa", &[1])));
        let b = chunk(s.on_event(delta("ris", &[2])));
        let c = chunk(s.on_event(finished("", &[3], FinishReason::Stop)));
        assert_eq!((a.seq, b.seq, c.seq), (0, 1, 2));
        assert_eq!((a.text.as_str(), b.text.as_str()), ("Pa", "ris"));
        assert!(!a.is_final() && !b.is_final() && c.is_final());
        assert_eq!(c.token_ids, vec![3]);
        assert_eq!(c.usage.map(|u| u.completion_tokens), Some(3));
        assert!(s.is_done());
        assert_eq!(s.on_event(delta("late", &[4])), None);
        assert_eq!(
            s.on_event(StreamEvent::Error(ErrorBody::new(ErrorCode::Internal, "x"))),
            None
        );
    }

    #[test]
    fn unstreamed_replies_are_one_message() {
        let mut s = ReplyStream::new("r".into(), 1, false);
        assert_eq!(s.on_event(delta("Pa", &[1])), None);
        assert_eq!(s.on_event(delta("ris", &[2])), None);
        let c = chunk(s.on_event(finished(".", &[3], FinishReason::Length)));
        assert_eq!(c.seq, 0);
        assert_eq!(c.text, "Paris.");
        assert_eq!(c.token_ids, vec![1, 2, 3]);
        assert_eq!(c.finish_reason, Some(FinishReason::Length));
    }

    #[test]
    fn errors_take_the_next_seq_and_end_the_stream() {
        let mut s = ReplyStream::new("r".into(), 1, true);
        chunk(s.on_event(delta("a", &[1])));
        let e = s.on_event(StreamEvent::Error(ErrorBody::new(
            ErrorCode::Internal,
            "boom",
        )));
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
