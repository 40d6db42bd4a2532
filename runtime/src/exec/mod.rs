//! Execution: [`Model`] (a validated, memory-mapped file, shareable across threads), the
//! [`SessionBuilder`] → [`Session`] API, and the planner that turns the graph into a flat list
//! of steps over reusable buffers for each input-shape signature.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{Metadata, ModelFile};
use crate::graph::IoSpec;

mod layout;
pub(crate) mod plan;
mod session;

pub use session::{OpTime, Outputs, Resume, RunEnd, Session, SessionBuilder, StepDone, StepHook};

/// Bytes of memory this process can still take: the smaller of its cgroup's room (v2
/// `memory.max − memory.current`, or v1 `memory.limit_in_bytes − memory.usage_in_bytes`) and the
/// system's `MemAvailable`; `None` where none of them can be read (non-Linux). A session without
/// its own memory limit plans against this, so an input too large for the device is an
/// [`crate::Error::Limit`] instead of the kernel's out-of-memory kill.
pub fn available_memory() -> Option<usize> {
    // Read at most every 100 ms: a model planned on every run (data-dependent shapes) must not
    // pay three file reads per run.
    static LAST: std::sync::Mutex<Option<(std::time::Instant, Option<usize>)>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, v)) = *last {
        if at.elapsed() < std::time::Duration::from_millis(100) {
            return v;
        }
    }
    let v = read_available_memory();
    *last = Some((std::time::Instant::now(), v));
    v
}

fn read_available_memory() -> Option<usize> {
    fn read_u64(p: &str) -> Option<u64> {
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb.saturating_mul(1024))
    });
    // The process's own cgroup (v2: the line "0::/path"), then the namespace root.
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)))
        .unwrap_or_default();
    let mut cgroup = None;
    for dir in [format!("/sys/fs/cgroup{own}"), "/sys/fs/cgroup".to_string()] {
        if let (Some(max), Some(cur)) =
            (read_u64(&format!("{dir}/memory.max")), read_u64(&format!("{dir}/memory.current")))
        {
            cgroup = Some(max.saturating_sub(cur));
            break;
        }
    }
    if cgroup.is_none() {
        let v1 = "/sys/fs/cgroup/memory";
        if let (Some(max), Some(cur)) =
            (read_u64(&format!("{v1}/memory.limit_in_bytes")), read_u64(&format!("{v1}/memory.usage_in_bytes")))
        {
            cgroup = Some(max.saturating_sub(cur));
        }
    }
    let room = match (meminfo, cgroup) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(usize::try_from(room).unwrap_or(usize::MAX))
}

/// Options for opening a model.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Verify every tensor's checksum at open (reads all weights), and that narrow q8 codes are
    /// within ±64. Header and metadata checksums are always verified.
    pub verify_checksums: bool,
    /// Read the file into memory owned by the model instead of mapping it. A mapped file that
    /// another program rewrites in place (`cp new.acorn model.acorn`, a truncating editor or
    /// downloader) makes the next read of a changed page fault with `SIGBUS`, which no runtime
    /// can turn into an error; apps whose model files others may write should set this (it
    /// costs the file's size in RAM and a read at open). Acorn's own writers never rewrite in
    /// place: they write a new file and rename it over the old one, which is safe with a map.
    pub in_memory: bool,
}

/// A loaded model. Cheap to clone (shared); `Send + Sync`, so one model can serve many threads,
/// each with its own [`Session`].
#[derive(Clone, Debug)]
pub struct Model {
    pub(crate) file: Arc<ModelFile>,
}

impl Model {
    /// Memory-maps and validates a `.acorn` file.
    ///
    /// The map is only as stable as the file: replacing it by renaming (as every Acorn writer
    /// does) is safe, but rewriting it in place while it is open can end the process with
    /// `SIGBUS`. Use [`OpenOptions::in_memory`] when other programs may write the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// [`Model::open`] with options (e.g. full checksum verification).
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Model> {
        let file = if opts.in_memory {
            ModelFile::read(path, opts.verify_checksums)?
        } else {
            ModelFile::open(path, opts.verify_checksums)?
        };
        Self::from_file(file)
    }

