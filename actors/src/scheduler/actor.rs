//! The scheduler actor: owns the [`SchedulerPolicy`] and drives the engine loop — plan →
//! one message to the block manager → commit → one message to the executor → update → one
//! message of tokens out. One step is in flight at a time; messages that arrive meanwhile
//! (new sequences, finishes) are folded into the next step.
//!
//! It talks to the other actors through recipients only (`messages`): in one process they
//! are the block manager, the executor and the detokenizer; in an engine process the token
//! and end recipients are the bridge to the frontends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::{SchedulerError, SchedulerPolicy};
use crate::fault;
use crate::load::EngineLoad;
use crate::messages::{
    now_us, post, AddSequence, BlockError, ErrorBody, FinishReason, FinishSequence, FirstScheduled,
    GetSchedulerStats, RunBatch, SeqId, SeqOutput, StepOutput, StepRequest, StepResponse,
    StepTokens, StreamEnd,
};
use crate::metrics::{SchedulerMetrics, StepSample};
use crate::supervisor::LifeGuard;

/// Steps of tokens that may be on their way to the detokenizer before the scheduler waits
/// for it: backpressure on the token path, so a slow consumer slows the engine down instead
/// of filling its mailbox.
pub const MAX_TOKEN_MESSAGES_IN_FLIGHT: usize = 2;

/// Where the scheduler's messages go.
pub struct SchedulerLinks {
    pub block_manager: Recipient<StepRequest>,
    pub executor: Recipient<RunBatch>,
    /// Sampled tokens, once per step.
    pub tokens: Recipient<StepTokens>,
    /// Streams that end without a token (aborted, failed).
    pub ends: Recipient<StreamEnd>,
}

pub struct SchedulerActor {
    policy: SchedulerPolicy,
    links: SchedulerLinks,
    in_flight: bool,
    /// A kick came while a step was in flight: whatever asked for it (a new sequence, a
    /// finish) is not in that step's plan, so the step's end must plan again.
    kick_missed: bool,
    /// StepTokens sent and not yet handled by their receiver.
    token_messages_in_flight: usize,
    /// Sequences that ended since the last batch: the executor drops their state.
    released: Vec<SeqId>,
    /// Sequences not yet scheduled, with their arrival time (for queue time).
    queued_at: HashMap<SeqId, u64>,
    /// Prometheus series (none in tests and `pagoda generate`).
    metrics: Option<SchedulerMetrics>,
    /// Bound on the waiting queue (`scheduler.max_waiting`); 0 = none.
    max_waiting: usize,
    /// Published after every change (tokenizer's early refusal, stats, announcements).
    load: Arc<EngineLoad>,
    /// When the step in flight was planned.
    step_started: Option<Instant>,
    guard: LifeGuard,
}

impl SchedulerActor {
    pub fn new(
        policy: SchedulerPolicy,
        links: SchedulerLinks,
        load: Arc<EngineLoad>,
        guard: LifeGuard,
    ) -> Self {
        Self {
            policy,
            links,
            in_flight: false,
            kick_missed: false,
            token_messages_in_flight: 0,
            released: Vec::new(),
            queued_at: HashMap::new(),
            metrics: None,
            max_waiting: 0,
            load,
            step_started: None,
            guard,
        }
    }

