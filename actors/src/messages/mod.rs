//! The message layer, at the bottom of the house: every value that crosses an actor
//! boundary, and nothing else. Actors depend on this module and never on each other; each
//! one holds [`actix::Recipient`]s for the messages it sends, so whether the other side is
//! an actor in this process or a bridge to another process over NATS is the wiring's
//! choice, not the actor's.
//!
//! Every message (and every answer) derives `Serialize`/`Deserialize` and round-trips
//! through MessagePack (`rmp-serde`, named fields; tested below). In one process they travel
//! as Rust values through actix mailboxes, with no serialization.
//!
//! - [`request`]: what a client hands the engine and the events of its stream.
//! - [`sequence`]: a sequence's life across tokenizer, scheduler and detokenizer.
//! - [`blocks`]: scheduler ↔ block manager, one round trip per step.
//! - [`batch`]: scheduler ↔ executor, one round trip per step.
//!
//! # Delivery
//!
//! Mailboxes are unbounded for the messages an actor posts ([`post`]): the bound is at
//! intake (`nats.max_in_flight`, `scheduler.max_waiting`), and each live sequence causes at
//! most a fixed number of control messages (one registration, one admission, one finish,
//! one end), so no mailbox can grow without bound. A post to an actor that has stopped
//! fails instead of vanishing: the sender ends the affected streams with a typed error,
//! and the [`crate::supervisor`] notices the dead actor itself. The token path has
//! backpressure of its own: the scheduler keeps at most a few steps of tokens in flight to
//! the detokenizer.

pub mod batch;
pub mod blocks;
pub mod request;
pub mod sequence;

pub use batch::{
    NewSeqData, RunBatch, SampledToken, ScheduledBatch, ScheduledSeq, SeqFailure, StepOutput,
};
pub use blocks::{
    AdmitRequest, Admitted, BlockCopy, BlockError, BlockHash, BlockId, BlockManagerConfig,
    BlockStats, ForkRequest, FreeRequest, GrowRequest, Grown, InspectPool, StepRequest,
    StepResponse,
};
pub use request::{
    now_us, overloaded, validate_params, ChatMessage, ErrorBody, ErrorCode, EventLogprobs,
    FinishReason, GenerateRequest, JsonSchemaFormat, Prompt, ResponseFormat, SamplingError,
    SamplingParams, SeqId, StreamEvent, Timings, TokenId, TokenLogprobs, Usage, MAX_LOGPROBS,
    MAX_N,
};
pub use sequence::{
    AddSequence, Cancel, CancelStreams, FinishSequence, FirstScheduled, GetSchedulerStats,
    RegisterStream, SchedulerStats, SeqOutput, SpecCounts, StepTokens, StreamEnd, Submit,
};

use actix::{Message, Recipient};

/// A message that could not be handed to its actor: the actor has stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} could not be delivered: the receiving actor has stopped")]
pub struct Undelivered {
    /// The message's type.
    pub message: &'static str,
}

/// Posts `msg` to `to` without waiting for an answer. The message is queued whatever the
/// mailbox holds (see the module docs for why that is bounded); it fails only when the
/// receiving actor has stopped, and then the caller must end the affected streams.
pub fn post<M>(to: &Recipient<M>, msg: M) -> Result<(), Undelivered>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    if to.connected() {
        to.do_send(msg);
        Ok(())
    } else {
        Err(Undelivered {
            message: short_type_name::<M>(),
        })
    }
}

