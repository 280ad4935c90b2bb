use super::*;
use crate::messages::SampledToken;
use crate::scheduler::speculation::{Drafts, NgramProposer, PLACEHOLDER};
use proptest::prelude::*;

const EOS: TokenId = 0;
/// A token that never ends anything.
const TOK: TokenId = 7;

struct Engine {
    sched: SchedulerPolicy,
    bm: BlockManager,
}

impl Engine {
    fn new(cfg: SchedulerLimits, num_blocks: usize, block_size: usize, caching: bool) -> Self {
        let cache = BlockManagerConfig::new(num_blocks, block_size, caching);
        Self {
            sched: SchedulerPolicy::new(cfg, cache.clone(), vec![EOS]).expect("valid config"),
            bm: BlockManager::new(cache).expect("valid config"),
        }
    }

    fn simple(max_num_seqs: usize, budget: usize, num_blocks: usize, block_size: usize) -> Self {
        let cfg = SchedulerLimits {
            max_num_seqs,
            max_num_batched_tokens: budget,
            max_model_len: 4096,
        };
        Self::new(cfg, num_blocks, block_size, true)
    }

    fn add(&mut self, id: SeqId, prompt: Vec<TokenId>, max_tokens: u32) {
        let params = SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        };
        self.sched.add(id, prompt, params).expect("accepted");
    }

    /// One full step; `sample` picks each sampled token.
    fn step_with(
        &mut self,
        mut sample: impl FnMut(&ScheduledSeq) -> TokenId,
    ) -> (ScheduledBatch, Vec<SeqOutput>) {
        self.step_verifying(|s| (0, sample(s)))
    }

    /// One full step in which `verify` says, per sampling sequence, how many of its drafts
    /// the "executor" kept and which token it sampled after them.
    fn step_verifying(
        &mut self,
        mut verify: impl FnMut(&ScheduledSeq) -> (usize, TokenId),
    ) -> (ScheduledBatch, Vec<SeqOutput>) {
        let batch = self.sched.schedule(&mut self.bm).expect("schedule");
        self.check(&batch);
        if batch.is_empty() {
            return (batch, Vec::new());
        }
        let sampled = batch
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| {
                let (kept, token) = verify(s);
                let drafts = &s.token_ids[s.token_ids.len() - s.num_draft..];
                let mut t = SampledToken::new(s.seq_id, token);
                t.accepted = drafts[..kept.min(drafts.len())].to_vec();
                t
            })
            .collect();
        let outs = self
            .sched
            .update(&StepOutput {
                sampled,
                failed: Vec::new(),
            })
            .expect("update");
        (batch, outs)
    }

    fn step(&mut self) -> (ScheduledBatch, Vec<SeqOutput>) {
        self.step_with(|_| TOK)
    }

    /// Consistency of a batch with the policy and the block manager.
    fn check(&self, batch: &ScheduledBatch) {
        self.bm.check_invariants().expect("block invariants");
        let cfg = self.sched.limits();
        assert!(batch.num_batched_tokens <= cfg.max_num_batched_tokens);
        assert!(batch.seqs.len() <= cfg.max_num_seqs);
        assert!(self.sched.num_running() <= cfg.max_num_seqs);
        assert_eq!(
            batch.num_batched_tokens,
            batch.seqs.iter().map(|s| s.token_ids.len()).sum::<usize>()
        );
        for s in &batch.seqs {
            assert!(!s.token_ids.is_empty());
            assert_eq!(s.context_len, s.start_pos + s.token_ids.len());
            let bs = self.bm.block_size();
            assert!(
                s.block_table.len() * bs >= s.context_len,
                "table too short for {s:?}"
            );
            assert_eq!(
                self.bm.block_table(s.seq_id),
                Some(s.block_table.as_slice())
            );
        }
        for &id in self.sched.running() {
            let view = self.sched.sequence(id).expect("running sequence exists");
            assert_eq!(
                self.bm.block_table(id),
                Some(view.block_table),
                "mirror table of {id}"
            );
        }
    }

    fn drain_frees(&mut self) {
        self.sched.flush_frees(&mut self.bm).expect("flush");
        self.bm.check_invariants().expect("block invariants");
    }
}

fn empty_response(bm: &BlockManager) -> StepResponse {
    StepResponse {
        grown: vec![],
        preempted: vec![],
        admitted: vec![],
        stats: bm.stats(),
    }
}

