//! The worker pool that splits large kernels across threads. One rayon pool per requested thread
//! count, created on first use and kept for the process: a session with `threads = N` runs one
//! share of the work on the calling thread and the other `N − 1` shares on the pool's workers.

use std::sync::{Arc, Mutex, OnceLock};

type Pools = Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>>;

/// The pool with `threads − 1` workers (`threads ≥ 2`), or `None` if it cannot be created
/// (the caller then runs everything itself).
fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Pools> = OnceLock::new();
    let pools = POOLS.get_or_init(|| Mutex::new(Vec::new()));
    let mut g = pools.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = g.iter().find(|(n, _)| *n == threads) {
        return Some(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(threads - 1)
        .thread_name(|i| format!("acorn-worker-{i}"))
        .build()
        .map_err(|e| log::warn!("cannot start {} worker threads ({e}); running on one thread", threads - 1))
        .ok()?;
    let p = Arc::new(p);
    g.push((threads, p.clone()));
    Some(p)
}

/// Runs `task(0) … task(parts − 1)`, spreading them over `threads` threads (the caller's
/// included); returns when all are done. Each part runs exactly once.
pub fn for_each(threads: usize, parts: usize, task: &(dyn Fn(usize) + Sync)) {
    let workers = if threads >= 2 && parts >= 2 { pool(threads.min(parts)) } else { None };
    match workers {
        None => (0..parts).for_each(task),
        Some(p) => p.in_place_scope(|s| {
            for i in 1..parts {
                s.spawn(move |_| task(i));
            }
            task(0);
        }),
    }
}

/// An output buffer shared by the parts of one kernel call: each part writes only its own
/// disjoint region (rows or columns), which the caller's split guarantees.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: parts write disjoint regions of a buffer that outlives the call (`for_each` returns
// only when every part is done).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        SharedOut { ptr: out.as_mut_ptr(), len: out.len() }
    }

    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.ptr
    }

    /// Floats in the buffer.
    pub(crate) fn len(self) -> usize {
        self.len
    }
}