    /// Records the engine's per-step series into `metrics`.
    pub fn with_metrics(mut self, metrics: SchedulerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Answer `Overloaded` to new sequences while `max_waiting` are already waiting.
    pub fn with_max_waiting(mut self, max_waiting: usize) -> Self {
        self.max_waiting = max_waiting;
        self
    }

    fn record_stats(&self) {
        let stats = self.policy.stats();
        self.load.store(&stats);
        if let Some(m) = &self.metrics {
            m.record_stats(&stats);
        }
    }

    /// Starts a step unless one is running (its end then plans again), the token path is
    /// backed up (the delivery's answer kicks), or there is nothing to do.
    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight {
            self.kick_missed = true;
            return;
        }
        if self.token_messages_in_flight >= MAX_TOKEN_MESSAGES_IN_FLIGHT || !self.policy.has_work()
        {
            return;
        }
        let req = match self.policy.plan() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "planning a step failed");
                return;
            }
        };
        self.in_flight = true;
        self.kick_missed = false;
        self.step_started = Some(Instant::now());
        self.links
            .block_manager
            .send(req)
            .into_actor(self)
            .map(|res, act, ctx| act.on_blocks(res, ctx))
            .spawn(ctx);
    }

    fn on_blocks(
        &mut self,
        res: Result<Result<StepResponse, BlockError>, MailboxError>,
        ctx: &mut Context<Self>,
    ) {
        let resp = match res {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return self.fail_step(format!("block manager: {e}"), ctx),
            Err(e) => return self.fail_step(format!("block manager unreachable: {e}"), ctx),
        };
        let batch = match self.policy.commit(resp) {
            Ok(b) => b,
            Err(e) => return self.fail_step(format!("commit: {e}"), ctx),
        };
        if batch.is_empty() {
            self.in_flight = false;
            self.record_stats();
            // Nothing runnable (e.g. only frees were sent): don't spin on waiting
            // sequences that cannot be admitted until something else changes — but a
            // sequence that arrived during this round trip was not in its plan.
            if self.policy.num_running() > 0 || self.kick_missed {
                self.kick(ctx);
            }
            return;
        }
        let now = now_us();
        let mut first_scheduled = Vec::new();
        for s in &batch.seqs {
            if let Some(t) = self.queued_at.remove(&s.seq_id) {
                first_scheduled.push(FirstScheduled {
                    seq_id: s.seq_id,
                    scheduled_us: now,
                    queue_us: now.saturating_sub(t),
                    // What it did not compute itself: prefix-cache hits, or a fork's
                    // shared prompt.
                    cached_tokens: s.start_pos,
                });
            }
        }
        let released = std::mem::take(&mut self.released);
        let seq_ids: Vec<SeqId> = batch.seqs.iter().map(|s| s.seq_id).collect();
        let num_tokens = batch.num_batched_tokens;
        self.links
            .executor
            .send(RunBatch { batch, released })
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.on_executed(res, seq_ids, num_tokens, first_scheduled, ctx)
            })
            .spawn(ctx);
    }

    fn on_executed(
        &mut self,
        res: Result<Result<StepOutput, String>, MailboxError>,
        seq_ids: Vec<SeqId>,
        num_tokens: usize,
        first_scheduled: Vec<FirstScheduled>,
        ctx: &mut Context<Self>,
    ) {
        self.in_flight = false;
        if let (Some(m), Some(t0)) = (&self.metrics, self.step_started.take()) {
            m.record_step(StepSample {
                num_seqs: seq_ids.len(),
                num_tokens,
                duration_s: t0.elapsed().as_secs_f64(),
            });
        }
        let out = match res {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return self.fail_batch(e, seq_ids, ctx),
            Err(e) => return self.fail_batch(format!("executor unreachable: {e}"), seq_ids, ctx),
        };
        // Failures that belong to one sequence end that sequence alone, before the others'
        // tokens are folded in.
        for f in &out.failed {
            tracing::warn!(seq_id = f.seq_id, error = %f.error, "a sequence failed; the rest of the batch goes on");
            self.end_with_error(f.seq_id, f.error.clone());
        }
        let outputs: Vec<SeqOutput> = match self.policy.update(&out) {
            Ok(o) => o,
            Err(e) => return self.fail_batch(format!("update: {e}"), seq_ids, ctx),
        };
        for o in &outputs {
            if o.finish_reason.is_some() {
                self.released.push(o.seq_id);
            }
        }
        self.record_stats();
        if !outputs.is_empty() || !first_scheduled.is_empty() {
            self.send_tokens(
                StepTokens {
                    outputs,
                    first_scheduled,
                },
                ctx,
            );
        }
        self.kick(ctx);
    }

    /// Hands a step's tokens on, counting them until the receiver has them. If they cannot
    /// be delivered, the sequences they belong to are over: abort them (their streams are
    /// ended by whoever noticed the receiver's death).
    fn send_tokens(&mut self, msg: StepTokens, ctx: &mut Context<Self>) {
        let seqs: Vec<SeqId> = msg
            .outputs
            .iter()
            .filter(|o| o.finish_reason.is_none())
            .map(|o| o.seq_id)
            .collect();
        self.token_messages_in_flight += 1;
        self.links
            .tokens
            .send(msg)
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.token_messages_in_flight -= 1;
                if let Err(e) = res {
                    tracing::error!(error = %e, sequences = seqs.len(), "cannot deliver a step's tokens; aborting those sequences");
                    for id in seqs {
                        if act.policy.abort(id) {
                            act.released.push(id);
                        }
                    }
                    act.record_stats();
                }
                act.kick(ctx);
            })
            .spawn(ctx);
    }

    /// Retires a live sequence and ends its stream with `error`.
    fn end_with_error(&mut self, seq_id: SeqId, error: ErrorBody) {
        fault::disarm(seq_id);
        if self.policy.abort(seq_id) {
            self.released.push(seq_id);
            self.queued_at.remove(&seq_id);
            self.post_end(StreamEnd {
                seq_id,
                reason: FinishReason::Abort,
                error: Some(error),
            });
        }
    }

    fn post_end(&self, end: StreamEnd) {
        let seq_id = end.seq_id;
        if let Err(e) = post(&self.links.ends, end) {
            // The detokenizer (or the bridge) is gone; the supervisor ends the streams.
            tracing::error!(seq_id, error = %e, "cannot end a stream");
        }
    }

    /// The block manager round trip failed: nothing ran; try again on the next message, or
    /// at once if one came during the round trip.
    fn fail_step(&mut self, error: String, ctx: &mut Context<Self>) {
        tracing::error!(%error, "engine step failed");
        self.policy.cancel_step();
        self.in_flight = false;
        if self.kick_missed {
            self.kick(ctx);
        }
    }

    /// The executor failed on a whole batch: its sequences end with `internal`, the engine
    /// goes on.
    fn fail_batch(&mut self, error: String, seq_ids: Vec<SeqId>, ctx: &mut Context<Self>) {
        tracing::error!(%error, sequences = seq_ids.len(), "batch failed; aborting its sequences");
        self.policy.cancel_step();
        for id in seq_ids {
            self.end_with_error(id, ErrorBody::internal(error.clone()));
        }
        self.record_stats();
        self.kick(ctx);
    }
}

