//! Split placement: frontends and engines as separate processes on one NATS bus
//! (`pagoda serve --role frontend|engine`; `--role all` runs everything in one process and
//! never comes here).
//!
//! A **frontend** runs the NATS edge, the tokenizer and the detokenizer; an **engine** runs
//! the scheduler, the block manager and the executor. They exchange the actors' own
//! messages (`pagoda_actors::messages`) as MessagePack, wrapped in the envelopes below:
//!
//! | subject | from → to | what |
//! |---|---|---|
//! | `<prefix>.internal.engine.<engine id>` | frontend → engine, request/reply | [`EngineCall`]: `AddSequence`, `FinishSequence`; answered with [`EngineAnswer`] |
//! | `<prefix>.internal.frontend.<frontend id>` | engine → frontend | [`FrontendEvent`]: a step's `StepTokens`, a `StreamEnd`, numbered per link |
//! | `<prefix>.internal.beat.engine` | engines → all | [`EngineBeat`]: load, state, last event number per frontend |
//! | `<prefix>.internal.beat.frontend` | frontends → all | [`FrontendBeat`] |
//!
//! Engines are also the micro service `pagoda-engine` (`nats micro stats pagoda-engine`
//! shows each engine's load). A frontend sends each new sequence to the least-loaded live
//! engine serving its model. Failures end streams, never silence them:
//!
//! - an engine not heard from for `placement.peer_timeout_ms` (or announcing that it
//!   failed) is gone: the frontend ends every stream that ran there with `internal`;
//! - a gap in a link's event numbers (core NATS dropped a message) ends every stream of
//!   that engine on that frontend with `internal`, and they are aborted on the engine;
//! - a call that gets no answer ends its stream (`AddSequence`) or aborts it locally
//!   (`FinishSequence` of a cancel);
//! - an engine aborts the sequences of a frontend it no longer hears from, so its blocks
//!   are freed.
//!
//! The pure bookkeeping of both sides is in [`table`]; [`frontend`] and [`engine`] are the
//! actors and tasks around it.

pub mod engine;
pub mod frontend;
pub mod table;

use std::collections::HashMap;

use pagoda_actors::load::LoadSnapshot;
use pagoda_actors::messages::{AddSequence, ErrorBody, FinishSequence, StepTokens, StreamEnd};
use serde::{Deserialize, Serialize};

/// Name of the micro service the engine processes register.
pub const ENGINE_SERVICE: &str = "pagoda-engine";

/// The subjects of one service prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Where an engine takes calls.
    pub fn engine(&self, engine_id: &str) -> String {
        format!("{}.internal.engine.{engine_id}", self.prefix)
    }

    /// Where a frontend takes events.
    pub fn frontend(&self, frontend_id: &str) -> String {
        format!("{}.internal.frontend.{frontend_id}", self.prefix)
    }

    pub fn engine_beats(&self) -> String {
        format!("{}.internal.beat.engine", self.prefix)
    }

    pub fn frontend_beats(&self) -> String {
        format!("{}.internal.beat.frontend", self.prefix)
    }
}

/// A fresh process id for the subjects: `<role>-<16 hex digits>`.
pub fn new_id(role: &str) -> String {
    format!("{role}-{:016x}", rand::random::<u64>())
}

/// Frontend → engine (request/reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineCall {
    Add {
        frontend: String,
        /// Boxed: sampling parameters (a JSON schema among them) dwarf the other calls.
        add: Box<AddSequence>,
    },
    Finish {
        frontend: String,
        finish: FinishSequence,
    },
}

/// Engine → frontend: the answer to an [`EngineCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineAnswer {
    /// `AddSequence`: queued, or refused with the client's typed error.
    Added(Result<(), ErrorBody>),
    /// `FinishSequence`: whether the sequence was live.
    Finished(bool),
    /// The call could not be read or served.
    Failed(ErrorBody),
}

/// Engine → frontend, numbered per (engine, frontend) link from 1 without gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontendEvent {
    pub engine: String,
    pub link_seq: u64,
    pub body: FrontendEventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendEventBody {
    Tokens(StepTokens),
    End(StreamEnd),
}