#[test]
fn config_and_request_validation() {
    let cache = BlockManagerConfig::new(4, 4, true);
    let zero = SchedulerLimits {
        max_num_seqs: 0,
        ..SchedulerLimits::default()
    };
    assert!(matches!(
        SchedulerPolicy::new(zero, cache.clone(), vec![]),
        Err(SchedulerError::InvalidConfig(_))
    ));
    let cfg = SchedulerLimits {
        max_num_seqs: 4,
        max_num_batched_tokens: 8,
        max_model_len: 12,
    };
    let mut s = SchedulerPolicy::new(cfg, cache, vec![EOS]).expect("valid");
    let p = |max_tokens, min_tokens| SamplingParams {
        max_tokens,
        min_tokens,
        ..SamplingParams::default()
    };
    assert_eq!(
        s.add(1, vec![], p(1, 0)),
        Err(SchedulerError::EmptyPrompt(1))
    );
    assert!(matches!(
        s.add(1, vec![1], p(0, 0)),
        Err(SchedulerError::InvalidParams { .. })
    ));
    assert!(matches!(
        s.add(1, vec![1], p(2, 3)),
        Err(SchedulerError::InvalidParams { .. })
    ));
    assert!(matches!(
        s.add(1, vec![1; 10], p(3, 0)),
        Err(SchedulerError::ExceedsModelLen { .. })
    ));
    s.add(1, vec![1; 10], p(2, 0))
        .expect("exactly max_model_len");
    assert_eq!(
        s.add(1, vec![1], p(1, 0)),
        Err(SchedulerError::DuplicateSequence(1))
    );

    // KV capacity (16 tokens) below max_model_len.
    let cfg = SchedulerLimits {
        max_num_seqs: 4,
        max_num_batched_tokens: 8,
        max_model_len: 100,
    };
    let mut s =
        SchedulerPolicy::new(cfg, BlockManagerConfig::new(4, 4, true), vec![EOS]).expect("valid");
    assert!(matches!(
        s.add(2, vec![1; 10], p(7, 0)),
        Err(SchedulerError::ExceedsKvCapacity { .. })
    ));
    s.add(2, vec![1; 10], p(6, 0)).expect("fits exactly");
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn prefill_then_decode_only_batches() {
    let mut e = Engine::simple(8, 64, 32, 4);
    e.add(1, vec![1, 2, 3, 4, 5], 4);
    e.add(2, vec![9, 9, 9], 4);
    let (b, outs) = e.step();
    assert_eq!(b.step, 1);
    assert_eq!(b.seqs.len(), 2);
    assert_eq!(b.seqs[0].token_ids, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        (b.seqs[0].start_pos, b.seqs[0].context_len, b.seqs[0].sample),
        (0, 5, true)
    );
    assert!(b.seqs[0].new_seq.is_some());
    assert_eq!(outs.len(), 2);
    for i in 0..3 {
        let (b, outs) = e.step();
        assert_eq!(b.num_batched_tokens, 2, "decode: one token per sequence");
        let s1 = &b.seqs[0];
        assert_eq!(
            (s1.seq_id, s1.token_ids.clone(), s1.start_pos),
            (1, vec![TOK], 5 + i)
        );
        assert!(s1.sample && s1.new_seq.is_none());
        assert_eq!(outs.len(), 2);
    }
    // max_tokens = 4 reached by both on the fourth token.
    let v = e.sched.sequence(1);
    assert!(v.is_none(), "finished sequences leave the policy");
    assert!(!e.sched.has_unfinished());
    assert!(e.sched.has_pending_frees());
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 32);
}

#[test]
fn token_budget_is_respected_and_prompts_are_chunked() {
    let mut e = Engine::simple(8, 10, 64, 4);
    for id in 1..=4 {
        e.add(id, vec![id as TokenId; 7], 3);
    }
    let (b, _) = e.step();
    // 7 + 3 (chunk of the second prompt).
    assert_eq!(b.num_batched_tokens, 10);
    assert_eq!(b.seqs.len(), 2);
    assert_eq!((b.seqs[1].token_ids.len(), b.seqs[1].sample), (3, false));
    let (b, _) = e.step();
    // Decode of seq 1 (1) + rest of seq 2 (4) + chunk of seq 3 (5).
    let per: Vec<(SeqId, usize)> = b
        .seqs
        .iter()
        .map(|s| (s.seq_id, s.token_ids.len()))
        .collect();
    assert_eq!(per, vec![(1, 1), (2, 4), (3, 5)]);
    assert_eq!(b.seqs[1].start_pos, 3);
    let mut steps = 2;
    while e.sched.has_unfinished() {
        let (b, _) = e.step();
        assert!(b.num_batched_tokens <= 10);
        steps += 1;
        assert!(steps < 50);
    }
}

#[test]
fn max_num_seqs_is_respected() {
    let mut e = Engine::simple(2, 100, 64, 4);
    for id in 1..=5 {
        e.add(id, vec![1, 2], 3);
    }
    let (b, _) = e.step();
    assert_eq!(b.seqs.len(), 2);
    assert_eq!((e.sched.num_running(), e.sched.num_waiting()), (2, 3));
    let mut finished = Vec::new();
    while e.sched.has_unfinished() {
        let (b, outs) = e.step();
        assert!(b.seqs.len() <= 2);
        finished.extend(
            outs.iter()
                .filter(|o| o.finish_reason.is_some())
                .map(|o| o.seq_id),
        );
    }
    finished.sort_unstable();
    assert_eq!(finished, vec![1, 2, 3, 4, 5]);
}

#[test]
fn long_prompt_is_prefilled_in_chunks() {
    let mut e = Engine::simple(4, 16, 64, 4);
    let prompt: Vec<TokenId> = (1..=40).collect();
    e.add(1, prompt.clone(), 2);
    let mut seen = Vec::new();
    for (i, (start, len, sample)) in [(0, 16, false), (16, 16, false), (32, 8, true)]
        .into_iter()
        .enumerate()
    {
        let (b, outs) = e.step();
        let s = &b.seqs[0];
        assert_eq!(
            (s.start_pos, s.token_ids.len(), s.sample),
            (start, len, sample)
        );
        assert_eq!(s.new_seq.is_some(), i == 0);
        assert_eq!(outs.len(), usize::from(sample));
        seen.extend_from_slice(&s.token_ids);
    }
    assert_eq!(seen, prompt);
    let (b, outs) = e.step();
    assert_eq!(
        (b.seqs[0].start_pos, b.seqs[0].token_ids.clone()),
        (40, vec![TOK])
    );
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Length));
}

#[test]
fn new_arrivals_join_the_running_batch() {
    let mut e = Engine::simple(8, 64, 64, 4);
    e.add(1, vec![1, 2, 3], 10);
    e.step();
    e.step();
    e.add(2, vec![4, 5, 6, 7], 10);
    let (b, _) = e.step();
    let per: Vec<(SeqId, usize, usize)> = b
        .seqs
        .iter()
        .map(|s| (s.seq_id, s.start_pos, s.token_ids.len()))
        .collect();
    assert_eq!(per, vec![(1, 4, 1), (2, 0, 4)]);
    let (b, _) = e.step();
    assert_eq!(b.num_batched_tokens, 2);
}

