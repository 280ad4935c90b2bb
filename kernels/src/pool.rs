//! The kernels' thread pool: fork-join over numbered tasks, the calling thread included.
//!
//! A decode step makes about 150 parallel calls (every matmul and attention of every
//! layer) separated by a few microseconds of serial work. A general work-stealing pool
//! puts its idle workers to sleep within microseconds and pays a futex wake-up (tens of
//! microseconds on a virtual machine) at the next call; this pool's helpers instead spin
//! on one atomic for [`SPIN`] after their last task, so within a step every call starts
//! at once, and between steps (or when the engine is idle) they park.
//!
//! One job runs at a time. [`run`] publishes it, works on it itself, then closes it and
//! waits until no helper holds it; a call made while another thread's job is open, or
//! from inside a task, runs on its caller alone. Task panics are caught on the helpers
//! and resumed on the caller.
//!
//! `PAGODA_KERNEL_THREADS` sets the pool's size (caller included; default: the cores);
//! [`with_threads`] caps it for one thread's calls (tests, timing probes).

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling for the next job before it parks.
pub const SPIN: Duration = Duration::from_micros(300);

/// `state`: bits 32.. the job's number, bit 31 set while it is open, bits 0..31 the
/// helpers holding it.
const OPEN: u64 = 1 << 31;
const HOLDERS: u64 = OPEN - 1;

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Job {
    /// The caller's task, lifetime erased: valid while the job is open or held.
    task: *const (dyn Fn(usize) + Sync + 'static),
    count: usize,
    /// Helpers that may join (the caller's [`with_threads`] cap, less itself).
    helpers: usize,
}

struct Shared {
    state: AtomicU64,
    /// Written by the caller only while the job is closed and unheld.
    job: UnsafeCell<Job>,
    next: AtomicUsize,
    /// Helpers that joined the current job (bounded by `Job::helpers`).
    joined: AtomicUsize,
    /// The first panic of a task run by a helper.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Serializes callers: one job at a time.
    submit: Mutex<()>,
    parked: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `submit` while no helper can read
// it (closed and unheld, see `run`), and read by helpers only while they hold the open
// job; the task it points to is `Sync`.
unsafe impl Sync for Shared {}

struct Pool {
    shared: &'static Shared,
    threads: usize,
}

thread_local! {
    /// Inside a task (or a helper thread): nested calls run serially.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
    /// This thread's cap on the threads of its parallel calls (0: none).
    static CAP: Cell<usize> = const { Cell::new(0) };
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("PAGODA_KERNEL_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicU64::new(0),
            job: UnsafeCell::new(Job {
                task: &|_| {},
                count: 0,
                helpers: 0,
            }),
            next: AtomicUsize::new(0),
            joined: AtomicUsize::new(0),
            panic: Mutex::new(None),
            submit: Mutex::new(()),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        }));
        let mut started = 1;
        for i in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("pagoda-kernel-{i}"))
                .spawn(move || helper(shared));
            match spawned {
                Ok(_) => started += 1,
                // Fewer threads than asked (the engine logs `threads()` at start).
                Err(_) => break,
            }
        }
        Pool {
            shared,
            threads: started,
        }
    })
}

/// Threads a parallel call from this thread may use, itself included.
pub fn threads() -> usize {
    if IN_POOL.with(Cell::get) {
        return 1;
    }
    let n = pool().threads;
    match CAP.with(Cell::get) {
        0 => n,
        cap => n.min(cap),
    }
}

/// Runs `f` with this thread's parallel calls capped at `n` threads (itself included;
/// `n = 1`: serial).
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            CAP.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CAP.with(|c| c.replace(n.max(1))));
    f()
}

/// Runs `task(0) … task(count - 1)`, each once, spread over the pool; returns when all
/// have finished. Task order and thread are unspecified. A panicking task's panic is
/// resumed here (after every other task has finished).
pub fn run(count: usize, task: &(dyn Fn(usize) + Sync)) {
    let threads = threads();
    if count <= 1 || threads <= 1 {
        return serial(count, task);
    }
    let p = pool();
    let submit = match p.shared.submit.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        // Another thread's job is running (tests call kernels from many threads).
        Err(TryLockError::WouldBlock) => return serial(count, task),
    };
    let s = p.shared;
    let number = s.state.load(Ordering::Relaxed) >> 32;
    // SAFETY: `submit` is held and the previous job was closed with no holders before
    // its caller released `submit`: no helper reads `job` now. The erased lifetime is
    // sound because this function does not return before the job is closed and unheld.
    unsafe {
        let job = &mut *s.job.get();
        job.task = std::mem::transmute::<Task<'_>, *const (dyn Fn(usize) + Sync + 'static)>(task);
        job.count = count;
        job.helpers = threads - 1;
    }
    s.next.store(0, Ordering::Relaxed);
    s.joined.store(0, Ordering::Relaxed);
    let number = (number + 1) & 0xFFFF_FFFF;
    s.state.store((number << 32) | OPEN, Ordering::Release);
    if *s.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
        s.wake.notify_all();
    }
    let caught = IN_POOL.with(|f| {
        f.set(true);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(s, count, task)));
        f.set(false);
        r
    });
    // Close: no helper joins from now on; wait for those that did.
    s.state.fetch_and(!OPEN, Ordering::AcqRel);
    let mut spins = 0u32;
    while s.state.load(Ordering::Acquire) & HOLDERS != 0 {
        backoff(&mut spins);
    }
    let helper_panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    // Released before a panic is resumed, so that it is not poisoned.
    drop(submit);
    if let Err(payload) = caught {
        std::panic::resume_unwind(payload);
    }
    if let Some(payload) = helper_panic {
        std::panic::resume_unwind(payload);
    }
}

