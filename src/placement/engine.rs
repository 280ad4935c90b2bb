//! The engine's side: `pagoda serve --role engine`. The core (scheduler, block manager,
//! executor) runs here with [`FrontendLinks`] as the recipient of its tokens and stream
//! ends; calls from frontends arrive on the micro service `pagoda-engine`; the engine
//! announces its load and state every `placement.heartbeat_interval_ms`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::service::{self, ServiceExt};
use futures_util::StreamExt;
use pagoda_actors::config::EngineConfig;
use pagoda_actors::engine::{CoreOutputs, EngineCore};
use pagoda_actors::messages::{
    post, AddSequence, ErrorBody, FinishReason, FinishSequence, SeqId, StepTokens, StreamEnd,
};
use pagoda_actors::supervisor::Supervisor;

use super::table::SeqMap;
use super::{
    decode, encode, new_id, EngineAnswer, EngineBeat, EngineCall, EngineState, FrontendBeat,
    FrontendEvent, FrontendEventBody, Subjects, ENGINE_SERVICE,
};
use crate::config::PlacementConfig;

/// A call from a frontend, and the request to answer it on.
struct Call(service::Request);

impl Message for Call {
    type Result = ();
}

/// A frontend's announcement.
struct Beat(async_nats::Message);

impl Message for Beat {
    type Result = ();
}

/// The bridge between this engine's core and the frontends: translates sequence ids,
/// numbers each link's events, and aborts the sequences of frontends that went away.
pub struct FrontendLinks {
    id: String,
    subjects: Subjects,
    nats: async_nats::Client,
    map: Arc<Mutex<SeqMap>>,
    add: Recipient<AddSequence>,
    finish: Recipient<FinishSequence>,
    peer_timeout: Duration,
    state: Arc<Mutex<EngineState>>,
    /// Sequences taken since start (`$SRV.STATS.pagoda-engine`).
    added: Arc<std::sync::atomic::AtomicU64>,
}

