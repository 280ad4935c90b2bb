//! Temporary home of the tokenizer actor (moves into tokenizer.rs).

// --- actor ---------------------------------------------------------------------------------

mod actor_impl {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use actix::prelude::*;
    use tokio::sync::mpsc::UnboundedSender;

    use crate::tokenizer::{ChatTemplate, TokenizerParts};
    use crate::detokenizer::{DetokenizerActor, RegisterStream, StreamEnd};
    use crate::executor::sampler::validate_params;
    use crate::messages::{now_us, FinishReason, SeqId, TokenId};
    use crate::protocol::{ErrorBody, ErrorCode, GenerateRequest, Prompt, StreamEvent};
    use crate::scheduler::{AddSequence, SchedulerActor, SchedulerError};

    /// Client → tokenizer: a request and where its stream goes.
    #[derive(Message)]
    #[rtype(result = "()")]
    pub struct Submit {
        pub request: GenerateRequest,
        pub sink: UnboundedSender<StreamEvent>,
    }

    /// The tokenizer actor: validates a request, applies the chat template, encodes the
    /// prompt, then hands the sequence to the detokenizer (its stream) and the scheduler.
    pub struct TokenizerActor {
        parts: Arc<TokenizerParts>,
        template: Arc<ChatTemplate>,
        vocab_size: usize,
        max_model_len: usize,
        next_seq_id: Arc<AtomicU64>,
        scheduler: Addr<SchedulerActor>,
        detokenizer: Addr<DetokenizerActor>,
    }

    impl TokenizerActor {
        pub fn new(
            parts: Arc<TokenizerParts>,
            template: Arc<ChatTemplate>,
            vocab_size: usize,
            max_model_len: usize,
            scheduler: Addr<SchedulerActor>,
            detokenizer: Addr<DetokenizerActor>,
        ) -> Self {
            Self {
                parts,
                template,
                vocab_size,
                max_model_len,
                next_seq_id: Arc::new(AtomicU64::new(1)),
                scheduler,
                detokenizer,
            }
        }

        /// Prompt token ids of a request, or the error to answer with.
        fn prompt_ids(&self, req: &GenerateRequest) -> Result<Vec<TokenId>, ErrorBody> {
            let invalid = |m: String| ErrorBody::new(ErrorCode::InvalidRequest, m);
            validate_params(&req.params, self.vocab_size).map_err(|e| invalid(e.to_string()))?;
            let ids = match &req.prompt {
                Prompt::Text(text) => self
                    .parts
                    .encode(text)
                    .map_err(|e| invalid(format!("tokenizing the prompt: {e}")))?,
                Prompt::Messages(messages) => {
                    if messages.is_empty() {
                        return Err(invalid("messages is empty".into()));
                    }
                    let text = self
                        .template
                        .render(messages, true)
                        .map_err(|e| invalid(format!("chat template: {e}")))?;
                    self.parts
                        .encode(&text)
                        .map_err(|e| invalid(format!("tokenizing the prompt: {e}")))?
                }
                Prompt::TokenIds(ids) => {
                    if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
                        return Err(invalid(format!(
                            "prompt token id {bad} is outside the vocabulary (size {})",
                            self.vocab_size
                        )));
                    }
                    ids.clone()
                }
            };
            if ids.is_empty() {
                return Err(invalid("the prompt is empty".into()));
            }
            if ids.len() >= self.max_model_len {
                return Err(ErrorBody::new(
                    ErrorCode::PromptTooLong,
                    format!(
                        "the prompt has {} tokens; this engine serves at most {} tokens per sequence (prompt + output)",
                        ids.len(),
                        self.max_model_len
                    ),
                ));
            }
            let total = ids.len() as u64 + u64::from(req.params.max_tokens);
            if total > self.max_model_len as u64 {
                return Err(invalid(format!(
                    "prompt ({} tokens) + max_tokens ({}) exceeds the maximum sequence length {}",
                    ids.len(),
                    req.params.max_tokens,
                    self.max_model_len
                )));
            }
            Ok(ids)
        }
    }

    impl Actor for TokenizerActor {
        type Context = Context<Self>;
    }

    impl Handler<Submit> for TokenizerActor {
        type Result = ();
        fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
            let arrival_us = now_us();
            let Submit { request, sink } = msg;
            let prompt = match self.prompt_ids(&request) {
                Ok(ids) => ids,
                Err(e) => {
                    let _ = sink.send(StreamEvent::Error(e));
                    return;
                }
            };
            let seq_id: SeqId = self.next_seq_id.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(request_id = %request.id, seq_id, prompt_tokens = prompt.len(), "request accepted");
            // Register the stream first: the detokenizer must know the sequence before the
            // scheduler's first tokens for it arrive.
            self.detokenizer.do_send(RegisterStream {
                seq_id,
                prompt_tokens: prompt.clone(),
                stop: request.params.stop.clone(),
                sink,
                arrival_us,
            });
            let detok = self.detokenizer.clone();
            self.scheduler
                .send(AddSequence {
                    seq_id,
                    prompt,
                    params: request.params,
                })
                .into_actor(self)
                .map(move |res, _, _| {
                    let error = match res {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => scheduler_error(e),
                        Err(e) => ErrorBody::new(ErrorCode::Internal, format!("scheduler unreachable: {e}")),
                    };
                    detok.do_send(StreamEnd {
                        seq_id,
                        reason: FinishReason::Abort,
                        error: Some(error),
                    });
                })
                .spawn(ctx);
        }
    }

    fn scheduler_error(e: SchedulerError) -> ErrorBody {
        let code = match &e {
            SchedulerError::ExceedsModelLen { .. } | SchedulerError::ExceedsKvCapacity { .. } => {
                ErrorCode::PromptTooLong
            }
            SchedulerError::EmptyPrompt(_) | SchedulerError::InvalidParams { .. } => {
                ErrorCode::InvalidRequest
            }
            _ => ErrorCode::Internal,
        };
        ErrorBody::new(code, e.to_string())
    }
}

pub use actor_impl::{Submit, TokenizerActor};
