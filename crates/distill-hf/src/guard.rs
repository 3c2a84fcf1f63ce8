//! Untrusted work on a worker thread under a memory budget and a deadline: rendering a model's
//! chat template.
//!
//! minijinja's fuel bounds the instructions a template runs, not the size of the values they
//! build: `{% set s = s ~ s %}` doubles a string per instruction, so forty instructions ask for
//! a terabyte. No minijinja hook sees `~`, `+`, `*` on lists or `{% set %}...{% endset %}`
//! blocks, so the bound is kept one level down: [`GuardedAllocator`], which a binary installs as
//! its global allocator (`distill` does, in its `main.rs`), counts the bytes a guarded thread
//! holds, and an allocation that would take that thread past its budget is never made. An allocator must not unwind, so the thread stops inside the
//! allocation, parked for good, and the caller (waiting on a condition variable) gets
//! [`Stop::Memory`]. The parked thread keeps what it held, at most the budget, until the process
//! exits; callers refuse further work from the same source, so this happens once per source.
//!
//! The deadline covers work that allocates nothing for a long time (one minijinja instruction
//! can iterate a lazily repeated list for hours): the caller stops waiting, and the thread is
//! parked at its next allocation.
//!
//! A library cannot choose the process's allocator for its users, so this crate only offers
//! one: where it is not installed ([`memory_bounded`] is false), [`run`] keeps its deadline but
//! not its memory budget.
//!
//! What is counted: every byte the worker allocates and has not freed. Memory it frees that
//! another thread allocated lowers the count, so the bound is the budget plus what the caller
//! handed over to be dropped there; [`run`]'s callers keep their inputs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The system allocator, plus the per-thread count of guarded threads: install it with
/// `#[global_allocator] static A: GuardedAllocator = GuardedAllocator;` for [`run`] to keep
/// its memory budget. Threads outside [`run`] pay one thread-local read per allocation.
pub struct GuardedAllocator;

// The library's own unit tests run hostile inputs; they need the budget in force.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: GuardedAllocator = GuardedAllocator;

thread_local! {
    /// The budget of this thread while it runs guarded work; null otherwise. A const-initialised
    /// `Cell` of a pointer has no destructor, so reading it never allocates.
    static CURRENT: Cell<*const Budget> = const { Cell::new(std::ptr::null()) };
}

/// Limits for one piece of untrusted work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes the worker may hold at once.
    pub memory: usize,
    /// Wall-clock time the caller waits.
    pub time: Duration,
}

/// Why guarded work did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// It asked for more than [`Limits::memory`].
    Memory,
    /// It ran past [`Limits::time`].
    Time,
    /// It panicked (a bug in the library it ran, not in the input's control).
    Panic(String),
    /// No worker thread could be started.
    Spawn(String),
}

#[derive(Default)]
struct State {
    finished: bool,
    stop: Option<Stop>,
}

