//! The C ABI of the Acorn runtime (`include/acorn.h`, generated from this file by cbindgen; a
//! test fails when the committed header is stale).
//!
//! - **Handles** (`AcornModel`, `AcornSession`, `AcornGenerator`) are numbers, not pointers:
//!   each names an entry of one registry and is never reused, so a freed, doubly freed, zeroed or
//!   made-up handle gets `ACORN_STATUS_INVALID_HANDLE`, never a crash.
//! - **Status codes**: every function returns an `AcornStatus`; on failure
//!   `acorn_last_error()` gives the message (per thread, kept until the next failure there).
//! - **Tensors** cross as views (`AcornTensor`: pointer, dtype, shape): inputs are read in place,
//!   outputs stay owned by the session until its next run or its free.
//! - **No unwinding crosses the boundary**: every function runs under `catch_unwind`; a panic
//!   becomes `ACORN_STATUS_PANIC` and leaves the object it happened in refusing further use.
//! - **Generation** (feature `text`): `acorn_generate` streams text pieces and token ids to a
//!   callback, which can stop it, as can `acorn_generator_cancel` from another thread.
//!
//! Thread safety: every function may be called from any thread. A model serves many sessions at
//! once; one session or generator runs one call at a time (a second concurrent call gets
//! `ACORN_STATUS_BUSY` rather than waiting).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
#[cfg(feature = "text")]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use acorn::{DType, Dim, IoSpec, Model, Session, Tensor, View};

/// What a call returned. `ACORN_STATUS_OK` is 0; the codes 1–9 are the runtime's error kinds;
/// the rest are this interface's own.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcornStatus {
    /// Success.
    Ok = 0,
    /// The file is not a well-formed `.acorn` file.
    Format = 1,
    /// A checksum did not match: the file is damaged.
    Checksum = 2,
    /// The file was written for a newer format version.
    Version = 3,
    /// The graph inside the file is inconsistent.
    Graph = 4,
    /// An input is missing, extra, or has the wrong dtype or shape.
    Input = 5,
    /// A node failed while planning or running.
    Node = 6,
    /// Something valid that this runtime does not implement.
    Unsupported = 7,
    /// A resource limit (memory, context length) would be exceeded.
    Limit = 8,
    /// The operating system refused a file operation.
    Io = 9,
    /// A pointer argument that must not be NULL was NULL.
    NullArgument = 100,
    /// The handle is zero, was freed, or names an object of another kind.
    InvalidHandle = 101,
    /// An argument is out of range (unknown dtype code, negative dimension, text that is not
    /// UTF-8, index past the end).
    InvalidArgument = 102,
    /// The session or generator is running a call on another thread (or this call came from
    /// its own token callback).
    Busy = 103,
    /// The text feature is missing from this build, or the model has no tokenizer.
    NoText = 104,
    /// An internal error (a panic in the library). The object it happened in refuses further
    /// calls; free it.
    Panic = 105,
}

/// Element types, as in `AcornTensor::dtype`.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcornDtype {
    /// 32-bit float.
    F32 = 1,
    /// 16-bit IEEE float.
    F16 = 2,
    /// 8-bit signed integer.
    I8 = 3,
    /// 8-bit unsigned integer.
    U8 = 4,
    /// 32-bit signed integer.
    I32 = 5,
    /// 64-bit signed integer.
    I64 = 6,
    /// Boolean, one byte (0 or 1).
    Bool = 7,
    /// 64-bit float.
    F64 = 8,
    /// 16-bit signed integer.
    I16 = 9,
    /// 16-bit unsigned integer.
    U16 = 10,
    /// 32-bit unsigned integer.
    U32 = 11,
    /// 64-bit unsigned integer.
    U64 = 12,
    /// bfloat16 (the upper half of an f32), 2 bytes.
    Bf16 = 13,
    /// 4-bit signed integer, one per byte (sign-extended).
    I4 = 14,
    /// 4-bit unsigned integer, one per byte.
    U4 = 15,
    /// 2-bit signed integer, one per byte (sign-extended).
    I2 = 16,
    /// 2-bit unsigned integer, one per byte.
    U2 = 17,
    /// 8-bit float E4M3 (bias 7, no infinities), its bits.
    F8E4m3fn = 18,
    /// 8-bit float E4M3 (bias 8, no negative zero), its bits.
    F8E4m3fnuz = 19,
    /// 8-bit float E5M2 (bias 15, IEEE-like), its bits.
    F8E5m2 = 20,
    /// 8-bit float E5M2 (bias 16, no negative zero), its bits.
    F8E5m2fnuz = 21,
    /// 4-bit float E2M1 (MX FP4: ±6 the largest, no infinities or NaN), one per byte.
    F4e2m1 = 22,
    /// 8-bit power of two E8M0 (the MX block scale: 2^(bits − 127), 0xFF NaN), its bits.
    F8e8m0 = 23,
}

const DTYPES: [(AcornDtype, DType); 23] = [
    (AcornDtype::F32, DType::F32),
    (AcornDtype::F16, DType::F16),
    (AcornDtype::I8, DType::I8),
    (AcornDtype::U8, DType::U8),
    (AcornDtype::I32, DType::I32),
    (AcornDtype::I64, DType::I64),
    (AcornDtype::Bool, DType::Bool),
    (AcornDtype::F64, DType::F64),
    (AcornDtype::I16, DType::I16),
    (AcornDtype::U16, DType::U16),
    (AcornDtype::U32, DType::U32),
    (AcornDtype::U64, DType::U64),
    (AcornDtype::Bf16, DType::BF16),
    (AcornDtype::I4, DType::I4),
    (AcornDtype::U4, DType::U4),
    (AcornDtype::I2, DType::I2),
    (AcornDtype::U2, DType::U2),
    (AcornDtype::F8E4m3fn, DType::F8E4M3FN),
    (AcornDtype::F8E4m3fnuz, DType::F8E4M3FNUZ),
    (AcornDtype::F8E5m2, DType::F8E5M2),
    (AcornDtype::F8E5m2fnuz, DType::F8E5M2FNUZ),
    (AcornDtype::F4e2m1, DType::F4E2M1),
    (AcornDtype::F8e8m0, DType::F8E8M0),
];

fn dtype_from_code(code: i32) -> Result<DType, Failure> {
    DTYPES.iter().find(|(c, _)| *c as i32 == code).map(|(_, d)| *d).ok_or_else(|| {
        Failure::new(AcornStatus::InvalidArgument, format!("unknown dtype code {code} (see AcornDtype)"))
    })
}

fn dtype_code(d: DType) -> i32 {
    DTYPES.iter().find(|(_, t)| *t == d).map_or(0, |(c, _)| *c as i32)
}

/// A loaded model (`acorn_model_open`). 0 is never a valid handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcornModel {
    /// Opaque.
    pub id: u64,
}

/// A session: one model's run state (`acorn_session_new`). 0 is never a valid handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcornSession {
    /// Opaque.
    pub id: u64,
}

/// An intent classifier: a model `acorn convert --train` wrote, with its tokenizer
/// (`acorn_classifier_new`). 0 is never a valid handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcornClassifier {
    /// Opaque.
    pub id: u64,
}

/// Sentence embeddings of text from an encoder with its tokenizer (`acorn_embedder_new`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcornEmbedder {
    /// Opaque.
    pub id: u64,
}

