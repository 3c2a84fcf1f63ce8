//! GPU time of decoding steps, from CUDA events: each step's span (what a step costs the GPU,
//! beside the host's time issuing it), and with `DISTILL_DECODE_PROFILE=1` each launch of
//! a direct step, by kind. What `distill bench generate` reports beside its tok/s.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use cudarc::driver::result::event;
use cudarc::driver::sys as cu;

static SPAN_NS: AtomicU64 = AtomicU64::new(0);
static SPANS: AtomicUsize = AtomicUsize::new(0);
static PROFILE: Mutex<BTreeMap<&'static str, (usize, f64)>> = Mutex::new(BTreeMap::new());

/// Fused steps whose GPU span was read, and the spans' total: from the first launch of a step
/// to the end of its last (gaps between launches included).
pub fn spans() -> (usize, Duration) {
    let ns = SPAN_NS.load(Ordering::Relaxed);
    (SPANS.load(Ordering::Relaxed), Duration::from_nanos(ns))
}

/// What profiled direct steps spent per kind of launch (a kernel's name, a GEMM's role):
/// launches and total GPU time, by name. Each launch's time runs from the end of the one
/// before: where the host issues more slowly than the GPU runs, it includes that wait.
pub fn profile() -> Vec<(&'static str, usize, Duration)> {
    let p = super::stream::lock(&PROFILE);
    p.iter()
        .map(|(name, &(n, ms))| (*name, n, Duration::from_secs_f64(ms / 1e3)))
        .collect()
}

/// Whether direct steps are profiled per launch (`DISTILL_DECODE_PROFILE=1`).
pub(super) fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DISTILL_DECODE_PROFILE").is_ok_and(|v| v == "1"))
}

/// Two events around each step of one cache. A step's span is read once its end is done,
/// at a later step's start: with decoding a step ahead of the host, the step before is often
/// still running when the next one starts.
#[derive(Default)]
pub(super) struct StepClock {
    /// Recorded pairs not read yet, oldest first.
    recorded: std::collections::VecDeque<[cu::CUevent; 2]>,
    free: Vec<[cu::CUevent; 2]>,
    current: Option<[cu::CUevent; 2]>,
}

/// Steps whose spans a clock waits to read at the most; an older one is given up.
const UNREAD: usize = 4;

// SAFETY: events are only used on cubecl's device thread, under their owner's lock, and
// destroyed there too.
unsafe impl Send for StepClock {}

impl StepClock {
    /// Marks a step's start on `stream`, after reading the spans of earlier steps that are
    /// done.
    pub(super) fn start(&mut self, stream: cu::CUstream) -> Result<(), String> {
        while let Some(&[a, b]) = self.recorded.front() {
            // SAFETY: live events recorded on one stream, in this order.
            if unsafe { event::query(b) }.is_err() {
                break;
            }
            if let Ok(ms) = unsafe { event::elapsed(a, b) } {
                SPAN_NS.fetch_add((f64::from(ms) * 1e6) as u64, Ordering::Relaxed);
                SPANS.fetch_add(1, Ordering::Relaxed);
            }
            self.free.extend(self.recorded.pop_front());
        }
        // Past `UNREAD` waiting, the oldest pair is given up and reused.
        let reuse = match self.free.is_empty() && self.recorded.len() >= UNREAD {
            true => self.recorded.pop_front(),
            false => self.free.pop(),
        };
        let pair = match reuse {
            Some(pair) => pair,
            None => [create()?, create()?],
        };
        self.current = Some(pair);
        // SAFETY: a live event and stream.
        unsafe { event::record(pair[0], stream) }.map_err(|e| format!("cuEventRecord: {e}"))
    }

    /// Marks the end of the step [`StepClock::start`] began.
    pub(super) fn stop(&mut self, stream: cu::CUstream) -> Result<(), String> {
        let Some(pair) = self.current.take() else {
            return Ok(());
        };
        self.recorded.push_back(pair);
        // SAFETY: a live event and stream.
        unsafe { event::record(pair[1], stream) }.map_err(|e| format!("cuEventRecord: {e}"))
    }
}

impl Drop for StepClock {
    fn drop(&mut self) {
        let pairs = self.recorded.iter().chain(&self.free).chain(&self.current);
        for &e in pairs.flatten() {
            // SAFETY: created by this clock, destroyed once.
            let _ = unsafe { event::destroy(e) };
        }
    }
}

/// An event after each launch of one direct step, read at its end
/// ([`Timeline::finish`]).
pub(super) struct Timeline {
    marks: Vec<(&'static str, cu::CUevent)>,
}

impl Timeline {
    /// A timeline whose first mark is recorded now on `stream`.
    pub(super) fn start(stream: cu::CUstream) -> Result<Self, String> {
        let mut t = Timeline { marks: Vec::new() };
        t.mark("start", stream)?;
        Ok(t)
    }

    /// Marks the end of launch `name`.
    pub(super) fn mark(&mut self, name: &'static str, stream: cu::CUstream) -> Result<(), String> {
        let e = create()?;
        self.marks.push((name, e));
        // SAFETY: a live event and stream.
        unsafe { event::record(e, stream) }.map_err(|e| format!("cuEventRecord: {e}"))
    }

    /// Waits for the step and adds each launch's time to [`profile`]'s.
    pub(super) fn finish(self) -> Result<(), String> {
        if let Some(&(_, last)) = self.marks.last() {
            // SAFETY: a live, recorded event.
            unsafe { event::synchronize(last) }.map_err(|e| format!("cuEventSynchronize: {e}"))?;
        }
        let mut p = super::stream::lock(&PROFILE);
        for pair in self.marks.windows(2) {
            let [(_, a), (name, b)] = [pair[0], pair[1]];
            // SAFETY: two live events recorded on one stream, in this order, both done.
            if let Ok(ms) = unsafe { event::elapsed(a, b) } {
                let entry = p.entry(name).or_default();
                *entry = (entry.0 + 1, entry.1 + f64::from(ms));
            }
        }
        Ok(())
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        for &(_, e) in &self.marks {
            // SAFETY: created by this timeline, destroyed once.
            let _ = unsafe { event::destroy(e) };
        }
    }
}

fn create() -> Result<cu::CUevent, String> {
    event::create(cu::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| format!("cuEventCreate: {e}"))
}