impl FrontendLinks {
    fn map(&self) -> std::sync::MutexGuard<'_, SeqMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes one event to a frontend, numbered on its link.
    fn publish(
        &self,
        frontend: &str,
        body: FrontendEventBody,
    ) -> impl Future<Output = ()> + 'static {
        let link_seq = self.map().next_link_seq(frontend);
        let event = FrontendEvent {
            engine: self.id.clone(),
            link_seq,
            body,
        };
        let subject = self.subjects.frontend(frontend);
        let nats = self.nats.clone();
        let bytes = encode(&event);
        async move {
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    // The frontend sees the gap in the numbering and ends the streams.
                    tracing::error!(error = %e, "encoding an event");
                    return;
                }
            };
            if let Err(e) = nats.publish(subject, bytes.into()).await {
                // Likewise: a lost event is a gap the frontend acts on.
                tracing::error!(error = %e, "publishing an event to a frontend");
            }
        }
    }

    async fn answer(req: service::Request, answer: EngineAnswer) {
        let bytes = match encode(&answer) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding an answer");
                return;
            }
        };
        if let Err(e) = req.respond(Ok(bytes.into())).await {
            tracing::warn!(error = %e, "answering a frontend's call");
        }
    }

    fn on_add(
        &mut self,
        frontend: String,
        add: AddSequence,
        req: service::Request,
        ctx: &mut Context<Self>,
    ) {
        if *self.state.lock().unwrap_or_else(|e| e.into_inner()) != EngineState::Serving {
            let answer = EngineAnswer::Added(Err(ErrorBody::new(
                pagoda_actors::messages::ErrorCode::Overloaded,
                "this engine is shutting down",
            )));
            actix::spawn(Self::answer(req, answer));
            return;
        }
        // The sequence and its forks (n > 1) get local ids, all or none.
        let mut locals: Vec<SeqId> = Vec::with_capacity(1 + add.forks.len());
        for &remote in std::iter::once(&add.seq_id).chain(&add.forks) {
            let inserted = self.map().insert(&frontend, remote, Instant::now());
            let Some(local) = inserted else {
                for &l in &locals {
                    self.map().remove(l);
                }
                let answer = EngineAnswer::Added(Err(ErrorBody::internal(format!(
                    "sequence {remote} of {frontend} is already running here"
                ))));
                actix::spawn(Self::answer(req, answer));
                return;
            };
            locals.push(local);
        }
        let local = locals[0];
        let add = AddSequence {
            seq_id: local,
            forks: locals[1..].to_vec(),
            ..add
        };
        // Queued in the scheduler's mailbox now, so a later finish cannot overtake it.
        self.add
            .send(add)
            .into_actor(self)
            .map(move |res, act, _| {
                let result = match res {
                    Ok(r) => r,
                    Err(e) => Err(ErrorBody::internal(format!("scheduler unreachable: {e}"))),
                };
                if result.is_err() {
                    for l in locals {
                        act.map().remove(l);
                    }
                } else {
                    act.added.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                actix::spawn(Self::answer(req, EngineAnswer::Added(result)));
            })
            .spawn(ctx);
    }

    fn on_finish(
        &mut self,
        frontend: String,
        finish: FinishSequence,
        req: service::Request,
        ctx: &mut Context<Self>,
    ) {
        self.map().heard_from(&frontend, Instant::now());
        let Some(local) = self.map().local(&frontend, finish.seq_id) else {
            actix::spawn(Self::answer(req, EngineAnswer::Finished(false)));
            return;
        };
        self.finish
            .send(FinishSequence {
                seq_id: local,
                reason: finish.reason,
            })
            .into_actor(self)
            .map(move |res, act, _| {
                let live = res.unwrap_or(false);
                // An aborted live sequence is forgotten when its StreamEnd goes out.
                if !live || finish.reason != FinishReason::Abort {
                    act.map().remove(local);
                }
                actix::spawn(Self::answer(req, EngineAnswer::Finished(live)));
            })
            .spawn(ctx);
    }

    /// Aborts the sequences of frontends not heard from within the peer timeout.
    fn expire_frontends(&mut self) {
        let gone = self.map().expire(Instant::now(), self.peer_timeout);
        for (frontend, locals) in gone {
            if locals.is_empty() {
                continue;
            }
            tracing::warn!(%frontend, sequences = locals.len(), "frontend gone; aborting its sequences");
            for seq_id in locals {
                let abort = FinishSequence {
                    seq_id,
                    reason: FinishReason::Abort,
                };
                if let Err(e) = post(&self.finish, abort) {
                    tracing::error!(seq_id, error = %e, "cannot abort a sequence");
                }
            }
        }
    }
}

impl Actor for FrontendLinks {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.peer_timeout / 4, |act, _| act.expire_frontends());
    }
}

impl Handler<Call> for FrontendLinks {
    type Result = ();
    fn handle(&mut self, Call(req): Call, ctx: &mut Context<Self>) {
        match decode::<EngineCall>(&req.message.payload) {
            Ok(EngineCall::Add { frontend, add }) => self.on_add(frontend, *add, req, ctx),
            Ok(EngineCall::Finish { frontend, finish }) => {
                self.on_finish(frontend, finish, req, ctx)
            }
            Err(e) => {
                let answer =
                    EngineAnswer::Failed(ErrorBody::internal(format!("unreadable call: {e}")));
                actix::spawn(Self::answer(req, answer));
            }
        }
    }
}

impl Handler<Beat> for FrontendLinks {
    type Result = ();
    fn handle(&mut self, Beat(msg): Beat, _: &mut Context<Self>) {
        match decode::<FrontendBeat>(&msg.payload) {
            Ok(b) => self.map().heard_from(&b.frontend, Instant::now()),
            Err(e) => tracing::warn!(error = %e, "unreadable frontend announcement"),
        }
    }
}

impl Handler<StepTokens> for FrontendLinks {
    type Result = AtomicResponse<Self, ()>;