fn short_type_name<M>() -> &'static str {
    let full = std::any::type_name::<M>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use std::fmt::Debug;

    /// MessagePack with named fields (what crosses a process) and back again.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
        let bytes = rmp_serde::to_vec_named(value).expect("encode");
        let back: T = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(&back, value, "MessagePack round trip changed the value");
    }

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            min_p: 0.05,
            seed: Some(7),
            repetition_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: -0.25,
            max_tokens: 64,
            min_tokens: 2,
            stop: vec!["\n\n".into(), "END".into()],
            stop_token_ids: vec![2, 3],
            ignore_eos: true,
            logprobs: Some(5),
            prompt_logprobs: Some(0),
            guided_choice: Some(vec!["yes".into(), "no".into()]),
            guided_regex: Some("[0-9]+".into()),
            guided_json: Some(serde_json::json!({"type": "object", "required": ["a"]})),
            guided_grammar: Some("start: \"x\"".into()),
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: JsonSchemaFormat {
                    name: Some("s".into()),
                    schema: serde_json::json!({"type": "array"}),
                    strict: None,
                },
            }),
            n: 3,
            speculate: false,
        }
    }

    fn hashes() -> Vec<BlockHash> {
        blocks::block_hashes(&(0..40).collect::<Vec<TokenId>>(), 16)
    }

    fn batch() -> ScheduledBatch {
        ScheduledBatch {
            step: 9,
            seqs: vec![
                ScheduledSeq {
                    seq_id: 1,
                    token_ids: vec![5],
                    start_pos: 17,
                    block_table: vec![3, 4],
                    context_len: 18,
                    sample: true,
                    new_seq: None,
                    num_draft: 0,
                },
                ScheduledSeq {
                    seq_id: 2,
                    token_ids: vec![1, 2, 3],
                    start_pos: 16,
                    block_table: vec![0, 7],
                    context_len: 19,
                    sample: false,
                    new_seq: Some(NewSeqData {
                        prompt_token_ids: vec![1, 2, 3],
                        output_token_ids: vec![9],
                        params: params(),
                    }),
                    num_draft: 2,
                },
            ],
            num_batched_tokens: 4,
            finished_seq_ids: vec![11],
            preempted_seq_ids: vec![12, 13],
            block_copies: vec![(4, 9)],
        }
    }

    #[test]
    fn request_types_round_trip() {
        round_trip(&params());
        round_trip(&SamplingParams::default());
        for prompt in [
            Prompt::Text("hello".into()),
            Prompt::Messages(vec![ChatMessage::new("user", "hi")]),
            Prompt::TokenIds(vec![1, 2, 3]),
        ] {
            round_trip(&GenerateRequest {
                id: "r1".into(),
                prompt,
                params: params(),
            });
        }
        round_trip(&StreamEvent::Delta {
            text: "é".into(),
            token_ids: vec![1, 2],
            logprobs: EventLogprobs::default(),
        });
        let lp = TokenLogprobs {
            logprob: -0.125,
            top_logprobs: vec![(1, -0.125), (7, -3.5)],
        };
        round_trip(&StreamEvent::Delta {
            text: "é".into(),
            token_ids: vec![1],
            logprobs: EventLogprobs {
                tokens: Some(vec![lp.clone()]),
                prompt: Some(vec![None, Some(lp.clone())]),
                cumulative: None,
            },
        });
        round_trip(&StreamEvent::Finished {
            text: String::new(),
            token_ids: vec![],
            finish_reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_tokens: 0,
            },
            timings: Timings {
                queue_ms: 0.5,
                ttft_ms: 12.25,
                total_ms: 40.0,
            },
            logprobs: EventLogprobs {
                tokens: Some(vec![]),
                prompt: None,
                cumulative: Some(-7.75),
            },
        });
        round_trip(&StreamEvent::Error(ErrorBody::new(
            ErrorCode::Overloaded,
            "full",
        )));
    }

    #[test]
    fn sequence_messages_round_trip() {
        round_trip(&Submit {
            seq_id: 4,
            forks: vec![5, 6],
            request: GenerateRequest {
                id: "x".into(),
                prompt: Prompt::Text("t".into()),
                params: params(),
            },
            arrival_us: 1_700_000_000_000_000,
        });
        round_trip(&Cancel {
            request_id: "x".into(),
        });
        round_trip(&RegisterStream {
            seq_id: 4,
            request_id: "x".into(),
            prompt_tokens: vec![1, 2],
            stop: vec!["a".into()],
            arrival_us: 5,
        });
        round_trip(&AddSequence {
            seq_id: 4,
            prompt: vec![1, 2],
            params: params(),
            forks: vec![5, 6],
        });
        round_trip(&FinishSequence {
            seq_id: 4,
            reason: FinishReason::Stop,
        });
        round_trip(&StepTokens {
            outputs: vec![
                SeqOutput {
                    seq_id: 4,
                    token_id: 9,
                    num_output_tokens: 1,
                    finish_reason: None,
                    logprobs: Some(TokenLogprobs {
                        logprob: -0.5,
                        top_logprobs: vec![(9, -0.5), (3, -1.25)],
                    }),
                    prompt_logprobs: Some(vec![
                        None,
                        Some(TokenLogprobs {
                            logprob: -2.0,
                            top_logprobs: vec![],
                        }),
                    ]),
                },
                SeqOutput {
                    seq_id: 5,
                    token_id: 2,
                    num_output_tokens: 7,
                    finish_reason: Some(FinishReason::Stop),
                    logprobs: None,
                    prompt_logprobs: None,
                },
            ],
            first_scheduled: vec![FirstScheduled {
                seq_id: 4,
                scheduled_us: 10,
                queue_us: 3,
                cached_tokens: 16,
            }],
        });
        round_trip(&StreamEnd {
            seq_id: 4,
            reason: FinishReason::Abort,
            error: Some(ErrorBody::internal("boom")),
        });
        round_trip(&StreamEnd {
            seq_id: 4,
            reason: FinishReason::Abort,
            error: None,
        });
        round_trip(&CancelStreams {
            request_id: "x".into(),
        });
        round_trip(&GetSchedulerStats);
        round_trip(&SchedulerStats {
            num_running: 1,
            num_waiting: 2,
            num_preemptions: 3,
            kv_cache_usage: 0.25,
            num_free_blocks: 5,
            prefix_cache_queries: 6,
            prefix_cache_hits: 7,
            spec: SpecCounts {
                drafts: 8,
                draft_tokens: 9,
                accepted_tokens: 10,
            },
        });
        // Answers.
        round_trip(&Ok::<(), ErrorBody>(()));
        round_trip(&Err::<(), ErrorBody>(ErrorBody::new(
            ErrorCode::PromptTooLong,
            "too long",
        )));
    }

    #[test]
    fn block_messages_round_trip() {
        round_trip(&StepRequest {
            fork: vec![ForkRequest {
                parent: 2,
                child: 5,
                num_tokens: 33,
            }],
            free: vec![FreeRequest {
                seq_id: 1,
                computed_hashes: hashes(),
            }],
            grow: vec![GrowRequest {
                seq_id: 2,
                num_tokens: 33,
                computed_hashes: vec![],
                keep_from: 0,
                write_from: 32,
            }],
            admit: vec![AdmitRequest {
                seq_id: 3,
                num_tokens: 40,
                num_new_tokens: 40,
                block_hashes: hashes(),
            }],
        });
        let resp = StepResponse {
            grown: vec![Grown {
                seq_id: 2,
                new_blocks: vec![8],
                released: 0,
                copied: vec![BlockCopy {
                    index: 1,
                    src: 4,
                    dst: 9,
                }],
                trimmed: 1,
            }],
            preempted: vec![4],
            admitted: vec![Admitted {
                seq_id: 3,
                num_cached_tokens: 32,
                num_new_tokens: 8,
                block_table: vec![1, 2, 9],
            }],
            stats: BlockStats::empty(64),
        };
        round_trip(&resp);
        round_trip(&Ok::<_, BlockError>(resp));
        round_trip(&Err::<StepResponse, _>(BlockError::OutOfBlocks {
            needed: 3,
            free: 1,
        }));
        round_trip(&InspectPool);
        round_trip(&BlockManagerConfig::new(128, 16, true));
    }

    #[test]
    fn batch_messages_round_trip() {
        let run = RunBatch {
            batch: batch(),
            released: vec![11, 12],
        };
        round_trip(&run);
        let out = StepOutput {
            sampled: vec![SampledToken::new(1, 42)],
            failed: vec![SeqFailure {
                seq_id: 2,
                error: ErrorBody::new(ErrorCode::InvalidRequest, "no token"),
            }],
        };
        round_trip(&out);
        round_trip(&Ok::<_, String>(out));
        round_trip(&Err::<StepOutput, _>("forward failed".to_string()));
    }

    #[test]
    fn post_fails_when_the_actor_has_stopped() {
        use actix::prelude::*;
        struct Sink;
        impl Actor for Sink {
            type Context = Context<Self>;
        }
        impl Handler<FinishSequence> for Sink {
            type Result = bool;
            fn handle(&mut self, _: FinishSequence, ctx: &mut Context<Self>) -> bool {
                ctx.stop();
                true
            }
        }
        let sys = System::new();
        sys.block_on(async {
            let addr = Sink.start();
            let r = addr.clone().recipient::<FinishSequence>();
            let msg = FinishSequence {
                seq_id: 1,
                reason: FinishReason::Abort,
            };
            assert_eq!(post(&r, msg), Ok(()));
            // The handler stops the actor; wait until its mailbox is gone.
            for _ in 0..100 {
                if !r.connected() {
                    break;
                }
                actix::clock::sleep(std::time::Duration::from_millis(5)).await;
            }
            let err = post(&r, msg).expect_err("the actor has stopped");
            assert_eq!(err.message, "FinishSequence");
        });
    }
}
