//! Bookkeeping of the paged KV cache: which block ids each sequence owns, which blocks are
//! free, and which full blocks can be reused by a later sequence with the same prefix.
//!
//! The executor owns the actual K/V tensors (one pool of `num_blocks` blocks, each holding
//! `block_size` token slots); this module only hands out block *ids*. Token position `p`
//! of a sequence lives in slot `table[p / block_size] * block_size + p % block_size`
//! (see [`slot_for`]).
//!
//! # Structure
//!
//! * [`BlockPool`] — per-block reference counts, the free queue and the prefix index.
//!   * The free queue is an intrusive doubly linked list threaded through two `Vec<u32>`
//!     (`prev`/`next`, indexed by block id), so pushing to the tail, popping the head and
//!     unlinking a block from the middle are all O(1) and allocation-free.
//!   * Blocks are handed out from the head, so the queue is in least-recently-freed order:
//!     a block that was released long ago is reused (evicted) first.
//!   * The prefix index maps a [`BlockHash`] to the block that holds exactly that content.
//!     Eviction is lazy: a released block keeps its hash and stays findable until it is
//!     popped from the free queue for new content. A lookup that hits a free block takes it
//!     out of the middle of the queue and bumps its reference count.
//! * [`BlockManager`] — per-sequence block tables on top of the pool, the prefix-caching
//!   policy and the batched per-step entry point [`BlockManager::apply`].
//!
//! # Prefix caching
//!
//! A block that is completely filled with *computed* tokens gets a hash chained from the
//! previous block's hash and its own token ids ([`BlockHash::new`]), so equal hashes mean
//! equal prefixes, not just equal blocks. The scheduler computes these hashes (it owns the
//! token ids) and reports them once the tokens have been through the model: a block only
//! enters the index after its K/V was written, so a sequence that shares it never reads
//! slots that are still being filled. When a sequence is admitted, the manager walks its
//! prompt's hash chain through the index and shares the longest cached run of blocks; the
//! number of tokens covered is returned so the scheduler can skip their prefill. The last
//! token is never taken from the cache, so every admitted sequence has at least one token
//! to compute (the one whose logits produce the next token). Shared blocks are always full
//! and are never written again: new tokens go to fresh blocks after them.
//!
//! # One call per engine step
//!
//! The scheduler never talks to the manager per sequence. Each step it builds one
//! [`StepRequest`] (frees, the running sequences' growth in priority order, the waiting
//! sequences it would like to admit) and [`BlockManager::apply`] answers with one
//! [`StepResponse`] (the new block ids, which sequences were preempted, which were admitted
//! and with how many cached tokens, and fresh pool statistics). The rules `apply` follows
//! are mechanical and documented there, so the scheduler knows exactly what an answer means
//! and the actor layer can ship the whole exchange as a single message.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::messages::{SeqId, TokenId};

/// Index of a block in the executor's KV pool.
pub type BlockId = u32;

/// Token slots per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// "No block" marker in the free-queue links.
const NIL: u32 = u32::MAX;

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
}

impl Default for BlockManagerConfig {
    fn default() -> Self {
        Self {
            num_blocks: 1024,
            block_size: DEFAULT_BLOCK_SIZE,
            enable_prefix_caching: true,
        }
    }
}

