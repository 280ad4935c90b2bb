//! The frontend's side: [`EngineRouter`], the actor the tokenizer and detokenizer send
//! their `AddSequence` / `FinishSequence` to when the engines are other processes. It
//! picks an engine per new sequence, calls it over NATS, passes the engines' events to the
//! detokenizer, and ends the streams of engines it loses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;
use pagoda_actors::engine::Backend;
use pagoda_actors::load::EngineLoad;
use pagoda_actors::messages::{
    post, AddSequence, ErrorBody, ErrorCode, FinishReason, FinishSequence, GetSchedulerStats,
    SchedulerStats, SeqId, StepTokens, StreamEnd,
};

use super::table::{EngineTable, Lost};
use super::{
    decode, encode, new_id, EngineAnswer, EngineBeat, EngineCall, FrontendBeat, FrontendEvent,
    FrontendEventBody, Subjects,
};
use crate::config::PlacementConfig;

/// What arrives on the router's subscriptions.
enum Inbound {
    Beat(async_nats::Message),
    Event(async_nats::Message),
}

impl Message for Inbound {
    type Result = ();
}

/// Where the router passes the engines' events: the detokenizer.
pub struct RouterOutputs {
    pub tokens: Recipient<StepTokens>,
    pub ends: Recipient<StreamEnd>,
}

pub struct EngineRouter {
    id: String,
    subjects: Subjects,
    nats: async_nats::Client,
    cfg: PlacementConfig,
    table: EngineTable,
    outputs: RouterOutputs,
    /// Sequences whose `AddSequence` call is under way, with finishes that arrived meanwhile.
    adding: HashMap<SeqId, Vec<FinishSequence>>,
    /// Published for the tokenizer's early refusal and `$SRV.STATS`.
    load: Arc<EngineLoad>,
}

/// A running router: the [`Backend`] a frontend engine is started with, and the router's
/// address for its outputs, which exist only once the frontend is started.
pub struct Router {
    pub id: String,
    pub backend: Backend,
    ctx: Context<EngineRouter>,
    parts: RouterParts,
}

struct RouterParts {
    subjects: Subjects,
    nats: async_nats::Client,
    cfg: PlacementConfig,
    model: String,
    load: Arc<EngineLoad>,
    beats: async_nats::Subscriber,
    events: async_nats::Subscriber,
}

impl Router {
    /// Subscribes to the engines' announcements and to this frontend's events. Call
    /// [`Router::run`] once the detokenizer exists.
    pub async fn subscribe(
        nats: async_nats::Client,
        prefix: &str,
        model: &str,
        cfg: &PlacementConfig,
    ) -> Result<Self, async_nats::SubscribeError> {
        let id = new_id("frontend");
        let subjects = Subjects::new(prefix);
        let beats = nats.subscribe(subjects.engine_beats()).await?;
        let events = nats.subscribe(subjects.frontend(&id)).await?;
        let ctx = Context::<EngineRouter>::new();
        let addr = ctx.address();
        let load = Arc::new(EngineLoad::new(0));
        load.set(&Default::default());
        Ok(Self {
            backend: Backend {
                add: addr.clone().recipient(),
                finish: addr.clone().recipient(),
                stats: addr.recipient(),
                pool: None,
                load: load.clone(),
            },
            id,
            ctx,
            parts: RouterParts {
                subjects,
                nats,
                cfg: cfg.clone(),
                model: model.to_owned(),
                load,
                beats,
                events,
            },
        })
    }

    /// Starts the router actor (sending engine events to `outputs`) and this frontend's
    /// announcements.
    pub fn run(self, outputs: RouterOutputs) -> Addr<EngineRouter> {
        let p = self.parts;
        let timeout = Duration::from_millis(p.cfg.peer_timeout_ms);
        spawn_beats(
            p.nats.clone(),
            p.subjects.frontend_beats(),
            self.id.clone(),
            Duration::from_millis(p.cfg.heartbeat_interval_ms),
        );
        let mut ctx = self.ctx;
        let inbound =
            futures_util::stream::select(p.beats.map(Inbound::Beat), p.events.map(Inbound::Event));
        ctx.add_message_stream(inbound);
        let router = EngineRouter {
            table: EngineTable::new(&self.id, &p.model, timeout),
            id: self.id,
            subjects: p.subjects,
            nats: p.nats,
            cfg: p.cfg,
            outputs,
            adding: HashMap::new(),
            load: p.load,
        };
        ctx.run(router)
    }
}

