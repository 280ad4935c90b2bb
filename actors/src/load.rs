//! The engine's load, published by the scheduler after every change and read without a
//! message round trip: by the tokenizer (refuse early while the waiting queue is full), by
//! the NATS front door (`$SRV.STATS`, the JetStream intake's capacity check) and by an
//! engine process's announcements to its frontends.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::messages::SchedulerStats;

/// Shared counters; one per engine.
#[derive(Debug, Default)]
pub struct EngineLoad {
    running: AtomicUsize,
    waiting: AtomicUsize,
    free_blocks: AtomicUsize,
    num_blocks: AtomicUsize,
    engines: AtomicUsize,
}

/// A copy of [`EngineLoad`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSnapshot {
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_free_blocks: usize,
    pub num_blocks: usize,
    /// Engines behind these numbers (1 for an engine; the live engines for a frontend).
    pub num_engines: usize,
}

impl EngineLoad {
    /// A pool of `num_blocks` blocks, all free, nothing queued.
    pub fn new(num_blocks: usize) -> Self {
        Self {
            free_blocks: AtomicUsize::new(num_blocks),
            num_blocks: AtomicUsize::new(num_blocks),
            engines: AtomicUsize::new(1),
            ..Self::default()
        }
    }

    /// Replaces every counter (a frontend publishing what its engines announced).
    pub fn set(&self, s: &LoadSnapshot) {
        self.running.store(s.num_running, Ordering::Relaxed);
        self.waiting.store(s.num_waiting, Ordering::Relaxed);
        self.free_blocks.store(s.num_free_blocks, Ordering::Relaxed);
        self.num_blocks.store(s.num_blocks, Ordering::Relaxed);
        self.engines.store(s.num_engines, Ordering::Relaxed);
    }

    pub fn store(&self, stats: &SchedulerStats) {
        self.running.store(stats.num_running, Ordering::Relaxed);
        self.waiting.store(stats.num_waiting, Ordering::Relaxed);
        self.free_blocks
            .store(stats.num_free_blocks, Ordering::Relaxed);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> LoadSnapshot {
        LoadSnapshot {
            num_running: self.running.load(Ordering::Relaxed),
            num_waiting: self.waiting.load(Ordering::Relaxed),
            num_free_blocks: self.free_blocks.load(Ordering::Relaxed),
            num_blocks: self.num_blocks.load(Ordering::Relaxed),
            num_engines: self.engines.load(Ordering::Relaxed),
        }
    }
}

impl LoadSnapshot {
    /// Fraction of the KV pool in use, in [0, 1].
    pub fn kv_usage(&self) -> f64 {
        if self.num_blocks == 0 {
            return 0.0;
        }
        1.0 - self.num_free_blocks as f64 / self.num_blocks as f64
    }
}
