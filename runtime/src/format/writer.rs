//! Writing `.acorn` files atomically: the file is built in a temporary file next to the target,
//! flushed, synced and renamed over it, so a crash or error never leaves a partial model.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use super::*;
use crate::error::{Error, Result};

/// A tensor to store: its table entry fields and its bytes.
pub struct TensorPayload<'a> {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Logical shape.
    pub shape: Vec<u64>,
    /// How `bytes` hold the values.
    pub encoding: TensorEncoding,
    /// The bytes as stored.
    pub bytes: Cow<'a, [u8]>,
}

const ZEROS: [u8; ALIGN] = [0; ALIGN];

/// Lays out and writes a model. `graph.constants[*].tensor` index into `tensors`.
/// Returns the number of bytes written.
pub fn write_model(
    path: &Path,
    graph: Graph,
    provenance: Provenance,
    extensions: Vec<Extension>,
    tensors: &[TensorPayload<'_>],
) -> Result<u64> {
    write_model_with(graph, provenance, extensions, tensors, |emit| atomic_write(path, |w| emit(w)))
}

/// The bytes [`write_model`] would write, in memory (a model the converter runs before writing
/// the file once, e.g. to measure it; open them with `Model::from_memory`).
pub fn model_bytes(
    graph: Graph,
    provenance: Provenance,
    extensions: Vec<Extension>,
    tensors: &[TensorPayload<'_>],
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_model_with(graph, provenance, extensions, tensors, |emit| {
        emit(&mut out).map_err(|e| Error::Io { path: "<memory>".into(), error: e })
    })?;
    Ok(out)
}

fn write_model_with(
    graph: Graph,
    provenance: Provenance,
    extensions: Vec<Extension>,
    tensors: &[TensorPayload<'_>],
    sink: impl FnOnce(&mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>) -> Result<()>,
) -> Result<u64> {
    graph.validate(tensors.len())?;
    // Tensor table and data-section checksum, computed before anything is written.
    let mut entries = Vec::with_capacity(tensors.len());
    let mut data_hasher = crc32fast::Hasher::new();
    let mut offset = 0u64;
    for t in tensors {
        let len = t.bytes.len() as u64;
        entries.push(TensorEntry {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            encoding: t.encoding,
            offset,
            len,
            crc32: crc32fast::hash(&t.bytes),
        });
        data_hasher.update(&t.bytes);
        let end = offset + len;
        let next = align_up(end).ok_or_else(|| Error::Limit("tensor data exceeds 2^64 bytes".into()))?;
        data_hasher.update(&ZEROS[..(next - end) as usize]);
        offset = next;
    }
    let data_len = offset;
    let data_crc = data_hasher.finalize();
    let meta = Metadata { graph, tensors: entries, provenance, extensions };
    let meta_bytes = postcard::to_allocvec(&meta).map_err(|e| Error::Graph(format!("cannot encode metadata: {e}")))?;

    let n_sections = 2usize;
    let table_off = HEADER_SIZE as u64;
    let meta_off = table_off + (n_sections * SECTION_ENTRY_SIZE) as u64;
    let meta_end = meta_off + meta_bytes.len() as u64;
    let data_off = align_up(meta_end).ok_or_else(|| Error::Limit("metadata too large".into()))?;
    let file_len = data_off + data_len;

    let mut table = Vec::with_capacity(n_sections * SECTION_ENTRY_SIZE);
    let mut entry = |kind: u32, flags: u32, off: u64, size: u64, crc: u32| {
        table.extend_from_slice(&kind.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&off.to_le_bytes());
        table.extend_from_slice(&size.to_le_bytes());
        table.extend_from_slice(&crc.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
    };
    entry(SECTION_METADATA, SECTION_REQUIRED, meta_off, meta_bytes.len() as u64, crc32fast::hash(&meta_bytes));
    entry(SECTION_TENSOR_DATA, SECTION_REQUIRED, data_off, data_len, data_crc);

    let mut header = [0u8; HEADER_SIZE];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&0u32.to_le_bytes());
    header[16..20].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    header[20..24].copy_from_slice(&(n_sections as u32).to_le_bytes());
    header[24..32].copy_from_slice(&table_off.to_le_bytes());
    header[32..40].copy_from_slice(&file_len.to_le_bytes());
    header[40..44].copy_from_slice(&crc32fast::hash(&table).to_le_bytes());
    let hcrc = crc32fast::hash(&header[0..60]);
    header[60..64].copy_from_slice(&hcrc.to_le_bytes());

    sink(&mut |w: &mut dyn Write| {
        w.write_all(&header)?;
        w.write_all(&table)?;
        w.write_all(&meta_bytes)?;
        w.write_all(&ZEROS[..(data_off - meta_end) as usize])?;
        for t in tensors {
            w.write_all(&t.bytes)?;
            let end = t.bytes.len() as u64;
            let pad = align_up(end).unwrap_or(end) - end;
            w.write_all(&ZEROS[..pad as usize])?;
        }
        Ok(())
    })?;
    Ok(file_len)
}

/// Bytes per write a [`ChunkWriter`] hands the file: the size of a huge page.
const CHUNK: usize = 2 << 20;

/// A writer that hands its file only whole [`CHUNK`]s at chunk-aligned offsets (and the tail at
/// the end). Linux keeps a file written that way in large page-cache folios, as it keeps one read
/// back from disk; written in pieces at unaligned offsets (a tensor at a time), the page cache
/// holds it in 4 KiB pages, and a model mapped while those pages stay cached ran up to 1.45×
/// slower (SmolLM2 q8 decode, 1 thread: 116 tok/s for a copy written 4 KiB at a time, 168 for
/// one written 1 MiB at a time, ext4 on Linux 6.18; docs/BENCHMARKS.md).
pub struct ChunkWriter<'f> {
    file: &'f std::fs::File,
    buf: Vec<u8>,
}

impl Write for ChunkWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // At a chunk boundary (nothing buffered), whole chunks go straight to the file.
        if self.buf.is_empty() && data.len() >= CHUNK {
            let whole = data.len() / CHUNK * CHUNK;
            (&mut &*self.file).write_all(&data[..whole])?;
            return Ok(whole);
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            (&mut &*self.file).write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            (&mut &*self.file).write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// The folder a file is in: `.` for a bare file name (`Path::parent` gives an empty path there,
/// which names no folder).
pub fn folder_of(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes through `f` into a temporary file beside `path`, then renames it into place.
/// On any error the temporary file is removed and `path` is untouched.
pub fn atomic_write(path: &Path, f: impl FnOnce(&mut ChunkWriter<'_>) -> std::io::Result<()>) -> Result<()> {
    let io = |e| Error::Io { path: path.display().to_string(), error: e };
    let dir = folder_of(path).to_path_buf();
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mode = check_destination(path)?;
    remove_stale_temporaries(&dir, &file_name);
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        if let Some(perm) = mode {
            file.set_permissions(perm)?;
        }
        {
            let mut w = ChunkWriter { file: &file, buf: Vec::new() };
            f(&mut w)?;
            w.flush()?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// Refuses a destination that renaming over would damage: anything but a regular file (a
/// device such as `/dev/null`, a FIFO, a folder), a symbolic link (replacing it would leave its
/// target stale and surprise whoever made it), or a file with other hard links (they would keep
/// the old contents). Returns the permissions the new file keeps (an existing file's), if any.
fn check_destination(path: &Path) -> Result<Option<std::fs::Permissions>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Io { path: path.display().to_string(), error: e }),
    };
    let refuse = |what: &str| {
        Err(Error::Io {
            path: path.display().to_string(),
            error: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the destination is {what}; not replacing it (write to a new path, or remove it first)"),
            ),
        })
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return refuse("a symbolic link");
    }
    if !ft.is_file() {
        return refuse("not a regular file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.nlink() > 1 {
            return refuse(&format!("a file with {} hard links", meta.nlink()));
        }
    }
    Ok(Some(meta.permissions()))
}

/// Removes `.NAME.tmpPID` files beside the destination that a killed writer left (their process
/// is gone): a `kill -9` mid-write must not leave hundreds of megabytes behind for good.
fn remove_stale_temporaries(dir: &Path, file_name: &str) {
    if !Path::new("/proc/self").exists() {
        return; // no way to tell a live writer from a dead one
    }
    let prefix = format!(".{file_name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        if pid.parse::<u32>().is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of every size around the chunk (one byte, several chunks at once, the tail)
    /// arrive in order and whole.
    #[test]
    fn chunked_writes_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunks.bin");
        let data: Vec<u8> = (0..(5 * CHUNK + 12345)).map(|i| (i * 7 + i / 251) as u8).collect();
        let cuts = [0, 1, 100, CHUNK - 3, CHUNK + 5, 2 * CHUNK, 3 * CHUNK + 7, data.len()];
        atomic_write(&path, |w| {
            for c in cuts.windows(2) {
                w.write_all(&data[c[0]..c[1]])?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