struct Budget {
    limit: usize,
    /// Written only by the guarded thread; atomic so that the caller may share the struct.
    held: AtomicUsize,
    cancelled: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

impl Budget {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `n` more bytes, or stops the thread for good when they are over the budget or
    /// the caller has given up.
    fn charge(&self, n: usize) {
        let held = self.held.load(Ordering::Relaxed).saturating_add(n);
        // A panicking thread holds the process's backtrace and stderr locks while it
        // symbolises; parked there, it would block every later panic and print.
        if std::thread::panicking() {
            self.held.store(held, Ordering::Relaxed);
            return;
        }
        if held > self.limit {
            self.park(Stop::Memory);
        }
        if self.cancelled.load(Ordering::Relaxed) {
            self.park(Stop::Time);
        }
        self.held.store(held, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        let held = self.held.load(Ordering::Relaxed);
        self.held.store(held.saturating_sub(n), Ordering::Relaxed);
    }

    /// Runs inside the allocator: locking a std mutex, notifying a condvar and sleeping do not
    /// allocate.
    fn park(&self, why: Stop) -> ! {
        CURRENT.with(|c| c.set(std::ptr::null()));
        {
            let mut state = self.state();
            if !state.finished && state.stop.is_none() {
                state.stop = Some(why);
            }
        }
        self.changed.notify_all();
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

fn with_budget(f: impl FnOnce(&Budget)) {
    let budget = CURRENT.with(Cell::get);
    if !budget.is_null() {
        // SAFETY: the pointer is set by `run`'s worker from an Arc that the worker holds until
        // after it clears the pointer (or forever, once parked).
        f(unsafe { &*budget })
    }
}

// SAFETY: every method forwards to `System` with the caller's layout; the count is bookkeeping.
unsafe impl GlobalAlloc for GuardedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        with_budget(|b| b.charge(layout.size()));
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        with_budget(|b| b.charge(layout.size()));
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        with_budget(|b| b.release(layout.size()));
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        with_budget(|b| {
            if new_size > layout.size() {
                b.charge(new_size - layout.size());
            } else {
                b.release(layout.size() - new_size);
            }
        });
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn new_budget(limit: usize) -> Budget {
    Budget {
        limit,
        held: AtomicUsize::new(0),
        cancelled: AtomicBool::new(false),
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
    }
}

/// Whether the process's global allocator is [`GuardedAllocator`], so that [`run`] keeps its
/// memory budget: found once, by counting a probe allocation.
pub fn memory_bounded() -> bool {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let probe = new_budget(usize::MAX);
        CURRENT.with(|c| c.set(&probe));
        let allocated = std::hint::black_box(vec![0u8; 64]);
        let counted = probe.held.load(Ordering::Relaxed) > 0;
        CURRENT.with(|c| c.set(std::ptr::null()));
        drop(allocated);
        counted
    })
}

/// Stack of a worker, reserved (pages are used as touched): minijinja recurses per level of a
/// nested value when it prints or drops one, and fuel allows a nesting a million deep.
const STACK: usize = 512 << 20;

/// Runs `work` on a new thread under `limits` and waits for it. On [`Stop::Memory`] or
/// [`Stop::Time`] the thread is left parked (see the module docs).
pub fn run<T: Send + 'static>(limits: Limits, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Stop> {
    let budget = Arc::new(new_budget(if memory_bounded() {
        limits.memory
    } else {
        usize::MAX
    }));
    let slot: Arc<Mutex<Option<std::thread::Result<T>>>> = Arc::new(Mutex::new(None));
    let (worker_budget, worker_slot) = (budget.clone(), slot.clone());
    std::thread::Builder::new()
        .name("distill-untrusted".into())
        .stack_size(STACK)
        .spawn(move || {
            CURRENT.with(|c| c.set(Arc::as_ptr(&worker_budget)));
            let out = catch_unwind(AssertUnwindSafe(work));
            CURRENT.with(|c| c.set(std::ptr::null()));
            *worker_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
            worker_budget.state().finished = true;
            worker_budget.changed.notify_all();
        })
        .map_err(|e| Stop::Spawn(e.to_string()))?;

    let deadline = Instant::now() + limits.time;
    let mut state = budget.state();
    loop {
        if state.finished {
            break;
        }
        if let Some(stop) = state.stop.clone() {
            return Err(stop);
        }
        let now = Instant::now();
        if now >= deadline {
            budget.cancelled.store(true, Ordering::Relaxed);
            return Err(Stop::Time);
        }
        state = budget
            .changed
            .wait_timeout(state, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    drop(state);
    let out = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    match out {
        Some(Ok(value)) => Ok(value),
        Some(Err(panic)) => Err(Stop::Panic(
            distill_core::panic_message(panic.as_ref())
                .unwrap_or("unknown panic")
                .to_string(),
        )),
        None => Err(Stop::Panic("the worker finished without a result".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        memory: 16 << 20,
        time: Duration::from_secs(60),
    };

    #[test]
    fn work_within_the_budget_returns_its_value() {
        let out = run(SMALL, || {
            vec![7u8; 8 << 20].iter().map(|&b| b as usize).sum::<usize>()
        });
        assert_eq!(out, Ok(7 * (8 << 20)));
        // Freed memory is given back: many allocations, each under the budget, add up past it.
        let out = run(SMALL, || {
            (0..64).map(|i| vec![i as u8; 1 << 20].len()).sum::<usize>()
        });
        assert_eq!(out, Ok(64 << 20));
    }

    #[test]
    fn an_allocation_over_the_budget_is_never_made() {
        // Doubling a string: without the guard this asks for 2^40 bytes.
        let out = run(SMALL, || {
            let mut s = String::from("x");
            for _ in 0..40 {
                s = s.repeat(2);
            }
            s.len()
        });
        assert_eq!(out, Err(Stop::Memory));
    }

    #[test]
    fn the_deadline_stops_waiting() {
        let limits = Limits {
            memory: 16 << 20,
            time: Duration::from_millis(50),
        };
        let out: Result<(), Stop> = run(limits, || {
            loop {
                // Allocates, so the thread is parked once the caller gives up.
                std::hint::black_box(vec![0u8; 16]);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        assert_eq!(out, Err(Stop::Time));
    }

    #[test]
    fn the_test_binary_has_the_guarded_allocator() {
        assert!(memory_bounded());
    }

    #[test]
    fn a_panic_is_reported() {
        let out: Result<(), Stop> = run(SMALL, || panic!("boom"));
        assert_eq!(out, Err(Stop::Panic("boom".into())));
    }
}
