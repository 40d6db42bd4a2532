//! The worker pool that splits large kernels across threads: `threads − 1` workers per
//! requested thread count, created on first use and kept for the process. The caller runs parts
//! itself while the workers claim the rest.
//!
//! Hand-off speed decides whether splitting a 40 µs kernel pays at all, so a worker that has just
//! finished a part keeps polling for the next job for `SPIN` before it sleeps on a condition
//! variable: inside a model run (ops microseconds apart) the workers stay awake and a job reaches
//! them in well under a microsecond; an idle process costs no CPU after `SPIN`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker polls for new work before sleeping.
const SPIN: Duration = Duration::from_micros(100);

/// A published job: the caller's closure, erased to a raw pointer. It is dereferenced only for
/// a part claimed under [`Pool::state`]'s lock while the job is published, and the caller
/// unpublishes it and waits for every claimed part before its closure goes out of scope.
struct Job {
    task: *const (dyn Fn(usize) + Sync),
    parts: usize,
    next: usize,
}

// SAFETY: the pointee is `Sync` and outlives every use (see `Job`).
unsafe impl Send for Job {}

struct State {
    job: Option<Job>,
    /// Workers blocked on the condition variable.
    sleeping: usize,
}

struct Pool {
    state: Mutex<State>,
    wake: Condvar,
    /// Bumped whenever a job is published, so spinning workers notice without the lock.
    generation: AtomicU64,
    /// Claimed parts not yet finished.
    pending: AtomicUsize,
    /// Set when a part panicked; the caller re-raises.
    panicked: AtomicBool,
    /// One caller at a time; a second (or nested) caller runs its parts itself.
    submit: Mutex<()>,
    workers: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// Claims the next part of the published job, if any: `(task, index)`.
    fn claim(&self) -> Option<(*const (dyn Fn(usize) + Sync), usize)> {
        let mut st = lock(&self.state);
        let job = st.job.as_mut()?;
        if job.next >= job.parts {
            return None;
        }
        let i = job.next;
        job.next += 1;
        self.pending.fetch_add(1, Ordering::AcqRel);
        Some((job.task, i))
    }

    /// Runs claimed parts until none is left.
    fn drain(&self) {
        while let Some((task, i)) = self.claim() {
            // SAFETY: the part was claimed while the job was published; its caller waits for
            // `pending` to drop to zero before the closure behind `task` can be dropped.
            let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*task)(i) }));
            if r.is_err() {
                self.panicked.store(true, Ordering::Release);
            }
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn worker(self: Arc<Self>) {
        let mut seen = self.generation.load(Ordering::Acquire);
        loop {
            // Poll for a new job for SPIN, then sleep until one is published.
            let start = Instant::now();
            let mut polls = 0u32;
            while self.generation.load(Ordering::Acquire) == seen {
                std::hint::spin_loop();
                polls = polls.wrapping_add(1);
                if polls.is_multiple_of(64) && start.elapsed() > SPIN {
                    let mut st = lock(&self.state);
                    while self.generation.load(Ordering::Acquire) == seen {
                        st.sleeping += 1;
                        st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                        st.sleeping -= 1;
                    }
                    break;
                }
            }
            seen = self.generation.load(Ordering::Acquire);
            self.drain();
        }
    }
}

/// The pool with `threads − 1` workers (`threads ≥ 2`), or `None` if its threads cannot be
/// started (the caller then runs everything itself).
fn pool(threads: usize) -> Option<Arc<Pool>> {
    static POOLS: OnceLock<Mutex<Vec<Arc<Pool>>>> = OnceLock::new();
    let mut pools = lock(POOLS.get_or_init(|| Mutex::new(Vec::new())));
    if let Some(p) = pools.iter().find(|p| p.workers == threads - 1) {
        return Some(p.clone());
    }
    let p = Arc::new(Pool {
        state: Mutex::new(State { job: None, sleeping: 0 }),
        wake: Condvar::new(),
        generation: AtomicU64::new(0),
        pending: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        submit: Mutex::new(()),
        workers: threads - 1,
    });
    for i in 0..threads - 1 {
        let w = p.clone();
        let spawned = std::thread::Builder::new().name(format!("acorn-worker-{i}")).spawn(move || w.worker());
        if let Err(e) = spawned {
            // Workers already started only ever claim parts; without a full set the pool is
            // not registered and this caller runs single-threaded.
            log::warn!("cannot start {} worker threads ({e}); running on one thread", threads - 1);
            return None;
        }
    }
    pools.push(p.clone());
    Some(p)
}

/// Runs `task(0) … task(parts − 1)`, spreading them over `threads` threads (the caller's
/// included); returns when all are done. Each part runs exactly once.
///
/// # Panics
/// If a part panics (after every other part has finished).
pub fn for_each(threads: usize, parts: usize, task: &(dyn Fn(usize) + Sync)) {
    let pool = if threads >= 2 && parts >= 2 { pool(threads.min(parts)) } else { None };
    let Some(pool) = pool else {
        (0..parts).for_each(task);
        return;
    };
    // Busy (another session's call, or a part calling back in): run inline.
    let Ok(turn) = pool.submit.try_lock() else {
        (0..parts).for_each(task);
        return;
    };
    {
        let mut st = lock(&pool.state);
        let task: *const (dyn Fn(usize) + Sync + '_) = task;
        // SAFETY: (lifetime erasure) the pointer is unpublished below, after which no part can be
        // claimed, and this function returns only when every claimed part has finished.
        let task: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(task) };
        st.job = Some(Job { task, parts, next: 0 });
        pool.generation.fetch_add(1, Ordering::Release);
        if st.sleeping > 0 {
            pool.wake.notify_all();
        }
    }
    pool.drain();
    lock(&pool.state).job = None;
    while pool.pending.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    if pool.panicked.swap(false, Ordering::AcqRel) {
        // Release the pool first: unwinding with the guard held would poison it, and every later
        // call would run single-threaded.
        drop(turn);
        panic!("a kernel part panicked on a worker thread");
    }
}

