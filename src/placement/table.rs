//! The bookkeeping of split placement, without I/O: a frontend's view of the engines
//! ([`EngineTable`]) and an engine's map of the frontends' sequences ([`SeqMap`]).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pagoda_actors::load::LoadSnapshot;
use pagoda_actors::messages::SeqId;

use super::{EngineBeat, EngineState};

/// What a frontend knows of one engine.
#[derive(Debug, Clone)]
struct Engine {
    beat: EngineBeat,
    last_seen: Instant,
    /// Sequences of this frontend running there.
    assigned: HashSet<SeqId>,
    /// Sequences sent there since its last announcement (spreads a burst before the
    /// engine's own numbers catch up).
    sent_since_beat: usize,
    /// The number of the last event received from it.
    last_event: u64,
    /// An announcement said more events were sent than received: when it was first seen.
    missing_since: Option<(u64, Instant)>,
}

/// Why a frontend gave up on sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// Not heard from within the peer timeout.
    Silent,
    /// It announced that it failed.
    Failed,
    /// Events from it were lost in transit.
    Gap { expected: u64, got: u64 },
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::Silent => f.write_str("stopped responding"),
            Loss::Failed => f.write_str("failed"),
            Loss::Gap { expected, got } => write!(
                f,
                "lost messages in transit (expected event {expected}, got {got})"
            ),
        }
    }
}

/// Sequences a frontend must end because their engine is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub engine: String,
    pub loss: Loss,
    pub seqs: Vec<SeqId>,
}

/// A frontend's view of the engines: who is live, how loaded, what runs where, and whether
/// each link's events arrive without gaps.
#[derive(Debug)]
pub struct EngineTable {
    me: String,
    model: String,
    timeout: Duration,
    engines: HashMap<String, Engine>,
    by_seq: HashMap<SeqId, String>,
}

impl EngineTable {
    /// The table of frontend `me`, which routes only to engines serving `model`; an engine
    /// silent for `timeout` is gone.
    pub fn new(me: &str, model: &str, timeout: Duration) -> Self {
        Self {
            me: me.to_owned(),
            model: model.to_owned(),
            timeout,
            engines: HashMap::new(),
            by_seq: HashMap::new(),
        }
    }

    /// An announcement. Returns the sequences lost if it says the engine failed.
    pub fn on_beat(&mut self, beat: EngineBeat, now: Instant) -> Option<Lost> {
        let id = beat.engine.clone();
        let last_sent = beat.links.get(&self.me).copied().unwrap_or(0);
        let failed = beat.state == EngineState::Failed;
        let e = self.engines.entry(id.clone()).or_insert_with(|| Engine {
            beat: beat.clone(),
            last_seen: now,
            assigned: HashSet::new(),
            sent_since_beat: 0,
            last_event: 0,
            missing_since: None,
        });
        e.beat = beat;
        e.last_seen = now;
        e.sent_since_beat = 0;
        if last_sent > e.last_event && e.missing_since.is_none() {
            e.missing_since = Some((last_sent, now));
        }
        if failed {
            return Some(self.remove(&id, Loss::Failed));
        }
        None
    }

    /// An event numbered `link_seq` from `engine`. Returns the sequences to end when events
    /// before it were lost.
    pub fn on_event(&mut self, engine: &str, link_seq: u64) -> Option<Lost> {
        let e = self.engines.get_mut(engine)?;
        let expected = e.last_event + 1;
        if link_seq != expected {
            e.last_event = link_seq.max(e.last_event);
            let seqs = e.assigned.drain().collect::<Vec<_>>();
            for s in &seqs {
                self.by_seq.remove(s);
            }
            return Some(Lost {
                engine: engine.to_owned(),
                loss: Loss::Gap {
                    expected,
                    got: link_seq,
                },
                seqs,
            });
        }
        e.last_event = link_seq;
        if matches!(e.missing_since, Some((n, _)) if n <= link_seq) {
            e.missing_since = None;
        }
        None
    }

