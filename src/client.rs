//! A Rust client for pagoda engines on NATS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pagoda::client::ClientError> {
//! use futures_util::StreamExt;
//! use pagoda::client::Client;
//! use pagoda_actors::protocol::WireRequest;
//!
//! let client = Client::connect("nats://127.0.0.1:4222").await?;
//! let mut req = WireRequest::text("The capital of France is");
//! req.params.max_tokens = 16;
//! let mut answer = client.generate(req).await?;
//! while let Some(chunk) = answer.next().await {
//!     print!("{}", chunk?.text);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [`Client::generate_durable`] publishes the request as a durable JetStream job instead
//! (engines serving with `--intake jetstream`): it survives an engine's death, and when a
//! job is redelivered the answer restarts from `seq` 0 with a higher `attempt` — the
//! stream then drops whatever the earlier attempt sent, so a chunk with a higher `attempt`
//! than the previous one means "start over" (as [`Generation::collect_text`] does).
//!
//! Each [`Client::generate`] subscribes to a fresh inbox, publishes the request with that
//! inbox as its reply subject, and yields the chunks in `seq` order; the stream ends after
//! the final chunk, or with an error (a typed error from the engine, no engine listening,
//! or nothing received for the idle timeout).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::{Stream, StreamExt};
use pagoda_actors::messages::{FinishReason, TokenId, TokenLogprobs};
use pagoda_actors::protocol::{
    decode_reply, new_request_id, CancelRequest, Chunk, ErrorCode, Reply, Timings, Usage,
    WireError, WireFormat, WireRequest,
};

use crate::config::NatsConfig;
use crate::gateway::message_format;
use crate::nats::{connect, ConnectError, InitialConnect};

/// How long a generation waits for its next message by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a missing chunk is awaited once the final one arrived.
const GAP_GRACE: Duration = Duration::from_secs(2);
/// Out-of-order chunks held while waiting for a missing one, at most.
const MAX_PENDING: usize = 4096;
/// JetStream's deduplication header.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// What can go wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The engine answered with a typed error.
    #[error("{code}: {message}")]
    Server { code: ErrorCode, message: String },
    /// With `n` > 1: completion `index` ended with a typed error (the others go on).
    #[error("completion {index}: {code}: {message}")]
    Completion {
        index: u32,
        code: ErrorCode,
        message: String,
    },
    #[error("no engine is serving {0}")]
    NoResponders(String),
    #[error("nothing received for {0:?}")]
    Timeout(Duration),
    #[error("the reply subscription closed before the final chunk")]
    Closed,
    /// A chunk was lost (e.g. published while the connection was down).
    #[error("chunk {0} of the answer was lost")]
    Gap(u64),
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// A connection to pagoda engines.
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    prefix: String,
    format: WireFormat,
    idle_timeout: Duration,
}