#[test]
fn pool_exhaustion_preempts_the_newest_and_recomputes_later() {
    // 4 blocks of 2 tokens. Two sequences with 3-token prompts hold 2 blocks each;
    // on the first decode step that needs a fifth block, the newer one is preempted.
    let mut e = Engine::simple(4, 64, 4, 2);
    e.add(1, vec![1, 2, 3], 4);
    e.add(2, vec![4, 5, 6], 4);
    e.step(); // prefill both; each has 4 tokens now, tables of 2 blocks hold them.
    assert_eq!(e.bm.num_free_blocks(), 0);
    let (b, _) = e.step_with(|s| if s.seq_id == 1 { 11 } else { 21 });
    // Seq 1 fits its decode in its own blocks.
    assert_eq!(
        b.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let (b, _) = e.step_with(|s| if s.seq_id == 1 { 12 } else { 22 });
    // Both need a third block for token 5; only seq 1 keeps running.
    assert_eq!(b.preempted_seq_ids, vec![2]);
    assert_eq!(b.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(e.sched.num_preemptions(), 1);
    assert_eq!(e.sched.stats().num_preemptions, 1);
    let v = e.sched.sequence(2).expect("still live");
    assert_eq!(
        (v.status, v.num_computed_tokens, v.num_preemptions),
        (SeqStatus::Waiting, 0, 1)
    );
    assert_eq!(v.output_token_ids, &[TOK, 21]);
    assert_eq!(e.sched.waiting().next(), Some(2));

    // Run seq 1 to completion; then seq 2 recomputes prompt + generated tokens.
    while e.sched.sequence(1).is_some() {
        let (b, _) = e.step();
        assert!(b.seqs.iter().all(|s| s.seq_id == 1));
    }
    let (b, outs) = e.step();
    let s = &b.seqs[0];
    assert_eq!(s.seq_id, 2);
    // The prefix cache still holds the first block of seq 2's prompt.
    let hit = s.start_pos;
    assert_eq!(hit, 2);
    assert_eq!(s.token_ids, vec![6, TOK, 21][..].to_vec());
    let nd = s
        .new_seq
        .as_ref()
        .expect("re-admission carries the history");
    assert_eq!(
        (nd.prompt_token_ids.clone(), nd.output_token_ids.clone()),
        (vec![4, 5, 6], vec![TOK, 21])
    );
    assert!(s.sample);
    assert_eq!(outs[0].num_output_tokens, 3);
    while e.sched.has_unfinished() {
        e.step();
    }
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 4);
}

#[test]
fn preempted_sequence_without_prefix_cache_recomputes_everything() {
    let cfg = SchedulerLimits {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        max_model_len: 64,
    };
    let mut e = Engine::new(cfg, 4, 2, false);
    e.add(1, vec![1, 2, 3], 4);
    e.add(2, vec![4, 5, 6], 4);
    e.step();
    e.step();
    let (b, _) = e.step();
    assert_eq!(b.preempted_seq_ids, vec![2]);
    while e.sched.sequence(1).is_some() {
        e.step();
    }
    let (b, _) = e.step();
    assert_eq!(
        (b.seqs[0].start_pos, b.seqs[0].token_ids.clone()),
        (0, vec![4, 5, 6, TOK, TOK])
    );
}

#[test]
fn the_newest_sequence_preempts_itself() {
    // 4 blocks of 2. Seq 1 holds 2 blocks, seq 2 one; on step 3 seq 1 takes the last
    // free block and seq 2, the newest, needs one more: it preempts itself.
    let mut e = Engine::simple(4, 64, 4, 2);
    e.add(1, vec![1, 2, 3], 3);
    e.add(2, vec![4], 4);
    e.step();
    e.step();
    assert_eq!(e.bm.num_free_blocks(), 1);
    let (b, _) = e.step();
    assert_eq!(b.preempted_seq_ids, vec![2]);
    assert_eq!(b.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(e.sched.num_preemptions(), 1);
    let mut n = 0;
    while e.sched.has_unfinished() {
        e.step();
        n += 1;
        assert!(n < 100);
    }
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 4);
}

#[test]
fn finished_sequences_free_their_blocks_with_the_next_request() {
    let mut e = Engine::simple(4, 64, 8, 4);
    e.add(1, vec![1, 2, 3, 4, 5], 1);
    e.add(2, vec![1, 2, 3], 3);
    let (_, outs) = e.step();
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(outs[1].finish_reason, None);
    assert_eq!(e.sched.running(), &[2]);
    // Seq 1's free rides on the next step's single request.
    let used_before = e.bm.num_blocks() - e.bm.num_free_blocks();
    assert_eq!(used_before, 3);
    let (b, _) = e.step();
    assert_eq!(b.finished_seq_ids, vec![1]);
    assert!(!e.bm.contains(1));
    assert_eq!(e.bm.num_free_blocks(), 8 - 1);
    // Or immediately, e.g. when the engine goes idle.
    e.step();
    assert!(!e.sched.has_unfinished());
    assert!(e.sched.has_work(), "the pending free is still work");
    e.drain_frees();
    assert!(!e.sched.has_work());
    assert_eq!(e.bm.num_free_blocks(), 8);
    assert_eq!(e.sched.stats().num_free_blocks, 8);
    assert_eq!(e.sched.kv_cache_usage(), 0.0);
}

fn run_one(params: SamplingParams, tokens: &[TokenId]) -> (Vec<TokenId>, Option<FinishReason>) {
    let mut e = Engine::simple(4, 64, 16, 4);
    e.sched.add(1, vec![3, 3, 3], params).expect("accepted");
    let mut out = Vec::new();
    let mut it = tokens.iter().copied();
    while e.sched.has_unfinished() {
        let (_, outs) = e.step_with(|_| it.next().unwrap_or(TOK));
        for o in outs {
            out.push(o.token_id);
            if o.finish_reason.is_some() {
                return (out, o.finish_reason);
            }
        }
    }
    (out, None)
}

#[test]
fn eos_stops_unless_ignored() {
    let p = SamplingParams {
        max_tokens: 10,
        ..SamplingParams::default()
    };
    assert_eq!(
        run_one(p.clone(), &[5, 6, EOS, 8]),
        (vec![5, 6, EOS], Some(FinishReason::Stop))
    );
    let ignore = SamplingParams {
        ignore_eos: true,
        max_tokens: 5,
        ..p.clone()
    };
    assert_eq!(
        run_one(ignore, &[EOS, EOS, 1]),
        (vec![EOS, EOS, 1, TOK, TOK], Some(FinishReason::Length))
    );
}

#[test]
fn min_tokens_defers_eos_and_stop_tokens() {
    let p = SamplingParams {
        max_tokens: 10,
        min_tokens: 2,
        stop_token_ids: vec![42],
        ..SamplingParams::default()
    };
    // EOS as 1st and 2nd token is ignored (fewer than 2 generated before it); as 3rd it stops.
    assert_eq!(
        run_one(p.clone(), &[EOS, 42, EOS]),
        (vec![EOS, 42, EOS], Some(FinishReason::Stop))
    );
    assert_eq!(
        run_one(p, &[1, 2, 42]),
        (vec![1, 2, 42], Some(FinishReason::Stop))
    );
}

#[test]
fn stop_token_ids_stop_even_with_ignore_eos() {
    let p = SamplingParams {
        max_tokens: 10,
        stop_token_ids: vec![42, 43],
        ignore_eos: true,
        ..SamplingParams::default()
    };
    assert_eq!(
        run_one(p, &[1, EOS, 43]),
        (vec![1, EOS, 43], Some(FinishReason::Stop))
    );
}

#[test]
fn max_tokens_gives_length_and_stop_wins_on_the_last_token() {
    let p = SamplingParams {
        max_tokens: 3,
        ..SamplingParams::default()
    };
    assert_eq!(
        run_one(p.clone(), &[1, 2, 3, 4]),
        (vec![1, 2, 3], Some(FinishReason::Length))
    );
    assert_eq!(
        run_one(p, &[1, 2, EOS]),
        (vec![1, 2, EOS], Some(FinishReason::Stop))
    );
}

#[test]
fn full_context_gives_length() {
    let s = Sequence {
        tokens: vec![1, 2, 3, 4],
        prompt_len: 3,
        num_computed: 3,
        params: SamplingParams {
            max_tokens: 100,
            ..SamplingParams::default()
        },
        status: SeqStatus::Running,
        block_table: vec![],
        block_hashes: vec![],
        hashes_reported: 0,
        num_preemptions: 0,
        forks: vec![],
        held_by: None,
        fresh: false,
        draft: vec![],
    };
    assert_eq!(check_finish(&s, &[EOS], 4), Some(FinishReason::Length));
    assert_eq!(check_finish(&s, &[EOS], 5), None);
}

#[test]
fn abort_and_external_finish() {
    let mut e = Engine::simple(1, 64, 16, 4);
    e.add(1, vec![1, 2, 3], 10);
    e.add(2, vec![1, 2, 3], 10);
    e.step();
    assert_eq!((e.sched.num_running(), e.sched.num_waiting()), (1, 1));
    assert!(e.sched.abort(2), "waiting sequence");
    assert_eq!(e.sched.num_waiting(), 0);
    assert!(
        !e.sched.has_pending_frees(),
        "a waiting sequence holds no blocks"
    );
    assert!(
        e.sched.finish(1, FinishReason::Stop),
        "stop string found by the detokenizer"
    );
    assert!(!e.sched.abort(1));
    assert!(!e.sched.abort(99));
    assert!(!e.sched.has_unfinished());
    let (b, _) = e.step();
    assert!(b.is_empty());
    assert_eq!(b.finished_seq_ids, vec![1]);
    assert_eq!(e.bm.num_free_blocks(), 16);
}

#[test]
fn aborts_while_a_step_is_in_flight() {
    let mut e = Engine::simple(4, 64, 16, 4);
    e.add(1, vec![1, 2, 3], 10);
    e.add(2, vec![4, 5, 6], 10);
    e.step();
    e.add(3, vec![7, 8], 10);
    // Between plan and commit: a running and a to-be-admitted sequence go away.
    let req = e.sched.plan().expect("plan");
    assert!(matches!(
        e.sched.plan(),
        Err(SchedulerError::StepInProgress)
    ));
    assert!(e.sched.abort(1));
    assert!(e.sched.abort(3));
    let resp = e.bm.apply(req).expect("apply");
    let b = e.sched.commit(resp).expect("commit");
    assert_eq!(b.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(), vec![2]);
    // While the batch executes, seq 2 is aborted too; its token is ignored.
    assert!(e.sched.abort(2));
    let outs = e
        .sched
        .update(&StepOutput {
            sampled: vec![SampledToken::new(2, 5)],
            failed: Vec::new(),
        })
        .expect("update");
    assert!(outs.is_empty());
    e.drain_frees();
    assert_eq!(e.bm.num_seqs(), 0);
    assert_eq!(e.bm.num_free_blocks(), 16);
}

#[test]
fn step_protocol_errors_change_nothing() {
    let mut e = Engine::simple(4, 64, 16, 4);
    assert!(matches!(
        e.sched.update(&StepOutput::default()),
        Err(SchedulerError::NoBatch)
    ));
    assert!(matches!(
        e.sched.commit(empty_response(&e.bm)),
        Err(SchedulerError::NoPlan)
    ));
    e.add(1, vec![1, 2, 3], 10);
    let b = e.sched.schedule(&mut e.bm).expect("schedule");
    assert_eq!(b.seqs.len(), 1);
    assert!(matches!(
        e.sched.plan(),
        Err(SchedulerError::StepInProgress)
    ));
    assert_eq!(
        e.sched.update(&StepOutput::default()),
        Err(SchedulerError::MissingToken(1))
    );
    // The executor failed: cancel, and the same tokens are scheduled again.
    e.sched.cancel_step();
    let b2 = e.sched.schedule(&mut e.bm).expect("schedule");
    assert_eq!(b2.seqs[0].token_ids, b.seqs[0].token_ids);
    assert_eq!(b2.seqs[0].start_pos, 0);
    e.sched.cancel_step();
    // A response that does not match the plan is refused.
    let _req = e.sched.plan().expect("plan");
    assert!(matches!(
        e.sched.commit(empty_response(&e.bm)),
        Err(SchedulerError::PlanMismatch(_))
    ));
    e.sched.cancel_step();
    e.bm.check_invariants().expect("consistent");
}

#[test]
fn prefix_cache_hit_skips_computed_tokens() {
    let mut e = Engine::simple(4, 64, 32, 4);
    let system: Vec<TokenId> = (100..110).collect(); // 10 tokens: 2 full blocks + 2
    let mut p1 = system.clone();
    p1.push(1);
    e.add(1, p1, 1);
    e.step(); // seq 1 computes its prompt and finishes

    let mut p2 = system.clone();
    p2.extend([2, 3]); // 12 tokens: 3 full blocks
    let mut p3 = p2.clone();
    p3.push(5); // 13 tokens
    e.add(2, p2.clone(), 2);
    e.add(3, p3.clone(), 1);
    let (b, _) = e.step();
    let s2 = &b.seqs[0];
    assert_eq!(s2.seq_id, 2);
    assert_eq!(s2.start_pos, 8, "two cached blocks skipped");
    assert_eq!(s2.token_ids, p2[8..].to_vec());
    assert_eq!(
        s2.new_seq.as_ref().map(|n| n.prompt_token_ids.clone()),
        Some(p2.clone())
    );
    // Seq 2's third block is being computed in this very step: not shareable yet.
    let s3 = &b.seqs[1];
    assert_eq!((s3.seq_id, s3.start_pos, s3.token_ids.len()), (3, 8, 5));
    let st = e.sched.stats();
    assert_eq!(
        (st.prefix_cache_queries, st.prefix_cache_hits),
        (11 + 12 + 13, 8 + 8)
    );

    // One step later it has been computed and reported.
    e.add(4, p3.clone(), 1);
    let (b, _) = e.step();
    let s4 = b.seqs.iter().find(|s| s.seq_id == 4).expect("scheduled");
    assert_eq!((s4.start_pos, s4.token_ids.clone()), (12, vec![5]));
    assert_eq!(
        s4.block_table[..2],
        e.bm.block_table(2).expect("seq 2 runs")[..2]
    );
    // The third block is the copy finished seq 3 computed (freed first in the request,
    // so its block won the index entry).
    assert!(e.bm.pool().block_hash(s4.block_table[2]).is_some());

    // A prompt made only of cached blocks still computes its last token (and so the
    // whole last block).
    e.add(5, p2.clone(), 1);
    let (b, _) = e.step();
    let s5 = b.seqs.iter().find(|s| s.seq_id == 5).expect("scheduled");
    assert_eq!((s5.start_pos, s5.token_ids.len()), (8, 4));
}

#[test]
fn generated_tokens_become_cacheable() {
    let mut e = Engine::simple(4, 64, 32, 4);
    e.add(1, vec![1, 2, 3], 6);
    let mut out = Vec::new();
    while e.sched.has_unfinished() {
        let (_, outs) = e.step_with(|s| 50 + s.context_len as TokenId);
        out.extend(outs.iter().map(|o| o.token_id));
    }
    // A follow-up turn whose prompt is the previous prompt + answer reuses it.
    let mut turn2 = vec![1, 2, 3];
    turn2.extend(&out);
    turn2.push(9);
    e.add(2, turn2, 1);
    let (b, _) = e.step();
    // 3 + 6 tokens, of which the first 8 (2 blocks; the last token was never computed).
    assert_eq!(b.seqs[0].start_pos, 8);
}

#[test]
fn batch_round_trips_through_messagepack() {
    let mut e = Engine::simple(4, 64, 16, 4);
    e.add(1, vec![1, 2, 3, 4, 5], 3);
    let b = e.sched.schedule(&mut e.bm).expect("schedule");
    let bytes = rmp_serde::to_vec_named(&b).expect("encode");
    let back: ScheduledBatch = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(back, b);
    let out = StepOutput {
        sampled: vec![SampledToken::new(1, 3)],
        failed: Vec::new(),
    };
    let back: StepOutput =
        rmp_serde::from_slice(&rmp_serde::to_vec_named(&out).expect("encode")).expect("decode");
    assert_eq!(back, out);
}

#[test]
fn n_completions_fork_after_the_prompt_and_share_its_blocks() {
    let mut e = Engine::simple(8, 64, 16, 4);
    let params = SamplingParams {
        max_tokens: 3,
        seed: Some(5),
        n: 3,
        prompt_logprobs: Some(1),
        ..SamplingParams::default()
    };
    let prompt: Vec<TokenId> = vec![1, 2, 3, 4, 5, 6];
    e.sched
        .add_forked(1, prompt.clone(), params, vec![2, 3])
        .expect("accepted");
    assert_eq!((e.sched.num_waiting(), e.sched.num_held()), (1, 2));

    // Step 1: the prompt, once.
    let (batch, outs) = e.step();
    assert_eq!(batch.seqs.len(), 1);
    assert_eq!(batch.seqs[0].token_ids, prompt);
    assert_eq!(outs.len(), 1);
    assert_eq!(e.sched.num_held(), 0, "forked once the prompt is computed");

    // Step 2: the forks compute the last prompt token again, in copies of its block.
    let free_before = e.bm.num_free_blocks();
    let (batch, outs) = e.step();
    let parent_blocks = e.bm.block_table(1).expect("parent").to_vec();
    assert_eq!(batch.seqs.len(), 3);
    assert_eq!(
        batch.block_copies.len(),
        2,
        "one copy per writer but the last"
    );
    for (s, seed) in batch.seqs[1..].iter().zip([6, 7]) {
        assert_eq!(s.token_ids, vec![6]);
        assert_eq!(s.start_pos, 5);
        let new = s
            .new_seq
            .as_ref()
            .expect("a fork starts with its sampling state");
        assert_eq!(new.params.seed, Some(seed), "seed + index");
        assert_eq!(new.params.prompt_logprobs, None);
        assert!(new.output_token_ids.is_empty());
        // The first block is the parent's own.
        assert_eq!(s.block_table[0], parent_blocks[0]);
    }
    assert_eq!(e.bm.pool().ref_count(parent_blocks[0]), 3);
    assert_eq!(outs.len(), 3);
    assert_eq!(
        free_before - e.bm.num_free_blocks(),
        2,
        "two copies, nothing else"
    );

    let mut ended = std::collections::BTreeSet::new();
    for o in outs {
        if o.finish_reason.is_some() {
            ended.insert(o.seq_id);
        }
    }
    while e.sched.has_unfinished() {
        let (_, outs) = e.step();
        for o in outs {
            assert!(o.num_output_tokens <= 3);
            if o.finish_reason.is_some() {
                assert!(ended.insert(o.seq_id));
            }
        }
    }
    assert_eq!(ended.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 16);
    assert_eq!(e.bm.num_seqs(), 0);
}

#[test]
fn completions_of_a_parent_that_ends_early_go_on_without_it() {
    let mut e = Engine::simple(8, 64, 16, 4);
    let params = SamplingParams {
        max_tokens: 2,
        n: 3,
        ..SamplingParams::default()
    };
    e.sched
        .add_forked(1, vec![1, 2, 3], params.clone(), vec![2, 3])
        .expect("accepted");
    // A held completion can end on its own.
    assert!(e.sched.finish(3, FinishReason::Abort));
    assert_eq!(e.sched.num_held(), 1);
    // The parent ends before its prompt ran: completion 2 takes its place.
    assert!(e.sched.finish(1, FinishReason::Abort));
    assert_eq!(e.sched.waiting().collect::<Vec<_>>(), vec![2]);
    assert_eq!(e.sched.num_held(), 0);
    let mut steps = 0;
    while e.sched.has_unfinished() {
        e.step();
        steps += 1;
        assert!(steps < 10);
    }
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 16);

    // n larger than max_num_seqs can never run: refused.
    let mut e = Engine::simple(2, 64, 16, 4);
    let err = e
        .sched
        .add_forked(7, vec![1, 2], params, vec![8, 9])
        .expect_err("3 completions, 2 seats");
    assert!(err.to_string().contains("max_num_seqs"), "{err}");
    assert!(!e.sched.has_unfinished());
}