impl Actor for SchedulerActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.guard.watch_this_thread();
    }
}

impl Handler<AddSequence> for SchedulerActor {
    type Result = Result<(), ErrorBody>;
    fn handle(&mut self, msg: AddSequence, ctx: &mut Context<Self>) -> Self::Result {
        fault::panic_if_armed("scheduler", std::iter::once(msg.seq_id));
        let waiting = self.policy.num_waiting();
        if self.max_waiting > 0 && waiting >= self.max_waiting {
            return Err(SchedulerError::Overloaded {
                waiting,
                max_waiting: self.max_waiting,
            }
            .to_error_body());
        }
        let seq_ids: Vec<SeqId> = std::iter::once(msg.seq_id)
            .chain(msg.forks.iter().copied())
            .collect();
        self.policy
            .add_forked(msg.seq_id, msg.prompt, msg.params, msg.forks)
            .map_err(|e| e.to_error_body())?;
        let now = now_us();
        for id in seq_ids {
            self.queued_at.insert(id, now);
        }
        self.kick(ctx);
        self.record_stats();
        Ok(())
    }
}

impl Handler<FinishSequence> for SchedulerActor {
    type Result = bool;
    fn handle(&mut self, msg: FinishSequence, ctx: &mut Context<Self>) -> bool {
        let live = self.policy.finish(msg.seq_id, msg.reason);
        if live {
            fault::disarm(msg.seq_id);
            self.released.push(msg.seq_id);
            self.queued_at.remove(&msg.seq_id);
            if msg.reason == FinishReason::Abort {
                self.post_end(StreamEnd {
                    seq_id: msg.seq_id,
                    reason: FinishReason::Abort,
                    error: None,
                });
            }
        }
        self.kick(ctx);
        self.record_stats();
        live
    }
}

