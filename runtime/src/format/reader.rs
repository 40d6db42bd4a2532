//! Reading `.acorn` files: memory-map, then validate every field before use. Any byte string
//! yields `Ok` or an [`Error`] naming the offset and the reason. The only `unsafe` is the mmap.

use std::path::Path;

use super::*;
use crate::error::{Error, Result};
use crate::graph::MAX_RANK;

/// The bytes of a model: a read-only memory map, an owned 8-byte-aligned copy, or memory the
/// caller owns (8-byte aligned: every element type can be viewed in place).
enum Storage {
    Mmap(memmap2::Mmap),
    Owned { words: Vec<u64>, len: usize },
    Shared(Box<dyn AsRef<[u8]> + Send + Sync>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned { words, len } => &bytemuck::cast_slice(words)[..*len],
            Storage::Shared(b) => (**b).as_ref(),
        }
    }
}

/// Alignment a model's first byte needs to be read in place: tensors lie at multiples of
/// [`ALIGN`] from it, so every element type is then aligned.
const IN_PLACE_ALIGN: usize = 8;

/// Outcome of checking one tensor's checksum.
#[derive(Clone, Debug)]
pub struct TensorCheck {
    /// The tensor.
    pub name: String,
    /// Whether the checksums agree.
    pub ok: bool,
    /// The CRC-32 the file stores.
    pub stored: u32,
    /// The CRC-32 of its bytes.
    pub computed: u32,
}

/// A validated `.acorn` file. Weights are borrowed from the mapping with zero copies.
pub struct ModelFile {
    storage: Storage,
    meta: Metadata,
    data_offset: usize,
    data_len: usize,
    data_crc32: u32,
    /// Weights given another layout at open for this CPU's kernels (by tensor index): panels
    /// repacked to another width (a file converted for another CPU), or q8 convolution weights
    /// decoded to f32 (a CPU without an int8 dot product). Empty when nothing changed.
    repacked: Vec<Option<(TensorEncoding, Vec<f32>)>>,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("tensors", &self.meta.tensors.len())
            .field("nodes", &self.meta.graph.nodes.len())
            .finish()
    }
}

/// Opens `path` for reading if it is a regular file. Checked before opening: opening a FIFO
/// blocks until a writer appears, and a folder or device is never a model.
fn open_regular(path: &Path) -> Result<std::fs::File> {
    let io = |e| Error::Io { path: path.display().to_string(), error: e };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a folder" } else { "not a regular file" };
        return Err(io(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}, not a model file"))));
    }
    std::fs::File::open(path).map_err(io)
}

/// A zeroed 8-byte-aligned buffer for `len` bytes of model, allocated fallibly.
fn aligned_words(len: usize) -> Result<Vec<u64>> {
    let mut words: Vec<u64> = Vec::new();
    words
        .try_reserve_exact(len.div_ceil(8))
        .map_err(|_| Error::Limit(format!("cannot allocate {len} bytes for a model")))?;
    words.resize(len.div_ceil(8), 0);
    Ok(words)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(x)
}

impl ModelFile {
    /// Maps and validates the file at `path`. With `verify_data`, also checks every tensor's
    /// checksum (reads all weights; otherwise open touches only header and metadata).
    pub fn open(path: impl AsRef<Path>, verify_data: bool) -> Result<ModelFile> {
        let path = path.as_ref();
        let io = |e| Error::Io { path: path.display().to_string(), error: e };
        let file = open_regular(path)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_SIZE as u64 {
            return Err(Error::format(0, format!("file is {len} bytes, shorter than the {HEADER_SIZE}-byte header")));
        }
        // SAFETY: the mapping is read-only and private to this process. Another process
        // truncating or rewriting the file while it is mapped is outside what the runtime can
        // defend against (as for every mmap-based loader); our writer never rewrites in place
        // (it renames a new file over the old one), so files produced by Acorn are safe.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_storage(Storage::Mmap(map), verify_data)
    }