#[test]
fn a_parent_that_finishes_on_its_first_token_still_forks() {
    let mut e = Engine::simple(8, 64, 16, 4);
    let params = SamplingParams {
        max_tokens: 1,
        n: 2,
        ..SamplingParams::default()
    };
    e.sched
        .add_forked(1, vec![1, 2, 3, 4, 5], params, vec![2])
        .expect("accepted");
    let (_, outs) = e.step();
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Length));
    // The parent's free and the fork go in the same request, the fork first.
    let (batch, outs) = e.step();
    assert_eq!(batch.finished_seq_ids, vec![1]);
    assert_eq!(batch.seqs.len(), 1);
    assert!(batch.block_copies.is_empty(), "the fork is the last holder");
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Length));
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 16);
}

/// 1–2-gram lookup, 3 drafts at most, blocks of 4.
fn speculating(max_num_seqs: usize) -> Engine {
    speculating_with(ngram(), 4, max_num_seqs)
}

fn ngram() -> Drafts {
    Drafts::Proposer(std::sync::Arc::new(NgramProposer { min_n: 1, max_n: 2 }))
}

/// An engine (8 seats, budget 64, 32 blocks of `block_size`) that speculates up to 3
/// tokens with `drafts`.
fn speculating_with(drafts: Drafts, block_size: usize, max_num_seqs: usize) -> Engine {
    let mut e = Engine::simple(8, 64, 32, block_size);
    e.sched = e.sched.with_speculation(Speculation {
        drafts,
        num_tokens: 3,
        max_num_seqs,
    });
    e
}