impl Handler<GetSchedulerStats> for SchedulerActor {
    type Result = MessageResult<GetSchedulerStats>;
    fn handle(&mut self, _: GetSchedulerStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.policy.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_manager::{BlockManager, BlockManagerConfig};
    use crate::messages::{BlockError, SampledToken, SamplingParams, StepResponse, TokenId};
    use crate::scheduler::SchedulerLimits;
    use crate::supervisor::Supervisor;
    use std::time::Duration;
    use tokio::sync::{mpsc, oneshot};

    const EOS: TokenId = 0;
    const TOK: TokenId = 7;

    /// The real block manager, except that its answer to a step that schedules nothing
    /// (frees only) waits until the test lets it go.
    struct GatedBlocks {
        bm: BlockManager,
        held: mpsc::UnboundedSender<oneshot::Sender<()>>,
    }

    impl Actor for GatedBlocks {
        type Context = Context<Self>;
    }

    impl Handler<StepRequest> for GatedBlocks {
        type Result = ResponseFuture<Result<StepResponse, BlockError>>;
        fn handle(&mut self, req: StepRequest, _: &mut Context<Self>) -> Self::Result {
            let frees_only = req.grow.is_empty() && req.admit.is_empty() && req.fork.is_empty();
            let res = self.bm.apply(req);
            if !frees_only {
                return Box::pin(async move { res });
            }
            let (release, wait) = oneshot::channel();
            self.held
                .send(release)
                .expect("the test holds the receiver");
            Box::pin(async move {
                // Err: the test ended with this step still held; nothing waits for it.
                wait.await.ok();
                res
            })
        }
    }

    /// Samples `TOK` for every sequence that samples.
    struct Executor;

    impl Actor for Executor {
        type Context = Context<Self>;
    }

    impl Handler<RunBatch> for Executor {
        type Result = Result<StepOutput, String>;
        fn handle(&mut self, msg: RunBatch, _: &mut Context<Self>) -> Self::Result {
            Ok(StepOutput {
                sampled: msg
                    .batch
                    .seqs
                    .iter()
                    .filter(|s| s.sample)
                    .map(|s| SampledToken::new(s.seq_id, TOK))
                    .collect(),
                failed: Vec::new(),
            })
        }
    }

    /// Passes every step's tokens and stream ends to the test.
    struct Sink(mpsc::UnboundedSender<SeqOutput>);

    impl Actor for Sink {
        type Context = Context<Self>;
    }

    impl Handler<StepTokens> for Sink {
        type Result = ();
        fn handle(&mut self, msg: StepTokens, _: &mut Context<Self>) {
            for o in msg.outputs {
                self.0.send(o).expect("the test holds the receiver");
            }
        }
    }

    impl Handler<StreamEnd> for Sink {
        type Result = ();
        fn handle(&mut self, msg: StreamEnd, _: &mut Context<Self>) {
            panic!("no stream should end without a token here: {msg:?}");
        }
    }

    /// The next item of `rx`, which must come within 5 s.
    async fn within<T>(what: &str, rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 5 s"))
            .unwrap_or_else(|| panic!("the channel of {what} closed"))
    }

    fn add(seq_id: SeqId, max_tokens: u32) -> AddSequence {
        AddSequence {
            seq_id,
            prompt: vec![TOK; 4],
            params: SamplingParams {
                max_tokens,
                ..SamplingParams::default()
            },
            forks: Vec::new(),
        }
    }

    /// A sequence added while the step that frees the previous one's blocks is at the
    /// block manager is not in that step's plan; the engine must still run it, without
    /// waiting for another message (seen in split placement: a client's next request,
    /// sent the moment its previous one ended, waited until the request after it came).
    #[test]
    fn a_sequence_added_during_a_frees_only_step_is_scheduled() {
        System::new().block_on(async {
            let supervisor = Supervisor::new(None);
            let cache = BlockManagerConfig::new(64, 16, false);
            let limits = SchedulerLimits {
                max_num_seqs: 4,
                max_num_batched_tokens: 256,
                max_model_len: 512,
            };
            let policy = SchedulerPolicy::new(limits, cache.clone(), vec![EOS]).expect("config");
            let (held_tx, mut held) = mpsc::unbounded_channel();
            let blocks = GatedBlocks {
                bm: BlockManager::new(cache).expect("config"),
                held: held_tx,
            }
            .start();
            let (out_tx, mut outputs) = mpsc::unbounded_channel();
            let sink = Sink(out_tx).start();
            let scheduler = SchedulerActor::new(
                policy,
                SchedulerLinks {
                    block_manager: blocks.recipient(),
                    executor: Executor.start().recipient(),
                    tokens: sink.clone().recipient(),
                    ends: sink.recipient(),
                },
                Arc::new(EngineLoad::new(64)),
                supervisor.guard("scheduler"),
            )
            .start();

            // Sequence 1 runs one token and ends; the step that frees its blocks is held.
            scheduler
                .send(add(1, 1))
                .await
                .expect("mailbox")
                .expect("added");
            let out = within("sequence 1's token", &mut outputs).await;
            assert_eq!((out.seq_id, out.finish_reason.is_some()), (1, true));
            let release = within("the frees-only step", &mut held).await;

            // Sequence 2 arrives while that step is in flight; then the step comes back.
            scheduler
                .send(add(2, 2))
                .await
                .expect("mailbox")
                .expect("added");
            release.send(()).expect("the step waits");

            let mut tokens = 0;
            while tokens < 2 {
                let out = within("sequence 2's tokens", &mut outputs).await;
                assert_eq!(out.seq_id, 2);
                tokens += 1;
            }
        });
    }
}
