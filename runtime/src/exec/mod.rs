//! Execution: [`Model`] (a validated, memory-mapped file, shareable across threads), the
//! [`SessionBuilder`] → [`Session`] API, and the planner that turns the graph into a flat list
//! of steps over reusable buffers for each input-shape signature.

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::format::{Metadata, ModelFile};
use crate::graph::IoSpec;

pub(crate) mod plan;
mod session;

pub use session::{OpTime, Session, SessionBuilder};

/// Options for opening a model.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Verify every tensor's checksum at open (reads all weights). Header and metadata
    /// checksums are always verified.
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
        Ok(Model { file: Arc::new(file) })
    }

    /// Validates a model held in memory.
    pub fn from_bytes(bytes: &[u8], opts: &OpenOptions) -> Result<Model> {
        Ok(Model { file: Arc::new(ModelFile::from_bytes(bytes, opts.verify_checksums)?) })
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
