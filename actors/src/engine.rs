//! Wiring: loads the model and tokenizer, sizes the KV pool, and starts the five actors.
//! [`Engine`] is the in-process handle front ends (the CLI, the NATS gateway) talk to.

use std::path::Path;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::block_manager::{
    BlockManager, BlockManagerActor, BlockManagerConfig, BlockStats, InspectPool,
};
use crate::config::EngineConfig;
use crate::detokenizer::DetokenizerActor;
use crate::executor::models::llama::Llama;
use crate::executor::weights::LoadError;
use crate::executor::{num_kv_blocks, open_model, Executor, ExecutorActor};
use crate::metrics::{RequestMetrics, SchedulerMetrics, TokenCounters};
use crate::protocol::{GenerateRequest, StreamEvent};
use crate::scheduler::{
    GetSchedulerStats, SchedulerActor, SchedulerLimits, SchedulerPolicy, SchedulerStats,
};
use crate::tokenizer::{
    tokenizer_from_gguf_file, tokenizer_from_hf_dir, Cancel, Submit, TokenizerActor,
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
    Blocks(#[from] crate::block_manager::BlockError),
    #[error("the model's vocabulary ({model}) is smaller than the tokenizer's ({tokenizer})")]
    VocabMismatch { model: usize, tokenizer: usize },
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
    pub num_blocks: usize,
    pub block_size: usize,
    /// The `model_name` label of the metrics.
    pub model_name: String,
}

/// Handle to a running engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tokenizer: Addr<TokenizerActor>,
    scheduler: Addr<SchedulerActor>,
    block_manager: Addr<BlockManagerActor>,
    pub info: Arc<EngineInfo>,
    counters: Arc<TokenCounters>,
}

impl Engine {
    /// Loads everything and starts the actors. Must run inside an actix `System`. Loading
    /// is synchronous (seconds for a small model).
    pub fn start(cfg: &EngineConfig) -> Result<Self, EngineError> {
        cfg.validate()?;
        let path = Path::new(&cfg.model.path);
        let (mut src, model_cfg) = open_model(path)?;
        let parts = if path.is_dir() {
            tokenizer_from_hf_dir(path)?
        } else {
            tokenizer_from_gguf_file(path)?
        };
        let tok_vocab = parts.tokenizer.get_vocab_size(true);
        if tok_vocab > model_cfg.vocab_size {
            return Err(EngineError::VocabMismatch {
                model: model_cfg.vocab_size,
                tokenizer: tok_vocab,
            });
        }
        let template = Arc::new(parts.compile_chat_template()?);
        let kv_dtype = cfg.cache.kv_cache_dtype.resolve(src.stores_f32());
        let model = Llama::load_with(
            &mut src,
            model_cfg.clone(),
            cfg.model.activations.precision(),
        )?;
        drop(src);

        let block_size = cfg.cache.block_size;
        let num_blocks = num_kv_blocks(cfg, &model_cfg, kv_dtype);
        let capacity = num_blocks * block_size;
        let model_len = match cfg.model.max_model_len {
            0 => model_cfg.max_position_embeddings,
            n => n.min(model_cfg.max_position_embeddings),
        };
        let max_model_len = model_len.min(capacity);
        if max_model_len < model_len {
            tracing::warn!(
                max_model_len,
                model_len,
                "the KV pool holds fewer tokens than the model's context; sequences are capped"
            );
        }
        let bm_cfg =
            BlockManagerConfig::new(num_blocks, block_size, cfg.cache.enable_prefix_caching);
        let manager = BlockManager::new(bm_cfg.clone())?;
        let eos_ids = parts.special.eos_ids.clone();
        let policy = SchedulerPolicy::new(
            SchedulerLimits {
                max_num_seqs: cfg.scheduler.max_num_seqs,
                max_num_batched_tokens: cfg.scheduler.max_num_batched_tokens,
                max_model_len,
            },
            bm_cfg,
            eos_ids.clone(),
        )?;
        let info = Arc::new(EngineInfo {
            model_path: cfg.model.path.clone(),
            architecture: model_cfg.architecture.clone(),
            vocab_size: model_cfg.vocab_size,
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
        let counters = Arc::new(TokenCounters::default());
        let sched_metrics = SchedulerMetrics::new(&info.model_name);
        let request_metrics = RequestMetrics::new(&info.model_name, counters.clone());

        let executor = Executor::new(model, num_blocks, block_size, kv_dtype, eos_ids);
        // The executor's thread: forward passes block it for milliseconds at a time.
        let exec_arbiter = Arbiter::new();
        let executor = ExecutorActor::start_in_arbiter(&exec_arbiter.handle(), move |_| {
            ExecutorActor::new(executor)
        });
        let block_manager = BlockManagerActor::new(manager).start();
        let decoder = Arc::new(parts.tokenizer.clone());
        let mut detok_addr = None;
        let bm = block_manager.clone();
        let max_waiting = cfg.scheduler.max_waiting;
        let mut waiting_gauge = None;
        let scheduler = SchedulerActor::create(|ctx| {
            let detok = DetokenizerActor::new(decoder, ctx.address().recipient())
                .with_metrics(request_metrics)
                .start();
            detok_addr = Some(detok.clone());
            let actor = SchedulerActor::new(
                policy,
                bm,
                executor,
                detok.clone().recipient(),
                detok.recipient(),
            )
            .with_metrics(sched_metrics)
            .with_max_waiting(max_waiting);
            waiting_gauge = Some(actor.waiting_gauge());
            actor
        });
        let detokenizer =
            detok_addr.ok_or_else(|| EngineError::Other("detokenizer did not start".into()))?;
        let tokenizer = TokenizerActor::new(
            Arc::new(parts),
            template,
            model_cfg.vocab_size,
            max_model_len,
            scheduler.clone(),
            detokenizer,
        );
        let tokenizer = match waiting_gauge {
            Some(gauge) => tokenizer.with_overload_gate(gauge, max_waiting),
            None => tokenizer,
        }
        .start();
        tracing::info!(
            model = %info.model_path,
            architecture = %info.architecture,
            max_model_len,
            num_blocks,
            block_size,
            "engine ready"
        );
        Ok(Self {
            tokenizer,
            scheduler,
            block_manager,
            info,
            counters,
        })
    }

    /// Prompt and generation tokens processed since start.
    pub fn token_counters(&self) -> &TokenCounters {
        &self.counters
    }

    /// Submits a request; its events arrive on the returned channel, ending with exactly
    /// one `Finished` or `Error`.
    pub fn generate(&self, request: GenerateRequest) -> mpsc::UnboundedReceiver<StreamEvent> {
        let (sink, rx) = mpsc::unbounded_channel();
        self.tokenizer.do_send(Submit { request, sink });
        rx
    }

    /// Cancels every live sequence of `request_id`: each stops within one engine step, its
    /// blocks are freed, and its stream ends with `Finished { finish_reason: Abort }`.
    /// Returns whether this engine had such a request (false also when it just finished).
    pub async fn cancel(&self, request_id: &str) -> bool {
        self.tokenizer
            .send(Cancel {
                request_id: request_id.to_owned(),
            })
            .await
            .unwrap_or(false)
    }

    /// Block pool statistics, after checking the pool's invariants.
    pub async fn pool_stats(&self) -> Result<BlockStats, String> {
        self.block_manager
            .send(InspectPool)
            .await
            .map_err(|e| e.to_string())?
    }

    pub async fn scheduler_stats(&self) -> Result<SchedulerStats, String> {
        self.scheduler
            .send(GetSchedulerStats)
            .await
            .map_err(|e| e.to_string())
    }
}
