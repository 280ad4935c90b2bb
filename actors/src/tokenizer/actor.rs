//! The tokenizer actor: validates a request, applies the chat template, encodes the prompt,
//! then registers the sequence's stream with the detokenizer and hands the sequence to the
//! scheduler. It runs on a thread of its own, so encoding a long prompt never holds up the
//! scheduler or the detokenizer.

use std::sync::Arc;

use actix::prelude::*;

use super::chat::ChatEncoder;
use super::{limits, ChatTemplate, TokenizerParts};
use crate::config::LimitsConfig;
use crate::fault;
use crate::guide::Guides;
use crate::load::EngineLoad;
use crate::messages::{
    overloaded, post, validate_params, AddSequence, Cancel, CancelStreams, ErrorBody, ErrorCode,
    FinishReason, GenerateRequest, Prompt, RegisterStream, SeqId, StreamEnd, StreamEvent, Submit,
    TokenId,
};
use crate::streams::Streams;
use crate::supervisor::LifeGuard;

/// What the tokenizer checks a request against.
pub struct TokenizerBounds {
    pub vocab_size: usize,
    /// Longest sequence (prompt + output) served.
    pub max_model_len: usize,
    pub limits: LimitsConfig,
}

/// Where the tokenizer's messages go.
pub struct TokenizerLinks {
    pub register: Recipient<RegisterStream>,
    /// Ends a registered stream when the scheduler refuses its sequence.
    pub ends: Recipient<StreamEnd>,
    pub cancel: Recipient<CancelStreams>,
    /// The scheduler, or in a frontend process the router to the engines.
    pub add: Recipient<AddSequence>,
}

pub struct TokenizerActor {
    parts: Arc<TokenizerParts>,
    template: Arc<ChatTemplate>,
    vocab_size: usize,
    max_model_len: usize,
    /// Prompts longer than this many bytes cannot fit in `max_model_len` tokens: they
    /// are refused before encoding (which would cost seconds for megabytes of text).
    max_prompt_bytes: usize,
    links: TokenizerLinks,
    streams: Streams,
    limits: LimitsConfig,
    chat: ChatEncoder,
    /// The scheduler's load and `scheduler.max_waiting` (0 = no bound): a full waiting
    /// queue refuses new requests here, before they cost an encoding.
    overload_gate: Option<(Arc<EngineLoad>, usize)>,
    /// Compiles guided requests' grammars to refuse bad ones before they are queued (or
    /// why this model cannot have structured output).
    guides: Guides,
    guard: LifeGuard,
}

impl TokenizerActor {
    pub fn new(
        parts: Arc<TokenizerParts>,
        template: Arc<ChatTemplate>,
        bounds: TokenizerBounds,
        links: TokenizerLinks,
        streams: Streams,
        guard: LifeGuard,
    ) -> Self {
        let TokenizerBounds {
            vocab_size,
            max_model_len,
            limits,
        } = bounds;
        let max_prompt_bytes = max_prompt_bytes(&parts.tokenizer, max_model_len);
        let chat = ChatEncoder::new(&parts, limits.chat_content);
        Self {
            limits,
            chat,
            parts,
            template,
            vocab_size,
            max_model_len,
            max_prompt_bytes,
            links,
            streams,
            overload_gate: None,
            guides: Guides::unavailable("structured output was not set up"),
            guard,
        }
    }

    /// Validates guided requests with `guides` (see [`crate::guide`]).
    pub fn with_guides(mut self, guides: Guides) -> Self {
        self.guides = guides;
        self
    }

    /// Refuse requests as `overloaded` before encoding them while the scheduler's waiting
    /// queue holds `max_waiting` or more (0 = no bound). The scheduler still checks on
    /// admission; this only saves the encoding work.
    pub fn with_overload_gate(mut self, load: Arc<EngineLoad>, max_waiting: usize) -> Self {
        self.overload_gate = Some((load, max_waiting));
        self
    }

