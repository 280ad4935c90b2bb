//! Noticing a dead actor.
//!
//! Every actor holds a [`LifeGuard`]. Actors in pagoda never stop on their own while the
//! engine runs, so the only way one dies mid-run is a panic in a handler; the guard is
//! dropped while that panic unwinds (the task that polls the actor drops it) and reports
//! to the [`Supervisor`]. The supervisor then, at once:
//!
//! 1. marks the engine failed (`/health` answers 503, the JetStream intake stops pulling),
//! 2. ends every live stream with an `internal` error naming the actor (the streams
//!    registry is outside the actors, so this works whichever actor died),
//! 3. wakes whoever waits on [`Supervisor::failed`]: `pagoda serve` then exits with a
//!    non-zero status once the error replies are out, for its supervisor (compose
//!    `restart:`, systemd) to start a fresh process.
//!
//! The report comes first, the backtrace after: on an actor's thread (marked by
//! [`LifeGuard::watch_this_thread`] when the actor starts) the panic hook prints the panic's
//! message at once and resolves the backtrace (when `RUST_BACKTRACE` asks for one) on a
//! thread of its own, since reading the binary's debug info can take seconds on a cold
//! page cache, seconds during which the dying thread would otherwise hold up the error
//! replies. [`flush_panic_reports`] waits for those backtraces before the process exits.
//!
//! Rebuilding the one actor in place is not attempted: the engine's state is spread over
//! the actors (block tables in the block manager, K/V contents and samplers in the
//! executor, queues in the scheduler, text state in the detokenizer) and a new actor could
//! not rebuild its share consistently with the others.

use std::cell::{Cell, RefCell};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::messages::{ErrorBody, ErrorCode};
use crate::streams::Streams;

/// Whether the engine serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Running,
    /// An actor died; the engine cannot serve any more.
    Failed {
        actor: String,
        reason: String,
    },
}

/// Watches the actors of one engine. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

/// Called with the dead actor's name and the reason.
type FailureHook = Box<dyn Fn(&str, &str) + Send + Sync>;

