//! The block pool: reference counts, the LRU free queue and the prefix index (see the
//! module docs of [`crate::block_manager`]).

use std::collections::HashMap;

use crate::messages::{BlockError, BlockHash, BlockId};

/// "No block" marker in the free-queue links.
const NIL: u32 = crate::messages::blocks::MAX_BLOCKS as u32;

/// Intrusive doubly linked list of free block ids (see the module docs).
#[derive(Debug, Clone)]
pub(super) struct FreeBlockQueue {
    pub(super) prev: Vec<u32>,
    pub(super) next: Vec<u32>,
    pub(super) linked: Vec<bool>,
    pub(super) head: u32,
    pub(super) tail: u32,
    pub(super) len: usize,
}

impl FreeBlockQueue {
    /// A queue holding every block, in id order.
    pub(super) fn new_full(num_blocks: usize) -> Self {
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

    pub(super) fn contains(&self, id: BlockId) -> bool {
        self.linked.get(id as usize).copied().unwrap_or(false)
    }

    pub(super) fn push_back(&mut self, id: BlockId) {
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

    pub(super) fn remove(&mut self, id: BlockId) {
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

    pub(super) fn pop_front(&mut self) -> Option<BlockId> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.remove(id);
        Some(id)
    }

    /// Walks the list head to tail, checking the links; returns the ids in order.
    pub(super) fn walk(&self) -> Result<Vec<BlockId>, String> {
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
    pub(super) block_size: usize,
    pub(super) ref_cnt: Vec<u32>,
    pub(super) hash: Vec<Option<BlockHash>>,
    pub(super) free: FreeBlockQueue,
    pub(super) index: HashMap<BlockHash, BlockId>,
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
    pub(super) fn take_free(&mut self, n: usize) -> Result<Vec<BlockId>, BlockError> {
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
    pub(super) fn touch(&mut self, block: BlockId) {
        let i = block as usize;
        if self.ref_cnt[i] == 0 {
            self.free.remove(block);
        }
        self.ref_cnt[i] += 1;
    }

    /// Drops a reference; a block reaching 0 goes to the tail of the free queue and keeps
    /// its cached content until it is reused.
    pub(super) fn release(&mut self, block: BlockId) {
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
    pub(super) fn register(&mut self, block: BlockId, hash: BlockHash) {
        let i = block as usize;
        if self.hash[i].is_some() || self.index.contains_key(&hash) {
            return;
        }
        self.hash[i] = Some(hash);
        self.index.insert(hash, block);
    }
}