#[test]
fn drafts_are_proposed_verified_and_kept_up_to_the_first_miss() {
    let mut e = speculating(4);
    e.add(1, vec![5, 6, 7, 5, 6], 10);
    let (batch, _) = e.step_with(|_| 7);
    assert_eq!(batch.seqs[0].num_draft, 0, "no drafts in a prefill");
    // Tokens 5 6 7 5 6 7: the 2-gram [6 7] occurred at 1, so 5 6 7 is proposed.
    let (batch, outs) = e.step_verifying(|_| (2, 9));
    let s = &batch.seqs[0];
    assert_eq!((s.token_ids.clone(), s.num_draft), (vec![7, 5, 6, 7], 3));
    assert_eq!((s.start_pos, s.context_len, s.sample), (5, 9, true));
    assert_eq!(
        outs.iter()
            .map(|o| (o.token_id, o.num_output_tokens))
            .collect::<Vec<_>>(),
        vec![(5, 2), (6, 3), (9, 4)],
        "two drafts kept, then the sampled token"
    );
    let view = e.sched.sequence(1).expect("live");
    assert_eq!(view.output_token_ids, &[7, 5, 6, 9]);
    // x 5 6 computed at 5..7; the rejected draft's slot (8) is computed again next step.
    assert_eq!(view.num_computed_tokens, 8);
    let spec = e.sched.stats().spec;
    assert_eq!(
        (spec.drafts, spec.draft_tokens, spec.accepted_tokens),
        (1, 3, 2)
    );

    // No match for [6 9] / [9]: a plain decode step.
    let (batch, _) = e.step_verifying(|_| (0, 1));
    assert_eq!(
        (batch.seqs[0].token_ids.clone(), batch.seqs[0].num_draft),
        (vec![9], 0)
    );

    // Drafts never run past max_tokens: with 9 of 10 generated, none are proposed.
    let mut e = speculating(4);
    e.add(2, vec![3, 4, 3, 4, 3], 3);
    e.step_with(|_| 4);
    let (batch, outs) = e.step_verifying(|s| (s.num_draft, 3));
    assert_eq!(
        batch.seqs[0].num_draft, 1,
        "room for one draft and the token after it"
    );
    assert_eq!(
        outs.last().map(|o| o.finish_reason),
        Some(Some(FinishReason::Length))
    );
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 32);
}

