//! Scheduler ↔ block manager: one [`StepRequest`] per engine step and its [`StepResponse`],
//! the block-pool geometry both sides share, and the hash chain that names full blocks.

use std::hash::{DefaultHasher, Hash, Hasher};

use serde::{Deserialize, Serialize};

use super::{SeqId, TokenId};

/// Index of a block in the executor's KV pool.
pub type BlockId = u32;

/// Token slots per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Blocks in a pool are fewer than this (block ids are `u32`; the largest is reserved).
pub const MAX_BLOCKS: usize = u32::MAX as usize;

/// A block-table entry whose block was given back because no query will read it again
/// (it lies wholly before the sequence's sliding window). Never a valid block id.
pub const RELEASED_BLOCK: BlockId = BlockId::MAX;

/// Errors of the block manager. Every failing call leaves the manager unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum BlockError {
    #[error("invalid block manager configuration: {0}")]
    InvalidConfig(String),
    #[error("out of KV cache blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("sequence {0} is unknown to the block manager")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already has a block table")]
    DuplicateSequence(SeqId),
    #[error("invalid block request: {0}")]
    InvalidRequest(String),
}

/// Geometry of the KV pool and the prefix-caching switch. The scheduler gets a copy so it
/// can size requests and decide whether to compute block hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockManagerConfig {
    /// Blocks in the pool (decided by the executor from its memory budget).
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Share full blocks between sequences with equal prefixes.
    pub enable_prefix_caching: bool,
    /// The model's sliding window (positions a query attends to): blocks wholly before it
    /// are given back while the sequence runs. None: every block is kept.
    pub sliding_window: Option<usize>,
}

impl Default for BlockManagerConfig {
    fn default() -> Self {
        Self {
            num_blocks: 1024,
            block_size: DEFAULT_BLOCK_SIZE,
            enable_prefix_caching: true,
            sliding_window: None,
        }
    }
}

impl BlockManagerConfig {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        Self {
            num_blocks,
            block_size,
            enable_prefix_caching,
            sliding_window: None,
        }
    }

    /// The same pool for a model with a sliding window.
    pub fn with_sliding_window(mut self, window: Option<usize>) -> Self {
        self.sliding_window = window.filter(|&w| w > 0);
        self
    }

    /// Tokens a sequence of `total` tokens holds blocks for at once when its steps compute
    /// at most `step_tokens` tokens: all of them, or with a sliding window just the window,
    /// the step's chunk and two partial blocks.
    pub fn tokens_held(&self, total: usize, step_tokens: usize) -> usize {
        match self.sliding_window {
            Some(w) => total.min(w + step_tokens + 2 * self.block_size),
            None => total,
        }
    }

    pub fn validate(&self) -> Result<(), BlockError> {
        if self.block_size == 0 {
            return Err(BlockError::InvalidConfig(
                "block_size must be at least 1".into(),
            ));
        }
        if self.num_blocks == 0 {
            return Err(BlockError::InvalidConfig(
                "num_blocks must be at least 1".into(),
            ));
        }
        if self.num_blocks >= MAX_BLOCKS {
            return Err(BlockError::InvalidConfig(format!(
                "num_blocks must be below {MAX_BLOCKS}, got {}",
                self.num_blocks
            )));
        }
        Ok(())
    }

    /// Token slots in the whole pool.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks.saturating_mul(self.block_size)
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size.max(1))
    }
}

/// The slot of token position `pos` given a block table, or `None` if the table is too
/// short.
pub fn slot_for(block_table: &[BlockId], block_size: usize, pos: usize) -> Option<usize> {
    let block = *block_table.get(pos / block_size.max(1))? as usize;
    Some(block * block_size + pos % block_size)
}

/// Identity of a full block: a 128-bit hash of its parent's hash and its own token ids.
///
/// Two independently salted SipHash passes give the 128 bits, which makes an accidental
/// collision (two different prefixes sharing a block) practically impossible. The value is
/// deterministic within one build of the program, which is all the prefix index needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockHash {
    hi: u64,
    lo: u64,
}

impl BlockHash {
    /// Hash of a full block given its parent's hash (`None` for the first block).
    pub fn new(parent: Option<BlockHash>, tokens: &[TokenId]) -> Self {
        let half = |salt: u64| {
            let mut h = DefaultHasher::new();
            salt.hash(&mut h);
            parent.hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        BlockHash {
            hi: half(0x9e37_79b9_7f4a_7c15),
            lo: half(0xc2b2_ae3d_27d4_eb4f),
        }
    }
}

/// Extends `hashes` (the chain of a sequence's full blocks so far) with the blocks of
/// `tokens` that became full since. Cheap to call after every appended token.
pub fn extend_block_hashes(hashes: &mut Vec<BlockHash>, tokens: &[TokenId], block_size: usize) {
    let bs = block_size.max(1);
    while let Some(chunk) = tokens.get(hashes.len() * bs..(hashes.len() + 1) * bs) {
        let parent = hashes.last().copied();
        hashes.push(BlockHash::new(parent, chunk));
    }
}

/// Hash chain of all full blocks of `tokens`.
pub fn block_hashes(tokens: &[TokenId], block_size: usize) -> Vec<BlockHash> {
    let mut hashes = Vec::with_capacity(tokens.len() / block_size.max(1));
    extend_block_hashes(&mut hashes, tokens, block_size);
    hashes
}

/// Pool occupancy and prefix-cache counters, sent back with every step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockStats {
    pub num_blocks: usize,
    pub num_free_blocks: usize,
    /// Fraction of blocks in use, in [0, 1] (free-but-cached blocks count as free).
    pub usage: f64,
    /// Sequences holding a block table.
    pub num_seqs: usize,
    /// Prompt tokens looked up in the prefix cache at admission (cumulative).
    pub prefix_cache_queries: u64,
    /// Of those, tokens served from the cache (cumulative).
    pub prefix_cache_hits: u64,
}