    /// Engines to give up on at `now`: silent past the timeout, or announced events that
    /// have not arrived within the timeout. Silent ones are forgotten.
    pub fn expire(&mut self, now: Instant) -> Vec<Lost> {
        let mut out = Vec::new();
        let silent: Vec<String> = self
            .engines
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) > self.timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            out.push(self.remove(&id, Loss::Silent));
        }
        let timeout = self.timeout;
        let gapped: Vec<(String, u64, u64)> = self
            .engines
            .iter()
            .filter_map(|(id, e)| match e.missing_since {
                Some((n, t)) if now.saturating_duration_since(t) > timeout => {
                    Some((id.clone(), e.last_event + 1, n))
                }
                _ => None,
            })
            .collect();
        for (id, expected, got) in gapped {
            if let Some(e) = self.engines.get_mut(&id) {
                e.missing_since = None;
                e.last_event = got;
                let seqs: Vec<SeqId> = e.assigned.drain().collect();
                for s in &seqs {
                    self.by_seq.remove(s);
                }
                out.push(Lost {
                    engine: id,
                    loss: Loss::Gap { expected, got },
                    seqs,
                });
            }
        }
        out
    }

    fn remove(&mut self, id: &str, loss: Loss) -> Lost {
        let seqs: Vec<SeqId> = self
            .engines
            .remove(id)
            .map(|e| e.assigned.into_iter().collect())
            .unwrap_or_default();
        for s in &seqs {
            self.by_seq.remove(s);
        }
        Lost {
            engine: id.to_owned(),
            loss,
            seqs,
        }
    }

    /// The least-loaded live engine serving this frontend's model (waiting + running as
    /// announced, plus what was sent since), not `except`.
    pub fn choose(&self, except: &[String]) -> Option<String> {
        self.engines
            .iter()
            .filter(|(id, e)| {
                e.beat.state == EngineState::Serving
                    && e.beat.model == self.model
                    && !except.contains(id)
            })
            .min_by_key(|(id, e)| {
                let l = &e.beat.load;
                (
                    l.num_running + l.num_waiting + e.sent_since_beat,
                    e.assigned.len(),
                    (*id).clone(),
                )
            })
            .map(|(id, _)| id.clone())
    }

    /// Records that `seq` runs on `engine`.
    pub fn assign(&mut self, engine: &str, seq: SeqId) {
        if let Some(e) = self.engines.get_mut(engine) {
            e.assigned.insert(seq);
            e.sent_since_beat += 1;
            self.by_seq.insert(seq, engine.to_owned());
        }
    }

    /// Forgets `seq`; the engine it ran on.
    pub fn unassign(&mut self, seq: SeqId) -> Option<String> {
        let engine = self.by_seq.remove(&seq)?;
        if let Some(e) = self.engines.get_mut(&engine) {
            e.assigned.remove(&seq);
        }
        Some(engine)
    }

    pub fn engine_of(&self, seq: SeqId) -> Option<&str> {
        self.by_seq.get(&seq).map(String::as_str)
    }

    /// Live engines of this frontend's model.
    pub fn num_live(&self) -> usize {
        self.engines
            .values()
            .filter(|e| e.beat.model == self.model && e.beat.state != EngineState::Failed)
            .count()
    }

    /// The engines' load together: running and free blocks summed, waiting the least of
    /// any serving engine (a new request is refused early only when every engine is full).
    pub fn aggregate(&self) -> LoadSnapshot {
        let mut total = LoadSnapshot::default();
        let mut min_waiting: Option<usize> = None;
        for e in self.engines.values().filter(|e| e.beat.model == self.model) {
            let l = &e.beat.load;
            total.num_running += l.num_running;
            total.num_free_blocks += l.num_free_blocks;
            total.num_blocks += l.num_blocks;
            total.num_engines += 1;
            if e.beat.state == EngineState::Serving {
                min_waiting = Some(min_waiting.map_or(l.num_waiting, |m| m.min(l.num_waiting)));
            }
        }
        total.num_waiting = min_waiting.unwrap_or(0);
        total
    }

    /// The smallest `max_model_len` of the serving engines (None without any).
    pub fn max_model_len(&self) -> Option<usize> {
        self.engines
            .values()
            .filter(|e| e.beat.model == self.model && e.beat.state == EngineState::Serving)
            .map(|e| e.beat.max_model_len)
            .min()
    }
}

/// An engine's map between its own sequence ids and the frontends' (each frontend numbers
/// its sequences itself), with each frontend's last event number and when it was last heard.
#[derive(Debug, Default)]
pub struct SeqMap {
    next_local: SeqId,
    by_local: HashMap<SeqId, (String, SeqId)>,
    by_remote: HashMap<(String, SeqId), SeqId>,
    link_seq: HashMap<String, u64>,
    seen: HashMap<String, Instant>,
}