#[test]
fn a_draft_model_gets_reserved_positions_and_its_accepted_tokens_are_kept() {
    let mut e = speculating_with(Drafts::DraftModel, 4, 4);
    e.add(1, vec![1, 2, 3], 10);
    let (batch, _) = e.step_with(|_| 4);
    assert_eq!(batch.seqs[0].num_draft, 0, "no drafts in a prefill");
    // Decode: three placeholder positions after the last token, blocks for all of them.
    let sched = e.sched.schedule(&mut e.bm).expect("schedule");
    let s = &sched.seqs[0];
    assert_eq!(s.token_ids, vec![4, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]);
    assert_eq!((s.num_draft, s.start_pos, s.context_len), (3, 3, 7));
    assert!(s.block_table.len() * 4 >= 7);
    // What the executor answers: the drafts its model proposed that the target kept, and
    // the token it sampled after them.
    let answer = |e: &mut Engine, accepted: Vec<TokenId>, token: TokenId| {
        let mut t = SampledToken::new(1, token);
        t.accepted = accepted;
        let outs = e
            .sched
            .update(&StepOutput {
                sampled: vec![t],
                failed: Vec::new(),
            })
            .expect("update");
        outs.iter().map(|o| o.token_id).collect::<Vec<_>>()
    };
    // The executor's draft model proposed 8 9 5; the target kept 8 9 and sampled 6.
    assert_eq!(answer(&mut e, vec![8, 9], 6), vec![8, 9, 6]);
    let view = e.sched.sequence(1).expect("live");
    assert_eq!(view.output_token_ids, &[4, 8, 9, 6]);
    assert_eq!(
        view.num_computed_tokens, 6,
        "4 8 9 at 3..6; 6 is computed next"
    );
    let spec = e.sched.stats().spec;
    assert_eq!(
        (spec.drafts, spec.draft_tokens, spec.accepted_tokens),
        (1, 3, 2)
    );
    // Never more kept than reserved, whatever the executor says.
    let sched = e.sched.schedule(&mut e.bm).expect("schedule");
    assert_eq!(sched.seqs[0].num_draft, 3);
    assert_eq!(answer(&mut e, vec![8, 9, 8, 9, 8], 7), vec![8, 9, 8, 7]);
    while e.sched.has_unfinished() {
        e.step_verifying(|_| (1, 7));
    }
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 32);
}

