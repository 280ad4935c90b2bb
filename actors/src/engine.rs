//! Wiring: loads the model and tokenizer, sizes the KV pool, and starts the actors.
//!
//! An engine is two halves that meet only through the message layer:
//!
//! - the **core** ([`EngineCore`]): scheduler, block manager and executor — the model, the
//!   KV pool and the batching;
//! - the **frontend** ([`Engine`]): tokenizer and detokenizer, the clients' streams, and
//!   the handle front ends (the CLI, the NATS gateway) talk to.
//!
//! [`Engine::start`] runs both in this process, the detokenizer and the scheduler addressing
//! each other directly (no serialization). [`EngineCore::start`] runs a core alone, its
//! tokens going to whatever recipients the caller gives (a bridge to frontends over NATS),
//! and [`Engine::start_frontend`] a frontend alone, its sequences going to a router.

use std::path::Path;
use std::sync::Arc;

use actix::prelude::*;

use crate::block_manager::{BlockManager, BlockManagerActor};
use crate::config::{EngineConfig, SpecMethod};
use crate::detokenizer::DetokenizerActor;
use crate::executor::backend::{Backend as _, Cpu};
use crate::executor::models::{self, CausalLm, ModelSpec};
use crate::executor::weights::LoadError;
use crate::executor::{num_kv_blocks, open_model, Executor, ExecutorActor};
use crate::guide::Guides;
use crate::load::EngineLoad;
use crate::messages::{
    now_us, post, AddSequence, BlockManagerConfig, BlockStats, Cancel, ErrorBody, FinishSequence,
    GenerateRequest, GetSchedulerStats, InspectPool, SchedulerStats, SeqId, StepTokens, StreamEnd,
    StreamEvent, Submit, TokenId, MAX_N,
};
use crate::metrics::{RequestMetrics, SchedulerMetrics, TokenCounters};
use crate::scheduler::speculation::{Drafts, NgramProposer, Speculation};
use crate::scheduler::{SchedulerActor, SchedulerLimits, SchedulerLinks, SchedulerPolicy};
use crate::streams::{Generation, Streams};
use crate::supervisor::Supervisor;
use crate::tokenizer::{
    tokenizer_from_gguf_file, tokenizer_from_hf_dir, TokenizerActor, TokenizerBounds,
    TokenizerLinks, TokenizerParts,
};

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("scheduler: {0}")]
    Scheduler(#[from] crate::scheduler::SchedulerError),
    #[error("block manager: {0}")]
    Blocks(#[from] crate::messages::BlockError),
    #[error("the model's vocabulary ({model}) is smaller than the tokenizer's ({tokenizer})")]
    VocabMismatch { model: usize, tokenizer: usize },
    #[error("compute backend: {0}")]
    Backend(#[from] crate::executor::backend::ForwardError),
    #[error("kernels: {0}")]
    Kernels(String),
    #[error("speculative.draft_model {0}")]
    Draft(String),
    #[error("engine: {0}")]
    Other(String),
}

/// What the engine serves.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model_path: String,
    pub architecture: String,
    pub vocab_size: usize,
    pub max_model_len: usize,
    /// KV blocks of this process's pool (0 for a frontend without a core).
    pub num_blocks: usize,
    pub block_size: usize,
    /// The `model_name` label of the metrics.
    pub model_name: String,
}

/// The model's description and tokenizer, read without loading any weights.
pub struct ModelFiles {
    pub model_cfg: ModelSpec,
    pub tokenizer: TokenizerParts,
    /// Structured output over the vocabulary (built once; the executor and the tokenizer
    /// of one process share it).
    pub guides: Guides,
}

impl ModelFiles {
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let (_, _, spec) = open_model(path)?;
        Self::with_config(path, spec)
    }

    fn with_config(path: &Path, model_cfg: ModelSpec) -> Result<Self, EngineError> {
        let tokenizer = if path.is_dir() {
            tokenizer_from_hf_dir(path)?
        } else {
            tokenizer_from_gguf_file(path)?
        };
        let tok_vocab = tokenizer.tokenizer.get_vocab_size(true);
        if tok_vocab > model_cfg.vocab_size {
            return Err(EngineError::VocabMismatch {
                model: model_cfg.vocab_size,
                tokenizer: tok_vocab,
            });
        }
        let guides = Guides::new(
            &tokenizer.tokenizer,
            tokenizer.special.eos_ids.first().copied(),
            model_cfg.vocab_size,
        );
        Ok(Self {
            model_cfg,
            tokenizer,
            guides,
        })
    }

    /// The context length the configuration allows for this model (before the KV pool's
    /// capacity caps it).
    pub fn model_len(&self, cfg: &EngineConfig) -> usize {
        match cfg.model.max_model_len {
            0 => self.model_cfg.max_position_embeddings,
            n => n.min(self.model_cfg.max_position_embeddings),
        }
    }
}