/// Publishes this frontend's announcement every `every`.
fn spawn_beats(nats: async_nats::Client, subject: String, id: String, every: Duration) {
    let body = match encode(&FrontendBeat { frontend: id }) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "encoding the frontend announcement");
            return;
        }
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = nats.publish(subject.clone(), body.clone().into()).await {
                tracing::warn!(error = %e, "announcing the frontend");
            }
        }
    });
}

impl EngineRouter {
    fn publish_load(&self) {
        self.load.set(&self.table.aggregate());
    }

    /// Ends the streams of a lost engine (and asks it, in case it still runs them, to
    /// abort them).
    fn lose(&mut self, lost: Lost) {
        if lost.seqs.is_empty() {
            tracing::info!(engine = %lost.engine, loss = %lost.loss, "engine gone");
            return;
        }
        tracing::error!(engine = %lost.engine, loss = %lost.loss, streams = lost.seqs.len(), "engine lost; ending its streams");
        let error = ErrorBody::internal(format!(
            "engine {} {}; retry the request",
            lost.engine, lost.loss
        ));
        for &seq_id in &lost.seqs {
            self.end_stream(seq_id, Some(error.clone()));
        }
        if matches!(lost.loss, super::table::Loss::Gap { .. }) {
            for seq_id in lost.seqs {
                self.call_and_forget(&lost.engine, seq_id);
            }
        }
    }

    fn end_stream(&self, seq_id: SeqId, error: Option<ErrorBody>) {
        let end = StreamEnd {
            seq_id,
            reason: FinishReason::Abort,
            error,
        };
        if let Err(e) = post(&self.outputs.ends, end) {
            tracing::error!(seq_id, error = %e, "cannot end a stream");
        }
    }

    /// Asks `engine` to abort `seq_id`, without waiting for the answer.
    fn call_and_forget(&self, engine: &str, seq_id: SeqId) {
        let call = EngineCall::Finish {
            frontend: self.id.clone(),
            finish: FinishSequence {
                seq_id,
                reason: FinishReason::Abort,
            },
        };
        let fut = self.call(engine, &call);
        actix::spawn(async move {
            if let Err(e) = fut.await {
                tracing::debug!(seq_id, error = %e, "aborting a lost sequence on its engine");
            }
        });
    }

    /// A call to `engine`, with the configured timeout.
    fn call(
        &self,
        engine: &str,
        call: &EngineCall,
    ) -> impl std::future::Future<Output = Result<EngineAnswer, String>> + 'static {
        let nats = self.nats.clone();
        let subject = self.subjects.engine(engine);
        let timeout = Duration::from_millis(self.cfg.call_timeout_ms);
        let body = encode(call);
        async move {
            let body = body?;
            let msg = tokio::time::timeout(timeout, nats.request(subject, body.into()))
                .await
                .map_err(|_| format!("no answer within {timeout:?}"))?
                .map_err(|e| e.to_string())?;
            decode::<EngineAnswer>(&msg.payload)
        }
    }

    /// Passes a finish on to the sequence's engine; a cancel that cannot reach it is
    /// answered here (the stream ends with `abort`).
    fn forward_finish(&mut self, finish: FinishSequence, ctx: &mut Context<Self>) {
        let Some(engine) = self.table.engine_of(finish.seq_id).map(str::to_owned) else {
            return;
        };
        if finish.reason != FinishReason::Abort {
            // The stream already ended here (a stop string); the engine frees it.
            self.table.unassign(finish.seq_id);
        }
        let call = EngineCall::Finish {
            frontend: self.id.clone(),
            finish,
        };
        self.call(&engine, &call)
            .into_actor(self)
            .map(move |res, act, _| {
                let live = matches!(res, Ok(EngineAnswer::Finished(true)));
                if let Err(e) = &res {
                    tracing::warn!(seq_id = finish.seq_id, %engine, error = %e, "a finish did not reach its engine");
                }
                if finish.reason == FinishReason::Abort && !live {
                    // Not running there (or unreachable): nothing else will end it.
                    if act.table.unassign(finish.seq_id).is_some() {
                        act.end_stream(finish.seq_id, None);
                    }
                }
            })
            .spawn(ctx);
    }

    fn on_beat(&mut self, msg: async_nats::Message) {
        let beat: EngineBeat = match decode(&msg.payload) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable engine announcement");
                return;
            }
        };
        if let Some(lost) = self.table.on_beat(beat, Instant::now()) {
            self.lose(lost);
        }
        self.publish_load();
    }

    fn on_event(&mut self, msg: async_nats::Message) {
        let ev: FrontendEvent = match decode(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "unreadable event from an engine");
                return;
            }
        };
        if let Some(lost) = self.table.on_event(&ev.engine, ev.link_seq) {
            self.lose(lost);
        }
        match ev.body {
            FrontendEventBody::Tokens(tokens) => {
                for o in &tokens.outputs {
                    if o.finish_reason.is_some() {
                        self.table.unassign(o.seq_id);
                    }
                }
                if let Err(e) = post(&self.outputs.tokens, tokens) {
                    tracing::error!(error = %e, "cannot pass a step's tokens on");
                }
            }
            FrontendEventBody::End(end) => {
                self.table.unassign(end.seq_id);
                if let Err(e) = post(&self.outputs.ends, end) {
                    tracing::error!(error = %e, "cannot pass a stream end on");
                }
            }
        }
    }
}