/// Labelled embeddings collected on the device (`acorn_trainer_new`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcornTrainer {
    /// Opaque.
    pub id: u64,
}

/// A classification head fitted on the device or loaded from a file (`acorn_trainer_fit`,
/// `acorn_head_load`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcornHead {
    /// Opaque.
    pub id: u64,
}

/// One utterance's class (`acorn_classify`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcornPrediction {
    /// Index of the label (`acorn_classifier_label`).
    pub label: u32,
    /// Its probability.
    pub score: f32,
    /// The 1-based encoder layer whose head answered (`layers` when the whole encoder ran).
    pub exit_layer: u32,
    /// The encoder's layer count.
    pub layers: u32,
}

/// How `acorn_trainer_fit` fits a head.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcornHeadKind {
    /// Nearest prototype: instant, works from one example per label.
    Prototype = 1,
    /// Softmax regression: a few milliseconds, more accurate with several examples per label.
    Softmax = 2,
}

/// A text generator over a decoder model with its KV cache (`acorn_generator_new`). 0 is never
/// a valid handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AcornGenerator {
    /// Opaque.
    pub id: u64,
}

/// A tensor view. As an input: `data` holds `byte_len` bytes of a dense row-major tensor of
/// `dtype` (an `AcornDtype` code) and `shape[0..rank]`, aligned to the element size; it is read
/// in place during the call and never kept. As an output: every field points into memory the
/// session owns, valid until the session's next run or its free.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcornTensor {
    /// The input's or output's name (NUL-terminated UTF-8).
    pub name: *const c_char,
    /// An `AcornDtype` code.
    pub dtype: i32,
    /// `rank` dimensions, outermost first.
    pub shape: *const i64,
    /// Number of dimensions (0 for a scalar).
    pub rank: usize,
    /// The elements.
    pub data: *const c_void,
    /// Size of `data` in bytes.
    pub byte_len: usize,
}

/// What a model declares about one of its inputs or outputs (`acorn_model_input`). Pointers
/// are valid until the model is freed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcornIoInfo {
    /// The name (NUL-terminated UTF-8).
    pub name: *const c_char,
    /// An `AcornDtype` code.
    pub dtype: i32,
    /// `rank` dimensions; -1 where the size is chosen at run time.
    pub shape: *const i64,
    /// Number of dimensions; -1 when the model declares no shape.
    pub rank: i64,
}

// ---------------------------------------------------------------------------------------------
// Errors

struct Failure {
    status: AcornStatus,
    message: String,
}

impl Failure {
    fn new(status: AcornStatus, message: impl Into<String>) -> Self {
        Failure { status, message: message.into() }
    }
}

// The statuses 1–9 are the runtime's `ErrorCode`s, number for number.
const _: () = {
    use acorn::ErrorCode as C;
    assert!(AcornStatus::Format as i32 == C::Format as i32 && AcornStatus::Checksum as i32 == C::Checksum as i32);
    assert!(AcornStatus::Version as i32 == C::Version as i32 && AcornStatus::Graph as i32 == C::Graph as i32);
    assert!(AcornStatus::Input as i32 == C::Input as i32 && AcornStatus::Node as i32 == C::Node as i32);
    assert!(AcornStatus::Unsupported as i32 == C::Unsupported as i32 && AcornStatus::Limit as i32 == C::Limit as i32);
    assert!(AcornStatus::Io as i32 == C::Io as i32);
};

impl From<acorn::Error> for Failure {
    fn from(e: acorn::Error) -> Self {
        use acorn::ErrorCode as C;
        let status = match e.code() {
            C::Format => AcornStatus::Format,
            C::Checksum => AcornStatus::Checksum,
            C::Version => AcornStatus::Version,
            C::Graph => AcornStatus::Graph,
            C::Input => AcornStatus::Input,
            C::Node => AcornStatus::Node,
            C::Unsupported => AcornStatus::Unsupported,
            C::Limit => AcornStatus::Limit,
            C::Io => AcornStatus::Io,
        };
        Failure::new(status, e.to_string())
    }
}