/// Where a core's results go: the detokenizer, or a bridge to frontends.
pub struct CoreOutputs {
    pub tokens: Recipient<StepTokens>,
    pub ends: Recipient<StreamEnd>,
}

/// A running core: scheduler, block manager, executor.
#[derive(Clone)]
pub struct EngineCore {
    pub add: Recipient<AddSequence>,
    pub finish: Recipient<FinishSequence>,
    pub stats: Recipient<GetSchedulerStats>,
    pub pool: Recipient<InspectPool>,
    pub load: Arc<EngineLoad>,
    pub info: Arc<EngineInfo>,
    pub supervisor: Supervisor,
}

impl EngineCore {
    /// Loads the weights, allocates the KV pool and starts the core's actors, sending its
    /// results to `outputs`. Must run inside an actix `System`. Loading is synchronous
    /// (seconds for a small model).
    pub fn start(
        cfg: &EngineConfig,
        outputs: CoreOutputs,
        supervisor: Supervisor,
    ) -> Result<Self, EngineError> {
        Self::launch(cfg, outputs, supervisor).map(|(core, _)| core)
    }

    /// [`Self::start`], also returning the model's files (for a frontend in this process).
    fn launch(
        cfg: &EngineConfig,
        outputs: CoreOutputs,
        supervisor: Supervisor,
    ) -> Result<(Self, ModelFiles), EngineError> {
        cfg.validate()?;
        let path = Path::new(&cfg.model.path);
        let (mut src, family, spec) = open_model(path)?;
        let files = ModelFiles::with_config(path, spec)?;
        let kv_dtype = cfg.cache.kv_cache_dtype.resolve(src.stores_f32());
        // The compute backend: pagoda's CPU kernels (the one implementation of the seam
        // today; see executor::backend).
        let backend = Cpu::new(cfg.model.activations.precision());
        // A forced int8 level this CPU lacks is refused here, not silently replaced.
        let int8 = pagoda_kernels::int8::setting().map_err(EngineError::Kernels)?;
        tracing::info!(
            family = family.name,
            backend = backend.name(),
            int8_kernel = %int8,
            kernel_threads = pagoda_kernels::pool::threads(),
            "loading"
        );
        let model = models::load(&backend, family, &mut src)?;
        drop(src);
        let draft = match cfg.speculative.method {
            SpecMethod::Draft => Some(load_draft(cfg, &files, &backend)?),
            _ => None,
        };

        let block_size = cfg.cache.block_size;
        let mut specs = vec![&files.model_cfg];
        specs.extend(draft.as_ref().map(|d| d.spec()));
        let num_blocks = num_kv_blocks(cfg, &specs, kv_dtype);
        // The draft proposes at the target's positions: its context bounds the target's.
        let model_len = match &draft {
            Some(d) => files.model_len(cfg).min(d.spec().max_position_embeddings),
            None => files.model_len(cfg),
        };
        let bm_cfg =
            BlockManagerConfig::new(num_blocks, block_size, cfg.cache.enable_prefix_caching)
                .with_sliding_window(files.model_cfg.sliding_window);
        // A sequence needs blocks for its whole context, or with a sliding window only for
        // the window and one step's tokens.
        let held = bm_cfg.tokens_held(model_len, cfg.scheduler.max_num_batched_tokens);
        let max_model_len = if held <= num_blocks * block_size {
            model_len
        } else {
            model_len.min(num_blocks * block_size)
        };
        if max_model_len < model_len {
            tracing::warn!(
                max_model_len,
                model_len,
                "the KV pool holds fewer tokens than the model's context; sequences are capped"
            );
        }
        let manager = BlockManager::new(bm_cfg.clone())?;
        let eos_ids: Vec<TokenId> = files.tokenizer.special.eos_ids.clone();
        let mut policy = SchedulerPolicy::new(
            SchedulerLimits {
                max_num_seqs: cfg.scheduler.max_num_seqs,
                max_num_batched_tokens: cfg.scheduler.max_num_batched_tokens,
                max_model_len,
            },
            bm_cfg,
            eos_ids.clone(),
        )?;
        let sp = &cfg.speculative;
        let drafts = match sp.method {
            SpecMethod::Off => None,
            SpecMethod::Ngram => {
                tracing::info!(
                    num_speculative_tokens = sp.num_speculative_tokens,
                    prompt_lookup_min = sp.prompt_lookup_min,
                    prompt_lookup_max = sp.prompt_lookup_max,
                    max_num_seqs = sp.max_num_seqs,
                    "speculative decoding: n-gram prompt lookup"
                );
                Some(Drafts::Proposer(Arc::new(NgramProposer {
                    min_n: sp.prompt_lookup_min,
                    max_n: sp.prompt_lookup_max,
                })))
            }
            SpecMethod::Draft => {
                tracing::info!(
                    num_speculative_tokens = sp.num_speculative_tokens,
                    max_num_seqs = sp.max_num_seqs,
                    draft_model = %sp.draft_model,
                    "speculative decoding: draft model"
                );
                Some(Drafts::DraftModel)
            }
        };
        if let Some(drafts) = drafts {
            policy = policy.with_speculation(Speculation {
                drafts,
                num_tokens: sp.num_speculative_tokens,
                max_num_seqs: sp.max_num_seqs,
            });
        }
        let info = Arc::new(EngineInfo {
            model_path: cfg.model.path.clone(),
            architecture: files.model_cfg.architecture.clone(),
            vocab_size: files.model_cfg.vocab_size,
            max_model_len,
            num_blocks,
            block_size,
            model_name: cfg.model.served_name(),
        });
        crate::metrics::record_cache_config(
            &info.model_name,
            block_size,
            num_blocks,
            cfg.cache.enable_prefix_caching,
            kv_dtype.name(),
        );
        let mut executor =
            Executor::new(backend, model, num_blocks, block_size, kv_dtype, eos_ids)?
                .with_guides(files.guides.clone());
        if let Some(draft) = draft {
            executor = executor.with_draft(backend, draft, kv_dtype)?;
        }
        // The executor's thread: forward passes block it for milliseconds at a time.
        let exec_guard = supervisor.guard("executor");
        let executor = ExecutorActor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            ExecutorActor::new(executor, exec_guard)
        });
        let block_manager =
            BlockManagerActor::new(manager, supervisor.guard("block_manager")).start();
        let load = Arc::new(EngineLoad::new(num_blocks));
        let scheduler = SchedulerActor::new(
            policy,
            SchedulerLinks {
                block_manager: block_manager.clone().recipient(),
                executor: executor.recipient(),
                tokens: outputs.tokens,
                ends: outputs.ends,
            },
            load.clone(),
            supervisor.guard("scheduler"),
        )
        .with_metrics(SchedulerMetrics::new(&info.model_name))
        .with_max_waiting(cfg.scheduler.max_waiting)
        .start();
        tracing::info!(
            model = %info.model_path,
            architecture = %info.architecture,
            max_model_len,
            num_blocks,
            block_size,
            fault_injection = crate::fault::ENABLED,
            "engine core ready"
        );
        let core = Self {
            add: scheduler.clone().recipient(),
            finish: scheduler.clone().recipient(),
            stats: scheduler.recipient(),
            pool: block_manager.recipient(),
            load,
            info,
            supervisor,
        };
        Ok((core, files))
    }
}

