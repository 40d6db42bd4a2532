//! The JNI layer of Acorn's Kotlin/Java binding. Each `external fun` of `dev.acorn.Native`
//! (`android/src/main/kotlin/dev/acorn/Native.kt`) is one function here, and each is a thin shim
//! over the C ABI of `acorn-ffi`: the same numeric handles (a closed or never-made handle is an
//! error, never a crash), the same statuses and messages, the same panic guard.
//!
//! What this layer adds is the JVM side of the boundary:
//! - a failed call throws `dev.acorn.AcornException(status, message)`;
//! - a panic in this layer is caught too and thrown the same way (status `PANIC`), so nothing
//!   unwinds into the JVM;
//! - Java arrays are copied in and out (a JNI array cannot be borrowed across a model run
//!   without stalling the garbage collector); a direct `ByteBuffer` is read in place;
//! - the token callback calls the Kotlin listener on the generating thread, and an exception
//!   the listener throws stops the generation and reaches the caller unchanged.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use acorn_ffi::{
    acorn_classifier_free, acorn_classifier_label, acorn_classifier_label_count, acorn_classifier_new,
    acorn_classifier_set_exits, acorn_classifier_set_thresholds, acorn_classify, acorn_embed, acorn_embedder_free,
    acorn_embedder_new, acorn_generate, acorn_generate_tokens, acorn_generator_cancel, acorn_generator_free,
    acorn_generator_new, acorn_generator_reset, acorn_head_free, acorn_head_label, acorn_head_label_count,
    acorn_head_load, acorn_head_predict, acorn_head_save, acorn_last_error, acorn_model_free, acorn_model_input,
    acorn_model_input_count, acorn_model_open, acorn_model_open_bytes, acorn_model_open_fd, acorn_model_output,
    acorn_model_output_count, acorn_session_free, acorn_session_new, acorn_session_output, acorn_session_output_count,
    acorn_session_run, acorn_trainer_add, acorn_trainer_fit, acorn_trainer_free, acorn_trainer_new, acorn_version,
    AcornClassifier, AcornDtype, AcornEmbedder, AcornGenerateOptions, AcornGenerateStats, AcornGenerator, AcornHead,
    AcornIoInfo, AcornModel, AcornPrediction, AcornSession, AcornStatus, AcornTensor, AcornTrainer,
};
use jni::objects::{
    JByteArray, JByteBuffer, JClass, JDoubleArray, JFloatArray, JIntArray, JLongArray, JObject, JObjectArray,
    JShortArray, JString, JThrowable, JValue,
};
use jni::sys::{jboolean, jdoubleArray, jfloat, jint, jlong, jlongArray, jobject, jstring};
use jni::JNIEnv;

const EXCEPTION: &str = "dev/acorn/AcornException";

/// Why a native method failed.
enum Fail {
    /// A status and its message, thrown as an `AcornException`.
    Status(i32, String),
    /// A Java exception is already pending (the JVM throws it when the method returns).
    Java,
}

impl From<jni::errors::Error> for Fail {
    fn from(e: jni::errors::Error) -> Self {
        match e {
            jni::errors::Error::JavaException => Fail::Java,
            other => Fail::Status(AcornStatus::InvalidArgument as i32, format!("JNI: {other}")),
        }
    }
}

type Res<T> = Result<T, Fail>;

fn invalid(message: impl Into<String>) -> Fail {
    Fail::Status(AcornStatus::InvalidArgument as i32, message.into())
}

/// A C ABI status as a result (the message is the thread's last error, which the call set).
fn check(status: AcornStatus) -> Res<()> {
    if status == AcornStatus::Ok {
        return Ok(());
    }
    // SAFETY: acorn_last_error returns a valid NUL-terminated string owned by this thread.
    let message = unsafe { CStr::from_ptr(acorn_last_error()) }.to_string_lossy().into_owned();
    Err(Fail::Status(status as i32, message))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into())
}

/// Throws `AcornException(status, message)` unless an exception is already pending.
fn throw(env: &mut JNIEnv, status: i32, message: &str) {
    if env.exception_check().unwrap_or(true) {
        return;
    }
    let thrown = (|| -> jni::errors::Result<()> {
        let msg = env.new_string(message)?;
        let e = env.new_object(EXCEPTION, "(ILjava/lang/String;)V", &[JValue::Int(status), JValue::Object(&msg)])?;
        env.throw(JThrowable::from(e))
    })();
    if thrown.is_err() && !env.exception_check().unwrap_or(true) {
        let _ = env.throw_new("java/lang/RuntimeException", message);
    }
}

