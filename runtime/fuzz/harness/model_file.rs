// Shared by the `model_file` fuzz target and the regression test `tests/tests/fuzz_regressions.rs`
// (both `include!` this file), so a crash input replays exactly as the fuzzer ran it.

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Recomputes the checksums of a file with a plausible header (see FORMAT.md).
fn reseal(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 64 || &data[0..8] != b"\x89ACORN\r\n" {
        return None;
    }
    let mut b = data.to_vec();
    let len = b.len() as u64;
    b[32..40].copy_from_slice(&len.to_le_bytes());
    let count = (u32_at(&b, 20) as usize).min(64);
    let table = usize::try_from(u64_at(&b, 24)).ok()?;
    let table_end = table.checked_add(count * 32).filter(|&e| e <= b.len())?;
    for i in 0..count {
        let e = table + i * 32;
        let (off, size) = (u64_at(&b, e + 8) as usize, u64_at(&b, e + 16) as usize);
        if let Some(end) = off.checked_add(size).filter(|&end| end <= b.len()) {
            let crc = crc32fast::hash(&b[off..end]);
            b[e + 24..e + 28].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&b[table..table_end]);
    b[40..44].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    Some(b)
}

/// Opens `bytes` as a model and, when it opens, plans and runs it on zero inputs.
fn exercise(bytes: &[u8]) {
    let Ok(model) = Model::from_bytes(bytes, &OpenOptions { verify_checksums: true, ..Default::default() }) else { return };
    let inputs: Option<Vec<(String, Tensor)>> = model
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let shape: Vec<usize> = match &spec.dims {
                Some(d) => d
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => usize::try_from(*n).unwrap_or(usize::MAX),
                        Dim::Sym(_) => 1 + i % 2,
                    })
                    .collect(),
                None => vec![1],
            };
            if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 16) {
                return None;
            }
            if spec.dtype == DType::F16 {
                return None;
            }
            Some((spec.name.clone(), Tensor::zeros(spec.dtype, shape).ok()?))
        })
        .collect();
    let Some(inputs) = inputs else { return };
    let Ok(mut session) = model.session().with_memory_limit(64 << 20).commit() else { return };
    let feed: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let _ = session.run(&feed);
}


/// What one fuzz input does: the bytes as given, then resealed.
pub fn fuzz_one(data: &[u8]) {
    exercise(data);
    if let Some(sealed) = reseal(data) {
        exercise(&sealed);
    }
}