/// Loads `[speculative] draft_model` for speculative decoding: any model pagoda loads,
/// with the target's tokenizer (the same vocabulary, token for token) and no sliding
/// window on either side (the draft catches up from position 0, which a window's freed
/// blocks no longer hold).
fn load_draft(
    cfg: &EngineConfig,
    target: &ModelFiles,
    backend: &Cpu,
) -> Result<Box<dyn CausalLm<Cpu>>, EngineError> {
    let path = Path::new(&cfg.speculative.draft_model);
    let refuse = |why: String| EngineError::Draft(format!("{}: {why}", path.display()));
    let (mut src, family, spec) = open_model(path).map_err(|e| refuse(e.to_string()))?;
    let tokenizer = if path.is_dir() {
        tokenizer_from_hf_dir(path)
    } else {
        tokenizer_from_gguf_file(path)
    }
    .map_err(|e| refuse(e.to_string()))?;
    // (The models' vocabulary sizes are checked where the draft's pool is made,
    // `Executor::with_draft`.)
    if tokenizer.tokenizer.get_vocab(true) != target.tokenizer.tokenizer.get_vocab(true) {
        return Err(refuse(format!(
            "its tokenizer differs from the target's ({} tokens, vocabulary {}; the target has {} and {})",
            tokenizer.tokenizer.get_vocab_size(true),
            spec.vocab_size,
            target.tokenizer.tokenizer.get_vocab_size(true),
            target.model_cfg.vocab_size
        )));
    }
    if spec.sliding_window.is_some() || target.model_cfg.sliding_window.is_some() {
        return Err(refuse(
            "a draft model cannot be used with a sliding-window model".to_owned(),
        ));
    }
    tracing::info!(family = family.name, "loading the draft model");
    let model = models::load(backend, family, &mut src).map_err(|e| refuse(e.to_string()))?;
    Ok(model)
}

