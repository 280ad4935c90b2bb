//! Durable intake (`intake.mode = "jetstream"`): jobs published with JetStream on
//! `<prefix>.jobs.generate` are kept in a work-queue stream and pulled by one durable
//! consumer that every engine shares. An engine pulls only as many jobs as it has room
//! for; while a job generates it tells the server the job is in progress; it acknowledges
//! the job once the final chunk is published. A job whose engine dies is redelivered
//! (chunks then carry a higher `attempt`); a job that failed `max_deliver` times is copied
//! to `<prefix>.dead` and its client gets error code `failed`. Each job runs through the
//! same per-request path as core NATS requests ([`crate::gateway`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use pagoda_actors::protocol::{
    check_reply_subject, decode_request, ErrorBody, ErrorCode, ErrorReply, Reply, WireFormat,
};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{IntakeConfig, StreamStorage};
use crate::request::{message_format, process, Durable, Incoming, Outcome, Shared};

/// Header of a dead letter: why the job failed.
pub const DEAD_REASON_HEADER: &str = "Pagoda-Dead-Reason";
/// Header of a dead letter: how many deliveries it had.
pub const DEAD_ATTEMPTS_HEADER: &str = "Pagoda-Attempts";
/// A job this engine cannot take now goes back with this delay.
const BUSY_NAK_DELAY: Duration = Duration::from_millis(200);

/// Why the JetStream intake could not start.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("creating or reading the JetStream stream {name}: {message}")]
    Stream { name: String, message: String },
    #[error("the existing stream {name} does not fit: {message}")]
    Mismatch { name: String, message: String },
    #[error("creating or reading the durable consumer {name}: {message}")]
    Consumer { name: String, message: String },
}

/// The stream configuration `cfg` asks for.
pub fn stream_config(prefix: &str, cfg: &IntakeConfig) -> stream::Config {
    let s = &cfg.stream;
    stream::Config {
        name: s.name.clone(),
        subjects: vec![IntakeConfig::stream_subjects(prefix)],
        retention: stream::RetentionPolicy::WorkQueue,
        // A full stream refuses new jobs (the publisher sees it) rather than dropping old ones.
        discard: stream::DiscardPolicy::New,
        max_age: Duration::from_secs(s.max_age_s),
        max_messages: s.max_msgs,
        max_bytes: s.max_bytes,
        num_replicas: s.replicas,
        storage: match s.storage {
            StreamStorage::File => stream::StorageType::File,
            StreamStorage::Memory => stream::StorageType::Memory,
        },
        ..Default::default()
    }
}

/// The jobs stream and its durable consumer.
pub struct JobQueue {
    pub stream: stream::Stream,
    pub consumer: consumer::PullConsumer,
}