/// Runs `f(start, chunk)` over `out` cut into contiguous chunks of whole `unit`s (rows), one per
/// thread, when it holds at least `min_per_part` floats per thread; otherwise once over the whole
/// of it. `start` is the chunk's offset in `out`. For elementwise loops too short to split by
/// anything but their output.
pub fn for_chunks(
    threads: usize,
    out: &mut [f32],
    unit: usize,
    min_per_part: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let units = out.len().checked_div(unit).unwrap_or(0);
    let parts = threads.min(out.len() / min_per_part.max(1)).min(units);
    if parts < 2 {
        f(0, out);
        return;
    }
    let per = units.div_ceil(parts) * unit;
    let len = out.len();
    let shared = SharedOut::new(out);
    for_each(threads, len.div_ceil(per), &|p| {
        let start = p * per;
        let end = (start + per).min(len);
        // SAFETY: parts cover disjoint ranges `start..end` of `out`, which outlives this call
        // (`for_each` returns when every part has finished) and is not otherwise used meanwhile.
        let chunk = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(start), end - start) };
        f(start, chunk);
    });
}

/// An output buffer shared by the parts of one kernel call: each part writes only its own
/// disjoint region (rows or columns), which the caller's split guarantees.
pub(crate) struct SharedOut<T = f32> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: parts write disjoint regions of a buffer that outlives the call (`for_each` returns
// only when every part is done).
unsafe impl<T: Send> Send for SharedOut<T> {}
// SAFETY: as for `Send`: no two parts touch the same element.
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}

impl<T> SharedOut<T> {
    pub(crate) fn new(out: &mut [T]) -> Self {
        SharedOut { ptr: out.as_mut_ptr(), len: out.len() }
    }

    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    pub(crate) fn ptr(self) -> *mut T {
        self.ptr
    }

    /// Elements in the buffer.
    pub(crate) fn len(self) -> usize {
        self.len
    }

    /// Elements `r` of the buffer.
    ///
    /// # Safety
    /// No other part reads or writes `r` while the slice lives, and the buffer outlives it.
    pub(crate) unsafe fn range<'a>(self, r: std::ops::Range<usize>) -> &'a mut [T] {
        assert!(r.start <= r.end && r.end <= self.len);
        // SAFETY: inside the buffer (asserted); exclusive and live by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.end - r.start) }
    }
}

/// Runs `f` on contiguous ranges of `0..n` of at least `min` items each (the last may be
/// shorter), one per thread: the per-call passes over a whole tensor (quantizing an input, its
/// layout) that would otherwise run on one thread while the products after them run on all.
pub(crate) fn for_ranges(threads: usize, n: usize, min: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let parts = threads.max(1).min(n.div_ceil(min.max(1))).max(1);
    let chunk = n.div_ceil(parts);
    for_each(parts, parts, &|p| {
        let r = (p * chunk).min(n)..((p + 1) * chunk).min(n);
        if !r.is_empty() {
            f(r);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_on_any_thread_count() {
        for threads in [1, 2, 3, 5] {
            for parts in [0, 1, 2, 3, 7, 64] {
                for _ in 0..50 {
                    let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                    for_each(threads, parts, &|i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads={threads} parts={parts}");
                }
            }
        }
    }

    #[test]
    fn chunks_cover_the_output_once_in_whole_units() {
        for threads in [1, 2, 3] {
            for (len, unit, min) in [(0, 4, 1), (7, 1, 1), (12, 4, 1), (100, 10, 30), (1000, 3, 64), (64, 1, 100)] {
                let mut out = vec![0.0f32; len];
                for_chunks(threads, &mut out, unit, min, &|start, chunk| {
                    assert!(start % unit.max(1) == 0 && chunk.len() % unit.max(1) == 0 || start + chunk.len() == len);
                    for (i, o) in chunk.iter_mut().enumerate() {
                        *o += (start + i) as f32 + 1.0;
                    }
                });
                assert!(out.iter().enumerate().all(|(i, &o)| o == i as f32 + 1.0), "threads={threads} len={len}");
            }
        }
    }

    #[test]
    fn nested_and_concurrent_callers_finish() {
        // A part that splits again, and callers on several threads sharing one pool: the busy
        // pool runs the inner or competing call inline instead of deadlocking.
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..100 {
                        for_each(2, 4, &|_| {
                            for_each(2, 3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 100 * 4 * 3);
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_pool_survives() {
        let r = catch_unwind(|| {
            for_each(2, 4, &|i| {
                if i == 3 {
                    panic!("part 3 fails");
                }
            })
        });
        assert!(r.is_err());
        // Still a pool: with parts that take a while, the worker claims some of them. (Other
        // tests of this process share the pool; a call that finds it busy runs inline, so a
        // few attempts are allowed.)
        let on_worker = AtomicUsize::new(0);
        for _ in 0..20 {
            let n = AtomicUsize::new(0);
            for_each(2, 16, &|_| {
                std::thread::sleep(Duration::from_millis(2));
                n.fetch_add(1, Ordering::Relaxed);
                if std::thread::current().name().is_some_and(|t| t.starts_with("acorn-worker")) {
                    on_worker.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert_eq!(n.load(Ordering::Relaxed), 16);
            if on_worker.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
        assert!(on_worker.load(Ordering::Relaxed) > 0, "after a panic the pool ran everything inline");
    }
}