/// What a frontend sends its sequences to: a core in this process, or a router to cores in
/// other processes.
#[derive(Clone)]
pub struct Backend {
    pub add: Recipient<AddSequence>,
    pub finish: Recipient<FinishSequence>,
    pub stats: Recipient<GetSchedulerStats>,
    /// The pool, when it is in this process.
    pub pool: Option<Recipient<InspectPool>>,
    /// The load the tokenizer's early refusal reads.
    pub load: Arc<EngineLoad>,
}

/// Handle to a running engine (a frontend, with its core in this process or behind a
/// router). Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    submit: Recipient<Submit>,
    cancel: Recipient<Cancel>,
    stats: Recipient<GetSchedulerStats>,
    pool: Option<Recipient<InspectPool>>,
    streams: Streams,
    supervisor: Supervisor,
    load: Arc<EngineLoad>,
    /// `scheduler.max_waiting` (0 = no bound).
    max_waiting: usize,
    pub info: Arc<EngineInfo>,
    counters: Arc<TokenCounters>,
}

impl Engine {
    /// Loads everything and starts all the actors in this process. Must run inside an
    /// actix `System`. Loading is synchronous (seconds for a small model).
    pub fn start(cfg: &EngineConfig) -> Result<Self, EngineError> {
        let streams = Streams::new();
        let supervisor = Supervisor::new(Some(streams.clone()));
        // The detokenizer's address exists before the actor, so the core can send to it
        // and it to the core.
        let detok_ctx = Context::<DetokenizerActor>::new();
        let detok = detok_ctx.address();
        let (core, files) = EngineCore::launch(
            cfg,
            CoreOutputs {
                tokens: detok.clone().recipient(),
                ends: detok.clone().recipient(),
            },
            supervisor.clone(),
        )?;
        let backend = Backend {
            add: core.add.clone(),
            finish: core.finish.clone(),
            stats: core.stats.clone(),
            pool: Some(core.pool.clone()),
            load: core.load.clone(),
        };
        let info = core.info.clone();
        Self::start_parts(
            cfg,
            files,
            info,
            backend,
            streams,
            supervisor,
            Some(detok_ctx),
        )
    }

    /// Starts a frontend alone (tokenizer and detokenizer), its sequences going to
    /// `backend`; returns it with the detokenizer's recipients, where the engines' results
    /// must go. It accepts sequences up to the model's context length (each engine checks
    /// its own KV capacity again). Must run inside an actix `System`.
    pub fn start_frontend(
        cfg: &EngineConfig,
        backend: Backend,
    ) -> Result<(Self, CoreOutputs), EngineError> {
        cfg.validate()?;
        let path = Path::new(&cfg.model.path);
        let files = ModelFiles::open(path)?;
        let max_model_len = files.model_len(cfg);
        let info = Arc::new(EngineInfo {
            model_path: cfg.model.path.clone(),
            architecture: files.model_cfg.architecture.clone(),
            vocab_size: files.model_cfg.vocab_size,
            max_model_len,
            num_blocks: 0,
            block_size: cfg.cache.block_size,
            model_name: cfg.model.served_name(),
        });
        let streams = Streams::new();
        let supervisor = Supervisor::new(Some(streams.clone()));
        let detok_ctx = Context::<DetokenizerActor>::new();
        let detok = detok_ctx.address();
        let engine = Self::start_parts(
            cfg,
            files,
            info,
            backend,
            streams,
            supervisor,
            Some(detok_ctx),
        )?;
        let outputs = CoreOutputs {
            tokens: detok.clone().recipient(),
            ends: detok.recipient(),
        };
        Ok((engine, outputs))
    }