    /// Prompt token ids of a request, or the error to answer with.
    fn prompt_ids(&self, req: &GenerateRequest) -> Result<Vec<TokenId>, ErrorBody> {
        let invalid = |m: String| ErrorBody::new(ErrorCode::InvalidRequest, m);
        limits::check(req, &self.limits)?;
        validate_params(&req.params, self.vocab_size).map_err(|e| invalid(e.to_string()))?;
        // Compiled here too, so that a bad grammar is refused before it is queued.
        self.guides
            .guide(&req.params)
            .map_err(|e| invalid(e.to_string()))?;
        let text_bytes = match &req.prompt {
            Prompt::Text(text) => text.len(),
            Prompt::Messages(messages) => messages.iter().map(|m| m.content.len()).sum(),
            Prompt::TokenIds(_) => 0,
        };
        if text_bytes > self.max_prompt_bytes {
            return Err(ErrorBody::new(
                ErrorCode::PromptTooLong,
                format!(
                    "the prompt is {text_bytes} bytes long, more than {} tokens can hold; this engine serves at most {} tokens per sequence",
                    self.max_model_len, self.max_model_len
                ),
            ));
        }
        let ids = match &req.prompt {
            Prompt::Text(text) => self
                .parts
                .encode(text)
                .map_err(|e| invalid(format!("tokenizing the prompt: {e}")))?,
            Prompt::Messages(messages) => {
                if messages.is_empty() {
                    return Err(invalid("messages is empty".into()));
                }
                self.chat
                    .encode(&self.parts, &self.template, messages)
                    .map_err(|e| match e {
                        super::TokenizerError::Encode(e) => {
                            invalid(format!("tokenizing the prompt: {e}"))
                        }
                        e => invalid(format!("chat template: {e}")),
                    })?
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

    /// Ends streams the detokenizer does not know yet.
    fn refuse(&self, seq_ids: &[SeqId], error: ErrorBody) {
        for &seq_id in seq_ids {
            self.streams.end(seq_id, StreamEvent::Error(error.clone()));
        }
    }
}

impl Actor for TokenizerActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.guard.watch_this_thread();
    }
}

impl Handler<Submit> for TokenizerActor {
    type Result = ();
    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        let Submit {
            seq_id,
            forks,
            request,
            arrival_us,
        } = msg;
        // Every completion's stream (index 0 first).
        let seq_ids: Vec<SeqId> = std::iter::once(seq_id)
            .chain(forks.iter().copied())
            .collect();
        fault::arm(&request.id, seq_id);
        fault::panic_if_armed("tokenizer", std::iter::once(seq_id));
        if let Some((load, max_waiting)) = &self.overload_gate {
            let waiting = load.num_waiting();
            if *max_waiting > 0 && waiting >= *max_waiting {
                return self.refuse(&seq_ids, overloaded(waiting, *max_waiting));
            }
        }
        let prompt = match self.prompt_ids(&request) {
            Ok(ids) => ids,
            Err(e) => return self.refuse(&seq_ids, e),
        };
        if seq_ids.len() != request.params.n as usize {
            let error = ErrorBody::internal(format!(
                "n = {} completions were asked for, {} streams opened",
                request.params.n,
                seq_ids.len()
            ));
            return self.refuse(&seq_ids, error);
        }
        tracing::debug!(request_id = %request.id, seq_id, prompt_tokens = prompt.len(), "request accepted");
        // Register the stream first: the detokenizer must know the sequence before the
        // scheduler's first tokens for it arrive.
        for &id in &seq_ids {
            let registered = post(
                &self.links.register,
                RegisterStream {
                    seq_id: id,
                    request_id: request.id.clone(),
                    prompt_tokens: prompt.clone(),
                    stop: request.params.stop.clone(),
                    arrival_us,
                },
            );
            if let Err(e) = registered {
                return self.refuse(&seq_ids, ErrorBody::internal(e.to_string()));
            }
        }
        let ends = self.links.ends.clone();
        let streams = self.streams.clone();
        self.links
            .add
            .send(AddSequence {
                seq_id,
                prompt,
                params: request.params,
                forks,
            })
            .into_actor(self)
            .map(move |res, _, _| {
                let error = match res {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(e) => ErrorBody::internal(format!("scheduler unreachable: {e}")),
                };
                for seq_id in seq_ids {
                    let end = StreamEnd {
                        seq_id,
                        reason: FinishReason::Abort,
                        error: Some(error.clone()),
                    };
                    if post(&ends, end).is_err() {
                        // The detokenizer is gone: end the stream here.
                        streams.end(seq_id, StreamEvent::Error(error.clone()));
                    }
                }
            })
            .spawn(ctx);
    }
}

impl Handler<Cancel> for TokenizerActor {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, msg: Cancel, _: &mut Context<Self>) -> Self::Result {
        let answer = self.links.cancel.send(CancelStreams {
            request_id: msg.request_id,
        });
        Box::pin(async move { answer.await.unwrap_or(false) })
    }
}

/// An upper bound on the bytes of text that `max_model_len` tokens can stand for: twice
/// the longest vocabulary entry (whose spelling is never shorter than the text it decodes
/// to) per token.
fn max_prompt_bytes(tokenizer: &tokenizers::Tokenizer, max_model_len: usize) -> usize {
    let longest = tokenizer
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(16);
    max_model_len.saturating_mul(longest).saturating_mul(2)
}