/// The body of every native method: its error or panic becomes a thrown exception and the
/// method returns `fallback` (which the JVM ignores, the exception being pending).
fn guard<'l, T>(env: &mut JNIEnv<'l>, fallback: T, body: impl FnOnce(&mut JNIEnv<'l>) -> Res<T>) -> T {
    let fail = match catch_unwind(AssertUnwindSafe(|| body(env))) {
        Ok(Ok(v)) => return v,
        Ok(Err(f)) => f,
        Err(payload) => Fail::Status(
            AcornStatus::Panic as i32,
            format!("internal error in Acorn's JNI layer (a panic: {}); please report it", panic_message(&*payload)),
        ),
    };
    if let Fail::Status(status, message) = fail {
        throw(env, status, &message);
    }
    fallback
}

fn string(env: &mut JNIEnv, s: &JString, what: &str) -> Res<String> {
    if s.is_null() {
        return Err(Fail::Status(AcornStatus::NullArgument as i32, format!("{what} is null")));
    }
    Ok(env.get_string(s)?.into())
}

fn cstring(s: String, what: &str) -> Res<CString> {
    CString::new(s).map_err(|_| invalid(format!("{what} holds a NUL character")))
}

/// A Java int or long that must not be negative (Java has no unsigned types), as `T`.
fn unsigned<T: TryFrom<i64>>(v: impl Into<i64>, what: &str) -> Res<T> {
    let v = v.into();
    T::try_from(v).map_err(|_| invalid(format!("{what} {v} is negative or too large")))
}

fn index(i: jint) -> Res<usize> {
    unsigned(i, "index")
}

fn handle(h: jlong) -> u64 {
    h as u64
}

/// `n` elements at `p` (none when `n` is 0, whatever `p` is: the C ABI may pass NULL then).
///
/// # Safety
/// When `n > 0`, `p` is valid for reads of `n` elements for `'a`.
unsafe fn slice<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

// ---------------------------------------------------------------------------------------------
// Library

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_version<'l>(mut env: JNIEnv<'l>, _: JClass<'l>) -> jstring {
    guard(&mut env, std::ptr::null_mut(), |env| {
        // SAFETY: a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(acorn_version()) }.to_string_lossy().into_owned();
        Ok(env.new_string(v)?.into_raw())
    })
}

/// Panics inside the C library (feature `panic-test`): the JVM tests check that this surfaces
/// as an `AcornException` with status `PANIC`.
#[cfg(feature = "panic-test")]
#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_debugPanic<'l>(mut env: JNIEnv<'l>, _: JClass<'l>) {
    guard(&mut env, (), |_| check(acorn_ffi::acorn_debug_panic()))
}

/// Panics in this layer itself (feature `panic-test`).
#[cfg(feature = "panic-test")]
#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_debugJniPanic<'l>(mut env: JNIEnv<'l>, _: JClass<'l>) {
    guard(&mut env, (), |_| -> Res<()> { panic!("injected by Native.debugJniPanic") })
}