    fn start_parts(
        cfg: &EngineConfig,
        files: ModelFiles,
        info: Arc<EngineInfo>,
        backend: Backend,
        streams: Streams,
        supervisor: Supervisor,
        detok_ctx: Option<Context<DetokenizerActor>>,
    ) -> Result<Self, EngineError> {
        let counters = Arc::new(TokenCounters::default());
        let template = Arc::new(files.tokenizer.compile_chat_template()?);
        let detok_ctx = detok_ctx.unwrap_or_default();
        let detok_addr = detok_ctx.address();
        let detok = DetokenizerActor::new(
            Arc::new(files.tokenizer.tokenizer.clone()),
            backend.finish.clone(),
            streams.clone(),
            supervisor.guard("detokenizer"),
        )
        .with_metrics(RequestMetrics::new(&info.model_name, counters.clone()));
        detok_ctx.run(detok);
        let links = TokenizerLinks {
            register: detok_addr.clone().recipient(),
            ends: detok_addr.clone().recipient(),
            cancel: detok_addr.recipient(),
            add: backend.add.clone(),
        };
        let tok_guard = supervisor.guard("tokenizer");
        let guides = files.guides.clone();
        let parts = Arc::new(files.tokenizer);
        let vocab_size = files.model_cfg.vocab_size;
        let max_model_len = info.max_model_len;
        let max_waiting = cfg.scheduler.max_waiting;
        let load = backend.load.clone();
        let tok_streams = streams.clone();
        let limits = cfg.limits.clone();
        // Its own thread: encoding a long prompt must not hold up the other actors.
        let tokenizer = TokenizerActor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            TokenizerActor::new(
                parts,
                template,
                TokenizerBounds {
                    vocab_size,
                    max_model_len,
                    limits,
                },
                links,
                tok_streams,
                tok_guard,
            )
            .with_overload_gate(load, max_waiting)
            .with_guides(guides)
        });
        Ok(Self {
            submit: tokenizer.clone().recipient(),
            cancel: tokenizer.recipient(),
            stats: backend.stats,
            pool: backend.pool,
            streams,
            supervisor,
            load: backend.load,
            max_waiting: cfg.scheduler.max_waiting,
            info,
            counters,
        })
    }

    /// Prompt and generation tokens processed since start.
    pub fn token_counters(&self) -> &TokenCounters {
        &self.counters
    }

    /// The actors' watchdog: whether the engine still serves, and a future that resolves
    /// when an actor died.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The clients' live streams.
    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// The scheduler's load as last published (the sum over the engines for a frontend
    /// with a router).
    pub fn load(&self) -> &EngineLoad {
        &self.load
    }

    /// Whether the waiting queue is full (`scheduler.max_waiting`): a new request would be
    /// refused as `overloaded`.
    pub fn is_full(&self) -> bool {
        self.max_waiting > 0 && self.load.num_waiting() >= self.max_waiting
    }

    /// Submits a request. Its events arrive on the returned [`Generation`]: for each of its
    /// `n` completions (index 0..n), text deltas and then exactly one `Finished` or `Error`.
    pub fn generate(&self, request: GenerateRequest) -> Generation {
        // An `n` out of range opens one stream: the tokenizer refuses the request on it.
        let n = match request.params.n {
            n @ 1..=MAX_N => n as usize,
            _ => 1,
        };
        let opened: Vec<_> = (0..n).map(|_| self.streams.open()).collect();
        let seq_ids: Vec<SeqId> = opened.iter().map(|(id, _)| *id).collect();
        let submit = Submit {
            seq_id: seq_ids[0],
            forks: seq_ids[1..].to_vec(),
            request,
            arrival_us: now_us(),
        };
        if let Err(e) = post(&self.submit, submit) {
            for &seq_id in &seq_ids {
                self.streams.end(
                    seq_id,
                    StreamEvent::Error(ErrorBody::internal(e.to_string())),
                );
            }
        }
        Generation::new(opened.into_iter().map(|(_, rx)| rx).collect())
    }

    /// Cancels every live sequence of `request_id`: each stops within one engine step, its
    /// blocks are freed, and its stream ends with `Finished { finish_reason: Abort }`.
    /// Returns whether this engine had such a request (false also when it just finished).
    pub async fn cancel(&self, request_id: &str) -> bool {
        self.cancel
            .send(Cancel {
                request_id: request_id.to_owned(),
            })
            .await
            .unwrap_or(false)
    }

    /// Block pool statistics, after checking the pool's invariants (only when the pool is
    /// in this process).
    pub async fn pool_stats(&self) -> Result<BlockStats, String> {
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| "the KV pool is in another process".to_owned())?;
        pool.send(InspectPool).await.map_err(|e| e.to_string())?
    }

    pub async fn scheduler_stats(&self) -> Result<SchedulerStats, String> {
        self.stats
            .send(GetSchedulerStats)
            .await
            .map_err(|e| e.to_string())
    }
}
