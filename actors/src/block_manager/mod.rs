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

use crate::messages::SeqId;

pub use crate::messages::blocks::{
    block_hashes, extend_block_hashes, slot_for, AdmitRequest, Admitted, BlockCopy, BlockError,
    BlockHash, BlockId, BlockManagerConfig, BlockStats, ForkRequest, FreeRequest, GrowRequest,
    Grown, InspectPool, StepRequest, StepResponse, DEFAULT_BLOCK_SIZE, RELEASED_BLOCK,
};

pub use pool::BlockPool;

mod pool;

#[derive(Debug, Clone)]
struct SeqBlocks {
    table: Vec<BlockId>,
    /// Leading blocks of `table` whose hashes were reported (cache hits count as reported).
    num_reported: usize,
    /// Leading entries of `table` given back (sliding window); they hold
    /// [`RELEASED_BLOCK`].
    released: usize,
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
                released: 0,
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
        let before = self
            .seqs
            .get(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?
            .table
            .len();
        self.prepare_write(seq, num_tokens, num_tokens)?;
        Ok(self.seqs.get(&seq).map_or(0, |s| s.table.len() - before))
    }

    /// Makes `seq`'s table ready for a step that writes positions `write_from..num_tokens`:
    /// blocks are appended until `num_tokens` fit, and every block in that range that
    /// other sequences share (a fork's) is replaced by a fresh one, returned as a
    /// [`BlockCopy`] whose K/V the executor copies before the step. All or nothing.
    pub fn prepare_write(
        &mut self,
        seq: SeqId,
        write_from: usize,
        num_tokens: usize,
    ) -> Result<Vec<BlockCopy>, BlockError> {
        let bs = self.block_size();
        let s = self
            .seqs
            .get(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?;
        let need = self.config.blocks_for(num_tokens);
        let append = need.saturating_sub(s.table.len());
        let shared: Vec<usize> = (write_from / bs..need.min(s.table.len()))
            .filter(|&i| s.table[i] != RELEASED_BLOCK && self.pool.ref_count(s.table[i]) > 1)
            .collect();
        if append + shared.len() == 0 {
            return Ok(Vec::new());
        }
        let mut fresh = self.pool.take_free(append + shared.len())?.into_iter();
        let mut copies = Vec::with_capacity(shared.len());
        let Some(s) = self.seqs.get_mut(&seq) else {
            return Err(BlockError::UnknownSequence(seq));
        };
        for (index, dst) in shared.into_iter().zip(fresh.by_ref()) {
            let src = std::mem::replace(&mut s.table[index], dst);
            self.pool.release(src);
            copies.push(BlockCopy { index, src, dst });
        }
        s.table.extend(fresh);
        Ok(copies)
    }

    /// Gives back the blocks of `seq`'s table beyond the first `num_tokens` positions (they
    /// held only draft tokens that were not kept); returns how many.
    pub fn trim(&mut self, seq: SeqId, num_tokens: usize) -> usize {
        let keep = self.config.blocks_for(num_tokens);
        let Some(s) = self.seqs.get_mut(&seq) else {
            return 0;
        };
        if s.table.len() <= keep {
            return 0;
        }
        let gone: Vec<BlockId> = s.table.drain(keep..).collect();
        s.num_reported = s.num_reported.min(keep);
        for &b in gone.iter().rev() {
            if b != RELEASED_BLOCK {
                self.pool.release(b);
            }
        }
        gone.len()
    }

    /// Starts `req.child` as a copy of `req.parent`: its table shares the parent's blocks
    /// that hold the first `req.num_tokens` positions (see [`ForkRequest`]).
    pub fn fork(&mut self, req: &ForkRequest) -> Result<(), BlockError> {
        let parent = self.check_fork(req)?;
        let upto = self.config.blocks_for(req.num_tokens);
        let table = parent.table[..upto].to_vec();
        let released = parent.released.min(upto);
        for &b in &table {
            if b != RELEASED_BLOCK {
                self.pool.touch(b);
            }
        }
        self.seqs.insert(
            req.child,
            SeqBlocks {
                table,
                num_reported: 0,
                released,
            },
        );
        Ok(())
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
                if b != RELEASED_BLOCK {
                    self.pool.register(b, *h);
                }
            }
        }
        s.num_reported += computed_hashes.len();
        Ok(())
    }

    /// Gives back `seq`'s blocks that lie wholly before position `keep_from` (no query of
    /// a sliding-window model reads them again); their table entries become
    /// [`RELEASED_BLOCK`]. Returns how many leading entries are released in all.
    pub fn release_before(&mut self, seq: SeqId, keep_from: usize) -> usize {
        let bs = self.config.block_size;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return 0;
        };
        let upto = (keep_from / bs).min(s.table.len());
        for entry in &mut s.table[s.released.min(upto)..upto] {
            if *entry != RELEASED_BLOCK {
                self.pool.release(*entry);
                *entry = RELEASED_BLOCK;
            }
        }
        s.released = s.released.max(upto);
        s.released
    }

    /// Releases `seq`'s blocks (last block first, so a sequence's tail is evicted before
    /// its more shareable head). Returns whether the sequence was known.
    pub fn free(&mut self, seq: SeqId) -> bool {
        let Some(s) = self.seqs.remove(&seq) else {
            return false;
        };
        for &b in s.table.iter().rev() {
            if b != RELEASED_BLOCK {
                self.pool.release(b);
            }
        }
        true
    }

    /// Serves one engine step. The rules, in order:
    ///
    /// 1. The request is validated as a whole; an invalid one changes nothing.
    /// 2. `fork`: each child gets a table sharing its parent's blocks (before the frees, so
    ///    a parent that finished in the step that completed its prompt still has them).
    /// 3. `free`: hashes are registered, then the blocks are released. Unknown sequences
    ///    are ignored, so a free may safely be sent twice.
    /// 4. The `computed_hashes` of every grow entry are registered, and blocks a table holds
    ///    beyond the entry's `num_tokens` are given back (`Grown.trimmed`).
    /// 5. `grow`, front to back: each entry gets the blocks it needs, including private
    ///    copies of the shared blocks it writes (copy on write, see
    ///    [`Self::prepare_write`]). When the pool cannot serve an entry, the entry at the
    ///    *back* of the list that is still live is preempted (its blocks are freed) and the
    ///    attempt is repeated; when the entry that needs the blocks is itself the last live
    ///    one, it is preempted and growth ends.
    /// 6. `admit`, only when nothing was preempted in this step: front to back, each entry is
    ///    admitted with its prefix-cache hits; the first one that does not fit ends
    ///    admission (FIFO: later ones never overtake it).
    pub fn apply(&mut self, req: StepRequest) -> Result<StepResponse, BlockError> {
        self.validate(&req)?;

        for f in &req.fork {
            // Validated: the parent is known, the child is not.
            self.fork(f)?;
        }
        for f in &req.free {
            // Validated: the sequence is unknown or the hashes fit.
            if self.seqs.contains_key(&f.seq_id) {
                self.cache_blocks(f.seq_id, &f.computed_hashes)?;
                self.free(f.seq_id);
            }
        }
        let mut trimmed: HashMap<SeqId, usize> = HashMap::new();
        for g in &req.grow {
            self.cache_blocks(g.seq_id, &g.computed_hashes)?;
            // Before any growth, so that rejected drafts' blocks make room.
            let n = self.trim(g.seq_id, g.num_tokens);
            if n > 0 {
                trimmed.insert(g.seq_id, n);
            }
            // Before any growth, so the window's old blocks make room.
            if self.config.sliding_window.is_some() && g.keep_from > 0 {
                self.release_before(g.seq_id, g.keep_from);
            }
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
                match self.prepare_write(g.seq_id, g.write_from, g.num_tokens) {
                    Ok(copied) => {
                        let new_blocks = self
                            .seqs
                            .get(&g.seq_id)
                            .map(|s| s.table[before..].to_vec())
                            .unwrap_or_default();
                        let released = self.seqs.get(&g.seq_id).map_or(0, |s| s.released);
                        grown.push(Grown {
                            seq_id: g.seq_id,
                            new_blocks,
                            released,
                            copied,
                            trimmed: trimmed.get(&g.seq_id).copied().unwrap_or(0),
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

    /// A fork's parent, when the fork can be made: the parent is known, the child is not,
    /// and the parent's table holds the forked positions.
    fn check_fork(&self, req: &ForkRequest) -> Result<&SeqBlocks, BlockError> {
        if self.seqs.contains_key(&req.child) {
            return Err(BlockError::DuplicateSequence(req.child));
        }
        let parent = self
            .seqs
            .get(&req.parent)
            .ok_or(BlockError::UnknownSequence(req.parent))?;
        if self.config.blocks_for(req.num_tokens) > parent.table.len() {
            return Err(BlockError::InvalidRequest(format!(
                "fork of sequence {} for {} tokens: its table holds {} blocks",
                req.parent,
                req.num_tokens,
                parent.table.len()
            )));
        }
        Ok(parent)
    }

    fn validate(&self, req: &StepRequest) -> Result<(), BlockError> {
        let mut forked = HashSet::with_capacity(req.fork.len());
        for f in &req.fork {
            self.check_fork(f)?;
            if !forked.insert(f.child) {
                return Err(BlockError::DuplicateSequence(f.child));
            }
        }
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
            if forked.contains(&g.seq_id) {
                // Its table is the parent's first blocks; hashes are reported from 0.
                if g.computed_hashes.len() > g.num_tokens.div_ceil(self.block_size()) {
                    return Err(BlockError::InvalidRequest(format!(
                        "sequence {}: {} block hashes reported by a fork",
                        g.seq_id,
                        g.computed_hashes.len()
                    )));
                }
                continue;
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
            for (j, &b) in s.table.iter().enumerate() {
                if (b == RELEASED_BLOCK) != (j < s.released) {
                    return Err(format!(
                        "sequence {seq}: entry {j} is {b}, but {} leading entries are released",
                        s.released
                    ));
                }
                if b == RELEASED_BLOCK {
                    continue;
                }
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
        let table_refs: u64 = self
            .seqs
            .values()
            .map(|s| s.table.iter().filter(|&&b| b != RELEASED_BLOCK).count() as u64)
            .sum();
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
mod tests;

// --- actor ---------------------------------------------------------------------------------

/// The block manager actor: a thin shell that owns the [`BlockManager`]. The scheduler sends
/// it one [`StepRequest`] per engine step.
pub struct BlockManagerActor {
    manager: BlockManager,
    guard: crate::supervisor::LifeGuard,
}

impl BlockManagerActor {
    pub fn new(manager: BlockManager, guard: crate::supervisor::LifeGuard) -> Self {
        Self { manager, guard }
    }
}

impl actix::Actor for BlockManagerActor {
    type Context = actix::Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.guard.watch_this_thread();
    }
}

impl actix::Handler<StepRequest> for BlockManagerActor {
    type Result = Result<StepResponse, BlockError>;
    fn handle(&mut self, req: StepRequest, _: &mut Self::Context) -> Self::Result {
        crate::fault::panic_if_armed("block_manager", req.admit.iter().map(|a| a.seq_id));
        self.manager.apply(req)
    }
}

impl actix::Handler<InspectPool> for BlockManagerActor {
    type Result = Result<BlockStats, String>;
    fn handle(&mut self, _: InspectPool, _: &mut Self::Context) -> Self::Result {
        self.manager.check_invariants()?;
        Ok(self.manager.stats())
    }
}