impl Client {
    /// Connects to `url` (comma-separated server list) with default options and the
    /// default subject prefix `pagoda.v1`.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let cfg = NatsConfig {
            url: url.to_owned(),
            ..NatsConfig::default()
        };
        Self::connect_with(&cfg).await
    }

    /// Connects with every option of a `[nats]` section (auth, TLS, subject prefix). Fails
    /// at once when no server answers.
    pub async fn connect_with(cfg: &NatsConfig) -> Result<Self, ClientError> {
        let nats = connect(cfg, InitialConnect::FailFast).await?;
        Ok(Self::new(nats, &cfg.subject_prefix))
    }

    /// Uses an existing connection; `prefix` is the engines' subject prefix.
    pub fn new(nats: async_nats::Client, prefix: &str) -> Self {
        Self {
            nats,
            prefix: prefix.to_owned(),
            format: WireFormat::MsgPack,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }

    /// Encode requests as JSON instead of MessagePack (the engine answers in kind).
    pub fn with_format(mut self, format: WireFormat) -> Self {
        self.format = format;
        self
    }

    /// How long a generation may go without receiving anything before it fails.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The underlying NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub fn generate_subject(&self) -> String {
        format!("{}.generate", self.prefix)
    }

    /// Where durable jobs go: `<prefix>.jobs.generate`.
    pub fn jobs_subject(&self) -> String {
        crate::config::IntakeConfig::jobs_subject(&self.prefix)
    }

    pub fn cancel_subject(&self) -> String {
        format!("{}.cancel", self.prefix)
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(WireFormat::HEADER, self.format.content_type());
        h
    }

    /// Sends a request and returns its chunks as a stream. The request gets a fresh id
    /// when it has none ([`Generation::id`] tells it, for [`Client::cancel`]).
    pub async fn generate(&self, mut req: WireRequest) -> Result<Generation, ClientError> {
        let id = match req.id.take() {
            Some(id) if !id.is_empty() => id,
            _ => new_request_id(),
        };
        req.id = Some(id.clone());
        let n = req.params.n;
        let body = self.format.encode(&req)?;
        let inbox = self.nats.new_inbox();
        let sub = self
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let subject = self.generate_subject();
        self.nats
            .publish_with_reply_and_headers(subject.clone(), inbox, self.headers(), body.into())
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        Ok(Generation::new(id, sub, self.idle_timeout, subject, n))
    }

    /// Publishes a request as a durable JetStream job on `<prefix>.jobs.generate` (for
    /// engines serving with `intake.mode = "jetstream"`) and returns its chunks. The job
    /// carries `reply_to` = a fresh inbox and the header `Nats-Msg-Id` = the request id,
    /// so a retried publish of the same id is deduplicated by the stream. Returns once the
    /// stream stored the job. When an engine dies mid-answer the job is redelivered; the
    /// returned stream then restarts with the new attempt's chunks (see the module docs).
    pub async fn generate_durable(&self, mut req: WireRequest) -> Result<Generation, ClientError> {
        let id = match req.id.take() {
            Some(id) if !id.is_empty() => id,
            _ => new_request_id(),
        };
        req.id = Some(id.clone());
        let n = req.params.n;
        let inbox = self.nats.new_inbox();
        req.reply_to = Some(inbox.clone());
        let body = self.format.encode(&req)?;
        let sub = self
            .nats
            .subscribe(inbox)
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let subject = self.jobs_subject();
        let mut headers = self.headers();
        headers.insert(MSG_ID_HEADER, id.as_str());
        let js = async_nats::jetstream::new(self.nats.clone());
        let ack = js
            .publish_with_headers(subject.clone(), headers, body.into())
            .await
            .map_err(|e| ClientError::Nats(format!("publishing the job: {e}")))?;
        ack.await
            .map_err(|e| ClientError::Nats(format!("the stream did not store the job: {e}")))?;
        Ok(Generation::new(id, sub, self.idle_timeout, subject, n))
    }

    /// Asks every engine to cancel request `id`; the one running it ends the request's
    /// stream with a final chunk whose `finish_reason` is `abort`.
    pub async fn cancel(&self, id: &str) -> Result<(), ClientError> {
        let body = self.format.encode(&CancelRequest { id: id.to_owned() })?;
        self.nats
            .publish_with_headers(self.cancel_subject(), self.headers(), body.into())
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        self.nats
            .flush()
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))
    }
}

/// A whole answer, gathered from a generation's chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub id: String,
    pub text: String,
    pub token_ids: Vec<TokenId>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// How many chunks carried it (of the attempt that finished).
    pub num_chunks: u64,
    /// The delivery attempt that produced it (1 unless a durable job was redelivered).
    pub attempt: u32,
    /// One entry per id in `token_ids` (the request set `logprobs`).
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// One entry per prompt token, the first `None` (the request set `prompt_logprobs`).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// Sum of the generated tokens' log-probabilities (the request set `logprobs`).
    pub cumulative_logprob: Option<f64>,
    /// Which completion this is (0 unless the request set `n` > 1).
    pub index: u32,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, ClientError>> + Send>>;

/// The chunks of one request, in `seq` order; ends after the final chunk or an error —
/// with `n` > 1, once every completion ended (an error that names its completion,
/// [`ClientError::Completion`], ends that completion only).
pub struct Generation {
    id: String,
    inner: ChunkStream,
}