/// Creates (or checks) the work-queue stream and the durable pull consumer.
pub async fn setup(
    nats: &async_nats::Client,
    prefix: &str,
    cfg: &IntakeConfig,
) -> Result<JobQueue, IntakeError> {
    let js = jetstream::new(nats.clone());
    let want = stream_config(prefix, cfg);
    let name = want.name.clone();
    let subjects = want.subjects.clone();
    let mut stream = js
        .get_or_create_stream(want)
        .await
        .map_err(|e| IntakeError::Stream {
            name: name.clone(),
            message: e.to_string(),
        })?;
    let info = stream.info().await.map_err(|e| IntakeError::Stream {
        name: name.clone(),
        message: e.to_string(),
    })?;
    if info.config.retention != stream::RetentionPolicy::WorkQueue {
        return Err(IntakeError::Mismatch {
            name,
            message: format!(
                "retention is {:?}, pagoda needs WorkQueue",
                info.config.retention
            ),
        });
    }
    if let Some(missing) = subjects.iter().find(|s| !info.config.subjects.contains(s)) {
        return Err(IntakeError::Mismatch {
            name,
            message: format!(
                "it does not hold the subject {missing} (it has {:?})",
                info.config.subjects
            ),
        });
    }
    let durable = cfg.durable_name.clone();
    let ack_wait = Duration::from_millis(cfg.ack_wait_ms);
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &durable,
            consumer::pull::Config {
                durable_name: Some(durable.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_deliver: cfg.max_deliver,
                ack_wait,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| IntakeError::Consumer {
            name: durable.clone(),
            message: e.to_string(),
        })?;
    let have = &consumer.cached_info().config;
    if have.max_deliver != cfg.max_deliver || have.ack_wait != ack_wait {
        tracing::warn!(
            consumer = %durable,
            max_deliver = have.max_deliver,
            ack_wait = ?have.ack_wait,
            "the existing consumer's max_deliver / ack_wait differ from intake.*; using the consumer's"
        );
    }
    tracing::info!(stream = %name, subjects = ?subjects, consumer = %durable, "JetStream intake ready");
    Ok(JobQueue { stream, consumer })
}

/// A running pull loop: stop it with [`Intake::stop`].
pub(crate) struct Intake {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    exhausted_task: tokio::task::JoinHandle<()>,
    slots: Arc<Semaphore>,
    max_in_flight: u32,
}

/// What every job task needs besides the gateway's state.
struct JobContext {
    ack_wait: Duration,
    max_deliver: i64,
    dead_subject: String,
}

impl Intake {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        queue: JobQueue,
        prefix: &str,
        queue_group: &str,
        cfg: &IntakeConfig,
    ) -> Result<Self, IntakeError> {
        let JobQueue { stream, consumer } = queue;
        let (stop, stop_rx) = watch::channel(false);
        let max_in_flight = u32::try_from(cfg.max_in_flight)
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32)
            .max(1);
        let slots = Arc::new(Semaphore::new(max_in_flight as usize));
        // The consumer's own settings win (it may have existed before).
        let info = &consumer.cached_info().config;
        let ctx = Arc::new(JobContext {
            ack_wait: info.ack_wait,
            max_deliver: info.max_deliver,
            dead_subject: IntakeConfig::dead_subject(prefix),
        });
        let expires = Duration::from_millis(cfg.fetch_expires_ms);
        // Jobs whose engine died on every attempt: the server says so in an advisory.
        let advisory = format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
            cfg.stream.name,
            consumer.cached_info().name
        );
        let exhausted = shared
            .nats
            .queue_subscribe(advisory.clone(), queue_group.to_owned())
            .await
            .map_err(|e| IntakeError::Consumer {
                name: advisory.clone(),
                message: e.to_string(),
            })?;
        let exhausted_task = tokio::spawn(watch_exhausted(
            shared.clone(),
            stream,
            exhausted,
            ctx.clone(),
        ));
        let task = tokio::spawn(pull_loop(
            shared,
            consumer,
            slots.clone(),
            ctx,
            expires,
            stop_rx,
        ));
        Ok(Self {
            stop,
            task,
            exhausted_task,
            slots,
            max_in_flight,
        })
    }

    /// Stops pulling (jobs of a pull already under way are given back at once).
    pub(crate) async fn stop(self) -> IntakeDrain {
        let _ = self.stop.send(true);
        self.exhausted_task.abort();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "the JetStream pull loop failed");
        }
        IntakeDrain {
            slots: self.slots,
            max_in_flight: self.max_in_flight,
        }
    }
}

/// The jobs still held after the pull loop stopped.
pub(crate) struct IntakeDrain {
    slots: Arc<Semaphore>,
    max_in_flight: u32,
}

impl IntakeDrain {
    /// Waits (at most `limit`) until every job was acked, nacked or terminated.
    pub(crate) async fn wait(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.slots.acquire_many(self.max_in_flight))
            .await
            .is_ok()
    }
}

/// How many jobs the engine has room for now: free slots, but none while the waiting
/// queue is full, or while requests wait and the KV cache is (nearly) full.
async fn room(shared: &Shared, free_slots: usize) -> usize {
    // A full waiting queue would refuse the job; a failed engine cannot run it.
    if shared.engine.supervisor().is_failed() || shared.engine.is_full() {
        return 0;
    }
    match shared.engine.scheduler_stats().await {
        Ok(s) if s.num_waiting > 0 && s.kv_cache_usage >= 0.95 => 0,
        _ => free_slots,
    }
}