impl BlockManagerConfig {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        Self {
            num_blocks,
            block_size,
            enable_prefix_caching,
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
        if self.num_blocks >= NIL as usize {
            return Err(BlockError::InvalidConfig(format!(
                "num_blocks must be below {NIL}, got {}",
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

/// Intrusive doubly linked list of free block ids (see the module docs).
#[derive(Debug, Clone)]
struct FreeBlockQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeBlockQueue {
    /// A queue holding every block, in id order.
    fn new_full(num_blocks: usize) -> Self {
        let n = num_blocks as u32;
        let prev = (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        let next = (0..n)
            .map(|i| if i + 1 == n { NIL } else { i + 1 })
            .collect();
        Self {
            prev,
            next,
            linked: vec![true; num_blocks],
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            len: num_blocks,
        }
    }

    fn contains(&self, id: BlockId) -> bool {
        self.linked.get(id as usize).copied().unwrap_or(false)
    }

    fn push_back(&mut self, id: BlockId) {
        if self.contains(id) {
            return;
        }
        let i = id as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.linked[i] = true;
        self.len += 1;
    }

    fn remove(&mut self, id: BlockId) {
        if !self.contains(id) {
            return;
        }
        let i = id as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.linked[i] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<BlockId> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.remove(id);
        Some(id)
    }

    /// Walks the list head to tail, checking the links; returns the ids in order.
    fn walk(&self) -> Result<Vec<BlockId>, String> {
        let mut out = Vec::with_capacity(self.len);
        let mut prev = NIL;
        let mut cur = self.head;
        while cur != NIL {
            if out.len() > self.linked.len() {
                return Err("free queue has a cycle".into());
            }
            let i = cur as usize;
            if i >= self.linked.len() {
                return Err(format!("free queue links to out-of-range block {cur}"));
            }
            if !self.linked[i] {
                return Err(format!(
                    "block {cur} reachable in free queue but not marked linked"
                ));
            }
            if self.prev[i] != prev {
                return Err(format!("block {cur} has a wrong prev link"));
            }
            out.push(cur);
            prev = cur;
            cur = self.next[i];
        }
        if self.tail != prev {
            return Err("free queue tail does not match the last reachable block".into());
        }
        if out.len() != self.len {
            return Err(format!(
                "free queue len {} but {} reachable",
                self.len,
                out.len()
            ));
        }
        Ok(out)
    }
}

/// Reference counts, free queue and prefix index of the pool.
///
/// Invariant: a block is either free (reference count 0, in the free queue exactly once) or
/// in use (reference count > 0, not in the queue). A block may carry a hash whether free or
/// in use; the index and the per-block hashes mirror each other exactly.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    ref_cnt: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    free: FreeBlockQueue,
    index: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    /// A pool whose blocks are all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            free: FreeBlockQueue::new_full(num_blocks),
            index: HashMap::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks with reference count 0, including those still holding cached content.
    pub fn num_free(&self) -> usize {
        self.free.len
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_cnt.get(block as usize).copied().unwrap_or(0)
    }

    pub fn block_hash(&self, block: BlockId) -> Option<BlockHash> {
        self.hash.get(block as usize).copied().flatten()
    }

    /// The block caching `hash`, if any (free or in use).
    pub fn cached_block(&self, hash: &BlockHash) -> Option<BlockId> {
        self.index.get(hash).copied()
    }

    /// Number of blocks currently registered in the prefix index.
    pub fn num_cached_blocks(&self) -> usize {
        self.index.len()
    }

    /// Pops `n` blocks from the head of the free queue (evicting their cached content),
    /// all or nothing.
    fn take_free(&mut self, n: usize) -> Result<Vec<BlockId>, BlockError> {
        if n > self.free.len {
            return Err(BlockError::OutOfBlocks {
                needed: n,
                free: self.free.len,
            });
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(b) = self.free.pop_front() else {
                // Unreachable given the length check; undo to stay consistent anyway.
                for &b in out.iter().rev() {
                    self.release(b);
                }
                return Err(BlockError::OutOfBlocks {
                    needed: n,
                    free: self.free.len,
                });
            };
            if let Some(h) = self.hash[b as usize].take() {
                if self.index.get(&h) == Some(&b) {
                    self.index.remove(&h);
                }
            }
            self.ref_cnt[b as usize] = 1;
            out.push(b);
        }
        Ok(out)
    }

    /// Adds a reference to a block (a prefix-cache hit), unlinking it from the free queue
    /// if it was free.
    fn touch(&mut self, block: BlockId) {
        let i = block as usize;
        if self.ref_cnt[i] == 0 {
            self.free.remove(block);
        }
        self.ref_cnt[i] += 1;
    }

    /// Drops a reference; a block reaching 0 goes to the tail of the free queue and keeps
    /// its cached content until it is reused.
    fn release(&mut self, block: BlockId) {
        let i = block as usize;
        if self.ref_cnt[i] == 0 {
            return;
        }
        self.ref_cnt[i] -= 1;
        if self.ref_cnt[i] == 0 {
            self.free.push_back(block);
        }
    }

    /// Records that `block` holds the content identified by `hash`. A block that already has
    /// a hash, or content already cached in another block, is left alone.
    fn register(&mut self, block: BlockId, hash: BlockHash) {
        let i = block as usize;
        if self.hash[i].is_some() || self.index.contains_key(&hash) {
            return;
        }
        self.hash[i] = Some(hash);
        self.index.insert(hash, block);
    }
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
    /// Tokens the table must hold after this step (computed + scheduled now). Tables never
    /// shrink; a value at or below the current capacity allocates nothing.
    pub num_tokens: usize,
    /// Hashes of the blocks (in table order, continuing where the last report stopped) that
    /// became completely filled with computed tokens since the last report.
    pub computed_hashes: Vec<BlockHash>,
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
    /// Applied first.
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
        self.free.is_empty() && self.grow.is_empty() && self.admit.is_empty()
    }
}

/// A running sequence that got the slots it asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grown {
    pub seq_id: SeqId,
    /// Block ids appended to the end of its table (often none).
    pub new_blocks: Vec<BlockId>,
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

#[derive(Debug, Clone)]
struct SeqBlocks {
    table: Vec<BlockId>,
    /// Leading blocks of `table` whose hashes were reported (cache hits count as reported).
    num_reported: usize,
}

/// Block tables of all sequences on top of a [`BlockPool`]; see the module docs.
#[derive(Debug, Clone)]
pub struct BlockManager {
    config: BlockManagerConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, SeqBlocks>,
    prefix_queries: u64,
    prefix_hits: u64,
}

impl BlockManager {
    pub fn new(config: BlockManagerConfig) -> Result<Self, BlockError> {
        config.validate()?;
        Ok(Self {
            pool: BlockPool::new(config.num_blocks, config.block_size),
            config,
            seqs: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        })
    }

    pub fn config(&self) -> &BlockManagerConfig {
        &self.config
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Fraction of blocks in use, in [0, 1].
    pub fn usage(&self) -> f64 {
        let total = self.num_blocks();
        if total == 0 {
            return 0.0;
        }
        (total - self.num_free_blocks()) as f64 / total as f64
    }

    /// Number of sequences holding a block table.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    pub fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    /// Slot of token position `pos` of `seq`.
    pub fn slot(&self, seq: SeqId, pos: usize) -> Option<usize> {
        slot_for(self.block_table(seq)?, self.block_size(), pos)
    }

    pub fn stats(&self) -> BlockStats {
        BlockStats {
            num_blocks: self.num_blocks(),
            num_free_blocks: self.num_free_blocks(),
            usage: self.usage(),
            num_seqs: self.seqs.len(),
            prefix_cache_queries: self.prefix_queries,
            prefix_cache_hits: self.prefix_hits,
        }
    }

    /// Whether a new sequence of `num_tokens` tokens fits without any cache hit.
    pub fn can_allocate(&self, num_tokens: usize) -> bool {
        self.config.blocks_for(num_tokens) <= self.num_free_blocks()
    }

    /// Whether `seq`'s table can grow to hold `num_tokens` tokens.
    pub fn can_append(&self, seq: SeqId, num_tokens: usize) -> bool {
        self.seqs.get(&seq).is_some_and(|s| {
            self.config
                .blocks_for(num_tokens)
                .saturating_sub(s.table.len())
                <= self.num_free_blocks()
        })
    }

    /// Tokens of a sequence with this hash chain that a new admission would take from the
    /// cache (read-only; counts nothing).
    pub fn peek_cached_tokens(&self, block_hashes: &[BlockHash], num_tokens: usize) -> usize {
        self.lookup_prefix(block_hashes, num_tokens).len() * self.block_size()
    }

    /// Gives `seq` a table for `num_tokens` tokens, without prefix caching.
    pub fn allocate(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), BlockError> {
        self.admit(&AdmitRequest {
            seq_id: seq,
            num_tokens,
            num_new_tokens: num_tokens,
            block_hashes: Vec::new(),
        })
        .map(|_| ())
    }

    /// Gives `seq` a table for `num_tokens` tokens, sharing cached prefix blocks; returns
    /// the number of cached tokens.
    pub fn allocate_with_prefix(
        &mut self,
        seq: SeqId,
        num_tokens: usize,
        block_hashes: &[BlockHash],
    ) -> Result<usize, BlockError> {
        self.admit(&AdmitRequest {
            seq_id: seq,
            num_tokens,
            num_new_tokens: num_tokens,
            block_hashes: block_hashes.to_vec(),
        })
        .map(|a| a.num_cached_tokens)
    }

    /// Admits one sequence (see [`AdmitRequest`]). All or nothing.
    pub fn admit(&mut self, req: &AdmitRequest) -> Result<Admitted, BlockError> {
        if self.seqs.contains_key(&req.seq_id) {
            return Err(BlockError::DuplicateSequence(req.seq_id));
        }
        check_admit_shape(req)?;
        let bs = self.block_size();
        let hits = self.lookup_prefix(&req.block_hashes, req.num_tokens);
        let cached = hits.len() * bs;
        let new_tokens = req.num_new_tokens.min(req.num_tokens - cached);
        let fresh = (cached + new_tokens).div_ceil(bs) - hits.len();
        let hits_free = hits
            .iter()
            .filter(|&&b| self.pool.ref_count(b) == 0)
            .count();
        let free = self.num_free_blocks();
        if fresh + hits_free > free {
            return Err(BlockError::OutOfBlocks {
                needed: fresh + hits_free,
                free,
            });
        }
        // Take the hits out of the free queue first so popping fresh blocks cannot evict
        // them.
        for &b in &hits {
            self.pool.touch(b);
        }
        let fresh_blocks = match self.pool.take_free(fresh) {
            Ok(v) => v,
            Err(e) => {
                for &b in hits.iter().rev() {
                    self.pool.release(b);
                }
                return Err(e);
            }
        };
        let mut table = hits;
        let num_reported = table.len();
        table.extend(fresh_blocks);
        if self.config.enable_prefix_caching {
            self.prefix_queries += req.num_tokens as u64;
            self.prefix_hits += cached as u64;
        }
        self.seqs.insert(
            req.seq_id,
            SeqBlocks {
                table: table.clone(),
                num_reported,
            },
        );
        Ok(Admitted {
            seq_id: req.seq_id,
            num_cached_tokens: cached,
            num_new_tokens: new_tokens,
            block_table: table,
        })
    }

    /// Grows `seq`'s table so that `num_tokens` tokens fit; returns how many blocks were
    /// appended. All or nothing.
    pub fn append_slots(&mut self, seq: SeqId, num_tokens: usize) -> Result<usize, BlockError> {
        let have = self
            .seqs
            .get(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?
            .table
            .len();
        let need = self.config.blocks_for(num_tokens).saturating_sub(have);
        if need == 0 {
            return Ok(0);
        }
        let blocks = self.pool.take_free(need)?;
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.table.extend(blocks);
        }
        Ok(need)
    }

    /// Registers the hashes of `seq`'s next blocks (in table order) that are now completely
    /// filled with computed tokens.
    pub fn cache_blocks(
        &mut self,
        seq: SeqId,
        computed_hashes: &[BlockHash],
    ) -> Result<(), BlockError> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?;
        if s.num_reported + computed_hashes.len() > s.table.len() {
            return Err(too_many_hashes(seq, s, computed_hashes.len()));
        }
        if self.config.enable_prefix_caching {
            for (h, &b) in computed_hashes.iter().zip(&s.table[s.num_reported..]) {
                self.pool.register(b, *h);
            }
        }
        s.num_reported += computed_hashes.len();
        Ok(())
    }

    /// Releases `seq`'s blocks (last block first, so a sequence's tail is evicted before
    /// its more shareable head). Returns whether the sequence was known.
    pub fn free(&mut self, seq: SeqId) -> bool {
        let Some(s) = self.seqs.remove(&seq) else {
            return false;
        };
        for &b in s.table.iter().rev() {
            self.pool.release(b);
        }
        true
    }

    /// Serves one engine step. The rules, in order:
    ///
    /// 1. The request is validated as a whole; an invalid one changes nothing.
    /// 2. `free`: hashes are registered, then the blocks are released. Unknown sequences
    ///    are ignored, so a free may safely be sent twice.
    /// 3. The `computed_hashes` of every grow entry are registered.
    /// 4. `grow`, front to back: each entry gets the blocks it needs. When the pool cannot
    ///    serve an entry, the entry at the *back* of the list that is still live is
    ///    preempted (its blocks are freed) and the attempt is repeated; when the entry that
    ///    needs the blocks is itself the last live one, it is preempted and growth ends.
    /// 5. `admit`, only when nothing was preempted in this step: front to back, each entry is
    ///    admitted with its prefix-cache hits; the first one that does not fit ends
    ///    admission (FIFO: later ones never overtake it).
    pub fn apply(&mut self, req: StepRequest) -> Result<StepResponse, BlockError> {
        self.validate(&req)?;

        for f in &req.free {
            // Validated: the sequence is unknown or the hashes fit.
            if self.seqs.contains_key(&f.seq_id) {
                self.cache_blocks(f.seq_id, &f.computed_hashes)?;
                self.free(f.seq_id);
            }
        }
        for g in &req.grow {
            self.cache_blocks(g.seq_id, &g.computed_hashes)?;
        }

        let mut grown = Vec::with_capacity(req.grow.len());
        let mut preempted = Vec::new();
        // Entries [0, live_end) are not preempted.
        let mut live_end = req.grow.len();
        let mut i = 0;
        'grow: while i < live_end {
            let g = &req.grow[i];
            loop {
                let before = self.seqs.get(&g.seq_id).map_or(0, |s| s.table.len());
                match self.append_slots(g.seq_id, g.num_tokens) {
                    Ok(_) => {
                        let new_blocks = self
                            .seqs
                            .get(&g.seq_id)
                            .map(|s| s.table[before..].to_vec())
                            .unwrap_or_default();
                        grown.push(Grown {
                            seq_id: g.seq_id,
                            new_blocks,
                        });
                        i += 1;
                        break;
                    }
                    Err(BlockError::OutOfBlocks { .. }) => {
                        live_end -= 1;
                        let victim = req.grow[live_end].seq_id;
                        tracing::debug!(
                            seq_id = victim,
                            for_seq = g.seq_id,
                            "preempting to free KV blocks"
                        );
                        self.free(victim);
                        preempted.push(victim);
                        if live_end == i {
                            break 'grow;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }

        let mut admitted = Vec::new();
        if preempted.is_empty() {
            for a in &req.admit {
                match self.admit(a) {
                    Ok(ok) => admitted.push(ok),
                    Err(BlockError::OutOfBlocks { .. }) => break,
                    Err(e) => return Err(e),
                }
            }
        }

        Ok(StepResponse {
            grown,
            preempted,
            admitted,
            stats: self.stats(),
        })
    }

    fn validate(&self, req: &StepRequest) -> Result<(), BlockError> {
        let freed: HashSet<SeqId> = req.free.iter().map(|f| f.seq_id).collect();
        for f in &req.free {
            if let Some(s) = self.seqs.get(&f.seq_id) {
                if s.num_reported + f.computed_hashes.len() > s.table.len() {
                    return Err(too_many_hashes(f.seq_id, s, f.computed_hashes.len()));
                }
            }
        }
        let mut seen = HashSet::with_capacity(req.grow.len() + req.admit.len());
        for g in &req.grow {
            if !seen.insert(g.seq_id) {
                return Err(BlockError::InvalidRequest(format!(
                    "sequence {} listed twice",
                    g.seq_id
                )));
            }
            let s = match self.seqs.get(&g.seq_id) {
                Some(s) if !freed.contains(&g.seq_id) => s,
                _ => return Err(BlockError::UnknownSequence(g.seq_id)),
            };
            if s.num_reported + g.computed_hashes.len() > s.table.len() {
                return Err(too_many_hashes(g.seq_id, s, g.computed_hashes.len()));
            }
        }
        for a in &req.admit {
            if !seen.insert(a.seq_id) {
                return Err(BlockError::InvalidRequest(format!(
                    "sequence {} listed twice",
                    a.seq_id
                )));
            }
            if self.seqs.contains_key(&a.seq_id) && !freed.contains(&a.seq_id) {
                return Err(BlockError::DuplicateSequence(a.seq_id));
            }
            check_admit_shape(a)?;
        }
        Ok(())
    }

    /// The cached blocks of the longest prefix of `block_hashes` in the index, never
    /// covering the last token.
    fn lookup_prefix(&self, block_hashes: &[BlockHash], num_tokens: usize) -> Vec<BlockId> {
        if !self.config.enable_prefix_caching || num_tokens == 0 {
            return Vec::new();
        }
        let max_hits = (num_tokens - 1) / self.block_size();
        block_hashes
            .iter()
            .take(max_hits)
            .map_while(|h| self.pool.cached_block(h))
            .collect()
    }

    /// Checks every bookkeeping invariant; `Err` describes the first violation found.
    ///
    /// * the free queue is a well-formed list of exactly the blocks with reference count 0;
    /// * each block's reference count equals the number of tables that contain it, and no
    ///   table contains a block twice;
    /// * a block in several tables is a cached (hashed) prefix block;
    /// * the prefix index and the per-block hashes agree;
    /// * reported-hash counters never exceed table lengths.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.num_blocks();
        let queue = self.pool.free.walk()?;
        let mut in_queue = vec![false; n];
        for &b in &queue {
            let i = b as usize;
            if in_queue[i] {
                return Err(format!("block {b} is in the free queue twice"));
            }
            in_queue[i] = true;
        }
        let mut refs = vec![0u32; n];
        for (&seq, s) in &self.seqs {
            if s.num_reported > s.table.len() {
                return Err(format!(
                    "sequence {seq} reported more hashes than it has blocks"
                ));
            }
            let mut mine = HashSet::with_capacity(s.table.len());
            for &b in &s.table {
                let i = b as usize;
                if i >= n {
                    return Err(format!("sequence {seq} holds out-of-range block {b}"));
                }
                if !mine.insert(b) {
                    return Err(format!("sequence {seq} holds block {b} twice"));
                }
                refs[i] += 1;
            }
        }
        let table_refs: u64 = self.seqs.values().map(|s| s.table.len() as u64).sum();
        let counted: u64 = self.pool.ref_cnt.iter().map(|&r| u64::from(r)).sum();
        if table_refs != counted {
            return Err(format!(
                "tables hold {table_refs} references, ref counts sum to {counted}"
            ));
        }
        for b in 0..n {
            let rc = self.pool.ref_cnt[b];
            if rc != refs[b] {
                return Err(format!(
                    "block {b}: ref count {rc}, referenced by {} tables",
                    refs[b]
                ));
            }
            if (rc == 0) != in_queue[b] {
                return Err(format!(
                    "block {b}: ref count {rc} but in free queue = {}",
                    in_queue[b]
                ));
            }
            if self.pool.free.linked[b] != in_queue[b] {
                return Err(format!("block {b}: linked flag disagrees with the queue"));
            }
            if rc >= 2 && self.pool.hash[b].is_none() {
                return Err(format!(
                    "block {b} is shared by {rc} sequences but not a cached block"
                ));
            }
            if let Some(h) = self.pool.hash[b] {
                if self.pool.index.get(&h) != Some(&(b as BlockId)) {
                    return Err(format!("block {b} has a hash missing from the index"));
                }
            }
        }
        for (h, &b) in &self.pool.index {
            if self.pool.hash.get(b as usize).copied().flatten() != Some(*h) {
                return Err(format!(
                    "index entry for block {b} does not match the block"
                ));
            }
        }
        let zero = self.pool.ref_cnt.iter().filter(|&&r| r == 0).count();
        if zero != self.num_free_blocks() {
            return Err(format!(
                "{zero} blocks unreferenced, {} reported free",
                self.num_free_blocks()
            ));
        }
        Ok(())
    }
}

fn check_admit_shape(req: &AdmitRequest) -> Result<(), BlockError> {
    if req.num_tokens == 0 || req.num_new_tokens == 0 || req.num_new_tokens > req.num_tokens {
        return Err(BlockError::InvalidRequest(format!(
            "sequence {}: admit with num_tokens {} and num_new_tokens {}",
            req.seq_id, req.num_tokens, req.num_new_tokens
        )));
    }
    Ok(())
}

fn too_many_hashes(seq: SeqId, s: &SeqBlocks, extra: usize) -> BlockError {
    BlockError::InvalidRequest(format!(
        "sequence {seq}: {} + {extra} block hashes reported for a table of {} blocks",
        s.num_reported,
        s.table.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manager(num_blocks: usize, block_size: usize, caching: bool) -> BlockManager {
        BlockManager::new(BlockManagerConfig::new(num_blocks, block_size, caching))
            .expect("valid config")
    }

    fn toks(range: std::ops::Range<u32>) -> Vec<TokenId> {
        range.collect()
    }

    fn grow(seq_id: SeqId, num_tokens: usize) -> GrowRequest {
        GrowRequest {
            seq_id,
            num_tokens,
            computed_hashes: Vec::new(),
        }
    }

    fn admit(seq_id: SeqId, num_tokens: usize) -> AdmitRequest {
        AdmitRequest {
            seq_id,
            num_tokens,
            num_new_tokens: num_tokens,
            block_hashes: Vec::new(),
        }
    }

    #[test]
    fn config_validation() {
        assert!(BlockManager::new(BlockManagerConfig::new(0, 16, true)).is_err());
        assert!(BlockManager::new(BlockManagerConfig::new(4, 0, true)).is_err());
        let bm = manager(4, 16, true);
        assert_eq!(bm.num_free_blocks(), 4);
        assert_eq!(bm.usage(), 0.0);
        assert_eq!(bm.config().capacity_tokens(), 64);
        bm.check_invariants().expect("fresh pool is consistent");
    }

    #[test]
    fn free_queue_links_and_middle_removal() {
        let mut q = FreeBlockQueue::new_full(5);
        assert_eq!(q.walk().expect("ok"), vec![0, 1, 2, 3, 4]);
        q.remove(2);
        q.remove(0);
        q.remove(4);
        assert_eq!(q.walk().expect("ok"), vec![1, 3]);
        q.push_back(2);
        q.push_back(0);
        assert_eq!(q.walk().expect("ok"), vec![1, 3, 2, 0]);
        assert_eq!(q.pop_front(), Some(1));
        assert_eq!(q.pop_front(), Some(3));
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!(q.pop_front(), Some(0));
        assert_eq!(q.pop_front(), None);
        assert_eq!(q.walk().expect("ok"), Vec::<BlockId>::new());
        q.push_back(4);
        assert_eq!(q.walk().expect("ok"), vec![4]);
        assert_eq!((q.head, q.tail, q.len), (4, 4, 1));
    }

    #[test]
    fn allocate_append_free_and_slots() {
        let mut bm = manager(8, 4, false);
        bm.allocate(1, 5).expect("fits");
        assert_eq!(bm.block_table(1), Some(&[0, 1][..]));
        assert_eq!(bm.num_free_blocks(), 6);
        // Token 5 lives in block 1, offset 1.
        assert_eq!(bm.slot(1, 5), Some(4 + 1));
        assert_eq!(bm.slot(1, 8), None);
        assert_eq!(slot_for(&[7, 3], 4, 6), Some(3 * 4 + 2));
        // Growing within the last block allocates nothing.
        assert_eq!(bm.append_slots(1, 8), Ok(0));
        assert_eq!(bm.append_slots(1, 9), Ok(1));
        assert_eq!(bm.block_table(1), Some(&[0, 1, 2][..]));
        // Tables never shrink.
        assert_eq!(bm.append_slots(1, 1), Ok(0));
        assert_eq!(bm.append_slots(9, 1), Err(BlockError::UnknownSequence(9)));
        assert_eq!(bm.allocate(1, 1), Err(BlockError::DuplicateSequence(1)));
        assert!((bm.usage() - 3.0 / 8.0).abs() < 1e-12);
        bm.check_invariants().expect("consistent");
        assert!(bm.free(1));
        assert!(!bm.free(1));
        assert_eq!(bm.num_free_blocks(), 8);
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn out_of_blocks_changes_nothing() {
        let mut bm = manager(4, 4, false);
        bm.allocate(1, 12).expect("fits");
        assert!(!bm.can_allocate(5));
        assert!(bm.can_allocate(4));
        assert_eq!(
            bm.allocate(2, 5),
            Err(BlockError::OutOfBlocks { needed: 2, free: 1 })
        );
        assert!(!bm.contains(2));
        assert!(!bm.can_append(1, 20));
        assert_eq!(
            bm.append_slots(1, 20),
            Err(BlockError::OutOfBlocks { needed: 2, free: 1 })
        );
        assert_eq!(bm.block_table(1).map(<[_]>::len), Some(3));
        assert_eq!(bm.num_free_blocks(), 1);
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn invalid_admissions_are_rejected() {
        let mut bm = manager(4, 4, true);
        assert!(matches!(
            bm.allocate(1, 0),
            Err(BlockError::InvalidRequest(_))
        ));
        let bad = AdmitRequest {
            seq_id: 1,
            num_tokens: 3,
            num_new_tokens: 4,
            block_hashes: vec![],
        };
        assert!(matches!(bm.admit(&bad), Err(BlockError::InvalidRequest(_))));
        assert_eq!(bm.num_seqs(), 0);
    }

    #[test]
    fn released_blocks_are_reused_least_recently_freed_first() {
        let mut bm = manager(4, 1, false);
        bm.allocate(1, 2).expect("fits"); // 0, 1
        bm.allocate(2, 2).expect("fits"); // 2, 3
        bm.free(2); // tail-first: queue 3, 2
        bm.free(1); // queue 3, 2, 1, 0
        bm.allocate(3, 3).expect("fits");
        assert_eq!(bm.block_table(3), Some(&[3, 2, 1][..]));
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn hash_chain_depends_on_parent() {
        let a = BlockHash::new(None, &[1, 2]);
        let b = BlockHash::new(Some(a), &[3, 4]);
        let c = BlockHash::new(Some(BlockHash::new(None, &[9, 9])), &[3, 4]);
        assert_ne!(b, c);
        assert_eq!(b, BlockHash::new(Some(a), &[3, 4]));
        let chain = block_hashes(&[1, 2, 3, 4, 5], 2);
        assert_eq!(chain, vec![a, b]);
        let mut inc = Vec::new();
        for n in 0..=5 {
            extend_block_hashes(&mut inc, &[1, 2, 3, 4, 5][..n], 2);
        }
        assert_eq!(inc, chain);
    }

    #[test]
    fn prefix_hit_shares_blocks_and_keeps_last_token_uncached() {
        let bs = 4;
        let mut bm = manager(16, bs, true);
        let prompt = toks(0..10); // 2 full blocks + 2 tokens
        let hashes = block_hashes(&prompt, bs);
        assert_eq!(bm.allocate_with_prefix(1, prompt.len(), &hashes), Ok(0));
        // Nothing is shareable before its K/V is reported as computed.
        assert_eq!(bm.peek_cached_tokens(&hashes, 10), 0);
        bm.cache_blocks(1, &hashes).expect("two full blocks");
        assert_eq!(bm.peek_cached_tokens(&hashes, 10), 8);

        // Same prompt while seq 1 is alive: both full blocks are shared.
        assert_eq!(bm.allocate_with_prefix(2, prompt.len(), &hashes), Ok(8));
        let (t1, t2) = (
            bm.block_table(1).expect("t1").to_vec(),
            bm.block_table(2).expect("t2").to_vec(),
        );
        assert_eq!(t1[..2], t2[..2]);
        assert_ne!(t1[2], t2[2]);
        assert_eq!(bm.pool().ref_count(t1[0]), 2);
        bm.check_invariants().expect("consistent");

        // A prompt that is exactly the two cached blocks: the last token must be computed,
        // so only the first block is reused.
        let exact = &prompt[..8];
        assert_eq!(
            bm.allocate_with_prefix(3, exact.len(), &block_hashes(exact, bs)),
            Ok(4)
        );
        assert_eq!(bm.block_table(3).map(<[_]>::len), Some(2));
        assert_eq!(bm.block_table(3).map(|t| t[0]), Some(t1[0]));

        let stats = bm.stats();
        assert_eq!(stats.prefix_cache_queries, 10 + 10 + 8);
        assert_eq!(stats.prefix_cache_hits, 8 + 4);
        for s in [1, 2, 3] {
            bm.free(s);
        }
        assert_eq!(bm.num_free_blocks(), 16);
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn free_cached_blocks_are_revived_then_evicted_lazily() {
        let bs = 2;
        let mut bm = manager(4, bs, true);
        let prompt = toks(0..5);
        let hashes = block_hashes(&prompt, bs);
        bm.allocate_with_prefix(1, 5, &hashes).expect("fits");
        bm.cache_blocks(1, &hashes).expect("ok");
        let t1 = bm.block_table(1).expect("t1").to_vec();
        bm.free(1);
        assert_eq!(bm.num_free_blocks(), 4);
        assert_eq!(bm.pool().num_cached_blocks(), 2);

        // The cached blocks are free yet findable: a hit takes them out of the queue.
        assert_eq!(bm.allocate_with_prefix(2, 5, &hashes), Ok(4));
        assert_eq!(
            bm.block_table(2).map(|t| t[..2].to_vec()),
            Some(t1[..2].to_vec())
        );
        assert_eq!(bm.num_free_blocks(), 1);
        bm.check_invariants().expect("consistent");
        bm.free(2);

        // Other content needs every block: the cached ones are evicted and lose their hash.
        bm.allocate(3, 8).expect("whole pool");
        assert_eq!(bm.pool().num_cached_blocks(), 0);
        assert_eq!(bm.peek_cached_tokens(&hashes, 5), 0);
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn prefix_caching_disabled_never_hits() {
        let mut bm = manager(8, 2, false);
        let prompt = toks(0..5);
        let hashes = block_hashes(&prompt, 2);
        bm.allocate_with_prefix(1, 5, &hashes).expect("fits");
        bm.cache_blocks(1, &hashes).expect("ok");
        assert_eq!(bm.allocate_with_prefix(2, 5, &hashes), Ok(0));
        assert_eq!(bm.pool().num_cached_blocks(), 0);
        assert_eq!(bm.stats().prefix_cache_queries, 0);
    }

    #[test]
    fn cache_blocks_rejects_more_hashes_than_blocks() {
        let mut bm = manager(8, 2, true);
        bm.allocate(1, 3).expect("fits");
        let hashes = block_hashes(&toks(0..6), 2);
        assert!(matches!(
            bm.cache_blocks(1, &hashes),
            Err(BlockError::InvalidRequest(_))
        ));
        assert_eq!(bm.pool().num_cached_blocks(), 0);
        assert_eq!(bm.cache_blocks(7, &[]), Err(BlockError::UnknownSequence(7)));
    }

    #[test]
    fn apply_frees_grows_and_admits_in_one_call() {
        let mut bm = manager(8, 4, false);
        bm.allocate(1, 4).expect("fits");
        bm.allocate(2, 4).expect("fits");
        let resp = bm
            .apply(StepRequest {
                free: vec![FreeRequest {
                    seq_id: 2,
                    computed_hashes: vec![],
                }],
                grow: vec![grow(1, 5)],
                admit: vec![admit(3, 6), admit(4, 4)],
            })
            .expect("valid");
        assert!(resp.preempted.is_empty());
        assert_eq!(resp.grown.len(), 1);
        assert_eq!(resp.grown[0].new_blocks.len(), 1);
        assert_eq!(
            resp.admitted.iter().map(|a| a.seq_id).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(resp.admitted[0].block_table.len(), 2);
        assert!(!bm.contains(2));
        assert_eq!(resp.stats.num_free_blocks, 8 - 2 - 2 - 1);
        assert_eq!(resp.stats, bm.stats());
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn apply_preempts_from_the_back_and_skips_admission() {
        let mut bm = manager(4, 2, false);
        for s in 1..=3 {
            bm.allocate(s, 2).expect("fits");
        }
        // 1 free block; seq 1 and seq 2 each need one more: seq 1 takes the free one, seq 2
        // forces the newest (seq 3) out.
        let resp = bm
            .apply(StepRequest {
                free: vec![],
                grow: vec![grow(1, 3), grow(2, 3), grow(3, 3)],
                admit: vec![admit(9, 1)],
            })
            .expect("valid");
        assert_eq!(
            resp.grown.iter().map(|g| g.seq_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(resp.preempted, vec![3]);
        assert!(
            resp.admitted.is_empty(),
            "no admission in a step that preempted"
        );
        assert!(!bm.contains(3));
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn apply_preempts_the_requester_when_it_is_the_newest() {
        let mut bm = manager(2, 2, false);
        bm.allocate(1, 2).expect("fits");
        bm.allocate(2, 2).expect("fits");
        let resp = bm
            .apply(StepRequest {
                grow: vec![grow(1, 2), grow(2, 3)],
                ..Default::default()
            })
            .expect("valid");
        assert_eq!(
            resp.grown.iter().map(|g| g.seq_id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(resp.preempted, vec![2]);
        assert_eq!(bm.num_free_blocks(), 1);
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn apply_admission_stops_at_first_misfit() {
        let mut bm = manager(4, 2, false);
        let resp = bm
            .apply(StepRequest {
                admit: vec![admit(1, 4), admit(2, 6), admit(3, 2)],
                ..Default::default()
            })
            .expect("valid");
        // Seq 2 does not fit; seq 3 would, but must not overtake it.
        assert_eq!(
            resp.admitted.iter().map(|a| a.seq_id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(bm.num_free_blocks(), 2);
    }

    #[test]
    fn apply_admission_with_cache_hit_allocates_after_the_hit() {
        let bs = 4;
        let mut bm = manager(8, bs, true);
        let prompt = toks(0..12);
        let hashes = block_hashes(&prompt, bs);
        bm.allocate_with_prefix(1, 12, &hashes).expect("fits");
        bm.cache_blocks(1, &hashes).expect("ok");
        bm.free(1);
        // Plan: compute 5 tokens from scratch; with 8 cached, 4 remain (positions 8..12).
        let req = AdmitRequest {
            seq_id: 2,
            num_tokens: 12,
            num_new_tokens: 5,
            block_hashes: hashes,
        };
        let resp = bm
            .apply(StepRequest {
                admit: vec![req],
                ..Default::default()
            })
            .expect("valid");
        let a = &resp.admitted[0];
        assert_eq!(
            (a.num_cached_tokens, a.num_new_tokens, a.block_table.len()),
            (8, 4, 3)
        );
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn apply_registers_reported_hashes_even_for_victims() {
        let bs = 2;
        let mut bm = manager(3, bs, true);
        let p1 = toks(0..2);
        let p2 = toks(10..12);
        bm.allocate(1, 2).expect("fits");
        bm.allocate(2, 3).expect("fits");
        let resp = bm
            .apply(StepRequest {
                grow: vec![
                    GrowRequest {
                        seq_id: 1,
                        num_tokens: 3,
                        computed_hashes: block_hashes(&p1, bs),
                    },
                    GrowRequest {
                        seq_id: 2,
                        num_tokens: 3,
                        computed_hashes: block_hashes(&p2, bs),
                    },
                ],
                ..Default::default()
            })
            .expect("valid");
        assert_eq!(resp.preempted, vec![2]);
        // Seq 2 was preempted after its computed block was registered; it can resume from it.
        assert_eq!(
            bm.peek_cached_tokens(&block_hashes(&toks(10..13), bs), 3),
            2
        );
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn apply_validates_before_changing_anything() {
        let mut bm = manager(4, 2, false);
        bm.allocate(1, 2).expect("fits");
        let before = bm.stats();
        let bad = [
            StepRequest {
                grow: vec![grow(7, 1)],
                ..Default::default()
            },
            StepRequest {
                grow: vec![grow(1, 3), grow(1, 3)],
                ..Default::default()
            },
            StepRequest {
                admit: vec![admit(1, 2)],
                ..Default::default()
            },
            StepRequest {
                admit: vec![admit(5, 0)],
                ..Default::default()
            },
            StepRequest {
                free: vec![FreeRequest {
                    seq_id: 1,
                    computed_hashes: vec![],
                }],
                grow: vec![grow(1, 3)],
                ..Default::default()
            },
            StepRequest {
                free: vec![FreeRequest {
                    seq_id: 1,
                    computed_hashes: block_hashes(&toks(0..4), 2),
                }],
                admit: vec![admit(5, 2)],
                ..Default::default()
            },
        ];
        for req in bad {
            assert!(bm.apply(req.clone()).is_err(), "{req:?} must be rejected");
            assert_eq!(bm.stats(), before);
            assert_eq!(bm.block_table(1), Some(&[0][..]));
        }
        // Freeing an unknown sequence is harmless; freeing then re-admitting an id works.
        let resp = bm
            .apply(StepRequest {
                free: vec![
                    FreeRequest {
                        seq_id: 42,
                        computed_hashes: vec![],
                    },
                    FreeRequest {
                        seq_id: 1,
                        computed_hashes: vec![],
                    },
                ],
                admit: vec![admit(1, 3)],
                ..Default::default()
            })
            .expect("valid");
        assert_eq!(resp.admitted.len(), 1);
        bm.check_invariants().expect("consistent");
    }

    #[test]
    fn step_messages_round_trip_through_messagepack() {
        let req = StepRequest {
            free: vec![FreeRequest {
                seq_id: 1,
                computed_hashes: block_hashes(&toks(0..4), 2),
            }],
            grow: vec![grow(2, 17)],
            admit: vec![AdmitRequest {
                seq_id: 3,
                num_tokens: 5,
                num_new_tokens: 5,
                block_hashes: block_hashes(&toks(0..5), 2),
            }],
        };
        let bytes = rmp_serde::to_vec_named(&req).expect("encode");
        let back: StepRequest = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, req);
        let mut bm = manager(8, 2, true);
        bm.allocate(2, 1).expect("fits");
        bm.allocate(1, 4).expect("fits");
        let resp = bm.apply(req).expect("valid");
        let bytes = rmp_serde::to_vec_named(&resp).expect("encode");
        let back: StepResponse = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, resp);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Admit a new sequence whose prompt is drawn from a tiny vocabulary (so prefixes
        /// repeat) with the given planned chunk fraction.
        Admit { prompt: Vec<TokenId>, chunk_pct: u8 },
        /// Append `n` tokens to the `i`-th live sequence and grow its table.
        Append { i: usize, n: usize },
        /// Report newly computed blocks of the `i`-th live sequence.
        Compute { i: usize },
        /// Free the `i`-th live sequence (preempt or finish).
        Free { i: usize },
        /// A batched step over every live sequence (each grows by `n`).
        Step { n: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (prop::collection::vec(0u32..3, 1..24), 1u8..=100)
                .prop_map(|(prompt, chunk_pct)| Op::Admit { prompt, chunk_pct }),
            3 => (any::<usize>(), 1usize..6).prop_map(|(i, n)| Op::Append { i, n }),
            2 => any::<usize>().prop_map(|i| Op::Compute { i }),
            2 => any::<usize>().prop_map(|i| Op::Free { i }),
            2 => (0usize..4).prop_map(|n| Op::Step { n }),
        ]
    }

    /// Test-side model of one live sequence.
    struct Live {
        id: SeqId,
        tokens: Vec<TokenId>,
        computed: usize,
        reported: usize,
    }

    impl Live {
        /// Marks everything the table can hold as computed; returns the newly full hashes.
        fn compute(&mut self, bm: &BlockManager) -> Vec<BlockHash> {
            let bs = bm.block_size();
            let cap = bm.block_table(self.id).map_or(0, <[_]>::len) * bs;
            self.computed = self.computed.max(self.tokens.len().min(cap));
            let hashes = block_hashes(&self.tokens[..self.computed], bs);
            let new = hashes[self.reported.min(hashes.len())..].to_vec();
            self.reported = hashes.len();
            new
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn pool_invariants_hold_under_random_traffic(
            num_blocks in 1usize..24,
            block_size in 1usize..5,
            caching in any::<bool>(),
            ops in prop::collection::vec(op(), 1..120),
        ) {
            let mut bm = manager(num_blocks, block_size, caching);
            let mut live: Vec<Live> = Vec::new();
            let mut next_id: SeqId = 0;
            for op in ops {
                match op {
                    Op::Admit { prompt, chunk_pct } => {
                        next_id += 1;
                        let n = (prompt.len() * chunk_pct as usize).div_ceil(100).max(1);
                        let req = AdmitRequest {
                            seq_id: next_id,
                            num_tokens: prompt.len(),
                            num_new_tokens: n,
                            block_hashes: block_hashes(&prompt, block_size),
                        };
                        let free_before = bm.num_free_blocks();
                        match bm.admit(&req) {
                            Ok(a) => {
                                prop_assert!(a.num_cached_tokens < prompt.len());
                                prop_assert_eq!(a.num_cached_tokens % block_size, 0);
                                prop_assert!(a.block_table.len() * block_size >= a.num_cached_tokens + a.num_new_tokens);
                                // Shared blocks really hold the same prefix.
                                for (k, &b) in a.block_table.iter().take(a.num_cached_tokens / block_size).enumerate() {
                                    prop_assert_eq!(bm.pool().block_hash(b), Some(req.block_hashes[k]));
                                }
                                live.push(Live {
                                    id: next_id,
                                    tokens: prompt,
                                    computed: a.num_cached_tokens,
                                    reported: a.num_cached_tokens / block_size,
                                });
                            }
                            Err(BlockError::OutOfBlocks { .. }) => {
                                prop_assert_eq!(bm.num_free_blocks(), free_before);
                                prop_assert!(!bm.contains(next_id));
                            }
                            Err(e) => prop_assert!(false, "unexpected error {e}"),
                        }
                    }
                    Op::Append { i, n } => {
                        if live.is_empty() { continue; }
                        let k = i % live.len();
                        let l = &mut live[k];
                        let total = l.tokens.len() + n;
                        match bm.append_slots(l.id, total) {
                            Ok(_) => l.tokens.extend((0..n as u32).map(|t| t % 3)),
                            Err(BlockError::OutOfBlocks { .. }) => {}
                            Err(e) => prop_assert!(false, "unexpected error {e}"),
                        }
                    }
                    Op::Compute { i } => {
                        if live.is_empty() { continue; }
                        let k = i % live.len();
                        let l = &mut live[k];
                        let new = l.compute(&bm);
                        bm.cache_blocks(l.id, &new).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                    Op::Free { i } => {
                        if live.is_empty() { continue; }
                        let l = live.remove(i % live.len());
                        prop_assert!(bm.free(l.id));
                    }
                    Op::Step { n } => {
                        let grow: Vec<GrowRequest> = live
                            .iter_mut()
                            .map(|l| {
                                let computed_hashes = l.compute(&bm);
                                l.tokens.extend(std::iter::repeat_n(1, n));
                                GrowRequest { seq_id: l.id, num_tokens: l.tokens.len(), computed_hashes }
                            })
                            .collect();
                        let resp = bm
                            .apply(StepRequest { grow, ..Default::default() })
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(resp.grown.len() + resp.preempted.len(), live.len());
                        // Victims are always the newest sequences.
                        let survivors: Vec<SeqId> = resp.grown.iter().map(|g| g.seq_id).collect();
                        let expect: Vec<SeqId> = live.iter().take(survivors.len()).map(|l| l.id).collect();
                        prop_assert_eq!(survivors, expect);
                        live.truncate(resp.grown.len());
                        for l in &live {
                            let cap = bm.block_table(l.id).map_or(0, <[_]>::len) * block_size;
                            prop_assert!(cap >= l.tokens.len());
                        }
                    }
                }
                bm.check_invariants().map_err(TestCaseError::fail)?;
                prop_assert_eq!(bm.num_seqs(), live.len());
            }
            for l in live.drain(..) {
                prop_assert!(bm.free(l.id));
            }
            bm.check_invariants().map_err(TestCaseError::fail)?;
            prop_assert_eq!(bm.num_free_blocks(), num_blocks);
            prop_assert!(bm.usage() == 0.0);
        }
    }
}

// --- actor ---------------------------------------------------------------------------------

/// The block manager actor: a thin shell that owns the [`BlockManager`]. The scheduler sends
/// it one [`StepRequest`] per engine step.
pub struct BlockManagerActor {
    manager: BlockManager,
}

impl BlockManagerActor {
    pub fn new(manager: BlockManager) -> Self {
        Self { manager }
    }
}

impl actix::Actor for BlockManagerActor {
    type Context = actix::Context<Self>;
}

impl actix::Message for StepRequest {
    type Result = Result<StepResponse, BlockError>;
}

impl actix::Handler<StepRequest> for BlockManagerActor {
    type Result = Result<StepResponse, BlockError>;
    fn handle(&mut self, req: StepRequest, _: &mut Self::Context) -> Self::Result {
        self.manager.apply(req)
    }
}

/// Asks for the pool's statistics, after checking its invariants.
#[derive(Debug, Clone, Copy)]
pub struct InspectPool;

impl actix::Message for InspectPool {
    type Result = Result<BlockStats, String>;
}

impl actix::Handler<InspectPool> for BlockManagerActor {
    type Result = Result<BlockStats, String>;
    fn handle(&mut self, _: InspectPool, _: &mut Self::Context) -> Self::Result {
        self.manager.check_invariants()?;
        Ok(self.manager.stats())
    }
}