struct State {
    sub: async_nats::Subscriber,
    pending: BTreeMap<u64, Reply>,
    next_seq: u64,
    /// The delivery attempt being read; replies of earlier attempts are dropped.
    attempt: u32,
    done: bool,
    idle: Duration,
    subject: String,
    /// Completions asked for, and those that ended (`n` > 1).
    n: u32,
    ended: std::collections::HashSet<u32>,
}

impl State {
    /// The next reply in order, or the error that ends the stream.
    async fn next_reply(&mut self) -> Result<Reply, ClientError> {
        loop {
            if let Some(r) = self.pending.remove(&self.next_seq) {
                self.next_seq += 1;
                return Ok(r);
            }
            if self.pending.len() > MAX_PENDING {
                return Err(ClientError::Gap(self.next_seq));
            }
            // Once the final reply is here, a missing earlier one is lost, not late (NATS
            // keeps order): give it a moment, then say so.
            let final_seen = self.ends_request_in(self.pending.values());
            let wait = if final_seen {
                self.idle.min(GAP_GRACE)
            } else {
                self.idle
            };
            let msg = match tokio::time::timeout(wait, self.sub.next()).await {
                Err(_) if final_seen => return Err(ClientError::Gap(self.next_seq)),
                Err(_) => return Err(ClientError::Timeout(self.idle)),
                Ok(None) => return Err(ClientError::Closed),
                Ok(Some(m)) => m,
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(ClientError::NoResponders(self.subject.clone()));
            }
            let format = message_format(msg.headers.as_ref(), &msg.payload);
            let reply = decode_reply(&msg.payload, format)?;
            // An error about an unreadable request may not know its place: it ends the
            // stream whatever its seq.
            if let Reply::Error(e) = &reply {
                if e.id.is_none() {
                    return Ok(reply);
                }
            }
            let attempt = reply_attempt(&reply);
            if attempt < self.attempt {
                continue;
            }
            if attempt > self.attempt {
                // A redelivery: the answer starts over from seq 0 of the new attempt.
                self.attempt = attempt;
                self.pending.clear();
                self.next_seq = 0;
                self.ended.clear();
            }
            if reply.seq() >= self.next_seq {
                self.pending.insert(reply.seq(), reply);
            }
        }
    }
}

impl State {
    /// Whether these replies (with the completions already ended) end the request.
    fn ends_request_in<'a>(&self, replies: impl Iterator<Item = &'a Reply>) -> bool {
        let mut ended = self.ended.clone();
        for r in replies {
            match r {
                Reply::Chunk(c) if c.is_final() => match c.index {
                    Some(i) if self.n > 1 => {
                        ended.insert(i);
                    }
                    _ => return true,
                },
                Reply::Error(e) => match e.index {
                    Some(i) if self.n > 1 => {
                        ended.insert(i);
                    }
                    _ => return true,
                },
                Reply::Chunk(_) => {}
            }
        }
        ended.len() >= self.n.max(1) as usize
    }
}