    /// Reads the file at `path` into owned memory and validates it: no map, so another program
    /// rewriting the file afterwards cannot affect the model ([`crate::OpenOptions::in_memory`]).
    pub fn read(path: impl AsRef<Path>, verify_data: bool) -> Result<ModelFile> {
        use std::io::Read;
        let path = path.as_ref();
        let io = |e| Error::Io { path: path.display().to_string(), error: e };
        let mut file = open_regular(path)?;
        let len = usize::try_from(file.metadata().map_err(io)?.len())
            .map_err(|_| Error::Limit(format!("{} is too large for this address space", path.display())))?;
        let mut words = aligned_words(len)?;
        file.read_exact(&mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len]).map_err(io)?;
        Self::from_storage(Storage::Owned { words, len }, verify_data)
    }

    /// Validates a model in memory the caller hands over (a `Vec<u8>`, `Box<[u8]>`,
    /// `&'static [u8]`, `Arc<[u8]>`, …): read in place when its first byte is 8-byte aligned,
    /// else copied once into an aligned buffer.
    pub fn from_shared(bytes: Box<dyn AsRef<[u8]> + Send + Sync>, verify_data: bool) -> Result<ModelFile> {
        let b = (*bytes).as_ref();
        if (b.as_ptr() as usize).is_multiple_of(IN_PLACE_ALIGN) {
            Self::from_storage(Storage::Shared(bytes), verify_data)
        } else {
            log::debug!("model bytes at an address not aligned to {IN_PLACE_ALIGN}: copied once");
            Self::from_bytes(b, verify_data)
        }
    }

    /// Maps `len` bytes of the open file `file` from byte `offset` (a model stored inside
    /// another file, such as an uncompressed asset of an Android APK: `AAsset_openFileDescriptor`
    /// gives the descriptor, offset and length) and validates them. Read in place when `offset`
    /// is a multiple of 8, else copied once. `file` may be closed afterwards.
    pub fn open_region(file: &std::fs::File, offset: u64, len: u64, verify_data: bool) -> Result<ModelFile> {
        let io = |e| Error::Io { path: format!("<descriptor at offset {offset}>"), error: e };
        let size = file.metadata().map_err(io)?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::Input(format!(
                "the region at offset {offset} of {len} bytes does not fit in the file's {size} bytes"
            )));
        }
        if len < HEADER_SIZE as u64 {
            return Err(Error::format(0, format!("model is {len} bytes, shorter than the {HEADER_SIZE}-byte header")));
        }
        let len =
            usize::try_from(len).map_err(|_| Error::Limit(format!("{len} bytes do not fit this address space")))?;
        // SAFETY: as in `open`: a read-only private mapping; rewriting the file underneath while
        // it is mapped is outside what the runtime defends against.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(file) }.map_err(io)?;
        if (map.as_ptr() as usize).is_multiple_of(IN_PLACE_ALIGN) {
            Self::from_storage(Storage::Mmap(map), verify_data)
        } else {
            log::debug!("model at offset {offset} (not a multiple of {IN_PLACE_ALIGN}): copied once");
            Self::from_bytes(&map, verify_data)
        }
    }

    /// Validates a model held in memory (copied once into an aligned buffer).
    pub fn from_bytes(bytes: &[u8], verify_data: bool) -> Result<ModelFile> {
        let mut words = aligned_words(bytes.len())?;
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self::from_storage(Storage::Owned { words, len: bytes.len() }, verify_data)
    }

    fn from_storage(storage: Storage, verify_data: bool) -> Result<ModelFile> {
        let b = storage.bytes();
        let flen = b.len() as u64;
        if b.len() < HEADER_SIZE {
            return Err(Error::format(0, format!("file is {flen} bytes, shorter than the {HEADER_SIZE}-byte header")));
        }
        if b[0..8] != MAGIC {
            return Err(Error::format(0, "bad magic: not an .acorn file"));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(Error::Version { found: version, supported: VERSION });
        }
        let stored = u32_at(b, 60);
        let computed = crc32fast::hash(&b[0..60]);
        if stored != computed {
            return Err(Error::Checksum { what: "header (bytes 0..64)".into(), stored, computed });
        }
        let header_size = u32_at(b, 16) as usize;
        if header_size != HEADER_SIZE {
            return Err(Error::format(16, format!("header size {header_size}, expected {HEADER_SIZE}")));
        }
        let n_sections = u32_at(b, 20) as usize;
        if n_sections > MAX_SECTIONS {
            return Err(Error::format(20, format!("{n_sections} sections exceeds the limit of {MAX_SECTIONS}")));
        }
        let table_off = u64_at(b, 24);
        let declared_len = u64_at(b, 32);
        if declared_len != flen {
            return Err(Error::format(
                32,
                format!("header says the file is {declared_len} bytes but it is {flen} (truncated or extended?)"),
            ));
        }
        let table_len = (n_sections * SECTION_ENTRY_SIZE) as u64;
        let table_end = table_off.checked_add(table_len).filter(|&e| e <= flen).ok_or_else(|| {
            Error::format(24, format!("section table at {table_off} (+{table_len} bytes) lies outside the file"))
        })?;
        let table = &b[table_off as usize..table_end as usize];
        let stored = u32_at(b, 40);
        let computed = crc32fast::hash(table);
        if stored != computed {
            return Err(Error::Checksum { what: "section table".into(), stored, computed });
        }

        let mut meta_range = None;
        let mut data_range = None;
        // Where the last section (or the table) ends: the file must end there too.
        let mut furthest = table_end;
        for i in 0..n_sections {
            let e = &table[i * SECTION_ENTRY_SIZE..(i + 1) * SECTION_ENTRY_SIZE];
            let at = table_off + (i * SECTION_ENTRY_SIZE) as u64;
            let (kind, flags, off, size, crc) =
                (u32_at(e, 0), u32_at(e, 4), u64_at(e, 8), u64_at(e, 16), u32_at(e, 24));
            let end = off.checked_add(size).filter(|&x| x <= flen).ok_or_else(|| {
                Error::format(at + 8, format!("section {i} (kind {kind}) at {off}+{size} lies outside the file"))
            })?;
            furthest = furthest.max(end);
            let range = (off as usize, end as usize, crc, at);
            match kind {
                SECTION_METADATA if meta_range.is_none() => meta_range = Some(range),
                SECTION_TENSOR_DATA if data_range.is_none() => {
                    if off % ALIGN as u64 != 0 {
                        return Err(Error::format(
                            at + 8,
                            format!("tensor data section offset {off} is not {ALIGN}-byte aligned"),
                        ));
                    }
                    data_range = Some(range)
                }
                SECTION_METADATA | SECTION_TENSOR_DATA => {
                    return Err(Error::format(at, format!("duplicate section of kind {kind}")))
                }
                _ if flags & SECTION_REQUIRED != 0 => {
                    return Err(Error::Unsupported(format!(
                        "file needs section kind {kind}, which this runtime does not know; use a newer runtime"
                    )))
                }
                _ => log::debug!("skipping unknown optional section kind {kind}"),
            }
        }
        if furthest != flen {
            return Err(Error::format(
                furthest,
                format!("{} bytes after the last section (no section covers them)", flen - furthest),
            ));
        }
        let (m0, m1, mcrc, mat) = meta_range.ok_or_else(|| Error::format(table_off, "no metadata section"))?;
        let (d0, d1, dcrc, dat) = data_range.ok_or_else(|| Error::format(table_off, "no tensor data section"))?;
        let computed = crc32fast::hash(&b[m0..m1]);
        if computed != mcrc {
            return Err(Error::Checksum { what: format!("metadata section (offset {m0})"), stored: mcrc, computed });
        }
        let meta: Metadata = postcard::from_bytes(&b[m0..m1]).map_err(|e| {
            Error::format(
                m0 as u64,
                format!("metadata section does not decode ({e}); was it written by a newer converter? (record table entry at {mat})"),
            )
        })?;
        let data_len = d1 - d0;
        validate_tensors(&meta, data_len as u64, d0 as u64, dat)?;
        for ext in &meta.extensions {
            if ext.required && !KNOWN_EXTENSIONS.contains(&ext.name.as_str()) {
                return Err(Error::Unsupported(format!(
                    "file needs extension '{}', which this runtime does not know; use a newer runtime",
                    ext.name
                )));
            }
        }
        meta.graph.validate(meta.tensors.len()).map_err(|e| match e {
            Error::Graph(reason) => Error::format(m0 as u64, format!("metadata section: invalid graph: {reason}")),
            other => other,
        })?;
        let file = ModelFile { storage, meta, data_offset: d0, data_len, data_crc32: dcrc, repacked: Vec::new() };
        if verify_data {
            file.verify_data()?;
        }
        Ok(file)
    }

    /// The decoded metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// Total file size in bytes.
    pub fn file_len(&self) -> usize {
        self.storage.bytes().len()
    }

    /// The bytes of tensor `i` as execution reads them: zero-copy from the mapping, or the
    /// open-time repack of a panel-encoded weight (see [`ModelFile::panel_width`]).
    pub fn tensor_bytes(&self, i: usize) -> &[u8] {
        match self.repacked.get(i) {
            Some(Some((_, v))) => bytemuck::cast_slice(v),
            _ => self.stored_bytes(i),
        }
    }

    /// Where tensor `i`'s stored bytes lie in the file: `(offset from the file's start, length)`
    /// (for reading them without the mapping, e.g. into owned memory piece by piece).
    pub fn tensor_range(&self, i: usize) -> (u64, u64) {
        let t = &self.meta.tensors[i];
        (self.data_offset as u64 + t.offset, t.len)
    }

    /// The bytes of tensor `i` as stored in the file (what the checksums cover).
    pub fn stored_bytes(&self, i: usize) -> &[u8] {
        let t = &self.meta.tensors[i];
        let start = self.data_offset + t.offset as usize;
        &self.storage.bytes()[start..start + t.len as usize]
    }

    /// The panel width of tensor `i` as [`ModelFile::tensor_bytes`] returns it (`None`: dense).
    pub fn panel_width(&self, i: usize) -> Option<u32> {
        match self.encoding(i) {
            TensorEncoding::PanelF32 { nr } => Some(nr),
            _ => None,
        }
    }

    /// The encoding of tensor `i` as [`ModelFile::tensor_bytes`] returns it (a repacked panel
    /// weight has the width it was repacked to).
    pub fn encoding(&self, i: usize) -> TensorEncoding {
        match self.repacked.get(i) {
            Some(Some((enc, _))) => *enc,
            _ => self.meta.tensors[i].encoding,
        }
    }

    /// Replaces what [`ModelFile::tensor_bytes`] returns for panel-encoded tensor `i` with the same
    /// matrices in panels of `nr` (the execution layer repacks a file converted for another CPU
    /// at open; the stored bytes and their checksums are unchanged).
    pub(crate) fn substitute_panels(&mut self, i: usize, nr: u32, data: Vec<f32>) {
        self.substitute(i, TensorEncoding::PanelF32 { nr }, data);
    }

    /// Replaces what [`ModelFile::tensor_bytes`] returns for tensor `i` with its values decoded
    /// to dense f32 (same shape).
    pub(crate) fn substitute_dense(&mut self, i: usize, data: Vec<f32>) {
        self.substitute(i, TensorEncoding::Dense, data);
    }

    fn substitute(&mut self, i: usize, enc: TensorEncoding, data: Vec<f32>) {
        if self.repacked.is_empty() {
            self.repacked.resize_with(self.meta.tensors.len(), || None);
        }
        self.repacked[i] = Some((enc, data));
    }

    /// Checks every tensor's CRC-32; returns one entry per tensor.
    pub fn check_tensors(&self) -> Vec<TensorCheck> {
        (0..self.meta.tensors.len())
            .map(|i| {
                let t = &self.meta.tensors[i];
                let computed = crc32fast::hash(self.stored_bytes(i));
                TensorCheck { name: t.name.clone(), ok: computed == t.crc32, stored: t.crc32, computed }
            })
            .collect()
    }

    /// Verifies all tensor checksums and the data section checksum; the error names the first
    /// damaged tensor.
    pub fn verify_data(&self) -> Result<()> {
        for (i, c) in self.check_tensors().into_iter().enumerate() {
            if !c.ok {
                let at = self.data_offset as u64 + self.meta.tensors[i].offset;
                return Err(Error::Checksum {
                    what: format!("tensor '{}' (bytes at offset {at})", c.name),
                    stored: c.stored,
                    computed: c.computed,
                });
            }
        }
        self.check_data_section()?;
        self.check_codes()
    }

    /// Checks the promises an encoding makes about its values beyond the bytes' length: every
    /// code of a `Q8PanelsNarrow` tensor is within ±64 (the x86 kernels without VNNI rely on it;
    /// a larger one would saturate their 16-bit pair sums), and no code of a q8 weight a
    /// `MatMulStaticQ8` reads is −128 (its activations may be: their kernels there move the
    /// activation's sign onto the weight). Run with the checksums.
    pub fn check_codes(&self) -> Result<()> {
        let static_b = self.meta.graph.weights_of(|op| matches!(op, crate::graph::Op::MatMulStaticQ8 { .. }));
        for (i, t) in self.meta.tensors.iter().enumerate() {
            let narrow = matches!(t.encoding, TensorEncoding::Q8PanelsNarrow { .. });
            if !narrow && static_b.binary_search(&(i as u32)).is_err() {
                continue;
            }
            let Some(l) = t.encoding.quant_layout(t.dtype, &t.shape) else { continue };
            let codes = &self.stored_bytes(i)[l.values.0..l.values.1];
            let (limit, what) =
                if narrow { (crate::weights::q8::NARROW_MAX as u8, "narrow q8") } else { (127, "MatMulStaticQ8's q8") };
            if let Some(p) = codes.iter().position(|&c| (c as i8).unsigned_abs() > limit) {
                let at = self.data_offset as u64 + t.offset + p as u64;
                return Err(Error::format(
                    at,
                    format!("tensor '{}': {what} code {} is outside ±{limit}", t.name, codes[p] as i8),
                ));
            }
        }
        Ok(())
    }

    /// Checks the CRC of the whole tensor-data section (tensors and the padding between them).
    pub fn check_data_section(&self) -> Result<()> {
        let b = self.storage.bytes();
        let computed = crc32fast::hash(&b[self.data_offset..self.data_offset + self.data_len]);
        if computed != self.data_crc32 {
            return Err(Error::Checksum {
                what: format!("tensor data section (offset {}, padding)", self.data_offset),
                stored: self.data_crc32,
                computed,
            });
        }
        Ok(())
    }
}