async fn pull_loop(
    shared: Arc<Shared>,
    consumer: consumer::PullConsumer,
    slots: Arc<Semaphore>,
    ctx: Arc<JobContext>,
    expires: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!("pulling jobs");
    loop {
        if *stop.borrow() {
            break;
        }
        // Wait for room for at least one job, then take every free slot.
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let n = room(&shared, permits.len()).await;
        if n == 0 {
            drop(permits);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.changed() => break,
            }
            continue;
        }
        permits.truncate(n);
        let batch = consumer
            .fetch()
            .max_messages(permits.len())
            .expires(expires)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "pulling jobs failed; retrying");
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
        };
        let mut stopping = false;
        loop {
            let next = tokio::select! {
                m = batch.next() => m,
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    continue;
                }
            };
            let msg = match next {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "receiving a job failed");
                    break;
                }
            };
            if stopping || *stop.borrow() {
                // Shutting down: this engine takes nothing more.
                nak(&msg, None, "shutting down").await;
                continue;
            }
            match permits.pop() {
                Some(permit) => {
                    tokio::spawn(handle_job(shared.clone(), ctx.clone(), msg, permit));
                }
                None => nak(&msg, None, "more jobs than asked for").await,
            }
        }
        drop(permits);
        if stopping {
            break;
        }
    }
    tracing::info!("stopped pulling jobs");
}

async fn nak(msg: &jetstream::Message, delay: Option<Duration>, why: &str) {
    if let Err(e) = msg.ack_with(AckKind::Nak(delay)).await {
        tracing::warn!(error = %e, why, "giving a job back failed (it is redelivered after ack_wait)");
    }
}

/// Runs one job through the gateway's per-request path, keeps it in progress while it
/// runs, and settles it with the server.
async fn handle_job(
    shared: Arc<Shared>,
    ctx: Arc<JobContext>,
    msg: jetstream::Message,
    _permit: OwnedSemaphorePermit,
) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1).max(1);
    let attempt = u32::try_from(delivered).unwrap_or(u32::MAX);
    let last_attempt = ctx.max_deliver > 0 && delivered >= ctx.max_deliver;
    let msg = Arc::new(msg);
    let progress = {
        let msg = msg.clone();
        let every = (ctx.ack_wait / 3).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "in-progress ack failed");
                }
            }
        })
    };
    let incoming = Incoming {
        message: &msg.message,
        own_reply: None,
        request: None,
        attempt,
        durable: Some(Durable { last_attempt }),
    };
    let outcome = process(&shared, incoming).await;
    progress.abort();
    let settle = match &outcome {
        Outcome::Done => AckKind::Ack,
        Outcome::Rejected => AckKind::Term,
        Outcome::Busy => AckKind::Nak(Some(BUSY_NAK_DELAY)),
        Outcome::Retry(reason) => {
            tracing::warn!(attempt, %reason, "job failed; giving it back for another attempt");
            AckKind::Nak(None)
        }
        Outcome::Failed(reason) => {
            dead_letter(&shared, &ctx, &msg, attempt, reason).await;
            AckKind::Term
        }
    };
    if let Err(e) = msg.ack_with(settle).await {
        shared
            .stats
            .publish_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, ?outcome, "settling a job failed (it may be redelivered)");
    }
}

/// Copies a job that failed its last attempt to `<prefix>.dead`, with the reason.
async fn dead_letter(
    shared: &Shared,
    ctx: &JobContext,
    msg: &jetstream::Message,
    attempt: u32,
    reason: &str,
) {
    let mut headers = msg.message.headers.clone().unwrap_or_default();
    headers.insert(DEAD_REASON_HEADER, reason);
    headers.insert(DEAD_ATTEMPTS_HEADER, attempt.to_string().as_str());
    tracing::error!(attempt, %reason, subject = %ctx.dead_subject, "job failed on its last attempt: dead letter");
    if let Err(e) = shared
        .nats
        .publish_with_headers(
            ctx.dead_subject.clone(),
            headers,
            msg.message.payload.clone(),
        )
        .await
    {
        tracing::error!(error = %e, "publishing a dead letter failed");
    }
}

