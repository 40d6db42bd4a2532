//! The runtime's error type. Every failure a user can cause (bad file, bad input, unsupported
//! graph) is one of these variants; nothing in the runtime panics on user data.

use std::fmt;

/// Result alias used throughout the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when opening or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file is not a well-formed `.acorn` file. `offset` is the byte offset of the field that
    /// failed validation.
    #[error("malformed .acorn file at byte offset {offset}: {reason}")]
    Format {
        /// Byte offset of the field that failed validation.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A checksum did not match: the file is damaged. `what` names the section or tensor.
    #[error("checksum mismatch in {what}: stored {stored:#010x}, computed {computed:#010x} (file is damaged)")]
    Checksum {
        /// The section or tensor.
        what: String,
        /// The CRC-32 the file stores.
        stored: u32,
        /// The CRC-32 of the bytes read.
        computed: u32,
    },
    /// The file was written for a newer (or unknown) format version.
    #[error("unsupported .acorn format version {found}: this runtime reads version {supported}; use a newer runtime")]
    Version {
        /// The file's version.
        found: u32,
        /// The version this runtime reads.
        supported: u32,
    },
    /// The graph inside the file is inconsistent (dangling value, bad attribute...).
    #[error("invalid model graph: {0}")]
    Graph(String),
    /// A caller-supplied input is missing, extra, or has the wrong dtype/shape.
    #[error("invalid input: {0}")]
    Input(String),
    /// Shape inference or execution failed at a node.
    #[error("node '{node}' ({op}): {reason}")]
    Node {
        /// The node's name in the graph.
        node: String,
        /// Its op type.
        op: String,
        /// What went wrong.
        reason: String,
    },
    /// Something valid that this runtime does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A configured resource limit would be exceeded.
    #[error("resource limit exceeded: {0}")]
    Limit(String),
    /// An operating-system I/O error.
    /// The message includes the OS error, which is therefore not also returned as
    /// `source()` (error reporters print the chain: it would appear twice).
    #[error("I/O error on '{path}': {error}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        error: std::io::Error,
    },
}

/// A stable numeric code for each error kind (used by the C ABI as its status codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ErrorCode {
    /// [`Error::Format`].
    Format = 1,
    /// [`Error::Checksum`].
    Checksum = 2,
    /// [`Error::Version`].
    Version = 3,
    /// [`Error::Graph`].
    Graph = 4,
    /// [`Error::Input`].
    Input = 5,
    /// [`Error::Node`].
    Node = 6,
    /// [`Error::Unsupported`].
    Unsupported = 7,
    /// [`Error::Limit`].
    Limit = 8,
    /// [`Error::Io`].
    Io = 9,
}

impl Error {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Format { .. } => ErrorCode::Format,
            Error::Checksum { .. } => ErrorCode::Checksum,
            Error::Version { .. } => ErrorCode::Version,
            Error::Graph(_) => ErrorCode::Graph,
            Error::Input(_) => ErrorCode::Input,
            Error::Node { .. } => ErrorCode::Node,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::Limit(_) => ErrorCode::Limit,
            Error::Io { .. } => ErrorCode::Io,
        }
    }

    pub(crate) fn format(offset: u64, reason: impl fmt::Display) -> Error {
        Error::Format { offset, reason: reason.to_string() }
    }
}

/// A node-level error without node context; the executor adds the node name.
#[derive(Debug)]
pub enum OpError {
    /// The op cannot run on these inputs: why.
    Failed(String),
    /// Output shapes depend on the *value* of this input, which is not known while planning.
    /// The planner reacts by making the plan depend on the input data behind it (see
    /// `exec::plan`); anywhere else it is an error like any other.
    NeedsValue {
        /// The op's name for the input.
        input: String,
    },
}

impl OpError {
    /// The message shown to users.
    pub fn message(&self) -> String {
        match self {
            OpError::Failed(reason) => reason.clone(),
            OpError::NeedsValue { input } => {
                format!("input '{input}' must be known when planning (its value decides output shapes)")
            }
        }
    }
}

impl<T: fmt::Display> From<T> for OpError {
    fn from(t: T) -> Self {
        OpError::Failed(t.to_string())
    }
}

/// Result type of op shape inference and kernels; the executor attaches the node name.
pub type OpResult<T> = std::result::Result<T, OpError>;

/// Early-return with an [`OpError`] built from a format string.
#[macro_export]
macro_rules! op_bail {
    ($($t:tt)*) => { return Err($crate::error::OpError::Failed(format!($($t)*))) };
}