fn validate_tensors(meta: &Metadata, data_len: u64, data_off: u64, at: u64) -> Result<()> {
    for (i, t) in meta.tensors.iter().enumerate() {
        let bad = |reason: String| {
            Error::format(data_off + t.offset.min(data_len), format!("tensor {i} '{}': {reason}", t.name))
        };
        if t.shape.len() > MAX_RANK {
            return Err(bad(format!("rank {} exceeds {MAX_RANK}", t.shape.len())));
        }
        if t.offset % ALIGN as u64 != 0 {
            return Err(bad(format!("offset {} is not {ALIGN}-byte aligned", t.offset)));
        }
        let end = t.offset.checked_add(t.len).filter(|&e| e <= data_len);
        if end.is_none() {
            return Err(bad(format!(
                "bytes {}+{} lie outside the {data_len}-byte data section (table at {at})",
                t.offset, t.len
            )));
        }
        let expect = t.encoding.byte_len(t.dtype, &t.shape);
        if expect != Some(t.len) {
            return Err(bad(format!(
                "{} bytes stored but shape {:?} of {} in encoding {:?} needs {:?}",
                t.len, t.shape, t.dtype, t.encoding, expect
            )));
        }
        if usize::try_from(t.len).is_err() {
            return Err(bad("too large for this platform".into()));
        }
    }
    Ok(())
}