/// The part of the server's `io.nats.jetstream.advisory.v1.max_deliver` advisory we use.
#[derive(Debug, serde::Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: i64,
}

/// Answers the jobs that used up `max_deliver` deliveries without being settled (their
/// engine died every time): the client gets error code `failed`, the job is copied to
/// `<prefix>.dead` and removed from the stream. The engines share the advisory in a queue
/// group, and only the one that deletes the job answers it.
async fn watch_exhausted(
    shared: Arc<Shared>,
    stream: stream::Stream,
    mut advisories: async_nats::Subscriber,
    ctx: Arc<JobContext>,
) {
    while let Some(msg) = advisories.next().await {
        let adv: MaxDeliveries = match serde_json::from_slice(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable max-deliveries advisory");
                continue;
            }
        };
        let raw = match stream.get_raw_message(adv.stream_seq).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(seq = adv.stream_seq, error = %e, "exhausted job already gone");
                continue;
            }
        };
        if adv.deliveries < ctx.max_deliver {
            tracing::warn!(
                seq = adv.stream_seq,
                deliveries = adv.deliveries,
                "a max-deliveries advisory below intake.max_deliver: ignored"
            );
            continue;
        }
        let format = message_format(Some(&raw.headers), &raw.payload);
        let (id, reply_to) = match decode_request(&raw.payload, format) {
            Ok(w) => (w.id, w.reply_to),
            Err(r) => (r.id, r.reply_to),
        };
        // Whoever published the advisory, a job running here is not dead.
        if id.as_deref().is_some_and(|id| shared.is_in_flight(id)) {
            tracing::warn!(
                seq = adv.stream_seq,
                id = id.as_deref().unwrap_or(""),
                "a max-deliveries advisory names a job running on this engine: ignored"
            );
            continue;
        }
        let reply_to = reply_to.filter(|r| check_reply_subject(r, &shared.prefix).is_ok());
        match stream.delete_message(adv.stream_seq).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::debug!(seq = adv.stream_seq, error = %e, "exhausted job already gone");
                continue;
            }
        }
        let attempt = u32::try_from(adv.deliveries.max(1)).unwrap_or(u32::MAX);
        // The error counts as the attempt after the last one, with seq 0: a client that
        // read part of the last attempt's answer takes it as a restart that failed.
        let error_attempt = attempt.saturating_add(1);
        let reason = format!(
            "no engine finished the job in {} deliveries (intake.max_deliver)",
            adv.deliveries
        );
        tracing::error!(seq = adv.stream_seq, %reason, subject = %ctx.dead_subject, "dead letter");
        shared.stats.count_error(ErrorCode::Failed);
        match reply_to {
            Some(target) => {
                let reply = Reply::Error(ErrorReply {
                    index: None,
                    id,
                    seq: 0,
                    attempt: error_attempt,
                    error: ErrorBody::new(ErrorCode::Failed, reason.clone()),
                });
                match reply.encode(format) {
                    Ok(bytes) => {
                        let mut h = HeaderMap::new();
                        h.insert(WireFormat::HEADER, format.content_type());
                        if let Err(e) = shared
                            .nats
                            .publish_with_headers(target, h, bytes.into())
                            .await
                        {
                            tracing::warn!(error = %e, "answering an exhausted job failed");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "encoding a reply failed"),
                }
            }
            None => {
                shared
                    .stats
                    .no_reply_subject
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut headers = raw.headers.clone();
        headers.insert(DEAD_REASON_HEADER, reason.as_str());
        headers.insert(DEAD_ATTEMPTS_HEADER, attempt.to_string().as_str());
        if let Err(e) = shared
            .nats
            .publish_with_headers(ctx.dead_subject.clone(), headers, raw.payload.clone())
            .await
        {
            tracing::error!(error = %e, "publishing a dead letter failed");
        }
    }
}