fn serial(count: usize, task: &(dyn Fn(usize) + Sync)) {
    (0..count).for_each(task);
}

/// Runs `f` on every item, each on exactly one thread, spread over the pool (items are
/// typically disjoint `&mut` parts of one output).
pub fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    if items.len() <= 1 || threads() <= 1 {
        return items.into_iter().for_each(f);
    }
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    run(slots.len(), &|i| {
        let item = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(item) = item {
            f(item);
        }
    });
}

/// Claims and runs tasks until none is left.
fn work(s: &Shared, count: usize, task: &(dyn Fn(usize) + Sync)) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            return;
        }
        task(i);
    }
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 1 << 12 {
        std::hint::spin_loop();
    } else {
        // The other side was preempted: let it run.
        std::thread::yield_now();
    }
}

fn helper(s: &'static Shared) {
    IN_POOL.with(|f| f.set(true));
    let mut seen = 0u64;
    loop {
        // Wait for an open job newer than the last one seen: spin, then park.
        let started = Instant::now();
        let mut polls = 0u32;
        let state = loop {
            let st = s.state.load(Ordering::Acquire);
            if st & OPEN != 0 && st >> 32 != seen {
                break st;
            }
            polls += 1;
            if polls.is_multiple_of(64) && started.elapsed() >= SPIN {
                let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
                *parked += 1;
                loop {
                    let st = s.state.load(Ordering::Acquire);
                    if st & OPEN != 0 && st >> 32 != seen {
                        break;
                    }
                    parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
                }
                *parked -= 1;
                drop(parked);
                polls = 0;
                continue;
            }
            std::hint::spin_loop();
        };
        seen = state >> 32;
        // Hold the job, unless it closed (or a newer one opened) since.
        if s.state
            .compare_exchange(state, state + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // SAFETY: the job is held: its caller waits before touching `job` or returning.
        let (task, count, helpers) = unsafe {
            let job = &*s.job.get();
            (&*job.task, job.count, job.helpers)
        };
        if s.joined.fetch_add(1, Ordering::Relaxed) < helpers {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(s, count, task)));
            if let Err(payload) = r {
                // The first panic is resumed on the caller; the rest of this job's tasks
                // are claimed by the others.
                let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    *slot = Some(payload);
                }
            }
        }
        s.state.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_task_runs_once() {
        for count in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            run(count, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "count {count}"
            );
        }
    }

    #[test]
    fn many_callers_and_nested_calls() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        run(8, &|_| {
                            // A nested call runs on its caller.
                            run(3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 8 * 3);
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_pool_goes_on() {
        for bad in [0, 5] {
            let r = std::panic::catch_unwind(|| {
                run(6, &|i| {
                    if i == bad {
                        panic!("task {i} failed");
                    }
                })
            });
            let msg = r.expect_err("the panic is resumed");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert_eq!(msg, format!("task {bad} failed"));
        }
        let hits = AtomicUsize::new(0);
        run(64, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn with_threads_caps_a_thread() {
        with_threads(1, || {
            assert_eq!(threads(), 1);
            let me = std::thread::current().id();
            run(16, &|_| assert_eq!(std::thread::current().id(), me));
        });
        assert!(threads() >= 1);
    }

    #[test]
    fn for_each_hands_out_every_item_once() {
        let mut out = vec![0u32; 1000];
        let parts: Vec<(usize, &mut [u32])> = out.chunks_mut(7).enumerate().collect();
        for_each(parts, |(c, part)| {
            for (j, v) in part.iter_mut().enumerate() {
                *v += (c * 7 + j) as u32;
            }
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as u32));
    }

    #[test]
    fn helpers_take_part_after_parking() {
        assert!(
            pool().threads >= 2,
            "this test needs a kernel pool of at least 2 threads (cores, or PAGODA_KERNEL_THREADS)"
        );
        // Long enough idle for the helpers to park, then jobs that need them (other
        // tests' jobs may hold the pool for a while: retry for up to 10 s).
        std::thread::sleep(SPIN * 4);
        let seen = Mutex::new(std::collections::HashSet::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            run(64, &|_| {
                seen.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(Duration::from_micros(50));
            });
            if seen.lock().unwrap().len() > 1 {
                return;
            }
        }
        panic!("no helper ever ran a task");
    }
}