impl Generation {
    fn new(
        id: String,
        sub: async_nats::Subscriber,
        idle: Duration,
        subject: String,
        n: u32,
    ) -> Self {
        let state = State {
            sub,
            pending: BTreeMap::new(),
            next_seq: 0,
            attempt: 0,
            done: false,
            idle,
            subject,
            n,
            ended: Default::default(),
        };
        let inner = futures_util::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let item = match st.next_reply().await {
                Ok(reply) => {
                    st.done = st.ends_request_in(std::iter::once(&reply));
                    match reply {
                        Reply::Chunk(c) => {
                            if let (true, Some(i)) = (c.is_final(), c.index) {
                                st.ended.insert(i);
                            }
                            Ok(c)
                        }
                        Reply::Error(e) => match e.index {
                            Some(index) if !st.done => {
                                st.ended.insert(index);
                                Err(ClientError::Completion {
                                    index,
                                    code: e.error.code,
                                    message: e.error.message,
                                })
                            }
                            _ => Err(ClientError::Server {
                                code: e.error.code,
                                message: e.error.message,
                            }),
                        },
                    }
                }
                Err(e) => {
                    st.done = true;
                    Err(e)
                }
            };
            if st.done {
                let _ = st.sub.unsubscribe().await;
            }
            Some((item, st))
        });
        Self {
            id,
            inner: Box::pin(inner),
        }
    }

    /// The request id (to cancel it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads the stream to its end and joins the chunks (of a request with `n` = 1; see
    /// [`Self::collect_all`]).
    pub async fn collect_text(mut self) -> Result<Completion, ClientError> {
        let mut answer: Option<Completion> = None;
        while let Some(chunk) = self.next().await {
            let chunk = chunk?;
            let c = match &mut answer {
                Some(c) if c.attempt == chunk.attempt => c,
                // The first chunk, or a redelivered job starting over.
                _ => answer.insert(Completion::empty(&chunk)),
            };
            if c.absorb(chunk) {
                return answer.ok_or(ClientError::Closed);
            }
        }
        Err(ClientError::Closed)
    }

    /// Reads the stream to its end and joins each completion's chunks: one entry per
    /// completion, in index order (with `n` = 1, one entry). An error that ends the whole
    /// request is returned as the `Err`.
    pub async fn collect_all(
        mut self,
    ) -> Result<Vec<Result<Completion, ClientError>>, ClientError> {
        let mut parts: BTreeMap<u32, Completion> = BTreeMap::new();
        let mut out: BTreeMap<u32, Result<Completion, ClientError>> = BTreeMap::new();
        let mut attempt = 0;
        while let Some(item) = self.next().await {
            let chunk = match item {
                Ok(c) => c,
                Err(ClientError::Completion {
                    index,
                    code,
                    message,
                }) => {
                    parts.remove(&index);
                    out.insert(index, Err(ClientError::Server { code, message }));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if chunk.attempt != attempt {
                // A redelivered job starts over.
                attempt = chunk.attempt;
                parts.clear();
                out.clear();
            }
            let index = chunk.index.unwrap_or(0);
            let c = parts
                .entry(index)
                .or_insert_with(|| Completion::empty(&chunk));
            if c.absorb(chunk) {
                if let Some(done) = parts.remove(&index) {
                    out.insert(index, Ok(done));
                }
            }
        }
        if !parts.is_empty() || out.is_empty() {
            return Err(ClientError::Closed);
        }
        Ok(out.into_values().collect())
    }
}

impl Completion {
    /// Nothing gathered yet, for the completion and attempt of `chunk`.
    fn empty(chunk: &Chunk) -> Self {
        Completion {
            id: chunk.id.clone(),
            text: String::new(),
            token_ids: Vec::new(),
            finish_reason: FinishReason::Abort,
            usage: Usage::default(),
            timings: Timings::default(),
            num_chunks: 0,
            attempt: chunk.attempt,
            logprobs: None,
            prompt_logprobs: None,
            cumulative_logprob: None,
            index: chunk.index.unwrap_or(0),
        }
    }

    /// Adds one of its chunks; true when it was the final one.
    fn absorb(&mut self, chunk: Chunk) -> bool {
        self.num_chunks += 1;
        self.text.push_str(&chunk.text);
        self.token_ids.extend_from_slice(&chunk.token_ids);
        if let Some(lps) = chunk.logprobs {
            self.logprobs.get_or_insert_with(Vec::new).extend(lps);
        }
        if chunk.prompt_logprobs.is_some() {
            self.prompt_logprobs = chunk.prompt_logprobs;
        }
        let Some(finish_reason) = chunk.finish_reason else {
            return false;
        };
        self.id = chunk.id;
        self.finish_reason = finish_reason;
        self.usage = chunk.usage.unwrap_or_default();
        self.timings = chunk.timings.unwrap_or_default();
        self.cumulative_logprob = chunk.cumulative_logprob;
        true
    }
}

fn reply_attempt(reply: &Reply) -> u32 {
    match reply {
        Reply::Chunk(c) => c.attempt,
        Reply::Error(e) => e.attempt,
    }
}

impl Stream for Generation {
    type Item = Result<Chunk, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