    /// Adapts a validated file's weight layouts to the selected kernels.
    fn from_file(mut file: ModelFile) -> Result<Model> {
        // Ops whose family this build leaves out (Cargo features), all named at once.
        if let Some(message) = crate::ops::left_out(file.metadata().graph.all_nodes().map(|n| &n.op)) {
            return Err(Error::Unsupported(message));
        }
        layout::adapt_layouts(&mut file, crate::kernels::selected())?;
        layout::decode_conv_weights(&mut file, crate::kernels::selected())?;
        layout::decode_static_weights(&mut file, crate::kernels::selected())?;
        Ok(Model { file: Arc::new(file) })
    }

    /// Validates a model the caller holds in memory and hands over, read in place (no copy)
    /// when its first byte is 8-byte aligned — a `Vec<u8>` or `Box<[u8]>` always is:
    ///
    /// ```no_run
    /// # fn main() -> Result<(), acorn::Error> {
    /// let bytes: Vec<u8> = std::fs::read("model.acorn").map_err(|e| acorn::Error::Io { path: "model.acorn".into(), error: e })?;
    /// let model = acorn::Model::from_memory(bytes, &acorn::OpenOptions::default())?;
    /// # Ok(()) }
    /// ```
    pub fn from_memory(bytes: impl AsRef<[u8]> + Send + Sync + 'static, opts: &OpenOptions) -> Result<Model> {
        Self::from_file(ModelFile::from_shared(Box::new(bytes), opts.verify_checksums)?)
    }

    /// Maps and validates `len` bytes of an open file from byte `offset`, the way a model packed
    /// inside another file is opened (an Android APK asset stored uncompressed: the descriptor,
    /// offset and length `AAsset_openFileDescriptor` returns). Read in place when `offset` is a
    /// multiple of 8, else copied once.
    pub fn open_region(file: &std::fs::File, offset: u64, len: u64, opts: &OpenOptions) -> Result<Model> {
        Self::from_file(ModelFile::open_region(file, offset, len, opts.verify_checksums)?)
    }

    /// [`Model::open_region`] on a file descriptor the caller keeps owning (duplicated for the
    /// mapping; the caller may close its own afterwards): what the Android and JNI bindings call.
    #[cfg(unix)]
    pub fn open_fd(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64, opts: &OpenOptions) -> Result<Model> {
        let owned =
            fd.try_clone_to_owned().map_err(|e| Error::Io { path: format!("<descriptor {fd:?}>"), error: e })?;
        Self::open_region(&std::fs::File::from(owned), offset, len, opts)
    }

    /// Validates a model held in memory the caller keeps (copied once into an aligned buffer;
    /// [`Model::from_memory`] reads it in place).
    pub fn from_bytes(bytes: &[u8], opts: &OpenOptions) -> Result<Model> {
        Self::from_file(ModelFile::from_bytes(bytes, opts.verify_checksums)?)
    }

    /// The model's inputs, with types and (symbolic) shapes.
    pub fn inputs(&self) -> &[IoSpec] {
        &self.file.metadata().graph.inputs
    }

    /// The model's outputs.
    pub fn outputs(&self) -> &[IoSpec] {
        &self.file.metadata().graph.outputs
    }

    /// Everything stored in the file's metadata (graph, tensor table, provenance).
    pub fn metadata(&self) -> &Metadata {
        self.file.metadata()
    }

    /// The underlying file (tensor bytes, checksums).
    pub fn file(&self) -> &ModelFile {
        &self.file
    }

    /// Starts building a session on this model.
    pub fn session(&self) -> SessionBuilder {
        SessionBuilder::new(self.clone())
    }
}

// A model is shared across threads; each thread runs its own session.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    shareable::<Model>();
    movable::<Session>();
};