// ---------------------------------------------------------------------------------------------
// Model

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_modelOpen<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    path: JString<'l>,
) -> jlong {
    guard(&mut env, 0, |env| {
        let path = cstring(string(env, &path, "path")?, "path")?;
        let mut m = AcornModel::default();
        // SAFETY: a NUL-terminated path and a writable handle.
        check(unsafe { acorn_model_open(path.as_ptr(), &mut m) })?;
        Ok(m.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_modelOpenBytes<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    bytes: JByteArray<'l>,
) -> jlong {
    guard(&mut env, 0, |env| {
        if bytes.is_null() {
            return Err(Fail::Status(AcornStatus::NullArgument as i32, "bytes is null".into()));
        }
        let data = env.convert_byte_array(&bytes)?;
        let mut m = AcornModel::default();
        // SAFETY: `data` is readable for its length; the library copies what it keeps.
        check(unsafe { acorn_model_open_bytes(data.as_ptr(), data.len(), &mut m) })?;
        Ok(m.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_modelOpenFd<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    fd: jint,
    offset: jlong,
    length: jlong,
) -> jlong {
    guard(&mut env, 0, |_| {
        let offset = unsigned(offset, "offset")?;
        let length = unsigned(length, "length")?;
        let mut m = AcornModel::default();
        // SAFETY: the descriptor is the caller's, open for the call (the library duplicates it);
        // `m` is writable.
        check(unsafe { acorn_model_open_fd(fd, offset, length, &mut m) })?;
        Ok(m.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_modelFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, model: jlong) {
    guard(&mut env, (), |_| check(acorn_model_free(AcornModel { id: handle(model) })))
}

fn io_info(model: jlong, outputs: jboolean, i: jint) -> Res<AcornIoInfo> {
    let mut info = AcornIoInfo { name: std::ptr::null(), dtype: 0, shape: std::ptr::null(), rank: 0 };
    let m = AcornModel { id: handle(model) };
    let i = index(i)?;
    // SAFETY: `info` is writable.
    check(unsafe {
        if outputs != 0 {
            acorn_model_output(m, i, &mut info)
        } else {
            acorn_model_input(m, i, &mut info)
        }
    })?;
    Ok(info)
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_ioCount<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    outputs: jboolean,
) -> jint {
    guard(&mut env, 0, |_| {
        let m = AcornModel { id: handle(model) };
        let mut n = 0usize;
        // SAFETY: `n` is writable.
        check(unsafe {
            if outputs != 0 {
                acorn_model_output_count(m, &mut n)
            } else {
                acorn_model_input_count(m, &mut n)
            }
        })?;
        Ok(n as jint)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_ioName<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    outputs: jboolean,
    i: jint,
) -> jstring {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let info = io_info(model, outputs, i)?;
        // SAFETY: the name is NUL-terminated and valid while the model lives (it is, in this call).
        let name = unsafe { CStr::from_ptr(info.name) }.to_string_lossy().into_owned();
        Ok(env.new_string(name)?.into_raw())
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_ioDtype<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    outputs: jboolean,
    i: jint,
) -> jint {
    guard(&mut env, 0, |_| Ok(io_info(model, outputs, i)?.dtype))
}

/// The declared shape (-1 for a size chosen at run time), or null when the model declares none.
#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_ioShape<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    outputs: jboolean,
    i: jint,
) -> jlongArray {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let info = io_info(model, outputs, i)?;
        if info.rank < 0 {
            return Ok(std::ptr::null_mut());
        }
        // SAFETY: `rank` dimensions, valid while the model lives (it does, in this call).
        let dims = unsafe { slice(info.shape, info.rank as usize) };
        long_array(env, dims)
    })
}

fn long_array(env: &mut JNIEnv, v: &[i64]) -> Res<jlongArray> {
    let a = env.new_long_array(v.len() as i32)?;
    env.set_long_array_region(&a, 0, v)?;
    Ok(a.into_raw())
}

// ---------------------------------------------------------------------------------------------
// Session

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_sessionNew<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    threads: jint,
) -> jlong {
    guard(&mut env, 0, |_| {
        let threads: u32 = unsigned(threads, "threads")?;
        let mut s = AcornSession::default();
        // SAFETY: `s` is writable.
        check(unsafe { acorn_session_new(AcornModel { id: handle(model) }, threads, &mut s) })?;
        Ok(s.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_sessionFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, session: jlong) {
    guard(&mut env, (), |_| check(acorn_session_free(AcornSession { id: handle(session) })))
}

/// One input's elements: copied out of a Java array (aligned, owned here), or a direct buffer's
/// memory read in place.
enum Elements {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I16(Vec<i16>),
    I8(Vec<i8>),
    Direct(*const u8, usize),
}

impl Elements {
    fn raw(&self) -> (*const c_void, usize) {
        fn of<T>(v: &[T]) -> (*const c_void, usize) {
            (v.as_ptr() as *const c_void, std::mem::size_of_val(v))
        }
        match self {
            Elements::F32(v) => of(v),
            Elements::F64(v) => of(v),
            Elements::I64(v) => of(v),
            Elements::I32(v) => of(v),
            Elements::I16(v) => of(v),
            Elements::I8(v) => of(v),
            Elements::Direct(p, n) => (*p as *const c_void, *n),
        }
    }
}

/// Copies a primitive Java array (or takes a direct buffer's address); the kind of array follows
/// the element size of `dtype`, which the Kotlin `Tensor` guarantees.
fn elements(env: &mut JNIEnv, data: JObject, dtype: i32, name: &str) -> Res<Elements> {
    if data.is_null() {
        return Err(Fail::Status(AcornStatus::NullArgument as i32, format!("input '{name}' has no data")));
    }
    macro_rules! copy {
        ($sig:literal, $arr:ty, $get:ident, $variant:ident, $zero:expr) => {
            if env.is_instance_of(&data, $sig)? {
                let a = <$arr>::from(data);
                let n = env.get_array_length(&a)? as usize;
                let mut v = vec![$zero; n];
                env.$get(&a, 0, &mut v)?;
                return Ok(Elements::$variant(v));
            }
        };
    }
    copy!("[F", JFloatArray, get_float_array_region, F32, 0.0f32);
    copy!("[D", JDoubleArray, get_double_array_region, F64, 0.0f64);
    copy!("[J", JLongArray, get_long_array_region, I64, 0i64);
    copy!("[I", JIntArray, get_int_array_region, I32, 0i32);
    copy!("[S", JShortArray, get_short_array_region, I16, 0i16);
    copy!("[B", JByteArray, get_byte_array_region, I8, 0i8);
    if env.is_instance_of(&data, "java/nio/ByteBuffer")? {
        let b = JByteBuffer::from(data);
        let p = env.get_direct_buffer_address(&b).map_err(|_| {
            invalid(format!("input '{name}': the ByteBuffer is not direct (use ByteBuffer.allocateDirect)"))
        })?;
        let n = env.get_direct_buffer_capacity(&b)?;
        return Ok(Elements::Direct(p as *const u8, n));
    }
    Err(invalid(format!("input '{name}' (dtype {dtype}): its data is not a primitive array or a ByteBuffer")))
}

/// Runs the session on named inputs: `names[i]`, `dtypes[i]` (AcornDtype codes), `shapes[i]`,
/// `data[i]` (a primitive array or a direct ByteBuffer).
#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_sessionRun<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    session: jlong,
    names: JObjectArray<'l>,
    dtypes: JIntArray<'l>,
    shapes: JObjectArray<'l>,
    data: JObjectArray<'l>,
) {
    guard(&mut env, (), |env| {
        if names.is_null() || dtypes.is_null() || shapes.is_null() || data.is_null() {
            return Err(Fail::Status(AcornStatus::NullArgument as i32, "an input array is null".into()));
        }
        let n = env.get_array_length(&names)? as usize;
        if [env.get_array_length(&dtypes)?, env.get_array_length(&shapes)?, env.get_array_length(&data)?]
            .iter()
            .any(|&l| l as usize != n)
        {
            return Err(invalid("names, dtypes, shapes and data differ in length"));
        }
        let mut codes = vec![0i32; n];
        env.get_int_array_region(&dtypes, 0, &mut codes)?;
        // Owned here until the run returns: names, shapes, elements (and the buffers' references).
        let mut owned = Vec::with_capacity(n);
        for (i, &dtype) in codes.iter().enumerate() {
            let name = JString::from(env.get_object_array_element(&names, i as i32)?);
            let name = string(env, &name, "an input name")?;
            let shape = JLongArray::from(env.get_object_array_element(&shapes, i as i32)?);
            if shape.is_null() {
                return Err(Fail::Status(AcornStatus::NullArgument as i32, format!("input '{name}' has no shape")));
            }
            let mut dims = vec![0i64; env.get_array_length(&shape)? as usize];
            env.get_long_array_region(&shape, 0, &mut dims)?;
            let obj = env.get_object_array_element(&data, i as i32)?;
            let elems = elements(env, obj, dtype, &name)?;
            owned.push((cstring(name, "an input name")?, dtype, dims, elems));
        }
        let views: Vec<AcornTensor> = owned
            .iter()
            .map(|(name, dtype, dims, elems)| {
                let (data, byte_len) = elems.raw();
                AcornTensor {
                    name: name.as_ptr(),
                    dtype: *dtype,
                    shape: dims.as_ptr(),
                    rank: dims.len(),
                    data,
                    byte_len,
                }
            })
            .collect();
        // SAFETY: every view points into `owned` (or a direct buffer the caller's array holds a
        // reference to), alive for the call.
        check(unsafe { acorn_session_run(AcornSession { id: handle(session) }, views.as_ptr(), views.len()) })
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_outputCount<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    session: jlong,
) -> jint {
    guard(&mut env, 0, |_| {
        let mut n = 0usize;
        // SAFETY: `n` is writable.
        check(unsafe { acorn_session_output_count(AcornSession { id: handle(session) }, &mut n) })?;
        Ok(n as jint)
    })
}

fn output(session: jlong, i: jint) -> Res<AcornTensor> {
    let mut t = AcornTensor {
        name: std::ptr::null(),
        dtype: 0,
        shape: std::ptr::null(),
        rank: 0,
        data: std::ptr::null(),
        byte_len: 0,
    };
    // SAFETY: `t` is writable.
    check(unsafe { acorn_session_output(AcornSession { id: handle(session) }, index(i)?, &mut t) })?;
    Ok(t)
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_outputName<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    session: jlong,
    i: jint,
) -> jstring {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let t = output(session, i)?;
        // SAFETY: NUL-terminated, owned by the session until its next run (the Kotlin Session
        // serializes its run and these reads).
        let name = unsafe { CStr::from_ptr(t.name) }.to_string_lossy().into_owned();
        Ok(env.new_string(name)?.into_raw())
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_outputDtype<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    session: jlong,
    i: jint,
) -> jint {
    guard(&mut env, 0, |_| Ok(output(session, i)?.dtype))
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_outputShape<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    session: jlong,
    i: jint,
) -> jlongArray {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let t = output(session, i)?;
        // SAFETY: `rank` dimensions owned by the session (see outputName).
        let dims = unsafe { slice(t.shape, t.rank) };
        long_array(env, dims)
    })
}

/// The output's elements copied into a new Java array of its element size: FloatArray (f32),
/// DoubleArray (f64), LongArray (i64, u64), IntArray (i32, u32), ShortArray (f16, i16, u16,
/// bf16), ByteArray (i8, u8, bool, and the sub-byte integers one per byte).
#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_outputData<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    session: jlong,
    i: jint,
) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let t = output(session, i)?;
        // SAFETY: `byte_len` bytes owned by the session (see outputName).
        let bytes = unsafe { slice(t.data as *const u8, t.byte_len) };
        macro_rules! array {
            ($t:ty, $new:ident, $set:ident) => {{
                let v: Vec<$t> = bytemuck::pod_collect_to_vec(bytes);
                let a = env.$new(v.len() as i32)?;
                env.$set(&a, 0, &v)?;
                JObject::from(a).into_raw()
            }};
        }
        use AcornDtype as D;
        let d = t.dtype;
        Ok(if d == D::F32 as i32 {
            array!(f32, new_float_array, set_float_array_region)
        } else if d == D::F64 as i32 {
            array!(f64, new_double_array, set_double_array_region)
        } else if d == D::I64 as i32 || d == D::U64 as i32 {
            array!(i64, new_long_array, set_long_array_region)
        } else if d == D::I32 as i32 || d == D::U32 as i32 {
            array!(i32, new_int_array, set_int_array_region)
        } else if d == D::F16 as i32 || d == D::I16 as i32 || d == D::U16 as i32 || d == D::Bf16 as i32 {
            array!(i16, new_short_array, set_short_array_region)
        } else {
            array!(i8, new_byte_array, set_byte_array_region)
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Generation

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_generatorNew<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    threads: jint,
    max_context: jint,
) -> jlong {
    guard(&mut env, 0, |_| {
        let threads: u32 = unsigned(threads, "threads")?;
        let ctx: u32 = unsigned(max_context, "maxContext")?;
        let mut g = AcornGenerator::default();
        // SAFETY: `g` is writable.
        check(unsafe { acorn_generator_new(AcornModel { id: handle(model) }, threads, ctx, &mut g) })?;
        Ok(g.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_generatorFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, g: jlong) {
    guard(&mut env, (), |_| check(acorn_generator_free(AcornGenerator { id: handle(g) })))
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_generatorReset<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, g: jlong) {
    guard(&mut env, (), |_| check(acorn_generator_reset(AcornGenerator { id: handle(g) })))
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_generatorCancel<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, g: jlong) {
    guard(&mut env, (), |_| check(acorn_generator_cancel(AcornGenerator { id: handle(g) })))
}

/// What the token callback needs: the generating thread's JNI environment and the listener.
struct Listener<'a, 'l> {
    env: &'a mut JNIEnv<'l>,
    listener: &'a JObject<'l>,
    failed: Option<Fail>,
}

impl Listener<'_, '_> {
    fn call(&mut self, piece: &[u8], token: u32) -> Res<bool> {
        let piece = self.env.new_string(String::from_utf8_lossy(piece))?;
        let go = self
            .env
            .call_method(
                self.listener,
                "onToken",
                "(Ljava/lang/String;I)Z",
                &[JValue::Object(&piece), JValue::Int(token as i32)],
            )?
            .z()?;
        // A long generation must not fill the local reference table.
        self.env.delete_local_ref(piece)?;
        Ok(go)
    }
}

/// The C callback: calls `TokenListener.onToken(piece, token)`; a `false` return, a thrown
/// exception or a failure here stops the generation.
///
/// # Safety
/// `user` is the `Listener` of the running `generate` call; `piece` is readable for `len` bytes.
unsafe extern "C" fn on_token(user: *mut c_void, piece: *const c_char, len: usize, token: u32) -> i32 {
    // SAFETY: the caller's contract (acorn_generate passes back the pointer generate gave it).
    let l = unsafe { &mut *(user as *mut Listener) };
    // SAFETY: `len` bytes (the C ABI's contract).
    let bytes = unsafe { slice(piece as *const u8, len) };
    match catch_unwind(AssertUnwindSafe(|| l.call(bytes, token))) {
        Ok(Ok(true)) => 0,
        Ok(Ok(false)) => 1,
        Ok(Err(f)) => {
            l.failed = Some(f);
            1
        }
        Err(payload) => {
            l.failed = Some(Fail::Status(
                AcornStatus::Panic as i32,
                format!("internal error in Acorn's JNI token callback (a panic: {})", panic_message(&*payload)),
            ));
            1
        }
    }
}

/// Generates from `prompt` (text) or `tokens` (ids; used when `prompt` is null), decoding as
/// `decoding` (an `AcornDecoding`) says, calling
/// `listener.onToken` for each token. Returns the stats as `[prompt tokens, generated tokens,
/// prefill ms, decode ms, stop reason]`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_acorn_Native_generate<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    g: jlong,
    prompt: JString<'l>,
    tokens: JIntArray<'l>,
    max_tokens: jint,
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    seed: jlong,
    decoding: jint,
    exit_layer: jint,
    draft_tokens: jint,
    exit_threshold: jfloat,
    listener: JObject<'l>,
) -> jdoubleArray {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let opts = AcornGenerateOptions {
            max_tokens: unsigned(max_tokens, "maxTokens")?,
            temperature,
            top_k: unsigned(top_k, "topK")?,
            top_p,
            seed: seed as u64,
            decoding,
            exit_layer: unsigned(exit_layer, "exitLayer")?,
            draft_tokens: unsigned(draft_tokens, "draftTokens")?,
            exit_threshold,
        };
        let text = if prompt.is_null() { None } else { Some(cstring(string(env, &prompt, "prompt")?, "prompt")?) };
        let ids: Vec<u32> = if text.is_none() {
            if tokens.is_null() {
                return Err(Fail::Status(AcornStatus::NullArgument as i32, "no prompt and no prompt tokens".into()));
            }
            let mut v = vec![0i32; env.get_array_length(&tokens)? as usize];
            env.get_int_array_region(&tokens, 0, &mut v)?;
            v.into_iter().map(|t| t as u32).collect()
        } else {
            Vec::new()
        };
        let mut stats = AcornGenerateStats {
            prompt_tokens: 0,
            generated_tokens: 0,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            stop_reason: 0,
            accepted_per_draft: 0.0,
            mean_layers_per_token: 0.0,
        };
        let gen = AcornGenerator { id: handle(g) };
        let has_listener = !listener.is_null();
        let mut l = Listener { env: &mut *env, listener: &listener, failed: None };
        let user = &mut l as *mut Listener as *mut c_void;
        let cb: acorn_ffi::AcornTokenCallback = if has_listener { Some(on_token) } else { None };
        // SAFETY: the prompt is NUL-terminated (or `ids` readable); `user` is the Listener that
        // `on_token` expects, alive for the call; `stats` is writable.
        let status = unsafe {
            match &text {
                Some(p) => acorn_generate(gen, p.as_ptr(), &opts, cb, user, &mut stats),
                None => acorn_generate_tokens(gen, ids.as_ptr(), ids.len(), &opts, cb, user, &mut stats),
            }
        };
        if let Some(f) = l.failed.take() {
            return Err(f);
        }
        check(status)?;
        let s = [
            stats.prompt_tokens as f64,
            stats.generated_tokens as f64,
            stats.prefill_ms,
            stats.decode_ms,
            stats.stop_reason as f64,
            stats.accepted_per_draft,
            stats.mean_layers_per_token,
        ];
        let a = env.new_double_array(s.len() as i32)?;
        env.set_double_array_region(&a, 0, &s)?;
        Ok(a.into_raw())
    })
}

// ---------------------------------------------------------------------------------------------
// Classification and on-device learning

/// A `String[]` of `n` labels read through `get(i)` (NUL-terminated C strings).
fn label_array<'l>(env: &mut JNIEnv<'l>, n: usize, get: impl Fn(usize) -> Res<*const c_char>) -> Res<jobject> {
    let arr = env.new_object_array(n as i32, "java/lang/String", JObject::null())?;
    for i in 0..n {
        // SAFETY: the C ABI returned a NUL-terminated string that lives as long as its object.
        let s = unsafe { CStr::from_ptr(get(i)?) }.to_string_lossy().into_owned();
        let js = env.new_string(s)?;
        env.set_object_array_element(&arr, i as i32, js)?;
    }
    Ok(arr.into_raw())
}

fn floats_in(env: &mut JNIEnv, a: &JFloatArray, what: &str) -> Res<Vec<f32>> {
    if a.is_null() {
        return Err(Fail::Status(AcornStatus::NullArgument as i32, format!("{what} is null")));
    }
    let n = env.get_array_length(a)? as usize;
    let mut v = vec![0f32; n];
    env.get_float_array_region(a, 0, &mut v)?;
    Ok(v)
}

fn floats_out(env: &mut JNIEnv, v: &[f32]) -> Res<jobject> {
    let arr = env.new_float_array(v.len() as i32)?;
    env.set_float_array_region(&arr, 0, v)?;
    Ok(arr.into_raw())
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_classifierNew<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    threads: jint,
) -> jlong {
    guard(&mut env, 0, |_| {
        let mut c = AcornClassifier::default();
        // SAFETY: `c` is writable.
        check(unsafe {
            acorn_classifier_new(AcornModel { id: handle(model) }, unsigned(threads, "threads")?, &mut c)
        })?;
        Ok(c.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_classifierFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, c: jlong) {
    guard(&mut env, (), |_| check(acorn_classifier_free(AcornClassifier { id: handle(c) })))
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_classifierLabels<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    c: jlong,
) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let c = AcornClassifier { id: handle(c) };
        let mut n = 0usize;
        // SAFETY: `n` is writable.
        check(unsafe { acorn_classifier_label_count(c, &mut n) })?;
        label_array(env, n, |i| {
            let mut p = std::ptr::null();
            // SAFETY: `p` is writable.
            check(unsafe { acorn_classifier_label(c, i, &mut p) })?;
            Ok(p)
        })
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_classifierSetExits<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    c: jlong,
    on: jboolean,
) {
    guard(&mut env, (), |_| check(acorn_classifier_set_exits(AcornClassifier { id: handle(c) }, on as i32)))
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_classifierSetThresholds<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    c: jlong,
    thresholds: JFloatArray<'l>,
) {
    guard(&mut env, (), |env| {
        let t = floats_in(env, &thresholds, "thresholds")?;
        // SAFETY: `t` is readable for its length.
        check(unsafe { acorn_classifier_set_thresholds(AcornClassifier { id: handle(c) }, t.as_ptr(), t.len()) })
    })
}

/// Four floats per utterance: label index, score, exit layer, layers.
#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_classify<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    c: jlong,
    texts: JObjectArray<'l>,
) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        if texts.is_null() {
            return Err(Fail::Status(AcornStatus::NullArgument as i32, "texts is null".into()));
        }
        let n = env.get_array_length(&texts)? as usize;
        let mut owned = Vec::with_capacity(n);
        for i in 0..n {
            let o = env.get_object_array_element(&texts, i as i32)?;
            let s = string(env, &JString::from(o), &format!("texts[{i}]"))?;
            owned.push(cstring(s, &format!("texts[{i}]"))?);
        }
        let ptrs: Vec<*const c_char> = owned.iter().map(|s| s.as_ptr()).collect();
        let mut out = vec![AcornPrediction::default(); n];
        // SAFETY: `ptrs` holds `n` NUL-terminated strings alive for the call; `out` has `n` entries.
        check(unsafe { acorn_classify(AcornClassifier { id: handle(c) }, ptrs.as_ptr(), n, out.as_mut_ptr()) })?;
        let flat: Vec<f32> =
            out.iter().flat_map(|p| [p.label as f32, p.score, p.exit_layer as f32, p.layers as f32]).collect();
        floats_out(env, &flat)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_embedderNew<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    threads: jint,
) -> jlong {
    guard(&mut env, 0, |_| {
        let mut e = AcornEmbedder::default();
        // SAFETY: `e` is writable.
        check(unsafe { acorn_embedder_new(AcornModel { id: handle(model) }, unsigned(threads, "threads")?, &mut e) })?;
        Ok(e.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_embedderFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, e: jlong) {
    guard(&mut env, (), |_| check(acorn_embedder_free(AcornEmbedder { id: handle(e) })))
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_embed<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    e: jlong,
    text: JString<'l>,
) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let text = cstring(string(env, &text, "text")?, "text")?;
        let e = AcornEmbedder { id: handle(e) };
        let mut dim = 0usize;
        // SAFETY: NUL-terminated text, NULL output (size query), writable `dim`.
        check(unsafe { acorn_embed(e, text.as_ptr(), std::ptr::null_mut(), 0, &mut dim) })?;
        let mut v = vec![0f32; dim];
        // SAFETY: `v` has room for `dim` floats.
        check(unsafe { acorn_embed(e, text.as_ptr(), v.as_mut_ptr(), v.len(), &mut dim) })?;
        floats_out(env, &v)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_trainerNew<'l>(mut env: JNIEnv<'l>, _: JClass<'l>) -> jlong {
    guard(&mut env, 0, |_| {
        let mut t = AcornTrainer::default();
        // SAFETY: `t` is writable.
        check(unsafe { acorn_trainer_new(&mut t) })?;
        Ok(t.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_trainerFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, t: jlong) {
    guard(&mut env, (), |_| check(acorn_trainer_free(AcornTrainer { id: handle(t) })))
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_trainerAdd<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    t: jlong,
    label: JString<'l>,
    embedding: JFloatArray<'l>,
) {
    guard(&mut env, (), |env| {
        let label = cstring(string(env, &label, "label")?, "label")?;
        let x = floats_in(env, &embedding, "embedding")?;
        // SAFETY: NUL-terminated label; `x` readable for its length.
        check(unsafe { acorn_trainer_add(AcornTrainer { id: handle(t) }, label.as_ptr(), x.as_ptr(), x.len()) })
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_trainerFit<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    t: jlong,
    kind: jint,
) -> jlong {
    guard(&mut env, 0, |_| {
        let mut h = AcornHead::default();
        // SAFETY: `h` is writable.
        check(unsafe { acorn_trainer_fit(AcornTrainer { id: handle(t) }, kind, &mut h) })?;
        Ok(h.id as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_headFree<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, h: jlong) {
    guard(&mut env, (), |_| check(acorn_head_free(AcornHead { id: handle(h) })))
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_headLabels<'l>(mut env: JNIEnv<'l>, _: JClass<'l>, h: jlong) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let h = AcornHead { id: handle(h) };
        let mut n = 0usize;
        // SAFETY: `n` is writable.
        check(unsafe { acorn_head_label_count(h, &mut n) })?;
        label_array(env, n, |i| {
            let mut p = std::ptr::null();
            // SAFETY: `p` is writable.
            check(unsafe { acorn_head_label(h, i, &mut p) })?;
            Ok(p)
        })
    })
}

/// `[label index or −1, score]`.
#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_headPredict<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    h: jlong,
    embedding: JFloatArray<'l>,
    unknown_threshold: jfloat,
) -> jobject {
    guard(&mut env, std::ptr::null_mut(), |env| {
        let x = floats_in(env, &embedding, "embedding")?;
        let (mut label, mut score) = (0i32, 0f32);
        // SAFETY: `x` readable for its length; `label` and `score` writable.
        check(unsafe {
            acorn_head_predict(
                AcornHead { id: handle(h) },
                x.as_ptr(),
                x.len(),
                unknown_threshold,
                &mut label,
                &mut score,
            )
        })?;
        floats_out(env, &[label as f32, score])
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_headSave<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    h: jlong,
    model: jlong,
    path: JString<'l>,
) {
    guard(&mut env, (), |env| {
        let path = cstring(string(env, &path, "path")?, "path")?;
        // SAFETY: a NUL-terminated path.
        check(unsafe { acorn_head_save(AcornHead { id: handle(h) }, AcornModel { id: handle(model) }, path.as_ptr()) })
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_acorn_Native_headLoad<'l>(
    mut env: JNIEnv<'l>,
    _: JClass<'l>,
    model: jlong,
    path: JString<'l>,
) -> jlong {
    guard(&mut env, 0, |env| {
        let path = cstring(string(env, &path, "path")?, "path")?;
        let mut h = AcornHead::default();
        // SAFETY: a NUL-terminated path; `h` writable.
        check(unsafe { acorn_head_load(AcornModel { id: handle(model) }, path.as_ptr(), &mut h) })?;
        Ok(h.id as jlong)
    })
}