#[cfg(feature = "text")]
impl From<acorn_text::Error> for Failure {
    fn from(e: acorn_text::Error) -> Self {
        match e {
            acorn_text::Error::Model(m) => m.into(),
            acorn_text::Error::Input(m) => Failure::new(AcornStatus::Input, m),
            other => Failure::new(AcornStatus::NoText, other.to_string()),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message never holds NUL in practice; if one does, it is cut there.
    let bytes: Vec<u8> = message.bytes().take_while(|&b| b != 0).collect();
    let c = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f` with no unwinding past it: its failure or panic becomes a status (and the message
/// the thread's last error).
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> AcornStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => AcornStatus::Ok,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            set_last_error(&format!("internal error in the Acorn library (a panic: {what}); please report it"));
            AcornStatus::Panic
        }
    }
}

fn non_null<T>(p: *const T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        Err(Failure::new(AcornStatus::NullArgument, format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

/// # Safety
/// `p` is NULL or a NUL-terminated string readable for the call.
unsafe fn utf8<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    non_null(p, what)?;
    // SAFETY: non-NULL and NUL-terminated (caller contract).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| Failure::new(AcornStatus::InvalidArgument, format!("{what} is not UTF-8: {e}")))
}

/// Writes `v` through `out`.
///
/// # Safety
/// `out` is NULL (refused) or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, v: T, what: &str) -> Result<(), Failure> {
    non_null(out, what)?;
    // SAFETY: non-NULL and writable (caller contract).
    unsafe { out.write(v) };
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The registry of live objects

struct IoOwned {
    name: CString,
    dtype: i32,
    shape: Vec<i64>,
    rank: i64,
}

impl IoOwned {
    fn of(spec: &IoSpec) -> Self {
        let shape: Vec<i64> = spec
            .dims
            .iter()
            .flatten()
            .map(|d| match d {
                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                Dim::Sym(_) => -1,
            })
            .collect();
        IoOwned {
            name: CString::new(spec.name.replace('\0', "")).unwrap_or_default(),
            dtype: dtype_code(spec.dtype),
            rank: spec.dims.as_ref().map_or(-1, |d| d.len() as i64),
            shape,
        }
    }

    fn info(&self) -> AcornIoInfo {
        AcornIoInfo { name: self.name.as_ptr(), dtype: self.dtype, shape: self.shape.as_ptr(), rank: self.rank }
    }
}

struct ModelEntry {
    model: Model,
    inputs: Vec<IoOwned>,
    outputs: Vec<IoOwned>,
}

struct OutputOwned {
    name: CString,
    shape: Vec<i64>,
    tensor: Tensor,
}

struct SessionState {
    session: Session,
    outputs: Vec<OutputOwned>,
}

#[cfg(feature = "text")]
struct GenState {
    generator: acorn::llm::Generator,
    tokenizer: tokenizers::Tokenizer,
    stop: Vec<u32>,
}

#[cfg(feature = "text")]
struct GenEntry {
    state: Mutex<GenState>,
    cancel: AtomicBool,
}

#[derive(Clone)]
enum Object {
    Model(Arc<ModelEntry>),
    Session(Arc<Mutex<SessionState>>),
    #[cfg(feature = "text")]
    Generator(Arc<GenEntry>),
    #[cfg(feature = "text")]
    Classifier(Arc<Mutex<ClassifierState>>),
    #[cfg(feature = "text")]
    Embedder(Arc<Mutex<acorn_text::TextEmbedder>>),
    Trainer(Arc<Mutex<acorn::head::Trainer>>),
    Head(Arc<HeadEntry>),
}

#[cfg(feature = "text")]
struct ClassifierState {
    classifier: acorn_text::TextClassifier,
    labels: Vec<CString>,
}

struct HeadEntry {
    head: acorn::head::Head,
    labels: Vec<CString>,
}

fn c_strings(list: &[String]) -> Vec<CString> {
    list.iter().map(|l| CString::new(l.replace('\0', "")).unwrap_or_default()).collect()
}

struct Registry {
    next: u64,
    objects: BTreeMap<u64, Object>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { next: 1, objects: BTreeMap::new() });

fn registry() -> MutexGuard<'static, Registry> {
    // The registry is only ever held for a map operation, which does not panic; a poisoned lock
    // still guards a consistent map.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn insert(obj: Object) -> u64 {
    let mut r = registry();
    let id = r.next;
    r.next += 1;
    r.objects.insert(id, obj);
    id
}

fn lookup(id: u64, kind: &str) -> Result<Object, Failure> {
    registry().objects.get(&id).cloned().ok_or_else(|| {
        Failure::new(AcornStatus::InvalidHandle, format!("{kind} handle {id} is not live (never made, or freed)"))
    })
}

fn remove(id: u64, kind: &str, is_kind: impl Fn(&Object) -> bool) -> Result<(), Failure> {
    let mut r = registry();
    match r.objects.get(&id) {
        Some(o) if is_kind(o) => {
            // The object itself drops after the registry lock is released (a model's unmap or a
            // session's buffers need not hold up other threads).
            let obj = r.objects.remove(&id);
            drop(r);
            drop(obj);
            Ok(())
        }
        Some(_) => Err(Failure::new(AcornStatus::InvalidHandle, format!("handle {id} is not a {kind}"))),
        None => Err(Failure::new(
            AcornStatus::InvalidHandle,
            format!("{kind} handle {id} is not live (never made, or freed)"),
        )),
    }
}

fn model_entry(m: AcornModel) -> Result<Arc<ModelEntry>, Failure> {
    match lookup(m.id, "model")? {
        Object::Model(e) => Ok(e),
        _ => Err(Failure::new(AcornStatus::InvalidHandle, format!("handle {} is not a model", m.id))),
    }
}

fn session_entry(s: AcornSession) -> Result<Arc<Mutex<SessionState>>, Failure> {
    match lookup(s.id, "session")? {
        Object::Session(e) => Ok(e),
        _ => Err(Failure::new(AcornStatus::InvalidHandle, format!("handle {} is not a session", s.id))),
    }
}

/// Locks an object for one call: busy if another call holds it, refused if a panic left it
/// inconsistent.
fn try_lock<'a, T>(m: &'a Mutex<T>, kind: &str) -> Result<MutexGuard<'a, T>, Failure> {
    match m.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::WouldBlock) => Err(Failure::new(
            AcornStatus::Busy,
            format!("the {kind} is running a call on another thread (or this call came from its own callback)"),
        )),
        Err(TryLockError::Poisoned(_)) => Err(Failure::new(
            AcornStatus::Panic,
            format!("the {kind} was left unusable by an earlier internal error; free it and make a new one"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Library

/// The library's version (a static NUL-terminated string).
#[no_mangle]
pub extern "C" fn acorn_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The message of the last failed call on this thread ("" if none failed yet). The pointer is
/// valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn acorn_last_error() -> *const c_char {
    match catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr())) {
        Ok(p) => p,
        Err(_) => c"".as_ptr(),
    }
}

/// Panics inside the library (feature `panic-test` only): the status is ACORN_STATUS_PANIC and
/// nothing unwinds into the caller.
#[cfg(feature = "panic-test")]
#[no_mangle]
pub extern "C" fn acorn_debug_panic() -> AcornStatus {
    guard(|| panic!("acorn_debug_panic was called"))
}

// ---------------------------------------------------------------------------------------------
// Models

fn register_model(model: Model) -> AcornModel {
    let entry = ModelEntry {
        inputs: model.inputs().iter().map(IoOwned::of).collect(),
        outputs: model.outputs().iter().map(IoOwned::of).collect(),
        model,
    };
    AcornModel { id: insert(Object::Model(Arc::new(entry))) }
}

/// Opens (memory-maps and validates) a `.acorn` file. On success `*out` is the model.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_model_open(path: *const c_char, out: *mut AcornModel) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: the caller's contract.
        let path = unsafe { utf8(path, "path") }?;
        let model = Model::open(path)?;
        // SAFETY: checked non-NULL; writable (caller contract).
        unsafe { put(out, register_model(model), "out") }
    })
}

/// Opens a model from `len` bytes in memory (an Android asset, a download): the bytes are
/// copied, the caller's buffer may be freed after the call.
///
/// # Safety
/// `data` is NULL or readable for `len` bytes; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_model_open_bytes(data: *const u8, len: usize, out: *mut AcornModel) -> AcornStatus {
    guard(|| {
        non_null(data, "data")?;
        non_null(out, "out")?;
        // SAFETY: readable for `len` bytes (caller contract).
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        let model = Model::from_bytes(bytes, &acorn::OpenOptions::default())?;
        // SAFETY: checked non-NULL; writable (caller contract).
        unsafe { put(out, register_model(model), "out") }
    })
}

/// Opens the model stored in `len` bytes of an open file from byte `offset`: how an Android app
/// maps a model it ships uncompressed inside its APK (`AssetFileDescriptor`'s descriptor, start
/// offset and length), without copying it. The descriptor is duplicated for the mapping: the
/// caller may close its own right after the call. Read in place when `offset` is a multiple of
/// 8, else copied once. Unix only (elsewhere `ACORN_STATUS_UNSUPPORTED`).
///
/// # Safety
/// `fd` is an open file descriptor for the duration of the call (or negative, refused); `out`
/// is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_model_open_fd(fd: i32, offset: u64, len: u64, out: *mut AcornModel) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        if fd < 0 {
            return Err(Failure::new(AcornStatus::InvalidArgument, format!("file descriptor {fd} is negative")));
        }
        #[cfg(unix)]
        {
            // SAFETY: non-negative, and open for the call (caller contract); only duplicated.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let model = Model::open_fd(borrowed, offset, len, &acorn::OpenOptions::default())?;
            // SAFETY: checked non-NULL; writable (caller contract).
            unsafe { put(out, register_model(model), "out") }
        }
        #[cfg(not(unix))]
        {
            let _ = (offset, len);
            Err(Failure::new(AcornStatus::Unsupported, "opening from a file descriptor needs a Unix system"))
        }
    })
}

/// Frees a model. Sessions and generators made from it stay usable (they share it).
#[no_mangle]
pub extern "C" fn acorn_model_free(model: AcornModel) -> AcornStatus {
    guard(|| remove(model.id, "model", |o| matches!(o, Object::Model(_))))
}

/// The number of inputs (`*count`).
///
/// # Safety
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_model_input_count(model: AcornModel, count: *mut usize) -> AcornStatus {
    guard(|| {
        let e = model_entry(model)?;
        // SAFETY: the caller's contract.
        unsafe { put(count, e.inputs.len(), "count") }
    })
}

/// The number of outputs (`*count`).
///
/// # Safety
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_model_output_count(model: AcornModel, count: *mut usize) -> AcornStatus {
    guard(|| {
        let e = model_entry(model)?;
        // SAFETY: the caller's contract.
        unsafe { put(count, e.outputs.len(), "count") }
    })
}

fn io_at(list: &[IoOwned], index: usize, what: &str) -> Result<AcornIoInfo, Failure> {
    list.get(index).map(IoOwned::info).ok_or_else(|| {
        Failure::new(AcornStatus::InvalidArgument, format!("{what} index {index} is past the model's {}", list.len()))
    })
}

/// Input `index`'s name, dtype and declared shape (`*info`, valid until the model is freed).
///
/// # Safety
/// `info` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_model_input(model: AcornModel, index: usize, info: *mut AcornIoInfo) -> AcornStatus {
    guard(|| {
        let e = model_entry(model)?;
        // SAFETY: the caller's contract.
        unsafe { put(info, io_at(&e.inputs, index, "input")?, "info") }
    })
}

/// Output `index`'s name, dtype and declared shape (`*info`, valid until the model is freed).
///
/// # Safety
/// `info` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_model_output(model: AcornModel, index: usize, info: *mut AcornIoInfo) -> AcornStatus {
    guard(|| {
        let e = model_entry(model)?;
        // SAFETY: the caller's contract.
        unsafe { put(info, io_at(&e.outputs, index, "output")?, "info") }
    })
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// A session over `model` with `threads` worker threads (0 = 1). On success `*out` is the
/// session.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_session_new(model: AcornModel, threads: u32, out: *mut AcornSession) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        let e = model_entry(model)?;
        let session = e.model.session().with_threads(threads.max(1) as usize).commit()?;
        let id = insert(Object::Session(Arc::new(Mutex::new(SessionState { session, outputs: Vec::new() }))));
        // SAFETY: checked non-NULL; writable (caller contract).
        unsafe { put(out, AcornSession { id }, "out") }
    })
}

/// Frees a session and its outputs.
#[no_mangle]
pub extern "C" fn acorn_session_free(session: AcornSession) -> AcornStatus {
    guard(|| remove(session.id, "session", |o| matches!(o, Object::Session(_))))
}

/// One input as the caller gave it: name, dtype, shape, bytes.
type InputRef<'a> = (&'a str, DType, Vec<usize>, &'a [u8]);

/// Reads the caller's input views.
///
/// # Safety
/// `inputs` is readable for `n` entries whose pointers are valid as `AcornTensor` documents.
unsafe fn read_inputs<'a>(inputs: *const AcornTensor, n: usize) -> Result<Vec<InputRef<'a>>, Failure> {
    if n == 0 {
        return Ok(Vec::new());
    }
    non_null(inputs, "inputs")?;
    // SAFETY: readable for `n` entries (caller contract).
    let list = unsafe { std::slice::from_raw_parts(inputs, n) };
    let mut out = Vec::with_capacity(n);
    for (i, t) in list.iter().enumerate() {
        // SAFETY: the caller's contract.
        let name = unsafe { utf8(t.name, &format!("inputs[{i}].name")) }?;
        let dtype =
            dtype_from_code(t.dtype).map_err(|e| Failure::new(e.status, format!("input '{name}': {}", e.message)))?;
        if t.rank > 0 {
            non_null(t.shape, &format!("input '{name}': shape"))?;
        }
        let dims: &[i64] = if t.rank == 0 {
            &[]
        } else {
            // SAFETY: readable for `rank` entries (caller contract).
            unsafe { std::slice::from_raw_parts(t.shape, t.rank) }
        };
        let shape = dims.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<usize>, _>>().map_err(|_| {
            Failure::new(AcornStatus::InvalidArgument, format!("input '{name}': negative dimension in {dims:?}"))
        })?;
        let bytes: &[u8] = if t.byte_len == 0 {
            &[]
        } else {
            non_null(t.data, &format!("input '{name}': data"))?;
            // SAFETY: readable for `byte_len` bytes (caller contract).
            unsafe { std::slice::from_raw_parts(t.data as *const u8, t.byte_len) }
        };
        out.push((name, dtype, shape, bytes));
    }
    Ok(out)
}

/// Runs the session on `n` named inputs (read in place, not kept). The outputs replace the
/// previous run's: read them with `acorn_session_output`.
///
/// # Safety
/// `inputs` is NULL (with `n` 0) or readable for `n` entries, each valid as `AcornTensor`
/// documents.
#[no_mangle]
pub unsafe extern "C" fn acorn_session_run(session: AcornSession, inputs: *const AcornTensor, n: usize) -> AcornStatus {
    guard(|| {
        let e = session_entry(session)?;
        let mut st = try_lock(&e, "session")?;
        // SAFETY: the caller's contract.
        let raw = unsafe { read_inputs(inputs, n) }?;
        let views = raw
            .iter()
            .map(|(name, dtype, shape, bytes)| Ok((*name, View::dense(*dtype, shape, bytes)?)))
            .collect::<Result<Vec<_>, Failure>>()?;
        st.outputs.clear();
        let outputs = st.session.run_views(&views)?;
        let names = outputs.names().to_vec();
        st.outputs = names
            .into_iter()
            .zip(outputs.into_vec())
            .map(|(name, tensor)| OutputOwned {
                name: CString::new(name.replace('\0', "")).unwrap_or_default(),
                shape: tensor.shape().iter().map(|&d| d as i64).collect(),
                tensor,
            })
            .collect();
        Ok(())
    })
}

/// The number of outputs the last run left (`*count`; 0 before the first run).
///
/// # Safety
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_session_output_count(session: AcornSession, count: *mut usize) -> AcornStatus {
    guard(|| {
        let e = session_entry(session)?;
        let st = try_lock(&e, "session")?;
        // SAFETY: the caller's contract.
        unsafe { put(count, st.outputs.len(), "count") }
    })
}

fn output_view(o: &OutputOwned) -> AcornTensor {
    let bytes = o.tensor.bytes();
    AcornTensor {
        name: o.name.as_ptr(),
        dtype: dtype_code(o.tensor.dtype()),
        shape: o.shape.as_ptr(),
        rank: o.shape.len(),
        data: bytes.as_ptr() as *const c_void,
        byte_len: bytes.len(),
    }
}

/// The last run's output `index` (`*out`: pointers owned by the session, valid until its next
/// run or its free).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_session_output(
    session: AcornSession,
    index: usize,
    out: *mut AcornTensor,
) -> AcornStatus {
    guard(|| {
        let e = session_entry(session)?;
        let st = try_lock(&e, "session")?;
        let o = st.outputs.get(index).ok_or_else(|| {
            Failure::new(
                AcornStatus::InvalidArgument,
                format!("output index {index} is past the last run's {} outputs", st.outputs.len()),
            )
        })?;
        // SAFETY: the caller's contract.
        unsafe { put(out, output_view(o), "out") }
    })
}

/// The last run's output called `name` (as `acorn_session_output`).
///
/// # Safety
/// `name` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_session_output_by_name(
    session: AcornSession,
    name: *const c_char,
    out: *mut AcornTensor,
) -> AcornStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let name = unsafe { utf8(name, "name") }?;
        let e = session_entry(session)?;
        let st = try_lock(&e, "session")?;
        let o = st.outputs.iter().find(|o| o.name.to_bytes() == name.as_bytes()).ok_or_else(|| {
            let names: Vec<_> = st.outputs.iter().map(|o| o.name.to_string_lossy().into_owned()).collect();
            Failure::new(
                AcornStatus::InvalidArgument,
                format!("the last run has no output '{name}' (it has {names:?})"),
            )
        })?;
        // SAFETY: the caller's contract.
        unsafe { put(out, output_view(o), "out") }
    })
}

// ---------------------------------------------------------------------------------------------
// Generation

/// Settings of one `acorn_generate` call (`acorn_generate_options_default` gives greedy
/// decoding of up to 64 tokens).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcornGenerateOptions {
    /// Most new tokens.
    pub max_tokens: u32,
    /// 0 = greedy (the most likely token); else sampling at this temperature.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// The sampler's seed (the same seed gives the same tokens).
    pub seed: u64,
    /// How tokens after the first are computed: an `AcornDecoding`.
    pub decoding: i32,
    /// `ACORN_DECODING_SPECULATIVE`: the exit (1-based layer) that drafts.
    pub exit_layer: u32,
    /// `ACORN_DECODING_SPECULATIVE`: tokens drafted per verification (0: 4).
    pub draft_tokens: u32,
    /// `ACORN_DECODING_EARLY_EXIT`: the top probability an exit needs (0 < t ≤ 1).
    pub exit_threshold: f32,
}

/// How a generation computes the tokens after the first (the model's exit heads come from
/// `acorn convert --exits`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcornDecoding {
    /// Every token through every layer.
    Plain = 0,
    /// Self-speculative: drafted by the exit after `exit_layer`, verified by the full model
    /// (greedy output identical to plain decoding).
    Speculative = 1,
    /// Self-speculative at the setting predicted fastest, plain decoding where none pays.
    Auto = 2,
    /// Per-token early exit at `exit_threshold` (lossy).
    EarlyExit = 3,
}

/// Why a generation ended.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcornStopReason {
    /// `max_tokens` were generated.
    MaxTokens = 0,
    /// The model produced one of its end-of-sequence tokens (not passed to the callback).
    StopToken = 1,
    /// The KV cache is full (`max_context`).
    ContextFull = 2,
    /// The callback returned nonzero, or `acorn_generator_cancel` was called.
    Cancelled = 3,
}

/// What one `acorn_generate` call did.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcornGenerateStats {
    /// Prompt tokens run (prefill).
    pub prompt_tokens: u32,
    /// Tokens passed to the callback.
    pub generated_tokens: u32,
    /// Prefill time, milliseconds.
    pub prefill_ms: f64,
    /// Decode time after the first token, milliseconds.
    pub decode_ms: f64,
    /// An `AcornStopReason`.
    pub stop_reason: i32,
    /// Self-speculative decoding: drafts the full model accepted per verification (else 0).
    pub accepted_per_draft: f64,
    /// Layers run per token after the first (fewer than the model's with early exits).
    pub mean_layers_per_token: f64,
}

/// Receives each generated token: `piece` is the text it completes (`len` bytes of UTF-8,
/// NUL-terminated; may be empty while a character spans tokens), `token` its id. Return 0 to go
/// on, nonzero to stop. `piece` is valid during the call only.
pub type AcornTokenCallback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, piece: *const c_char, len: usize, token: u32) -> i32>;

/// Greedy decoding of up to 64 tokens.
#[no_mangle]
pub extern "C" fn acorn_generate_options_default() -> AcornGenerateOptions {
    AcornGenerateOptions {
        max_tokens: 64,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        decoding: AcornDecoding::Plain as i32,
        exit_layer: 0,
        draft_tokens: 0,
        exit_threshold: 0.0,
    }
}

/// The decoding `opts` names, or why it names none.
#[cfg(feature = "text")]
fn decoding_of(opts: &AcornGenerateOptions) -> Result<acorn::llm::Decoding, Failure> {
    use acorn::llm::Decoding;
    Ok(match opts.decoding {
        0 => Decoding::Plain,
        1 => Decoding::Speculative {
            layer: opts.exit_layer,
            draft: if opts.draft_tokens == 0 { acorn::llm::DEFAULT_DRAFT } else { opts.draft_tokens as usize },
        },
        2 => Decoding::Auto,
        3 => Decoding::EarlyExit { threshold: opts.exit_threshold },
        d => return Err(Failure::new(AcornStatus::InvalidArgument, format!("decoding {d} is not an AcornDecoding"))),
    })
}

#[cfg(feature = "text")]
fn generator_entry(g: AcornGenerator) -> Result<Arc<GenEntry>, Failure> {
    match lookup(g.id, "generator")? {
        Object::Generator(e) => Ok(e),
        _ => Err(Failure::new(AcornStatus::InvalidHandle, format!("handle {} is not a generator", g.id))),
    }
}

/// A generator over a decoder `model` (a `.acorn` file with a KV-cache signature and an embedded
/// tokenizer), `threads` workers (0 = 1), a KV cache of `max_context` positions (0 = 2048).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_generator_new(
    model: AcornModel,
    threads: u32,
    max_context: u32,
    out: *mut AcornGenerator,
) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        let e = model_entry(model)?;
        #[cfg(feature = "text")]
        {
            let tokenizer = acorn_text::load_tokenizer(&e.model, None)
                .map_err(|err| Failure::new(AcornStatus::NoText, err.to_string()))?;
            let stop = acorn::llm::GenerationConfig::of(&e.model)?.eos_token_ids;
            let opts = acorn::llm::GeneratorOptions {
                threads: threads.max(1) as usize,
                max_context: if max_context == 0 { 2048 } else { max_context as usize },
                ..Default::default()
            };
            let generator = acorn::llm::Generator::new(&e.model, &opts)?;
            let entry =
                GenEntry { state: Mutex::new(GenState { generator, tokenizer, stop }), cancel: AtomicBool::new(false) };
            let id = insert(Object::Generator(Arc::new(entry)));
            // SAFETY: checked non-NULL; writable (caller contract).
            unsafe { put(out, AcornGenerator { id }, "out") }
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (e, threads, max_context);
            Err(Failure::new(AcornStatus::NoText, "this build of the library has no text generation (feature `text`)"))
        }
    })
}

/// Frees a generator and its KV cache.
#[no_mangle]
pub extern "C" fn acorn_generator_free(generator: AcornGenerator) -> AcornStatus {
    guard(|| {
        #[cfg(feature = "text")]
        return remove(generator.id, "generator", |o| matches!(o, Object::Generator(_)));
        #[cfg(not(feature = "text"))]
        Err(Failure::new(AcornStatus::InvalidHandle, format!("generator handle {} is not live", generator.id)))
    })
}

/// Empties the generator's context (the next prompt starts a new conversation).
#[no_mangle]
pub extern "C" fn acorn_generator_reset(generator: AcornGenerator) -> AcornStatus {
    guard(|| {
        #[cfg(feature = "text")]
        {
            let e = generator_entry(generator)?;
            try_lock(&e.state, "generator")?.generator.reset();
            Ok(())
        }
        #[cfg(not(feature = "text"))]
        Err(Failure::new(AcornStatus::InvalidHandle, format!("generator handle {} is not live", generator.id)))
    })
}

/// Asks a running `acorn_generate` on this generator to stop after the token it is on (callable
/// from any thread; a generation that starts later is not affected).
#[no_mangle]
pub extern "C" fn acorn_generator_cancel(generator: AcornGenerator) -> AcornStatus {
    guard(|| {
        #[cfg(feature = "text")]
        {
            generator_entry(generator)?.cancel.store(true, Ordering::SeqCst);
            Ok(())
        }
        #[cfg(not(feature = "text"))]
        Err(Failure::new(AcornStatus::InvalidHandle, format!("generator handle {} is not live", generator.id)))
    })
}

#[cfg(feature = "text")]
enum Prompt<'a> {
    Text(&'a str),
    Tokens(&'a [u32]),
}

/// # Safety
/// `opts`, `callback`, `user_data` and `stats` as `acorn_generate` documents.
#[cfg(feature = "text")]
unsafe fn generate(
    generator: AcornGenerator,
    prompt: Prompt<'_>,
    opts: *const AcornGenerateOptions,
    callback: AcornTokenCallback,
    user_data: *mut c_void,
    stats: *mut AcornGenerateStats,
) -> Result<(), Failure> {
    let e = generator_entry(generator)?;
    let mut st = try_lock(&e.state, "generator")?;
    e.cancel.store(false, Ordering::SeqCst);
    // SAFETY: NULL or readable (caller contract).
    let opts = if opts.is_null() { acorn_generate_options_default() } else { unsafe { opts.read() } };
    let sampling = acorn::llm::Sampling {
        temperature: opts.temperature,
        top_k: opts.top_k as usize,
        top_p: opts.top_p,
        seed: opts.seed,
    };
    let GenState { generator, tokenizer, stop } = &mut *st;
    let ids = match prompt {
        Prompt::Text(t) => acorn_text::encode(tokenizer, t)?,
        Prompt::Tokens(t) => t.to_vec(),
    };
    let mut text = acorn_text::Detokenizer::new(tokenizer);
    let decoding = decoding_of(&opts)?;
    let mut tokens = generator.generate_with(&ids, opts.max_tokens as usize, &sampling, stop, &decoding)?;
    let mut cancelled = false;
    let mut generated = 0u32;
    let mut piece = Vec::new();
    for t in &mut tokens {
        let t = t?;
        generated += 1;
        piece.clear();
        piece.extend_from_slice(text.push(t)?.as_bytes());
        let len = piece.len();
        piece.push(0);
        if let Some(cb) = callback {
            // SAFETY: a C function pointer the caller gave with its user data; `piece` outlives
            // the call.
            if unsafe { cb(user_data, piece.as_ptr() as *const c_char, len, t) } != 0 {
                cancelled = true;
                break;
            }
        }
        if e.cancel.load(Ordering::SeqCst) {
            cancelled = true;
            break;
        }
    }
    let reason = match (cancelled, tokens.stop_reason()) {
        (true, _) => AcornStopReason::Cancelled,
        (false, Some(acorn::llm::StopReason::StopToken(_))) => AcornStopReason::StopToken,
        (false, Some(acorn::llm::StopReason::ContextFull)) => AcornStopReason::ContextFull,
        _ => AcornStopReason::MaxTokens,
    };
    if !stats.is_null() {
        let s = tokens.stats();
        let out = AcornGenerateStats {
            prompt_tokens: s.prefill_tokens as u32,
            generated_tokens: generated,
            prefill_ms: s.prefill_seconds * 1e3,
            decode_ms: s.decode_seconds * 1e3,
            stop_reason: reason as i32,
            accepted_per_draft: s.accepted_per_draft(),
            mean_layers_per_token: s.mean_layers_per_token(),
        };
        // SAFETY: non-NULL and writable (caller contract).
        unsafe { stats.write(out) };
    }
    Ok(())
}

/// Generates after `prompt` (UTF-8 text, tokenized with the model's tokenizer, run from the
/// generator's current context), passing each new token to `callback` (may be NULL) with
/// `user_data`. `opts` NULL means `acorn_generate_options_default()`; `stats` may be NULL. The
/// context afterwards holds the prompt and every generated token but the last.
///
/// # Safety
/// `prompt` is NULL or NUL-terminated; `opts` NULL or readable; `callback` NULL or a function
/// safe to call with `user_data`; `stats` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_generate(
    generator: AcornGenerator,
    prompt: *const c_char,
    opts: *const AcornGenerateOptions,
    callback: AcornTokenCallback,
    user_data: *mut c_void,
    stats: *mut AcornGenerateStats,
) -> AcornStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let prompt = unsafe { utf8(prompt, "prompt") }?;
        #[cfg(feature = "text")]
        // SAFETY: the caller's contract.
        return unsafe { generate(generator, Prompt::Text(prompt), opts, callback, user_data, stats) };
        #[cfg(not(feature = "text"))]
        {
            let _ = (generator, prompt, opts, callback, user_data, stats);
            Err(Failure::new(AcornStatus::NoText, "this build of the library has no text generation (feature `text`)"))
        }
    })
}

/// As `acorn_generate` with the prompt given as `n` token ids.
///
/// # Safety
/// `prompt` is NULL or readable for `n` ids; the rest as `acorn_generate`.
#[no_mangle]
pub unsafe extern "C" fn acorn_generate_tokens(
    generator: AcornGenerator,
    prompt: *const u32,
    n: usize,
    opts: *const AcornGenerateOptions,
    callback: AcornTokenCallback,
    user_data: *mut c_void,
    stats: *mut AcornGenerateStats,
) -> AcornStatus {
    guard(|| {
        non_null(prompt, "prompt")?;
        // SAFETY: readable for `n` ids (caller contract).
        let ids = unsafe { std::slice::from_raw_parts(prompt, n) };
        #[cfg(feature = "text")]
        // SAFETY: the caller's contract.
        return unsafe { generate(generator, Prompt::Tokens(ids), opts, callback, user_data, stats) };
        #[cfg(not(feature = "text"))]
        {
            let _ = (generator, ids, opts, callback, user_data, stats);
            Err(Failure::new(AcornStatus::NoText, "this build of the library has no text generation (feature `text`)"))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Classification and on-device learning

#[cfg(feature = "text")]
fn classifier_entry(c: AcornClassifier) -> Result<Arc<Mutex<ClassifierState>>, Failure> {
    match lookup(c.id, "classifier")? {
        Object::Classifier(e) => Ok(e),
        _ => Err(Failure::new(AcornStatus::InvalidHandle, format!("handle {} is not a classifier", c.id))),
    }
}

#[cfg(feature = "text")]
fn embedder_entry(e: AcornEmbedder) -> Result<Arc<Mutex<acorn_text::TextEmbedder>>, Failure> {
    match lookup(e.id, "embedder")? {
        Object::Embedder(x) => Ok(x),
        _ => Err(Failure::new(AcornStatus::InvalidHandle, format!("handle {} is not an embedder", e.id))),
    }
}

fn trainer_entry(t: AcornTrainer) -> Result<Arc<Mutex<acorn::head::Trainer>>, Failure> {
    match lookup(t.id, "trainer")? {
        Object::Trainer(x) => Ok(x),
        _ => Err(Failure::new(AcornStatus::InvalidHandle, format!("handle {} is not a trainer", t.id))),
    }
}

fn head_entry(h: AcornHead) -> Result<Arc<HeadEntry>, Failure> {
    match lookup(h.id, "head")? {
        Object::Head(x) => Ok(x),
        _ => Err(Failure::new(AcornStatus::InvalidHandle, format!("handle {} is not a head", h.id))),
    }
}

#[cfg(not(feature = "text"))]
fn no_text<T>() -> Result<T, Failure> {
    Err(Failure::new(AcornStatus::NoText, "this build of the library has no text (feature `text`)"))
}

/// A classifier over `model` (a file `acorn convert --train` wrote: encoder, head, exits and
/// tokenizer), `threads` workers (0 = 1).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_classifier_new(
    model: AcornModel,
    threads: u32,
    out: *mut AcornClassifier,
) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        let e = model_entry(model)?;
        #[cfg(feature = "text")]
        {
            let classifier = acorn_text::TextClassifier::new(&e.model, threads.max(1) as usize)?;
            let labels = c_strings(classifier.labels());
            let id = insert(Object::Classifier(Arc::new(Mutex::new(ClassifierState { classifier, labels }))));
            // SAFETY: checked non-NULL; writable (caller contract).
            unsafe { put(out, AcornClassifier { id }, "out") }
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (e, threads);
            no_text()
        }
    })
}

/// Frees a classifier.
#[no_mangle]
pub extern "C" fn acorn_classifier_free(classifier: AcornClassifier) -> AcornStatus {
    guard(|| {
        #[cfg(feature = "text")]
        return remove(classifier.id, "classifier", |o| matches!(o, Object::Classifier(_)));
        #[cfg(not(feature = "text"))]
        Err(Failure::new(AcornStatus::InvalidHandle, format!("classifier handle {} is not live", classifier.id)))
    })
}

/// The number of labels (`*count`).
///
/// # Safety
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_classifier_label_count(classifier: AcornClassifier, count: *mut usize) -> AcornStatus {
    guard(|| {
        #[cfg(feature = "text")]
        {
            let e = classifier_entry(classifier)?;
            let n = try_lock(&e, "classifier")?.labels.len();
            // SAFETY: the caller's contract.
            unsafe { put(count, n, "count") }
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (classifier, count);
            no_text()
        }
    })
}

/// Label `index` (`*label`: NUL-terminated UTF-8, valid until the classifier is freed).
///
/// # Safety
/// `label` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_classifier_label(
    classifier: AcornClassifier,
    index: usize,
    label: *mut *const c_char,
) -> AcornStatus {
    guard(|| {
        #[cfg(feature = "text")]
        {
            let e = classifier_entry(classifier)?;
            let st = try_lock(&e, "classifier")?;
            let p = label_at(&st.labels, index)?;
            // SAFETY: the caller's contract.
            unsafe { put(label, p, "label") }
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (classifier, index, label);
            no_text()
        }
    })
}

fn label_at(labels: &[CString], index: usize) -> Result<*const c_char, Failure> {
    labels.get(index).map(|l| l.as_ptr()).ok_or_else(|| {
        Failure::new(AcornStatus::InvalidArgument, format!("label index {index} is past the {} labels", labels.len()))
    })
}

/// Whether runs may stop at an exit head (`on` nonzero, the default) or always run the whole
/// encoder (0).
#[no_mangle]
pub extern "C" fn acorn_classifier_set_exits(classifier: AcornClassifier, on: i32) -> AcornStatus {
    guard(|| {
        #[cfg(feature = "text")]
        {
            let e = classifier_entry(classifier)?;
            try_lock(&e, "classifier")?.classifier.classifier().set_exits(on != 0);
            Ok(())
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (classifier, on);
            no_text()
        }
    })
}

/// Replaces the exits' confidence thresholds: `n` values in (0, 1], one per exit, in layer order.
///
/// # Safety
/// `thresholds` is NULL or readable for `n` floats.
#[no_mangle]
pub unsafe extern "C" fn acorn_classifier_set_thresholds(
    classifier: AcornClassifier,
    thresholds: *const f32,
    n: usize,
) -> AcornStatus {
    guard(|| {
        if n > 0 {
            non_null(thresholds, "thresholds")?;
        }
        #[cfg(feature = "text")]
        {
            let t: &[f32] = if n == 0 {
                &[]
            } else {
                // SAFETY: readable for `n` floats (caller contract).
                unsafe { std::slice::from_raw_parts(thresholds, n) }
            };
            let e = classifier_entry(classifier)?;
            try_lock(&e, "classifier")?.classifier.classifier().set_thresholds(t)?;
            Ok(())
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (classifier, thresholds);
            no_text()
        }
    })
}

/// Classifies `n` utterances (UTF-8 strings) as one batch; `out` receives `n` predictions.
///
/// # Safety
/// `texts` is NULL or readable for `n` NUL-terminated strings; `out` NULL or writable for `n`
/// entries.
#[no_mangle]
pub unsafe extern "C" fn acorn_classify(
    classifier: AcornClassifier,
    texts: *const *const c_char,
    n: usize,
    out: *mut AcornPrediction,
) -> AcornStatus {
    guard(|| {
        non_null(texts, "texts")?;
        non_null(out, "out")?;
        #[cfg(feature = "text")]
        {
            // SAFETY: readable for `n` pointers (caller contract).
            let ptrs = unsafe { std::slice::from_raw_parts(texts, n) };
            let list: Vec<&str> = ptrs
                .iter()
                .enumerate()
                // SAFETY: each a NUL-terminated string (caller contract).
                .map(|(i, &p)| unsafe { utf8(p, &format!("texts[{i}]")) })
                .collect::<Result<_, _>>()?;
            let e = classifier_entry(classifier)?;
            let preds = try_lock(&e, "classifier")?.classifier.classify(&list)?;
            for (i, p) in preds.iter().enumerate() {
                let v = AcornPrediction {
                    label: p.label as u32,
                    score: p.score,
                    exit_layer: p.exit_layer,
                    layers: p.layers,
                };
                // SAFETY: writable for `n` entries (caller contract), i < n.
                unsafe { out.add(i).write(v) };
            }
            Ok(())
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (classifier, n);
            no_text()
        }
    })
}

/// An embedder over a sentence encoder `model` with its tokenizer (any `.acorn` encoder
/// converted with `--tokenizer`, or a classifier file), `threads` workers (0 = 1).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_embedder_new(model: AcornModel, threads: u32, out: *mut AcornEmbedder) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        let e = model_entry(model)?;
        #[cfg(feature = "text")]
        {
            let emb = acorn_text::TextEmbedder::new(&e.model, threads.max(1) as usize)?;
            let id = insert(Object::Embedder(Arc::new(Mutex::new(emb))));
            // SAFETY: checked non-NULL; writable (caller contract).
            unsafe { put(out, AcornEmbedder { id }, "out") }
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (e, threads);
            no_text()
        }
    })
}

/// Frees an embedder.
#[no_mangle]
pub extern "C" fn acorn_embedder_free(embedder: AcornEmbedder) -> AcornStatus {
    guard(|| {
        #[cfg(feature = "text")]
        return remove(embedder.id, "embedder", |o| matches!(o, Object::Embedder(_)));
        #[cfg(not(feature = "text"))]
        Err(Failure::new(AcornStatus::InvalidHandle, format!("embedder handle {} is not live", embedder.id)))
    })
}

/// The sentence embedding of `text` into `out` (room for `capacity` floats); `*dim` is its
/// width. With `out` NULL or too small, only `*dim` is written and the status is
/// `ACORN_STATUS_INVALID_ARGUMENT` for too small, OK for NULL (ask the size first).
///
/// # Safety
/// `text` NULL or NUL-terminated; `out` NULL or writable for `capacity` floats; `dim` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_embed(
    embedder: AcornEmbedder,
    text: *const c_char,
    out: *mut f32,
    capacity: usize,
    dim: *mut usize,
) -> AcornStatus {
    guard(|| {
        non_null(dim, "dim")?;
        // SAFETY: the caller's contract.
        let text = unsafe { utf8(text, "text") }?;
        #[cfg(feature = "text")]
        {
            let e = embedder_entry(embedder)?;
            let v = try_lock(&e, "embedder")?.embed(&[text])?.remove(0);
            // SAFETY: checked non-NULL; writable (caller contract).
            unsafe { put(dim, v.len(), "dim") }?;
            if out.is_null() {
                return Ok(());
            }
            if capacity < v.len() {
                return Err(Failure::new(
                    AcornStatus::InvalidArgument,
                    format!("the embedding has {} values, the buffer room for {capacity}", v.len()),
                ));
            }
            // SAFETY: writable for `capacity` ≥ len floats (caller contract).
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out, v.len()) };
            Ok(())
        }
        #[cfg(not(feature = "text"))]
        {
            let _ = (embedder, text, out, capacity);
            no_text()
        }
    })
}

/// An empty trainer.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_trainer_new(out: *mut AcornTrainer) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        let id = insert(Object::Trainer(Arc::new(Mutex::new(acorn::head::Trainer::new()))));
        // SAFETY: checked non-NULL; writable (caller contract).
        unsafe { put(out, AcornTrainer { id }, "out") }
    })
}

/// Frees a trainer (heads fitted from it stay).
#[no_mangle]
pub extern "C" fn acorn_trainer_free(trainer: AcornTrainer) -> AcornStatus {
    guard(|| remove(trainer.id, "trainer", |o| matches!(o, Object::Trainer(_))))
}

/// Adds one example: `label` (UTF-8, not empty) and an embedding of `dim` floats (every example
/// the same width).
///
/// # Safety
/// `label` NULL or NUL-terminated; `embedding` NULL or readable for `dim` floats.
#[no_mangle]
pub unsafe extern "C" fn acorn_trainer_add(
    trainer: AcornTrainer,
    label: *const c_char,
    embedding: *const f32,
    dim: usize,
) -> AcornStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let label = unsafe { utf8(label, "label") }?;
        non_null(embedding, "embedding")?;
        // SAFETY: readable for `dim` floats (caller contract).
        let x = unsafe { std::slice::from_raw_parts(embedding, dim) };
        let e = trainer_entry(trainer)?;
        try_lock(&e, "trainer")?.add(label, x)?;
        Ok(())
    })
}

fn register_head(head: acorn::head::Head) -> AcornHead {
    let labels = c_strings(&head.labels);
    AcornHead { id: insert(Object::Head(Arc::new(HeadEntry { head, labels }))) }
}

/// Fits a head on every example added (`kind`: an `AcornHeadKind`); `*out` is the new head.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_trainer_fit(trainer: AcornTrainer, kind: i32, out: *mut AcornHead) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        let kind = match kind {
            1 => acorn::head::HeadKind::Prototype,
            2 => acorn::head::HeadKind::Softmax,
            k => {
                return Err(Failure::new(
                    AcornStatus::InvalidArgument,
                    format!("unknown head kind {k} (see AcornHeadKind)"),
                ))
            }
        };
        let e = trainer_entry(trainer)?;
        let head = try_lock(&e, "trainer")?.fit(kind)?;
        // SAFETY: checked non-NULL; writable (caller contract).
        unsafe { put(out, register_head(head), "out") }
    })
}

/// Frees a head.
#[no_mangle]
pub extern "C" fn acorn_head_free(head: AcornHead) -> AcornStatus {
    guard(|| remove(head.id, "head", |o| matches!(o, Object::Head(_))))
}

/// The number of labels (`*count`).
///
/// # Safety
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_head_label_count(head: AcornHead, count: *mut usize) -> AcornStatus {
    guard(|| {
        let e = head_entry(head)?;
        // SAFETY: the caller's contract.
        unsafe { put(count, e.labels.len(), "count") }
    })
}

/// Label `index` (`*label`: NUL-terminated UTF-8, valid until the head is freed).
///
/// # Safety
/// `label` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_head_label(head: AcornHead, index: usize, label: *mut *const c_char) -> AcornStatus {
    guard(|| {
        let e = head_entry(head)?;
        let p = label_at(&e.labels, index)?;
        // SAFETY: the caller's contract.
        unsafe { put(label, p, "label") }
    })
}

/// The head's answer for an embedding of `dim` floats: `*label` the label index, or -1 when its
/// probability `*score` is below `unknown_threshold` (in (0, 1]; pass a tiny value such as
/// 1e-9 to always get a label).
///
/// # Safety
/// `embedding` NULL or readable for `dim` floats; `label` and `score` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_head_predict(
    head: AcornHead,
    embedding: *const f32,
    dim: usize,
    unknown_threshold: f32,
    label: *mut i32,
    score: *mut f32,
) -> AcornStatus {
    guard(|| {
        non_null(embedding, "embedding")?;
        non_null(label, "label")?;
        non_null(score, "score")?;
        // SAFETY: readable for `dim` floats (caller contract).
        let x = unsafe { std::slice::from_raw_parts(embedding, dim) };
        let e = head_entry(head)?;
        let (l, p) = match e.head.predict_or_unknown(x, unknown_threshold)? {
            acorn::head::Answer::Label(c, p) => (c as i32, p),
            acorn::head::Answer::Unknown(_, p) => (-1, p),
        };
        // SAFETY: checked non-NULL; writable (caller contract).
        unsafe {
            put(label, l, "label")?;
            put(score, p, "score")
        }
    })
}

/// Saves a head for `model`'s encoder to `path` (atomically); loading it checks the encoder.
///
/// # Safety
/// `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn acorn_head_save(head: AcornHead, model: AcornModel, path: *const c_char) -> AcornStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let path = unsafe { utf8(path, "path") }?;
        let (h, m) = (head_entry(head)?, model_entry(model)?);
        acorn::head::SavedHead::save(&h.head, &m.model, path)?;
        Ok(())
    })
}

/// Loads a head saved for `model`'s encoder (refused, `ACORN_STATUS_INPUT`, when it was fitted on
/// another encoder); `*out` is the head.
///
/// # Safety
/// `path` NULL or NUL-terminated; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn acorn_head_load(model: AcornModel, path: *const c_char, out: *mut AcornHead) -> AcornStatus {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: the caller's contract.
        let path = unsafe { utf8(path, "path") }?;
        let m = model_entry(model)?;
        let head = acorn::head::SavedHead::load(path, &m.model)?;
        // SAFETY: checked non-NULL; writable (caller contract).
        unsafe { put(out, register_head(head), "out") }
    })
}