    /// One event per frontend with sequences in the step, published in order before the
    /// next step's (the scheduler waits for this answer: backpressure).
    fn handle(&mut self, step: StepTokens, _: &mut Context<Self>) -> Self::Result {
        let mut per_frontend: HashMap<String, StepTokens> = HashMap::new();
        {
            let mut map = self.map();
            for f in step.first_scheduled {
                if let Some((frontend, remote)) = map.remote(f.seq_id) {
                    let e = per_frontend.entry(frontend.to_owned()).or_default();
                    e.first_scheduled
                        .push(pagoda_actors::messages::FirstScheduled {
                            seq_id: remote,
                            ..f
                        });
                }
            }
            for o in step.outputs {
                let Some((frontend, remote)) = map.remote(o.seq_id).map(|(f, r)| (f.to_owned(), r))
                else {
                    continue; // its frontend is gone
                };
                if o.finish_reason.is_some() {
                    map.remove(o.seq_id);
                }
                per_frontend.entry(frontend).or_default().outputs.push(
                    pagoda_actors::messages::SeqOutput {
                        seq_id: remote,
                        ..o
                    },
                );
            }
        }
        let sends: Vec<_> = per_frontend
            .into_iter()
            .map(|(frontend, tokens)| self.publish(&frontend, FrontendEventBody::Tokens(tokens)))
            .collect();
        AtomicResponse::new(Box::pin(
            async move {
                for s in sends {
                    s.await;
                }
            }
            .into_actor(self),
        ))
    }
}

impl Handler<StreamEnd> for FrontendLinks {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, end: StreamEnd, _: &mut Context<Self>) -> Self::Result {
        let target = self.map().remove(end.seq_id);
        let send = target.map(|(frontend, remote)| {
            self.publish(
                &frontend,
                FrontendEventBody::End(StreamEnd {
                    seq_id: remote,
                    ..end
                }),
            )
        });
        AtomicResponse::new(Box::pin(
            async move {
                if let Some(s) = send {
                    s.await;
                }
            }
            .into_actor(self),
        ))
    }
}