impl SeqMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new sequence from `frontend`; its local id, or None when it is known already.
    pub fn insert(&mut self, frontend: &str, remote: SeqId, now: Instant) -> Option<SeqId> {
        self.seen.insert(frontend.to_owned(), now);
        let key = (frontend.to_owned(), remote);
        if self.by_remote.contains_key(&key) {
            return None;
        }
        self.next_local += 1;
        let local = self.next_local;
        self.by_remote.insert(key.clone(), local);
        self.by_local.insert(local, key);
        Some(local)
    }

    pub fn local(&self, frontend: &str, remote: SeqId) -> Option<SeqId> {
        self.by_remote.get(&(frontend.to_owned(), remote)).copied()
    }

    /// The frontend and its id for a local sequence.
    pub fn remote(&self, local: SeqId) -> Option<(&str, SeqId)> {
        self.by_local.get(&local).map(|(f, r)| (f.as_str(), *r))
    }

    /// Forgets a local sequence; its frontend and remote id.
    pub fn remove(&mut self, local: SeqId) -> Option<(String, SeqId)> {
        let key = self.by_local.remove(&local)?;
        self.by_remote.remove(&key);
        Some(key)
    }

    /// The next event number on the link to `frontend` (1, 2, …).
    pub fn next_link_seq(&mut self, frontend: &str) -> u64 {
        let n = self.link_seq.entry(frontend.to_owned()).or_insert(0);
        *n += 1;
        *n
    }

    /// The last event number sent to each frontend.
    pub fn links(&self) -> HashMap<String, u64> {
        self.link_seq.clone()
    }

    pub fn heard_from(&mut self, frontend: &str, now: Instant) {
        self.seen.insert(frontend.to_owned(), now);
    }

    /// Frontends not heard from for `timeout`, with their local sequences, all forgotten.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<(String, Vec<SeqId>)> {
        let gone: Vec<String> = self
            .seen
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > timeout)
            .map(|(f, _)| f.clone())
            .collect();
        let mut out = Vec::new();
        for f in gone {
            self.seen.remove(&f);
            self.link_seq.remove(&f);
            let locals: Vec<SeqId> = self
                .by_local
                .iter()
                .filter(|(_, (ff, _))| *ff == f)
                .map(|(l, _)| *l)
                .collect();
            for l in &locals {
                self.remove(*l);
            }
            out.push((f, locals));
        }
        out
    }

    pub fn len(&self) -> usize {
        self.by_local.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_local.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(engine: &str, running: usize, waiting: usize, state: EngineState) -> EngineBeat {
        EngineBeat {
            engine: engine.into(),
            model: "m".into(),
            max_model_len: 2048,
            state,
            load: LoadSnapshot {
                num_running: running,
                num_waiting: waiting,
                num_free_blocks: 10,
                num_blocks: 16,
                num_engines: 1,
            },
            links: HashMap::new(),
        }
    }

    const T: Duration = Duration::from_millis(1000);

    #[test]
    fn chooses_the_least_loaded_serving_engine_of_its_model() {
        let t0 = Instant::now();
        let mut t = EngineTable::new("f", "m", T);
        assert_eq!(t.choose(&[]), None);
        t.on_beat(beat("a", 4, 0, EngineState::Serving), t0);
        t.on_beat(beat("b", 1, 0, EngineState::Serving), t0);
        t.on_beat(beat("c", 0, 0, EngineState::Draining), t0);
        let mut other = beat("d", 0, 0, EngineState::Serving);
        other.model = "other".into();
        t.on_beat(other, t0);
        assert_eq!(t.choose(&[]).as_deref(), Some("b"));
        // Sequences sent since the last announcement count: a burst spreads out.
        for s in 1..=4 {
            t.assign("b", s);
        }
        assert_eq!(t.choose(&[]).as_deref(), Some("a"));
        assert_eq!(t.choose(&["a".into()]).as_deref(), Some("b"));
        assert_eq!(t.engine_of(3), Some("b"));
        assert_eq!(t.unassign(3).as_deref(), Some("b"));
        assert_eq!(t.engine_of(3), None);
        assert_eq!(t.num_live(), 3);
        let agg = t.aggregate();
        assert_eq!(agg.num_running, 5);
        assert_eq!(agg.num_engines, 3);
        assert_eq!(agg.num_blocks, 48);
    }

    #[test]
    fn a_silent_or_failed_engine_loses_its_sequences() {
        let t0 = Instant::now();
        let mut t = EngineTable::new("f", "m", T);
        t.on_beat(beat("a", 0, 0, EngineState::Serving), t0);
        t.on_beat(beat("b", 0, 0, EngineState::Serving), t0);
        t.assign("a", 1);
        t.assign("a", 2);
        t.assign("b", 3);
        assert!(t.expire(t0 + Duration::from_millis(900)).is_empty());
        t.on_beat(
            beat("b", 0, 0, EngineState::Serving),
            t0 + Duration::from_millis(900),
        );
        let mut lost = t.expire(t0 + Duration::from_millis(1100));
        assert_eq!(lost.len(), 1);
        lost[0].seqs.sort();
        assert_eq!(lost[0].engine, "a");
        assert_eq!(lost[0].loss, Loss::Silent);
        assert_eq!(lost[0].seqs, vec![1, 2]);
        assert_eq!(t.engine_of(1), None);
        assert_eq!(t.choose(&[]).as_deref(), Some("b"));
        let failed = t
            .on_beat(
                beat("b", 0, 0, EngineState::Failed),
                t0 + Duration::from_millis(1200),
            )
            .expect("a failed engine loses its sequences");
        assert_eq!(failed.loss, Loss::Failed);
        assert_eq!(failed.seqs, vec![3]);
        assert_eq!(t.choose(&[]), None);
    }

    #[test]
    fn a_gap_in_a_links_events_loses_that_engines_sequences() {
        let t0 = Instant::now();
        let mut t = EngineTable::new("f", "m", T);
        t.on_beat(beat("a", 0, 0, EngineState::Serving), t0);
        t.assign("a", 1);
        assert_eq!(t.on_event("a", 1), None);
        assert_eq!(t.on_event("a", 2), None);
        let lost = t.on_event("a", 4).expect("event 3 is missing");
        assert_eq!(
            lost.loss,
            Loss::Gap {
                expected: 3,
                got: 4
            }
        );
        assert_eq!(lost.seqs, vec![1]);
        // The link goes on from there.
        t.assign("a", 2);
        assert_eq!(t.on_event("a", 5), None);
        assert_eq!(t.engine_of(2), Some("a"));
    }

    #[test]
    fn a_lost_last_event_is_seen_through_the_announcements() {
        let t0 = Instant::now();
        let mut t = EngineTable::new("f", "m", T);
        t.on_beat(beat("a", 0, 0, EngineState::Serving), t0);
        t.assign("a", 1);
        assert_eq!(t.on_event("a", 1), None);
        // The engine says it sent 2 events; the second is late, then never comes.
        let mut b = beat("a", 1, 0, EngineState::Serving);
        b.links.insert("f".into(), 2);
        t.on_beat(b.clone(), t0 + Duration::from_millis(100));
        t.on_beat(b.clone(), t0 + Duration::from_millis(600));
        assert!(t.expire(t0 + Duration::from_millis(700)).is_empty());
        t.on_beat(b, t0 + Duration::from_millis(1050));
        let lost = t.expire(t0 + Duration::from_millis(1150));
        assert_eq!(lost.len(), 1);
        assert_eq!(
            lost[0].loss,
            Loss::Gap {
                expected: 2,
                got: 2
            }
        );
        assert_eq!(lost[0].seqs, vec![1]);
        // A late event that does arrive clears the suspicion.
        let mut t = EngineTable::new("f", "m", T);
        let mut b = beat("a", 0, 0, EngineState::Serving);
        b.links.insert("f".into(), 1);
        t.on_beat(b.clone(), t0);
        assert_eq!(t.on_event("a", 1), None);
        t.on_beat(b, t0 + Duration::from_millis(900));
        assert!(t.expire(t0 + Duration::from_millis(1500)).is_empty());
    }

    #[test]
    fn seq_map_translates_and_expires_frontends() {
        let t0 = Instant::now();
        let mut m = SeqMap::new();
        let a = m.insert("f1", 1, t0).expect("new");
        let b = m.insert("f2", 1, t0).expect("new");
        assert_ne!(a, b);
        assert_eq!(m.insert("f1", 1, t0), None, "a duplicate add is refused");
        assert_eq!(m.remote(a), Some(("f1", 1)));
        assert_eq!(m.local("f2", 1), Some(b));
        assert_eq!(m.next_link_seq("f1"), 1);
        assert_eq!(m.next_link_seq("f1"), 2);
        assert_eq!(m.next_link_seq("f2"), 1);
        assert_eq!(m.links().get("f1"), Some(&2));
        m.heard_from("f2", t0 + Duration::from_millis(900));
        let gone = m.expire(t0 + Duration::from_millis(1100), T);
        assert_eq!(gone, vec![("f1".to_owned(), vec![a])]);
        assert_eq!(m.remote(a), None);
        assert_eq!(m.len(), 1);
        assert_eq!(m.remove(b), Some(("f2".to_owned(), 1)));
        assert!(m.is_empty());
    }
}