impl Actor for EngineRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(frontend = %self.id, "frontend routing to engines");
        let every = Duration::from_millis((self.cfg.heartbeat_interval_ms / 2).max(10));
        ctx.run_interval(every, |act, _| {
            for lost in act.table.expire(Instant::now()) {
                act.lose(lost);
            }
            act.publish_load();
        });
    }
}

impl Handler<Inbound> for EngineRouter {
    type Result = ();
    fn handle(&mut self, msg: Inbound, _: &mut Context<Self>) {
        match msg {
            Inbound::Beat(m) => self.on_beat(m),
            Inbound::Event(m) => self.on_event(m),
        }
    }
}

impl Handler<AddSequence> for EngineRouter {
    type Result = ResponseActFuture<Self, Result<(), ErrorBody>>;

    fn handle(&mut self, add: AddSequence, _: &mut Context<Self>) -> Self::Result {
        let seq_id = add.seq_id;
        let Some(engine) = self.table.choose(&[]) else {
            let error = ErrorBody::new(
                ErrorCode::Overloaded,
                "no engine is serving this model right now; retry later",
            );
            return Box::pin(actix::fut::ready(Err(error)));
        };
        // Recorded before the call: the engine's first tokens may overtake its answer.
        let seq_ids: Vec<SeqId> = std::iter::once(seq_id)
            .chain(add.forks.iter().copied())
            .collect();
        for &id in &seq_ids {
            self.table.assign(&engine, id);
            self.adding.insert(id, Vec::new());
        }
        let call = EngineCall::Add {
            frontend: self.id.clone(),
            add: Box::new(add),
        };
        Box::pin(
            self.call(&engine, &call)
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let finishes: Vec<FinishSequence> = seq_ids
                        .iter()
                        .flat_map(|id| act.adding.remove(id).unwrap_or_default())
                        .collect();
                    let outcome = match res {
                        Ok(EngineAnswer::Added(Ok(()))) => Ok(()),
                        Ok(EngineAnswer::Added(Err(e))) | Ok(EngineAnswer::Failed(e)) => Err(e),
                        Ok(other) => Err(ErrorBody::internal(format!(
                            "engine {engine} answered a new sequence with {other:?}"
                        ))),
                        Err(e) => {
                            // It may have arrived: make sure it does not run unseen.
                            for &id in &seq_ids {
                                act.call_and_forget(&engine, id);
                            }
                            Err(ErrorBody::internal(format!(
                                "engine {engine} did not take the request: {e}"
                            )))
                        }
                    };
                    match &outcome {
                        Ok(()) => {
                            for f in finishes {
                                act.forward_finish(f, ctx);
                            }
                        }
                        Err(_) => {
                            for &id in &seq_ids {
                                act.table.unassign(id);
                            }
                        }
                    }
                    outcome
                }),
        )
    }
}

impl Handler<FinishSequence> for EngineRouter {
    type Result = bool;

    fn handle(&mut self, finish: FinishSequence, ctx: &mut Context<Self>) -> bool {
        if let Some(waiting) = self.adding.get_mut(&finish.seq_id) {
            waiting.push(finish);
            return true;
        }
        let known = self.table.engine_of(finish.seq_id).is_some();
        self.forward_finish(finish, ctx);
        known
    }
}

impl Handler<GetSchedulerStats> for EngineRouter {
    type Result = MessageResult<GetSchedulerStats>;

    fn handle(&mut self, _: GetSchedulerStats, _: &mut Context<Self>) -> Self::Result {
        let l = self.table.aggregate();
        MessageResult(SchedulerStats {
            num_running: l.num_running,
            num_waiting: l.num_waiting,
            num_preemptions: 0,
            kv_cache_usage: l.kv_usage(),
            num_free_blocks: l.num_free_blocks,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            spec: Default::default(),
        })
    }
}

impl EngineRouter {
    /// The smallest context length the live engines serve (None without engines).
    pub fn max_model_len(&self) -> Option<usize> {
        self.table.max_model_len()
    }
}