#[test]
fn blocks_of_rejected_drafts_go_back() {
    let mut e = speculating_with(ngram(), 2, 4);
    e.add(1, vec![1, 2, 3, 4, 5, 1, 2], 10);
    e.step_with(|_| 3);
    // Tokens 1 2 3 4 5 1 2 3: [2 3] → propose 4 5 1 at positions 8..10 (blocks of 2).
    let (batch, _) = e.step_verifying(|_| (0, 9));
    assert_eq!(batch.seqs[0].num_draft, 3);
    assert_eq!(
        e.bm.block_table(1).map(<[_]>::len),
        Some(6),
        "room for position 10"
    );
    let free = e.bm.num_free_blocks();
    // All rejected: the next step writes position 8 only, and the block that held just
    // position 10 goes back (the harness checks the scheduler's mirror of the table).
    let (batch, _) = e.step_verifying(|_| (0, 8));
    assert_eq!((batch.seqs[0].start_pos, batch.seqs[0].num_draft), (8, 0));
    assert_eq!(e.bm.block_table(1).map(<[_]>::len), Some(5));
    assert_eq!(e.bm.num_free_blocks(), free + 1);
    e.drain_frees();
}

#[test]
fn an_eos_among_kept_drafts_ends_the_sequence_there() {
    let mut e = speculating(4);
    e.add(1, vec![5, 0, 8, 2], 10);
    e.step_with(|_| 5); // tokens 5 0 8 2 5: [2 5] unseen, [5] at 0 → propose 0 8 2
    let (batch, outs) = e.step_verifying(|s| (s.num_draft, 4));
    assert_eq!(batch.seqs[0].token_ids, vec![5, 0, 8, 2]);
    assert_eq!(outs.len(), 1, "the kept EOS ends it: {outs:?}");
    assert_eq!(
        (outs[0].token_id, outs[0].finish_reason),
        (EOS, Some(FinishReason::Stop))
    );
    assert!(!e.sched.has_unfinished());
    e.drain_frees();
    assert_eq!(e.bm.num_free_blocks(), 32);
}

#[test]
fn speculation_stops_above_its_batch_size_and_for_opted_out_requests() {
    let mut e = speculating(1);
    e.add(1, vec![1, 2, 1], 10);
    e.add(2, vec![1, 2, 1], 10);
    e.step_with(|_| 2);
    let (batch, _) = e.step_with(|_| 2);
    assert!(
        batch.seqs.iter().all(|s| s.num_draft == 0),
        "two running > max 1"
    );

    let mut e = speculating(4);
    let params = SamplingParams {
        max_tokens: 10,
        speculate: false,
        ..SamplingParams::default()
    };
    e.sched.add(1, vec![1, 2, 1], params).expect("accepted");
    e.step_with(|_| 2);
    let (batch, _) = e.step_with(|_| 2);
    assert_eq!(batch.seqs[0].num_draft, 0, "opted out");
}

