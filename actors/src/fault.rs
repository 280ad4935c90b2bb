//! Fault injection for the tests, compiled only with the cargo feature `fault-injection`
//! (the workspace's tests turn it on through a dev-dependency; `cargo build --release`
//! never has it). Without the feature every function here is an empty inline call.
//!
//! Even then faults are armed only in a process started with `PAGODA_FAULT_INJECTION=1`,
//! so a test can fault one engine and let another, without the variable, serve the same
//! request. A request whose id is `pagoda-fault:<kind>` arms a fault for its sequence:
//!
//! - `pagoda-fault:panic:<actor>` — that actor panics when it handles the sequence
//!   (`tokenizer` at submission, `detokenizer` at registration, `scheduler` at admission,
//!   `block_manager` at the step that admits it, `executor` at the step that runs it);
//! - `pagoda-fault:nan_logits` — the executor fills the sequence's logits with NaN, a
//!   failure that belongs to that sequence alone;
//! - `pagoda-fault:forward_error` — the executor fails the whole step that runs the
//!   sequence for the first time, as a failed forward pass would.

use crate::messages::SeqId;

/// Prefix of the request ids that arm a fault.
pub const PREFIX: &str = "pagoda-fault:";

/// Whether this build can inject faults.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

#[cfg(feature = "fault-injection")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use super::{SeqId, PREFIX};

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Fault {
        Panic(String),
        NanLogits,
        ForwardError,
    }

    fn armed() -> std::sync::MutexGuard<'static, HashMap<SeqId, Fault>> {
        static ARMED: OnceLock<Mutex<HashMap<SeqId, Fault>>> = OnceLock::new();
        ARMED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn switched_on() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var("PAGODA_FAULT_INJECTION").is_ok_and(|v| v == "1"))
    }

    pub fn arm(request_id: &str, seq_id: SeqId) {
        let Some(spec) = request_id.strip_prefix(PREFIX) else {
            return;
        };
        if !switched_on() {
            return;
        }
        let fault = match spec.strip_prefix("panic:") {
            Some(actor) => Fault::Panic(actor.to_owned()),
            None if spec == "nan_logits" => Fault::NanLogits,
            None if spec == "forward_error" => Fault::ForwardError,
            None => return,
        };
        tracing::warn!(request_id, seq_id, ?fault, "fault armed (test build)");
        armed().insert(seq_id, fault);
    }

    pub fn panic_if_armed(actor: &str, seq_ids: &mut dyn Iterator<Item = SeqId>) {
        let hit = {
            let mut map = armed();
            if map.is_empty() {
                return;
            }
            let want = Fault::Panic(actor.to_owned());
            let mut hit = None;
            for id in seq_ids {
                if map.get(&id) == Some(&want) {
                    map.remove(&id);
                    hit = Some(id);
                    break;
                }
            }
            hit
        };
        if let Some(id) = hit {
            panic!("injected fault: {actor} panics on sequence {id}");
        }
    }

    pub fn nan_logits(seq_id: SeqId) -> bool {
        armed().get(&seq_id) == Some(&Fault::NanLogits)
    }

    pub fn forward_error(seq_ids: &mut dyn Iterator<Item = SeqId>) -> Option<SeqId> {
        let mut map = armed();
        if map.is_empty() {
            return None;
        }
        for id in seq_ids {
            if map.get(&id) == Some(&Fault::ForwardError) {
                map.remove(&id);
                return Some(id);
            }
        }
        None
    }

    pub fn disarm(seq_id: SeqId) {
        armed().remove(&seq_id);
    }
}

/// Arms the fault a request id asks for (test builds only).
#[inline(always)]
pub fn arm(request_id: &str, seq_id: SeqId) {
    #[cfg(feature = "fault-injection")]
    imp::arm(request_id, seq_id);
    #[cfg(not(feature = "fault-injection"))]
    let _ = (request_id, seq_id);
}

/// Panics when a panic in `actor` is armed for one of `seq_ids` (test builds only).
#[inline(always)]
pub fn panic_if_armed(actor: &str, seq_ids: impl Iterator<Item = SeqId>) {
    #[cfg(feature = "fault-injection")]
    imp::panic_if_armed(actor, &mut { seq_ids });
    #[cfg(not(feature = "fault-injection"))]
    let _ = (actor, seq_ids);
}

/// Whether the executor must poison this sequence's logits (test builds only).
#[inline(always)]
pub fn nan_logits(seq_id: SeqId) -> bool {
    #[cfg(feature = "fault-injection")]
    return imp::nan_logits(seq_id);
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = seq_id;
        false
    }
}

/// The sequence of `seq_ids` for which the step must fail as a whole, once (test builds
/// only).
#[inline(always)]
pub fn forward_error(seq_ids: impl Iterator<Item = SeqId>) -> Option<SeqId> {
    #[cfg(feature = "fault-injection")]
    return imp::forward_error(&mut { seq_ids });
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = seq_ids;
        None
    }
}

/// Forgets a sequence's fault once it ended (test builds only).
#[inline(always)]
pub fn disarm(seq_id: SeqId) {
    #[cfg(feature = "fault-injection")]
    imp::disarm(seq_id);
    #[cfg(not(feature = "fault-injection"))]
    let _ = seq_id;
}
