use super::pool::FreeBlockQueue;
use super::*;
use crate::messages::TokenId;
use proptest::prelude::*;

fn manager(num_blocks: usize, block_size: usize, caching: bool) -> BlockManager {
    BlockManager::new(BlockManagerConfig::new(num_blocks, block_size, caching))
        .expect("valid config")
}

fn toks(range: std::ops::Range<u32>) -> Vec<TokenId> {
    range.collect()
}

/// Growth to `num_tokens` tokens by a step that writes the last one.
fn grow(seq_id: SeqId, num_tokens: usize) -> GrowRequest {
    GrowRequest {
        seq_id,
        num_tokens,
        computed_hashes: Vec::new(),
        keep_from: 0,
        write_from: num_tokens.saturating_sub(1),
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
            ..StepRequest::default()
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
            ..StepRequest::default()
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
                    computed_hashes: block_hashes(&p1, bs),
                    ..grow(1, 3)
                },
                GrowRequest {
                    computed_hashes: block_hashes(&p2, bs),
                    ..grow(2, 3)
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
        fork: vec![],
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
                            GrowRequest { computed_hashes, ..grow(l.id, l.tokens.len()) }
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

#[test]
fn a_sliding_window_gives_old_blocks_back() {
    let cfg = BlockManagerConfig::new(6, 4, true).with_sliding_window(Some(8));
    // Without the window a 40-token sequence needs 10 blocks; with it, never more than
    // the window and a step.
    assert_eq!(cfg.tokens_held(40, 4), 8 + 4 + 8);
    let mut bm = BlockManager::new(cfg).expect("valid config");
    let resp = bm
        .apply(StepRequest {
            admit: vec![admit(1, 12)],
            ..StepRequest::default()
        })
        .expect("admit");
    assert_eq!(resp.admitted[0].block_table.len(), 3);
    // Step after step, one token at a time: positions before (computed + 1 − 8) go back.
    for computed in 12..40 {
        let keep_from = (computed + 1usize).saturating_sub(8);
        let resp = bm
            .apply(StepRequest {
                grow: vec![GrowRequest {
                    keep_from,
                    ..grow(1, computed + 1)
                }],
                ..StepRequest::default()
            })
            .expect("grow");
        assert!(resp.preempted.is_empty(), "step {computed}: {resp:?}");
        let table = bm.block_table(1).expect("table");
        let released = resp.grown[0].released;
        assert_eq!(released, keep_from / 4, "step {computed}");
        assert!(table[..released].iter().all(|&b| b == RELEASED_BLOCK));
        assert!(table[released..].iter().all(|&b| b != RELEASED_BLOCK));
        assert!(table.len() - released <= 4, "step {computed}: {table:?}");
        bm.check_invariants().expect("invariants");
    }
    // Growing again does not release anything twice; freeing gives back the rest.
    let again = bm
        .apply(StepRequest {
            grow: vec![GrowRequest {
                keep_from: 33,
                ..grow(1, 40)
            }],
            ..StepRequest::default()
        })
        .expect("grow");
    assert_eq!(again.grown[0].released, 8);
    bm.check_invariants().expect("invariants");
    assert!(bm.free(1));
    bm.check_invariants().expect("invariants");
    assert_eq!(bm.num_free_blocks(), 6);
}

#[test]
fn without_a_window_keep_from_releases_nothing() {
    let mut bm = manager(8, 4, true);
    bm.apply(StepRequest {
        admit: vec![admit(1, 12)],
        ..StepRequest::default()
    })
    .expect("admit");
    let resp = bm
        .apply(StepRequest {
            grow: vec![GrowRequest {
                keep_from: 9,
                ..grow(1, 13)
            }],
            ..StepRequest::default()
        })
        .expect("grow");
    assert_eq!(resp.grown[0].released, 0);
    assert!(bm
        .block_table(1)
        .expect("table")
        .iter()
        .all(|&b| b != RELEASED_BLOCK));
}

#[test]
fn a_fork_shares_blocks_and_copies_the_one_it_writes() {
    let mut bm = manager(8, 4, false);
    // The parent computed a 6-token prompt: blocks [a, b], b half full.
    bm.apply(StepRequest {
        admit: vec![admit(1, 6)],
        ..StepRequest::default()
    })
    .expect("admit");
    let parent = bm.block_table(1).expect("table").to_vec();
    assert_eq!(parent.len(), 2);
    // Two forks, then each writes: the parent position 6, the forks position 5 again.
    let resp = bm
        .apply(StepRequest {
            fork: vec![
                ForkRequest {
                    parent: 1,
                    child: 2,
                    num_tokens: 6,
                },
                ForkRequest {
                    parent: 1,
                    child: 3,
                    num_tokens: 6,
                },
            ],
            grow: vec![
                GrowRequest {
                    write_from: 6,
                    ..grow(1, 7)
                },
                GrowRequest {
                    write_from: 5,
                    ..grow(2, 6)
                },
                GrowRequest {
                    write_from: 5,
                    ..grow(3, 6)
                },
            ],
            ..StepRequest::default()
        })
        .expect("fork and grow");
    bm.check_invariants().expect("invariants");
    // The first block stays shared by all three; the second is copied for the first two
    // writers, the last writer keeps the original.
    let (t1, t2, t3) = (
        bm.block_table(1).expect("1").to_vec(),
        bm.block_table(2).expect("2").to_vec(),
        bm.block_table(3).expect("3").to_vec(),
    );
    assert!(t1[0] == parent[0] && t2[0] == parent[0] && t3[0] == parent[0]);
    assert_eq!(bm.pool().ref_count(parent[0]), 3);
    let copies: Vec<BlockCopy> = resp.grown.iter().flat_map(|g| g.copied.clone()).collect();
    assert_eq!(copies.len(), 2, "{resp:?}");
    assert!(copies.iter().all(|c| c.index == 1 && c.src == parent[1]));
    assert_eq!(t3[1], parent[1]);
    assert_ne!(t1[1], t2[1]);
    assert!(t1[1] != parent[1] && t2[1] != parent[1]);
    assert_eq!(resp.grown[0].copied[0].dst, t1[1]);
    assert_eq!(resp.grown[1].copied[0].dst, t2[1]);
    for b in [t1[1], t2[1], t3[1]] {
        assert_eq!(bm.pool().ref_count(b), 1);
    }
    // Nothing is shared any more where they write: the next step copies nothing.
    let resp = bm
        .apply(StepRequest {
            grow: vec![grow(1, 8), grow(2, 7), grow(3, 7)],
            ..StepRequest::default()
        })
        .expect("grow");
    assert!(resp.grown.iter().all(|g| g.copied.is_empty()));
    for id in [1, 2, 3] {
        assert!(bm.free(id));
        bm.check_invariants().expect("invariants");
    }
    assert_eq!(bm.num_free_blocks(), 8);
}

#[test]
fn a_fork_comes_before_the_parents_free_and_a_bad_fork_changes_nothing() {
    let mut bm = manager(4, 4, true);
    bm.apply(StepRequest {
        admit: vec![admit(1, 8)],
        ..StepRequest::default()
    })
    .expect("admit");
    let parent = bm.block_table(1).expect("table").to_vec();
    let fork = |child| ForkRequest {
        parent: 1,
        child,
        num_tokens: 8,
    };
    // Unknown parent, a child that exists, more tokens than the parent holds: refused.
    for bad in [
        ForkRequest {
            parent: 9,
            ..fork(2)
        },
        ForkRequest {
            child: 1,
            ..fork(2)
        },
        ForkRequest {
            num_tokens: 9,
            ..fork(2)
        },
    ] {
        assert!(bm
            .apply(StepRequest {
                fork: vec![bad],
                ..StepRequest::default()
            })
            .is_err());
        bm.check_invariants().expect("unchanged");
        assert!(!bm.contains(2));
    }
    // The parent finished in the step that computed its prompt: fork, then free.
    let resp = bm
        .apply(StepRequest {
            fork: vec![fork(2)],
            free: vec![FreeRequest {
                seq_id: 1,
                computed_hashes: Vec::new(),
            }],
            grow: vec![GrowRequest {
                write_from: 7,
                ..grow(2, 8)
            }],
            ..StepRequest::default()
        })
        .expect("fork, free, grow");
    bm.check_invariants().expect("invariants");
    // The fork is the only holder left: it writes in place, nothing is copied.
    assert!(resp.grown[0].copied.is_empty());
    assert_eq!(bm.block_table(2), Some(parent.as_slice()));
    assert!(bm.free(2));
    assert_eq!(bm.num_free_blocks(), 4);
}

#[test]
fn a_copy_that_does_not_fit_preempts_like_growth() {
    let mut bm = manager(3, 4, false);
    bm.apply(StepRequest {
        admit: vec![admit(1, 6), admit(9, 4)],
        ..StepRequest::default()
    })
    .expect("admit");
    assert_eq!(bm.num_free_blocks(), 0);
    // The fork needs a copy of the shared block and there is none: the newest entry
    // (the fork itself) is preempted, the parent writes in place.
    let resp = bm
        .apply(StepRequest {
            fork: vec![ForkRequest {
                parent: 1,
                child: 2,
                num_tokens: 6,
            }],
            grow: vec![
                GrowRequest {
                    write_from: 6,
                    ..grow(1, 7)
                },
                GrowRequest {
                    write_from: 5,
                    ..grow(2, 6)
                },
            ],
            ..StepRequest::default()
        })
        .expect("apply");
    bm.check_invariants().expect("invariants");
    assert_eq!(resp.preempted, vec![2]);
    assert!(resp.grown[0].copied.is_empty());
    assert!(!bm.contains(2));
}