struct Inner {
    streams: Option<Streams>,
    state: watch::Sender<Health>,
    /// Called once, first thing, when an actor dies (e.g. `/health` turns 503).
    on_failure: std::sync::Mutex<Vec<FailureHook>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("health", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor that ends `streams` when an actor dies (`None` for an engine process
    /// without clients of its own).
    pub fn new(streams: Option<Streams>) -> Self {
        install_panic_hook();
        let (state, _) = watch::channel(Health::Running);
        Self {
            inner: Arc::new(Inner {
                streams,
                state,
                on_failure: Default::default(),
            }),
        }
    }

    /// Runs `f(actor, reason)` when an actor dies, before any stream is ended (at once if
    /// one already has).
    pub fn on_failure(&self, f: impl Fn(&str, &str) + Send + Sync + 'static) {
        if let Health::Failed { actor, reason } = self.health() {
            f(&actor, &reason);
        }
        self.inner
            .on_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    /// The guard an actor keeps for its whole life.
    pub fn guard(&self, actor: &'static str) -> LifeGuard {
        LifeGuard {
            actor,
            supervisor: self.clone(),
        }
    }

    pub fn health(&self) -> Health {
        self.inner.state.borrow().clone()
    }

    pub fn is_failed(&self) -> bool {
        matches!(self.health(), Health::Failed { .. })
    }

    /// Reports a dead actor. The first report wins; later ones are logged only.
    pub fn actor_failed(&self, actor: &str, reason: &str) {
        let first = self.inner.state.send_if_modified(|h| match h {
            Health::Running => {
                *h = Health::Failed {
                    actor: actor.to_owned(),
                    reason: reason.to_owned(),
                };
                true
            }
            Health::Failed { .. } => false,
        });
        tracing::error!(actor, reason, "an actor died; the engine stops serving");
        if !first {
            return;
        }
        for f in self
            .inner
            .on_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            f(actor, reason);
        }
        if let Some(streams) = &self.inner.streams {
            let n = streams.fail_all(ErrorBody::new(
                ErrorCode::Internal,
                format!("the engine failed ({actor} actor: {reason}); retry on another engine"),
            ));
            tracing::error!(
                streams = n,
                "ended every live stream with an internal error"
            );
        }
    }

    /// Resolves once an actor died, with the actor's name and the reason.
    pub async fn failed(&self) -> (String, String) {
        let mut rx = self.inner.state.subscribe();
        loop {
            if let Health::Failed { actor, reason } = &*rx.borrow_and_update() {
                return (actor.clone(), reason.clone());
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`: unreachable while we hold it.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Reports its actor's death to the supervisor when dropped during a panic.
#[derive(Debug)]
pub struct LifeGuard {
    actor: &'static str,
    supervisor: Supervisor,
}

impl LifeGuard {
    /// Marks the calling thread as one that runs actors: a panic there is reported to the
    /// supervisor before its backtrace is resolved (see the module docs). Call it from the
    /// actor's `started`, which runs on the actor's own thread.
    pub fn watch_this_thread(&self) {
        ACTOR_THREAD.with(|a| a.set(true));
    }
}

impl Drop for LifeGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let reason = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| "panicked".to_owned());
            self.supervisor.actor_failed(self.actor, &reason);
        }
    }
}

thread_local! {
    /// The message of the panic unwinding on this thread, for the guard to report.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether actors run on this thread ([`LifeGuard::watch_this_thread`]).
    static ACTOR_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Threads still printing the backtrace of an actor's panic.
static PENDING_REPORTS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits (at most `limit`) for the backtraces of actors' panics to be printed; call it
/// before the process exits after an actor died.
pub fn flush_panic_reports(limit: Duration) {
    let deadline = Instant::now() + limit;
    let pending = std::mem::take(&mut *PENDING_REPORTS.lock().unwrap_or_else(|e| e.into_inner()));
    for h in pending {
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if h.is_finished() {
            // The printing thread cannot fail in a way worth reporting twice.
            if h.join().is_err() {
                eprintln!("(the thread printing a panic's backtrace panicked itself)");
            }
        }
    }
}

/// What the default hook prints, with the backtrace (if `RUST_BACKTRACE` asks for one)
/// captured here, cheaply, and resolved and printed on another thread.
fn report_off_thread(msg: &str) {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>").to_owned();
    eprintln!("thread '{name}' {msg}");
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() != std::backtrace::BacktraceStatus::Captured {
        eprintln!("note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace");
        return;
    }
    let printer = std::thread::Builder::new()
        .name("panic-report".into())
        .spawn(move || eprintln!("stack backtrace of the panic in thread '{name}':\n{backtrace}"));
    match printer {
        Ok(h) => PENDING_REPORTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h),
        Err(e) => eprintln!("(cannot start a thread to print the backtrace: {e})"),
    }
}

/// Chains a hook in front of the current panic hook that remembers the panic's message
/// (and location) on the panicking thread.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            let msg = match info.location() {
                Some(l) => format!("panicked at {}:{}: {msg}", l.file(), l.line()),
                None => format!("panicked: {msg}"),
            };
            if ACTOR_THREAD.with(Cell::get) {
                report_off_thread(&msg);
            } else {
                previous(info);
            }
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(msg));
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::Supervisor;
    use super::*;
    use crate::messages::StreamEvent;
    use actix::{Actor, Context, Handler, Message, System};

    struct Fragile {
        _guard: LifeGuard,
    }

    impl Actor for Fragile {
        type Context = Context<Self>;

        fn started(&mut self, _: &mut Context<Self>) {
            self._guard.watch_this_thread();
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Boom;

    impl Handler<Boom> for Fragile {
        type Result = ();
        fn handle(&mut self, _: Boom, _: &mut Context<Self>) {
            panic!("boom in a handler");
        }
    }

    #[test]
    fn a_panicking_actor_fails_the_engine_and_its_streams() {
        let streams = Streams::new();
        let sup = Supervisor::new(Some(streams.clone()));
        let (_, mut rx) = streams.open();
        let sys = System::new();
        let sup2 = sup.clone();
        sys.block_on(async move {
            let addr = Fragile {
                _guard: sup2.guard("fragile"),
            }
            .start();
            assert_eq!(sup2.health(), Health::Running);
            addr.do_send(Boom);
            let (actor, reason) =
                tokio::time::timeout(std::time::Duration::from_secs(5), sup2.failed())
                    .await
                    .expect("the supervisor notices within 5 s");
            assert_eq!(actor, "fragile");
            assert!(reason.contains("boom in a handler"), "{reason}");
            assert!(!addr.connected());
        });
        assert!(sup.is_failed());
        // The backtrace (if RUST_BACKTRACE asks for one) is printed off the actor's thread.
        flush_panic_reports(std::time::Duration::from_secs(30));
        assert!(PENDING_REPORTS.lock().unwrap().is_empty());
        match rx.try_recv() {
            Ok(StreamEvent::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Internal);
                assert!(e.message.contains("fragile"), "{e:?}");
            }
            other => panic!("expected an internal error, got {other:?}"),
        }
    }

    #[test]
    fn an_actor_dropped_normally_is_not_a_failure() {
        let sup = Supervisor::new(None);
        drop(sup.guard("calm"));
        assert_eq!(sup.health(), Health::Running);
    }
}