#[derive(Debug, Clone)]
enum Op {
    Arrive {
        prompt: Vec<TokenId>,
        max_tokens: u32,
        min_tokens: u32,
        ignore_eos: bool,
        n: usize,
    },
    Step {
        seed: u64,
    },
    Abort {
        i: usize,
    },
    StopString {
        i: usize,
    },
}

const PREFIXES: [[TokenId; 16]; 3] = [
    [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1],
    [3, 3, 2, 2, 1, 1, 3, 3, 2, 2, 1, 1, 3, 3, 2, 2],
    [1, 2, 3, 1, 2, 3, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3],
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..3, 0usize..17, prop::collection::vec(1u32..4, 1..14), 1u32..16, 0u32..3, any::<bool>(), prop_oneof![3 => Just(1usize), 1 => 2usize..4]).prop_map(
            |(pid, plen, tail, max_tokens, min_tokens, ignore_eos, n)| Op::Arrive {
                n,
                // Shared "system prompts" so that prefixes repeat.
                prompt: PREFIXES[pid][..plen].iter().copied().chain(tail).collect(),
                max_tokens,
                min_tokens: min_tokens.min(max_tokens),
                ignore_eos,
            }
        ),
        5 => any::<u64>().prop_map(|seed| Op::Step { seed }),
        1 => any::<usize>().prop_map(|i| Op::Abort { i }),
        1 => any::<usize>().prop_map(|i| Op::StopString { i }),
    ]
}

/// A step with pseudo-random sampled tokens (EOS about one time in eight).
fn random_step(e: &mut Engine, seed: u64) -> Result<Vec<SeqOutput>, TestCaseError> {
    let mut x = seed | 1;
    let (_, outs) = e.step_verifying(|s| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let t = (x.wrapping_add(s.seq_id) % 8) as TokenId;
        // With drafts, keep a pseudo-random number of them.
        let kept = (x >> 20) as usize % (s.num_draft + 1);
        (kept, if t == 7 { 5 } else { t }) // tokens 0 (EOS) ..= 6
    });
    for o in &outs {
        prop_assert!(o.num_output_tokens >= 1);
    }
    Ok(outs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_traffic_finishes_and_frees_everything(
        max_num_seqs in 1usize..6,
        budget in 1usize..40,
        num_blocks in 6usize..16,
        block_size in 1usize..5,
        caching in any::<bool>(),
        speculate in 0u8..3,
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let cfg = SchedulerLimits { max_num_seqs, max_num_batched_tokens: budget, max_model_len: 48 };
        let mut e = Engine::new(cfg, num_blocks, block_size, caching);
        // Off, n-gram lookup, or positions reserved for a draft model.
        if speculate > 0 {
            e.sched = e.sched.with_speculation(Speculation {
                drafts: if speculate == 1 {
                    Drafts::Proposer(std::sync::Arc::new(NgramProposer { min_n: 1, max_n: 3 }))
                } else {
                    Drafts::DraftModel
                },
                num_tokens: 3,
                max_num_seqs: 3,
            });
        }
        let mut next_id: SeqId = 0;
        let mut accepted = std::collections::BTreeSet::new();
        let mut ended = std::collections::BTreeSet::new();
        let mut live: Vec<SeqId> = Vec::new();
        for op in ops {
            match op {
                Op::Arrive { prompt, max_tokens, min_tokens, ignore_eos, n } => {
                    // A request of n completions: ids next_id + 1 ..= next_id + n.
                    let ids: Vec<SeqId> = (1..=n as SeqId).map(|k| next_id + k).collect();
                    next_id += n as SeqId;
                    let params = SamplingParams { max_tokens, min_tokens, ignore_eos, stop_token_ids: vec![6], n: n as u32, ..SamplingParams::default() };
                    let fits = prompt.len() + max_tokens as usize <= (num_blocks * block_size).min(48)
                        && n <= max_num_seqs;
                    match e.sched.add_forked(ids[0], prompt, params, ids[1..].to_vec()) {
                        Ok(()) => {
                            prop_assert!(fits);
                            accepted.extend(ids.iter().copied());
                            live.extend(ids.iter().copied());
                        }
                        Err(_) => prop_assert!(!fits),
                    }
                }
                Op::Step { seed } => {
                    for o in random_step(&mut e, seed)? {
                        if o.finish_reason.is_some() {
                            prop_assert!(ended.insert(o.seq_id));
                            live.retain(|&id| id != o.seq_id);
                        }
                    }
                }
                Op::Abort { i } | Op::StopString { i } => {
                    if live.is_empty() { continue; }
                    let id = live.remove(i % live.len());
                    let reason = if matches!(op, Op::Abort { .. }) { FinishReason::Abort } else { FinishReason::Stop };
                    prop_assert!(e.sched.finish(id, reason));
                    prop_assert!(ended.insert(id));
                }
            }
            e.bm.check_invariants().map_err(TestCaseError::fail)?;
            prop_assert_eq!(e.sched.num_running() + e.sched.num_waiting() + e.sched.num_held(), live.len());
        }
        let mut steps = 0u64;
        while e.sched.has_unfinished() {
            steps += 1;
            prop_assert!(steps < 5_000, "no progress");
            for o in random_step(&mut e, steps)? {
                if o.finish_reason.is_some() {
                    prop_assert!(ended.insert(o.seq_id));
                }
            }
            e.bm.check_invariants().map_err(TestCaseError::fail)?;
        }
        prop_assert_eq!(&accepted, &ended);
        e.drain_frees();
        prop_assert_eq!(e.bm.num_seqs(), 0);
        prop_assert_eq!(e.bm.num_free_blocks(), num_blocks);
        prop_assert!(!e.sched.has_work());
    }
}