/// Serves an engine process until `shutdown` resolves (then drains: new sequences are
/// refused, running ones finish, up to `drain_timeout`) or an actor dies (an error: the
/// caller exits non-zero). Must run inside an actix `System`.
pub async fn serve(
    cfg: &EngineConfig,
    placement: &PlacementConfig,
    nats: async_nats::Client,
    prefix: &str,
    drain_timeout: Duration,
    on_ready: impl FnOnce(&Supervisor),
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::gateway::GatewayError> {
    let id = new_id("engine");
    let subjects = Subjects::new(prefix);
    let map = Arc::new(Mutex::new(SeqMap::new()));
    let links_ctx = Context::<FrontendLinks>::new();
    let links_addr = links_ctx.address();
    let supervisor = Supervisor::new(None);
    let core = EngineCore::start(
        cfg,
        CoreOutputs {
            tokens: links_addr.clone().recipient(),
            ends: links_addr.clone().recipient(),
        },
        supervisor.clone(),
    )
    .map_err(|e| crate::gateway::GatewayError::Service(e.to_string()))?;
    on_ready(&supervisor);
    let state = Arc::new(Mutex::new(EngineState::Serving));
    let sub_err =
        |subject: &str, e: &dyn std::fmt::Display| crate::gateway::GatewayError::Subscribe {
            subject: subject.to_owned(),
            message: e.to_string(),
        };
    let calls_subject = subjects.engine(&id);
    let load = core.load.clone();
    let stats_load = load.clone();
    let added = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stats_added = added.clone();
    let stats_map = map.clone();
    let stats_id = id.clone();
    let service = nats
        .service_builder()
        .description(format!(
            "pagoda engine {id}: {} ({}); calls on {calls_subject}",
            core.info.model_path, core.info.architecture
        ))
        .metadata(HashMap::from([
            ("engine".to_string(), id.clone()),
            ("model".to_string(), core.info.model_name.clone()),
        ]))
        .stats_handler(move |_, _| {
            let l = stats_load.snapshot();
            serde_json::json!({
                "engine": stats_id,
                "num_running": l.num_running,
                "num_waiting": l.num_waiting,
                "num_free_blocks": l.num_free_blocks,
                "num_blocks": l.num_blocks,
                "sequences_total": stats_added.load(std::sync::atomic::Ordering::Relaxed),
                "sequences_mapped": stats_map.lock().map(|m| m.len()).unwrap_or(0),
            })
        })
        .start(ENGINE_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| crate::gateway::GatewayError::Service(e.to_string()))?;
    let endpoint = service
        .endpoint(calls_subject.clone())
        .await
        .map_err(|e| sub_err(&calls_subject, &e))?;
    let beats_subject = subjects.frontend_beats();
    let frontend_beats = nats
        .subscribe(beats_subject.clone())
        .await
        .map_err(|e| sub_err(&beats_subject, &e))?;
    let mut links_ctx = links_ctx;
    links_ctx.add_message_stream(endpoint.map(Call));
    links_ctx.add_message_stream(frontend_beats.map(Beat));
    links_ctx.run(FrontendLinks {
        id: id.clone(),
        subjects: subjects.clone(),
        nats: nats.clone(),
        map: map.clone(),
        add: core.add.clone(),
        finish: core.finish.clone(),
        peer_timeout: Duration::from_millis(placement.peer_timeout_ms),
        state: state.clone(),
        added,
    });

    // Announcements.
    let beat = {
        let nats = nats.clone();
        let subject = subjects.engine_beats();
        let id = id.clone();
        let model = core.info.model_name.clone();
        let max_model_len = core.info.max_model_len;
        let map = map.clone();
        let state = state.clone();
        let load = load.clone();
        move || {
            let beat = EngineBeat {
                engine: id.clone(),
                model: model.clone(),
                max_model_len,
                state: *state.lock().unwrap_or_else(|e| e.into_inner()),
                load: load.snapshot(),
                links: map.lock().unwrap_or_else(|e| e.into_inner()).links(),
            };
            let nats = nats.clone();
            let subject = subject.clone();
            async move {
                match encode(&beat) {
                    Ok(b) => {
                        if let Err(e) = nats.publish(subject, b.into()).await {
                            tracing::warn!(error = %e, "announcing the engine");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "encoding the engine announcement"),
                }
            }
        }
    };
    let every = Duration::from_millis(placement.heartbeat_interval_ms);
    let beats_task = {
        let beat = beat.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                beat().await;
            }
        })
    };
    tracing::info!(engine = %id, calls = %calls_subject, model = %core.info.model_name, "serving as an engine");

    tokio::pin!(shutdown);
    let failed = supervisor.failed();
    tokio::pin!(failed);
    let failure = tokio::select! {
        _ = &mut shutdown => None,
        f = &mut failed => Some(f),
    };
    let set_state = |s: EngineState| *state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    match &failure {
        Some((actor, reason)) => {
            tracing::error!(%actor, %reason, "the engine failed; telling the frontends and exiting");
            set_state(EngineState::Failed);
        }
        None => {
            set_state(EngineState::Draining);
            tracing::info!("draining: no new sequences; finishing the running ones");
        }
    }
    // Tell the frontends at once rather than at the next tick.
    beat().await;
    if failure.is_none() {
        let deadline = tokio::time::Instant::now() + drain_timeout;
        loop {
            let l = load.snapshot();
            let empty = map.lock().map(|m| m.is_empty()).unwrap_or(true);
            if (l.num_running == 0 && l.num_waiting == 0 && empty)
                || tokio::time::Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        beat().await;
    }
    beats_task.abort();
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "stopping the micro service");
    }
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), nats.flush()).await {
        tracing::warn!(error = %e, "flushing the NATS connection timed out");
    }
    match failure {
        Some((actor, reason)) => Err(crate::gateway::GatewayError::EngineFailed { actor, reason }),
        None => Ok(()),
    }
}