impl BlockStats {
    /// Statistics of an untouched pool of `num_blocks` blocks.
    pub fn empty(num_blocks: usize) -> Self {
        Self {
            num_blocks,
            num_free_blocks: num_blocks,
            usage: 0.0,
            num_seqs: 0,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        }
    }
}

/// Give a finished, aborted or otherwise retired sequence's blocks back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeRequest {
    pub seq_id: SeqId,
    /// Hashes of full blocks computed since the last report (see [`GrowRequest`]);
    /// registered before the blocks are released, so they stay reusable.
    pub computed_hashes: Vec<BlockHash>,
}

/// A running sequence's needs for this step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrowRequest {
    pub seq_id: SeqId,
    /// Tokens the table must hold after this step (computed + scheduled now). Blocks the
    /// table holds beyond them (the slots of draft tokens that were not kept) are given
    /// back; a value at or below the current capacity allocates nothing.
    pub num_tokens: usize,
    /// Hashes of the blocks (in table order, continuing where the last report stopped) that
    /// became completely filled with computed tokens since the last report.
    pub computed_hashes: Vec<BlockHash>,
    /// Positions before this one are never read again (sliding window): blocks wholly
    /// before it are given back. 0 for models without a window.
    #[serde(default)]
    pub keep_from: usize,
    /// The first position this step writes (the tokens computed so far). A block from here
    /// on that other sequences share (a fork's) is copied first: copy on write.
    #[serde(default)]
    pub write_from: usize,
}

/// A new sequence that starts as a copy of a running one (completion `i` of a request with
/// `n` > 1): its table shares the parent's blocks for the first `num_tokens` positions
/// (reference counts raised; nothing is copied until one of them writes a shared block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkRequest {
    pub parent: SeqId,
    pub child: SeqId,
    pub num_tokens: usize,
}

/// A shared block replaced by a private copy before a write: entry `index` of the table
/// now holds `dst`, which must receive `src`'s K/V before the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCopy {
    pub index: usize,
    pub src: BlockId,
    pub dst: BlockId,
}

/// A waiting sequence the scheduler would like to start this step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmitRequest {
    pub seq_id: SeqId,
    /// All known tokens of the sequence (prompt, plus generated ones after a preemption).
    pub num_tokens: usize,
    /// Tokens the scheduler wants to compute this step, counted as if nothing were cached
    /// (1..=num_tokens). With a cache hit of `c` tokens, `min(num_new_tokens,
    /// num_tokens - c)` tokens starting at position `c` are allocated.
    pub num_new_tokens: usize,
    /// Hash chain of the sequence's full blocks (empty without prefix caching).
    pub block_hashes: Vec<BlockHash>,
}

/// Everything the scheduler needs from the block manager for one step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRequest {
    /// Applied first, before the frees (a parent may finish in the step that forks it).
    #[serde(default)]
    pub fork: Vec<ForkRequest>,
    /// Applied next.
    pub free: Vec<FreeRequest>,
    /// The running sequences in priority order (oldest first). Entries at the back are the
    /// preemption victims when the pool runs dry, so list every running sequence, including
    /// those that get no tokens this step.
    pub grow: Vec<GrowRequest>,
    /// Waiting sequences in admission order.
    pub admit: Vec<AdmitRequest>,
}

impl StepRequest {
    /// A request that only returns blocks.
    pub fn free_only(free: Vec<FreeRequest>) -> Self {
        Self {
            free,
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fork.is_empty()
            && self.free.is_empty()
            && self.grow.is_empty()
            && self.admit.is_empty()
    }
}

/// A running sequence that got the slots it asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grown {
    pub seq_id: SeqId,
    /// Block ids appended to the end of its table (often none).
    pub new_blocks: Vec<BlockId>,
    /// Leading table entries given back so far (sliding window): they read
    /// [`RELEASED_BLOCK`] from now on.
    #[serde(default)]
    pub released: usize,
    /// Shared blocks this step writes, replaced by copies (see [`GrowRequest::write_from`]).
    #[serde(default)]
    pub copied: Vec<BlockCopy>,
    /// Trailing table entries given back before growing (they held only rejected
    /// speculative tokens): the table is that much shorter before `new_blocks` are added.
    #[serde(default)]
    pub trimmed: usize,
}

/// A waiting sequence that now has a block table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admitted {
    pub seq_id: SeqId,
    /// Leading tokens whose K/V is already in the cache (a multiple of the block size).
    pub num_cached_tokens: usize,
    /// Tokens to compute this step, starting at `num_cached_tokens`.
    pub num_new_tokens: usize,
    /// The full table: cached blocks first, then fresh ones.
    pub block_table: Vec<BlockId>,
}

/// The answer to a [`StepRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResponse {
    /// Grow entries that were served, in request order.
    pub grown: Vec<Grown>,
    /// Grow entries whose blocks were freed to make room, in the order they were preempted
    /// (newest first). Every grow entry is in exactly one of `grown` and `preempted`.
    pub preempted: Vec<SeqId>,
    /// Admit entries that were served: a prefix of the request's list.
    pub admitted: Vec<Admitted>,
    pub stats: BlockStats,
}

impl actix::Message for StepRequest {
    type Result = Result<StepResponse, BlockError>;
}

/// Asks for the pool's statistics, after checking its invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectPool;

impl actix::Message for InspectPool {
    type Result = Result<BlockStats, String>;
}
