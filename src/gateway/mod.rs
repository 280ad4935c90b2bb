//! `pagoda serve`: the NATS front door.
//!
//! The generate endpoint is a NATS micro-service endpoint (service `pagoda`, subject
//! `<prefix>.generate`, queue group `nats.queue_group`), so `$SRV.PING|INFO|STATS` answer
//! and N engines share the requests. Each request runs in its own task: decode → validate
//! → [`Engine::generate`] → one chunk per engine step to the reply subject. Cancels arrive
//! on `<prefix>.cancel`, a plain subscription that every engine sees. `docs/protocol.md`
//! is the reference for what travels.
//!
//! The per-request path it shares with the JetStream intake is `crate::request`; here is
//! the service itself — subscriptions, cancels, shutdown.

pub use crate::request::{
    message_format, GatewayStats, RecentCancels, ReplyStream, ABORT_GRACE, PUBLISH_TIMEOUT,
};
use crate::request::{process, Incoming, Shared};

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::{self, ServiceExt};
use futures_util::StreamExt;
use pagoda_actors::engine::Engine;
use pagoda_actors::protocol::{CancelReply, CancelRequest, ErrorBody, ErrorCode, ErrorReply};
use tokio::time::Instant;

use crate::config::{IntakeConfig, NatsConfig};
use crate::request::{Replier, ATTEMPT};

/// The micro service's name (`$SRV.PING.pagoda`).
pub const SERVICE_NAME: &str = "pagoda";

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("starting the NATS micro service: {0}")]
    Service(String),
    #[error("subscribing to {subject}: {message}")]
    Subscribe { subject: String, message: String },
    #[error(transparent)]
    Intake(#[from] crate::intake::IntakeError),
    #[error("the engine failed ({actor} actor: {reason})")]
    EngineFailed { actor: String, reason: String },
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
    let shared = Arc::new(Shared::new(
        engine.clone(),
        nats.clone(),
        &cfg.subject_prefix,
        stats.clone(),
        cfg.max_in_flight,
        cfg.log_prompts,
    ));

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
            let (in_flight, engine) = weak.upgrade().map_or((0, serde_json::Value::Null), |s| {
                (s.num_in_flight(), engine_json(&s.engine))
            });
            let mut data = handler_stats.snapshot(in_flight);
            data["engine"] = engine;
            data
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
    let supervisor = engine.supervisor().clone();
    let engine_failed = supervisor.failed();
    tokio::pin!(engine_failed);
    let mut failure = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            (actor, reason) = &mut engine_failed => {
                tracing::error!(%actor, %reason, "the engine failed: no new requests; answering the ones in flight, then exiting");
                failure = Some((actor, reason));
                break;
            }
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
    shared.stopping.store(true, Ordering::Relaxed);
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
    // After an engine failure every stream has already ended with an error: give the
    // request tasks a moment to publish those, no more.
    let drain_timeout = match &failure {
        Some(_) => cfg.drain_timeout.min(FAILED_DRAIN),
        None => cfg.drain_timeout,
    };
    if !wait_idle(&shared, drain_timeout).await && failure.is_none() {
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
    match failure {
        Some((actor, reason)) => {
            // Keep answering /health (503) and /metrics a moment, so that health checks
            // and a last scrape see the failure before the process is gone.
            tokio::time::sleep(FAILED_LINGER).await;
            Err(GatewayError::EngineFailed { actor, reason })
        }
        None => Ok(stats),
    }
}

/// How long a failed engine stays up (serving 503 on /health) after its last reply.
const FAILED_LINGER: Duration = Duration::from_secs(1);

/// How long the request tasks get to publish their error replies after an engine failure.
const FAILED_DRAIN: Duration = Duration::from_secs(2);

/// The engine's part of `$SRV.STATS`: its load as last published and whether it serves.
fn engine_json(engine: &Engine) -> serde_json::Value {
    let load = engine.load().snapshot();
    serde_json::json!({
        "healthy": !engine.supervisor().is_failed(),
        "num_running": load.num_running,
        "num_waiting": load.num_waiting,
        "num_free_blocks": load.num_free_blocks,
        "num_blocks": load.num_blocks,
        "num_engines": load.num_engines,
    })
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

async fn handle_cancel(shared: Arc<Shared>, msg: async_nats::Message) {
    shared.stats.cancels.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(crate::metrics::NATS_MESSAGES_RECEIVED).increment(1);
    let format = message_format(msg.headers.as_ref(), &msg.payload);
    // A cancel is applied whatever its reply subject; it is answered only where the
    // reply-subject policy allows.
    let out = msg.reply.clone().filter(|r| {
        let ok = pagoda_actors::protocol::check_reply_subject(r.as_str(), &shared.prefix).is_ok();
        if !ok {
            shared
                .stats
                .refused_reply_subjects
                .fetch_add(1, Ordering::Relaxed);
        }
        ok
    });
    let out = out.map(|target| Replier {
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
                    index: None,
                    id: None,
                    seq: 0,
                    attempt: ATTEMPT,
                    error: ErrorBody::new(
                        ErrorCode::InvalidRequest,
                        format!("a cancel is {{\"id\": \"…\"}}: {e}"),
                    ),
                });
                if let Err(e) = out.send_bytes(None, bytes).await {
                    tracing::debug!(error = %e, "answering an unreadable cancel");
                }
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
    if !cancelled {
        // Perhaps its request has not reached us (or the engine) yet: remember the cancel
        // for a while.
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