/// What an engine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    Serving,
    /// Shutting down: finishes what it runs, takes nothing new.
    Draining,
    /// An actor died: nothing it runs will finish.
    Failed,
}

/// An engine's announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineBeat {
    pub engine: String,
    /// The served model's name (`model.name` or the file stem); frontends route only to
    /// engines of their own model.
    pub model: String,
    pub max_model_len: usize,
    pub state: EngineState,
    pub load: LoadSnapshot,
    /// The number of the last event sent to each frontend (to see a lost last message).
    pub links: HashMap<String, u64>,
}

/// A frontend's announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendBeat {
    pub frontend: String,
}

/// MessagePack with named fields, as every actor message across processes.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(value).map_err(|e| e.to_string())
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_actors::messages::{
        ErrorCode, FinishReason, FirstScheduled, SamplingParams, SeqOutput,
    };

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let back: T = decode(&encode(v).expect("encode")).expect("decode");
        assert_eq!(&back, v);
    }

    #[test]
    fn envelopes_round_trip_as_messagepack() {
        round_trip(&EngineCall::Add {
            frontend: "frontend-1".into(),
            add: Box::new(AddSequence {
                seq_id: 3,
                prompt: vec![1, 2, 3],
                params: SamplingParams::default(),
                forks: vec![4, 5],
            }),
        });
        round_trip(&EngineCall::Finish {
            frontend: "frontend-1".into(),
            finish: FinishSequence {
                seq_id: 3,
                reason: FinishReason::Abort,
            },
        });
        round_trip(&EngineAnswer::Added(Ok(())));
        round_trip(&EngineAnswer::Added(Err(ErrorBody::new(
            ErrorCode::Overloaded,
            "full",
        ))));
        round_trip(&EngineAnswer::Finished(true));
        round_trip(&EngineAnswer::Failed(ErrorBody::internal("bad call")));
        round_trip(&FrontendEvent {
            engine: "engine-1".into(),
            link_seq: 7,
            body: FrontendEventBody::Tokens(StepTokens {
                outputs: vec![SeqOutput {
                    seq_id: 3,
                    token_id: 9,
                    num_output_tokens: 1,
                    finish_reason: None,
                    logprobs: Some(pagoda_actors::messages::TokenLogprobs {
                        logprob: -0.25,
                        top_logprobs: vec![(9, -0.25)],
                    }),
                    prompt_logprobs: None,
                }],
                first_scheduled: vec![FirstScheduled {
                    seq_id: 3,
                    scheduled_us: 1,
                    queue_us: 2,
                    cached_tokens: 0,
                }],
            }),
        });
        round_trip(&FrontendEvent {
            engine: "engine-1".into(),
            link_seq: 8,
            body: FrontendEventBody::End(StreamEnd {
                seq_id: 3,
                reason: FinishReason::Abort,
                error: None,
            }),
        });
        round_trip(&EngineBeat {
            engine: "engine-1".into(),
            model: "m".into(),
            max_model_len: 2048,
            state: EngineState::Draining,
            load: LoadSnapshot {
                num_running: 1,
                num_waiting: 2,
                num_free_blocks: 3,
                num_blocks: 4,
                num_engines: 1,
            },
            links: HashMap::from([("frontend-1".to_owned(), 8)]),
        });
        round_trip(&FrontendBeat {
            frontend: "frontend-1".into(),
        });
    }

    #[test]
    fn subjects_live_under_the_prefix() {
        let s = Subjects::new("pagoda.v1");
        assert_eq!(s.engine("engine-a"), "pagoda.v1.internal.engine.engine-a");
        assert_eq!(s.frontend("f"), "pagoda.v1.internal.frontend.f");
        assert_eq!(s.engine_beats(), "pagoda.v1.internal.beat.engine");
        assert_eq!(s.frontend_beats(), "pagoda.v1.internal.beat.frontend");
        let id = new_id("engine");
        assert!(id.starts_with("engine-") && id.len() == "engine-".len() + 16);
    }
}
