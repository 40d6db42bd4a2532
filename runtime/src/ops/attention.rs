//! ONNX `Attention` (opsets 23/24): scaled dot-product attention over 4-D [B, heads, S, H] or
//! 3-D [B, S, heads·H] inputs, grouped-query heads, boolean or additive masks (padded to the
//! total length), causal masking aligned after the past, KV cache concatenation (present =
//! past ‖ new), softcap, `nonpad_kv_seqlen`, sliding windows (opset 25), and the optional QK
//! output in its four modes.
//! Scores are computed one query row at a time: no [heads, S, S] tensor is materialised
//! unless the QK output is asked for.

use super::{broadcast_strides, req, Ctx, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::AttentionAttrs;
use crate::kernels::{self, BMat, MatRef};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

struct Geo {
    b: usize,
    qh: usize,
    kvh: usize,
    sq: usize,
    skv: usize,
    past: usize,
    hd: usize,
    hv: usize,
    three_d: bool,
}

fn geometry(a: &AttentionAttrs, q: &[usize], k: &[usize], v: &[usize], past: Option<&[usize]>) -> OpResult<Geo> {
    if q.len() != k.len() || q.len() != v.len() || !(q.len() == 3 || q.len() == 4) {
        op_bail!("Attention needs Q, K, V all 3-D or all 4-D; got {q:?}, {k:?}, {v:?}");
    }
    let g = if q.len() == 4 {
        if k[0] != q[0] || v[0] != q[0] || k[1] != v[1] || k[2] != v[2] || k[3] != q[3] {
            op_bail!("Attention shapes disagree: Q {q:?}, K {k:?}, V {v:?}");
        }
        Geo { b: q[0], qh: q[1], kvh: k[1], sq: q[2], skv: k[2], past: 0, hd: q[3], hv: v[3], three_d: false }
    } else {
        let (Some(qn), Some(kn)) = (a.q_num_heads, a.kv_num_heads) else {
            op_bail!("3-D Attention needs q_num_heads and kv_num_heads");
        };
        let (qn, kn) = (qn as usize, kn as usize);
        if qn == 0
            || kn == 0
            || !q[2].is_multiple_of(qn)
            || !k[2].is_multiple_of(kn)
            || !v[2].is_multiple_of(kn)
            || q[2] / qn != k[2] / kn
        {
            op_bail!("Attention hidden sizes do not split into heads: Q {q:?}, K {k:?}, V {v:?}");
        }
        if k[1] != v[1] || k[0] != q[0] || v[0] != q[0] {
            op_bail!("Attention shapes disagree: Q {q:?}, K {k:?}, V {v:?}");
        }
        Geo { b: q[0], qh: qn, kvh: kn, sq: q[1], skv: k[1], past: 0, hd: q[2] / qn, hv: v[2] / kn, three_d: true }
    };
    if g.kvh == 0 || g.qh % g.kvh != 0 {
        op_bail!("{} query heads are not a multiple of {} key/value heads", g.qh, g.kvh);
    }
    let mut g = g;
    if let Some(p) = past {
        if p.len() != 4 || p[0] != g.b || p[1] != g.kvh || p[3] != g.hd {
            op_bail!("past_key {p:?} does not match [B={}, kv_heads={}, past, H={}]", g.b, g.kvh, g.hd);
        }
        g.past = p[2];
    }
    Ok(g)
}

pub(super) fn infer(a: &AttentionAttrs, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let (q, k, v) = (req(inputs, 0, "Q")?, req(inputs, 1, "K")?, req(inputs, 2, "V")?);
    if q.dtype != DType::F32 || k.dtype != DType::F32 || v.dtype != DType::F32 {
        op_bail!("Attention is not supported for {} tensors", q.dtype);
    }
    let past_k = inputs.get(4).copied().flatten();
    let past_v = inputs.get(5).copied().flatten();
    let g = geometry(a, q.shape, k.shape, v.shape, past_k.map(|p| p.shape))?;
    if past_k.is_some() != past_v.is_some() {
        op_bail!("past_key and past_value must be given together");
    }
    if let Some(pv) = past_v {
        if pv.shape != [g.b, g.kvh, g.past, g.hv] {
            op_bail!("past_value {:?} does not match past_key", pv.shape);
        }
    }
    let total = g.past + g.skv;
    if let Some(Some(m)) = inputs.get(3) {
        let mw = *m.shape.last().unwrap_or(&0);
        if m.shape.is_empty() || m.shape.len() > 4 || mw > total || !matches!(m.dtype, DType::Bool | DType::F32) {
            op_bail!("attn_mask {} {:?} does not fit [.., {}, {total}]", m.dtype, m.shape, g.sq);
        }
        let full = [g.b, g.qh, g.sq, mw];
        let off = 4 - m.shape.len();
        if m.shape.iter().enumerate().any(|(i, &d)| d != 1 && d != full[off + i]) {
            op_bail!("attn_mask {:?} does not broadcast to {full:?}", m.shape);
        }
    }
    let y = if g.three_d { vec![g.b, g.sq, g.qh * g.hv] } else { vec![g.b, g.qh, g.sq, g.hv] };
    let mut outs = vec![
        (DType::F32, y),
        (DType::F32, vec![g.b, g.kvh, total, g.hd]),
        (DType::F32, vec![g.b, g.kvh, total, g.hv]),
        (DType::F32, vec![g.b, g.qh, g.sq, total]),
    ];
    outs.truncate(n_out.max(1));
    Ok(outs)
}

/// Whether the unit kernel ([`attend_units`]) computes this node: no softcap, no QK output, no
/// `nonpad_kv_seqlen`, an f32 or bool mask (or none); 4-D with or without present outputs, 3-D
/// (heads side by side in each row, as BERT-style encoders keep them) without.
fn fast_path(a: &AttentionAttrs, q_rank: usize, mask: Option<DType>, nonpad: bool, n_out: usize) -> bool {
    let mask_ok = mask.is_none_or(|d| matches!(d, DType::F32 | DType::Bool));
    let outs_ok = if q_rank == 3 { n_out <= 1 } else { q_rank == 4 && n_out <= 3 };
    outs_ok && a.softcap == 0.0 && !nonpad && mask_ok
}

/// Query rows of one unit: a group of query heads sharing a K/V head (4-D: their rows are
/// contiguous) or one query head (3-D).
fn unit_rows(g: &Geo) -> usize {
    if g.three_d {
        g.sq
    } else {
        (g.qh / g.kvh.max(1)) * g.sq
    }
}

/// Scratch floats for one unit: its scores and probabilities (a parallel run grows the scratch
/// to one such block, plus its outputs, per thread).
pub(super) fn scratch_len(a: &AttentionAttrs, inputs: &[Option<Fact<'_>>], n_out: usize) -> usize {
    let (Some(q), Some(k), Some(v)) = (inputs[0], inputs.get(1).copied().flatten(), inputs.get(2).copied().flatten())
    else {
        return 0;
    };
    let past = inputs.get(4).copied().flatten().map(|p| p.shape);
    match geometry(a, q.shape, k.shape, v.shape, past) {
        Ok(g)
            if fast_path(
                a,
                q.shape.len(),
                inputs.get(3).copied().flatten().map(|m| m.dtype),
                inputs.get(6).copied().flatten().is_some(),
                n_out,
            ) =>
        {
            2 * unit_rows(&g) * (g.past + g.skv)
        }
        _ => 0,
    }
}

/// Rows of one K/V head in one buffer: row `j` is `data[j·stride ..][.. width]`.
#[derive(Clone, Copy)]
struct Piece<'a> {
    data: &'a [f32],
    rows: usize,
    stride: usize,
}

impl<'a> Piece<'a> {
    const EMPTY: Piece<'static> = Piece { data: &[], rows: 0, stride: 0 };

    /// Head `h`'s `rows` rows of `width` in a buffer of [rows, heads, width] (`heads_side_by_side`)
    /// or [heads, rows, width], starting at row `r0` of the batch.
    fn of(data: &'a [f32], r0: usize, rows: usize, heads: usize, h: usize, width: usize, side_by_side: bool) -> Self {
        if rows == 0 {
            return Piece { data: &[], rows: 0, stride: width };
        }
        if side_by_side {
            Piece { data: &data[(r0 * heads + h) * width..], rows, stride: heads * width }
        } else {
            Piece { data: &data[(r0 * heads + h * rows) * width..], rows, stride: width }
        }
    }
}

/// Up to two pieces of one K/V head's rows (the past, then the new rows), `width` floats per row.
#[derive(Clone, Copy)]
struct Rows<'a> {
    pieces: [Piece<'a>; 2],
    width: usize,
}

impl Rows<'_> {
    fn total(&self) -> usize {
        self.pieces[0].rows + self.pieces[1].rows
    }
}

/// One unit of work: `rows` query rows (`q`, row stride `q.rs`) of the query heads `h0…` in
/// batch `b`, the K/V rows they attend to, and where their outputs start in Y.
#[derive(Clone, Copy)]
struct Unit<'a> {
    b: usize,
    h0: usize,
    q: MatRef<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    y: usize,
}

/// How the mask reaches one group: the mask view, its width, broadcast strides over
/// [B, heads, S, width].
type MaskRef<'a> = Option<(View<'a>, usize, [isize; crate::graph::MAX_RANK])>;

/// What every unit shares: query rows per head, the scale, the mask (with its values when f32),
/// the causal offset (the past length) if causal.
struct Scoring<'a> {
    sq: usize,
    scale: f32,
    mask: MaskRef<'a>,
    mask_f32: Option<&'a [f32]>,
    causal_past: Option<usize>,
}

impl Scoring<'_> {
    /// Scales score row `r` of a unit starting at query head `h0` and adds its mask and causal
    /// biases.
    fn bias(&self, b: usize, h0: usize, r: usize, row: &mut [f32]) {
        let (h, i) = (h0 + r / self.sq, r % self.sq);
        match &self.mask {
            None => row.iter_mut().for_each(|s| *s *= self.scale),
            Some((m, mw, st)) => {
                let base = b as isize * st[0] + h as isize * st[1] + i as isize * st[2];
                let (mw, sj) = (*mw, st[3]);
                if let (Some(mf), 1, true) = (self.mask_f32, sj, mw >= row.len()) {
                    // The common case (an f32 mask row as wide as the keys): one vector loop.
                    let mrow = &mf[base as usize..][..row.len()];
                    row.iter_mut().zip(mrow).for_each(|(s, &m)| *s = *s * self.scale + m);
                } else {
                    self.bias_any(m, (mw, sj, base), row);
                }
            }
        }
        // Causal: query i (at position past + i) sees keys up to its own position.
        if let Some(past) = self.causal_past {
            row.iter_mut().skip(past + i + 1).for_each(|s| *s = f32::NEG_INFINITY);
        }
    }

    /// [`Scoring::bias`] for any mask: boolean, strided, or narrower than the keys.
    fn bias_any(&self, m: &View<'_>, (mw, sj, base): (usize, isize, isize), row: &mut [f32]) {
        for (j, s) in row.iter_mut().enumerate() {
            let bias = if j >= mw {
                f32::NEG_INFINITY
            } else {
                let off = (base + j as isize * sj) as usize;
                match self.mask_f32 {
                    Some(mf) => mf[off],
                    None if m.bytes[off] != 0 => 0.0,
                    None => f32::NEG_INFINITY,
                }
            };
            *s = *s * self.scale + bias;
        }
    }
}

/// Attention for one unit as two small GEMMs (Q·Kᵀ, then P·V) over its `rows` query rows:
/// outputs into `y` (row stride `ldy`); `scratch` holds 2·rows·T floats.
fn attend_unit(
    u: &Unit<'_>,
    rows: usize,
    sc: &Scoring<'_>,
    (y, ldy): (&mut [f32], usize),
    scratch: &mut [f32],
    threads: usize,
) {
    let (hd, hv, total) = (u.k.width, u.v.width, u.k.total());
    if total == 0 {
        for r in 0..rows {
            y[r * ldy..r * ldy + hv].fill(0.0);
        }
        return;
    }
    let (scores, probs) = scratch[..2 * rows * total].split_at_mut(rows * total);
    let mut col = 0;
    for piece in u.k.pieces {
        if piece.rows > 0 {
            let bm = MatRef { data: piece.data, rs: 1, cs: piece.stride };
            kernels::sgemm(rows, piece.rows, hd, u.q, BMat::Strided(bm), &mut scores[col..], total, false, threads);
        }
        col += piece.rows;
    }
    for (r, row) in scores.chunks_exact_mut(total).enumerate() {
        sc.bias(u.b, u.h0, r, row);
    }
    kernels::math::softmax_rows(scores, probs, total, false);
    // A row with no attendable key (every score −∞ after the masks) attends to nothing: zeros,
    // as ONNX Attention defines it. Decided on the scores, not on what the softmax kernel made of
    // them (NaN in the portable code; a SIMD exp that clamps its argument could give a finite
    // uniform row). Almost every row stops at its first score.
    for (srow, prow) in scores.chunks_exact(total).zip(probs.chunks_exact_mut(total)) {
        if srow.iter().all(|&s| s == f32::NEG_INFINITY) {
            prow.fill(0.0);
        }
    }
    let mut row0 = 0;
    for piece in u.v.pieces {
        if piece.rows > 0 {
            let am = MatRef { data: &probs[row0..], rs: total, cs: 1 };
            let bm = MatRef { data: piece.data, rs: piece.stride, cs: 1 };
            kernels::sgemm(rows, hv, piece.rows, am, BMat::Strided(bm), y, ldy, row0 > 0, threads);
        }
        row0 += piece.rows;
    }
}

/// Multiply-adds per unit below which units are not handed to threads (the hand-off would cost
/// more than it saves: a 16-token MiniLM head is 16K).
const PAR_UNIT_WORK: usize = 1 << 16;

/// Runs units `0..n` (`unit(i)` describes one). With several threads and enough units, whole
/// units go to threads (each with its own block of the scratch, outputs copied into Y
/// afterwards); otherwise units run in turn, each product split across the threads.
fn attend_units<'a>(
    n: usize,
    unit: &(dyn Fn(usize) -> Unit<'a> + Sync),
    (rows, ldy): (usize, usize),
    sc: &Scoring<'_>,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
    threads: usize,
) {
    if n == 0 {
        return;
    }
    let first = unit(0);
    let (total, hv) = (first.k.total(), first.v.width);
    let per_unit = 2 * rows * total;
    let parts = threads.min(n);
    let small = rows * total * (first.k.width + hv) < PAR_UNIT_WORK;
    if parts < 2 || small || (!n.is_multiple_of(parts) && n < 4 * parts) {
        if scratch.len() < per_unit {
            // Planned sessions reserve this up front; other callers (plan-time evaluation of
            // converted f16 inputs) grow it here.
            scratch.resize(per_unit, 0.0);
        }
        for i in 0..n {
            let u = unit(i);
            attend_unit(&u, rows, sc, (&mut y[u.y..], ldy), scratch, threads);
        }
        return;
    }
    // Part p runs units p, p + parts, …; its block of the scratch holds the scores and its
    // units' outputs.
    let per_part = n.div_ceil(parts);
    let block = per_unit + per_part * rows * hv;
    if scratch.len() < parts * block {
        // Once per session and thread count (the plan reserves one unit's scratch).
        scratch.resize(parts * block, 0.0);
    }
    let blocks = &mut scratch[..parts * block];
    kernels::pool::for_chunks(parts, blocks, block, block, &|start, mine| {
        let (work, outs) = mine.split_at_mut(per_unit);
        for (slot, i) in (start / block..n).step_by(parts).enumerate() {
            attend_unit(&unit(i), rows, sc, (&mut outs[slot * rows * hv..], hv), work, 1);
        }
    });
    for (p, mine) in blocks.chunks_exact(block).enumerate() {
        let outs = &mine[per_unit..];
        for (slot, i) in (p..n).step_by(parts).enumerate() {
            let at = unit(i).y;
            for r in 0..rows {
                y[at + r * ldy..][..hv].copy_from_slice(&outs[(slot * rows + r) * hv..][..hv]);
            }
        }
    }
}

fn mask_ref<'a>(mask: Option<View<'a>>, g: &Geo) -> MaskRef<'a> {
    mask.map(|m| {
        let mw = *m.shape.last().unwrap_or(&0);
        let st = broadcast_strides(m.shape, &[g.b, g.qh, g.sq, mw]);
        (m, mw, st)
    })
}

/// The KV cache a generating session keeps: per layer and K/V head, the K and V rows of every
/// cached position, one contiguous vector each, reserved for `capacity` positions up front (so
/// appending never reallocates or copies, and memory is only touched as positions fill). Layer
/// `l` holds `lens[l]` valid positions; a step's attention appends its rows after them and reads
/// `0..lens[l] + S`. `len` is the context's length, which the caller sets once a step has run
/// (layers behind it are those an early exit has not run yet at the last positions).
#[derive(Debug)]
pub struct KvCache {
    /// [layer][kv_head] → (K rows, V rows).
    pub(crate) layers: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) value_dim: usize,
    pub(crate) capacity: usize,
    /// Positions of the context (what every layer holds once a step has run them all).
    pub(crate) len: usize,
    /// Per layer: positions it holds (below `len` for layers an early exit or a draft has not
    /// run yet at the last positions; a step's attention appends at its own layer's length).
    pub(crate) lens: Vec<usize>,
}

impl KvCache {
    /// Reserves the cache. Errors when the memory cannot be had.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        value_dim: usize,
        capacity: usize,
    ) -> crate::Result<Self> {
        let too_big = || crate::Error::Limit(format!("cannot allocate a KV cache of {capacity} positions"));
        let reserve = |w: usize| -> crate::Result<Vec<f32>> {
            let n = capacity.checked_mul(w).ok_or_else(too_big)?;
            let mut v: Vec<f32> = Vec::new();
            v.try_reserve_exact(n).map_err(|_| too_big())?;
            Ok(v)
        };
        let mut l = Vec::with_capacity(layers);
        for _ in 0..layers {
            let mut heads = Vec::with_capacity(kv_heads);
            for _ in 0..kv_heads {
                heads.push((reserve(head_dim)?, reserve(value_dim)?));
            }
            l.push(heads);
        }
        Ok(KvCache { layers: l, kv_heads, head_dim, value_dim, capacity, len: 0, lens: vec![0; layers] })
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No position filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions layer `layer` holds.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.lens.get(layer).copied().unwrap_or(0)
    }

    /// Forgets every position (the memory is kept).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps the first `n` positions of every layer (e.g. to drop a rejected continuation).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
        for l in &mut self.lens {
            *l = (*l).min(n);
        }
    }

    /// Sets the context's length after a step that ran every layer (each layer's own length
    /// is what its attention appended).
    #[cfg(feature = "llm")]
    pub(crate) fn set_len(&mut self, n: usize) {
        self.len = n;
    }
}

pub(super) fn infer_cached(a: &AttentionAttrs, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let (q, k, v) = (req(inputs, 0, "Q")?, req(inputs, 1, "K")?, req(inputs, 2, "V")?);
    if q.shape.len() != 4 || q.shape[0] != 1 {
        op_bail!("cached attention runs 4-D inputs of batch 1, got Q {:?}", q.shape);
    }
    let g = geometry(a, q.shape, k.shape, v.shape, None)?;
    Ok(vec![(DType::F32, vec![g.b, g.qh, g.sq, g.hv])])
}

/// Scratch for cached attention at most `capacity` positions long.
pub(super) fn scratch_len_cached(a: &AttentionAttrs, inputs: &[Option<Fact<'_>>], capacity: usize) -> usize {
    let (Some(q), Some(k), Some(v)) = (inputs[0], inputs.get(1).copied().flatten(), inputs.get(2).copied().flatten())
    else {
        return 0;
    };
    match geometry(a, q.shape, k.shape, v.shape, None) {
        Ok(g) => 2 * (g.qh / g.kvh.max(1)) * g.sq * capacity,
        Err(_) => 0,
    }
}

/// Attention of layer `layer` against the session's KV cache: appends the new K/V rows at the
/// cache's current length, then attends over everything cached (the mask, if any, must span
/// it all).
pub(super) fn run_cached(
    a: &AttentionAttrs,
    layer: usize,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let (q, k, v) = (*req(inputs, 0, "Q")?, *req(inputs, 1, "K")?, *req(inputs, 2, "V")?);
    let g = geometry(a, q.shape, k.shape, v.shape, None)?;
    let Some(cache) = ctx.kv.as_deref_mut() else { op_bail!("this plan needs a KV cache") };
    let Some(heads) = cache.layers.get_mut(layer) else { op_bail!("no KV cache for layer {layer}") };
    if g.b != 1 || g.kvh != cache.kv_heads || g.hd != cache.head_dim || g.hv != cache.value_dim {
        op_bail!(
            "K/V [{}, {}, {}, {}] do not match the KV cache [1, {}, _, {}]",
            g.b,
            g.kvh,
            g.skv,
            g.hd,
            cache.kv_heads,
            cache.head_dim
        );
    }
    let (p, cap) = (cache.lens[layer], cache.capacity);
    let total = p + g.skv;
    if total > cap {
        op_bail!("the context is full: {p} positions cached + {} new > {cap}", g.skv);
    }
    let mask = inputs.get(3).copied().flatten();
    // A mask may be wider than the cache (a decode step's attention mask padded with zeros to
    // a bucket, so one plan serves many steps): columns past `total` are keys that do not exist.
    if let Some(m) = mask {
        if m.shape.last().is_none_or(|&w| w < total) {
            op_bail!("attn_mask {:?} must span the {total} cached positions", m.shape);
        }
    }
    let (kd, vd) = (k.f32()?, v.f32()?);
    let (skv, hd, hv) = (g.skv, g.hd, g.hv);
    for (h, (ck, cv)) in heads.iter_mut().enumerate() {
        // Rows past `len` are from a step that did not complete (or a truncated context).
        ck.truncate(p * hd);
        cv.truncate(p * hv);
        if ck.len() != p * hd || cv.len() != p * hv {
            op_bail!("the KV cache of layer {layer} holds {} positions, expected {p}", ck.len() / hd.max(1));
        }
        ck.extend_from_slice(&kd[h * skv * hd..(h + 1) * skv * hd]);
        cv.extend_from_slice(&vd[h * skv * hv..(h + 1) * skv * hv]);
    }
    cache.lens[layer] = total;
    let g = Geo { past: p, ..g };
    let heads = &cache.layers[layer];
    let kv = |rows: usize| {
        move |_: usize, h: usize| {
            let (kc, vc) = (&heads[h].0[..], &heads[h].1[..]);
            (
                Rows { pieces: [Piece { data: kc, rows, stride: g.hd }, Piece::EMPTY], width: g.hd },
                Rows { pieces: [Piece { data: vc, rows, stride: g.hv }, Piece::EMPTY], width: g.hv },
            )
        }
    };
    if ctx.row_invariant && g.sq > 1 {
        return attend_rows_alone(a, &g, q.f32()?, outputs[0].f32()?, mask, (&mut *ctx.scratch, ctx.threads), kv);
    }
    attend_heads(a, &g, q.f32()?, outputs[0].f32()?, mask, (&mut *ctx.scratch, ctx.threads), kv(total))
}

/// Cached attention of `g.sq` new positions computed one query row at a time, each exactly as
/// a one-token decode step computes it (its keys up to its own position, the same products and
/// softmax lengths): what a verification pass needs so that its results are, bit for bit, those
/// of decoding the positions one by one.
fn attend_rows_alone<'c, F>(
    a: &AttentionAttrs,
    g: &Geo,
    qd: &[f32],
    y: &mut [f32],
    mask: Option<View<'_>>,
    (scratch, threads): (&mut Vec<f32>, usize),
    kv: impl Fn(usize) -> F,
) -> OpResult<()>
where
    F: Fn(usize, usize) -> (Rows<'c>, Rows<'c>) + Sync,
{
    let (qh, sq, hd, hv) = (g.qh, g.sq, g.hd, g.hv);
    if g.b != 1 {
        op_bail!("cached attention runs batch 1");
    }
    let mut qi = vec![0.0f32; qh * hd];
    let mut yi = vec![0.0f32; qh * hv];
    for i in 0..sq {
        for h in 0..qh {
            let src = if g.three_d { i * qh * hd + h * hd } else { (h * sq + i) * hd };
            qi[h * hd..(h + 1) * hd].copy_from_slice(&qd[src..src + hd]);
        }
        let row_mask = match mask {
            Some(m) => mask_row(&m, sq, i)?,
            None => None,
        };
        let m = match &row_mask {
            Some(t) => Some(t.view()),
            None => mask,
        };
        let gi = Geo { sq: 1, skv: 1, past: g.past + i, ..*g };
        let rows = kv(g.past + i + 1);
        attend_heads(a, &gi, &qi, &mut yi, m, (&mut *scratch, threads), |b, h| {
            let (k, v) = rows(b, h);
            (k, v)
        })?;
        for h in 0..qh {
            let dst = if g.three_d { i * qh * hv + h * hv } else { (h * sq + i) * hv };
            y[dst..dst + hv].copy_from_slice(&yi[h * hv..(h + 1) * hv]);
        }
    }
    Ok(())
}

/// Row `i` of a mask whose query axis (second to last) has `sq` rows; `None` when that axis
/// broadcasts (the mask serves every row as it is).
fn mask_row(m: &View<'_>, sq: usize, i: usize) -> OpResult<Option<crate::tensor::Tensor>> {
    let r = m.shape.len();
    if r < 2 || m.shape[r - 2] != sq || sq == 1 {
        return Ok(None);
    }
    let w = m.shape[r - 1];
    let size = m.dtype.size();
    let outer: usize = m.shape[..r - 2].iter().product();
    let mut bytes = Vec::with_capacity(outer * w * size);
    for o in 0..outer {
        let at = ((o * sq + i) * w) * size;
        bytes.extend_from_slice(&m.bytes[at..at + w * size]);
    }
    let mut shape = m.shape.to_vec();
    shape[r - 2] = 1;
    Ok(Some(
        crate::tensor::Tensor::from_bytes(m.dtype, shape, &bytes)
            .map_err(|e| crate::error::OpError::Failed(e.to_string()))?,
    ))
}

/// Attention over every unit of a node: `kv(b, h)` gives K/V head `h`'s rows in batch `b`. Q
/// and Y are 4-D [B, heads, S, ·] (a group's query heads contiguous: one unit per K/V head) or
/// 3-D [B, S, heads·width] (one unit per query head, rows `heads·width` apart).
fn attend_heads<'r>(
    a: &AttentionAttrs,
    g: &Geo,
    qd: &'r [f32],
    y: &mut [f32],
    mask: Option<View<'r>>,
    (scratch, threads): (&mut Vec<f32>, usize),
    kv: impl Fn(usize, usize) -> (Rows<'r>, Rows<'r>) + Sync,
) -> OpResult<()> {
    let rows = unit_rows(g);
    if rows == 0 || g.hv == 0 {
        return Ok(());
    }
    let mask = mask_ref(mask, g);
    let mask_f32 = match &mask {
        Some((m, _, _)) if m.dtype == DType::F32 => Some(m.f32()?),
        _ => None,
    };
    let scale = a.scale.unwrap_or(1.0 / (g.hd as f32).sqrt());
    let sc = Scoring { sq: g.sq, scale, mask, mask_f32, causal_past: a.is_causal.then_some(g.past) };
    let reps = g.qh / g.kvh;
    if g.three_d {
        let (ldq, ldy) = (g.qh * g.hd, g.qh * g.hv);
        let unit = |i: usize| {
            let (b, h) = (i / g.qh, i % g.qh);
            let (k, v) = kv(b, h / reps);
            let q = MatRef { data: &qd[b * g.sq * ldq + h * g.hd..], rs: ldq, cs: 1 };
            Unit { b, h0: h, q, k, v, y: b * g.sq * ldy + h * g.hv }
        };
        attend_units(g.b * g.qh, &unit, (rows, ldy), &sc, y, scratch, threads);
    } else {
        let unit = |bh: usize| {
            let (b, h) = (bh / g.kvh, bh % g.kvh);
            let (k, v) = kv(b, h);
            let q = MatRef { data: &qd[bh * rows * g.hd..], rs: g.hd, cs: 1 };
            Unit { b, h0: h * reps, q, k, v, y: bh * rows * g.hv }
        };
        attend_units(g.b * g.kvh, &unit, (rows, g.hv), &sc, y, scratch, threads);
    }
    Ok(())
}

pub(super) fn run(
    a: &AttentionAttrs,
    window: Option<(i64, i64)>,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let (q, k, v) = (*req(inputs, 0, "Q")?, *req(inputs, 1, "K")?, *req(inputs, 2, "V")?);
    let mask = inputs.get(3).copied().flatten();
    let (past_k, past_v) = (inputs.get(4).copied().flatten(), inputs.get(5).copied().flatten());
    let nonpad = inputs.get(6).copied().flatten();
    let g = geometry(a, q.shape, k.shape, v.shape, past_k.map(|p| p.shape))?;
    if window.is_none() && fast_path(a, q.shape.len(), mask.map(|m| m.dtype), nonpad.is_some(), outputs.len()) {
        return run_grouped(a, &g, inputs, outputs, ctx);
    }
    let (qd, kd, vd) = (q.f32()?, k.f32()?, v.f32()?);
    let total = g.past + g.skv;
    let scale = a.scale.unwrap_or(1.0 / (g.hd as f32).sqrt());
    let s2 = scale.sqrt();
    // Element offsets of Q[b, h, i, 0] and new K/V rows for both layouts.
    let q_at = |b: usize, h: usize, i: usize| {
        if g.three_d {
            (b * g.sq + i) * g.qh * g.hd + h * g.hd
        } else {
            ((b * g.qh + h) * g.sq + i) * g.hd
        }
    };
    let kv_at = |b: usize, h: usize, j: usize, width: usize| {
        if g.three_d {
            (b * g.skv + j) * g.kvh * width + h * width
        } else {
            ((b * g.kvh + h) * g.skv + j) * width
        }
    };
    // Row j of the present K/V (past rows, then the new ones), read in place.
    let (pk, pv) = match (past_k, past_v) {
        (Some(k), Some(v)) => (k.f32()?, v.f32()?),
        _ => (&[][..], &[][..]),
    };
    // Where row j of a present tensor of row width `w` lives: (in the past, offset).
    let locate = |b: usize, h: usize, j: usize, w: usize| {
        if j < g.past {
            (true, ((b * g.kvh + h) * g.past + j) * w)
        } else {
            (false, kv_at(b, h, j - g.past, w))
        }
    };
    let k_row = |b: usize, h: usize, j: usize| -> &[f32] {
        let (past, o) = locate(b, h, j, g.hd);
        &(if past { pk } else { kd })[o..o + g.hd]
    };
    let v_row = |b: usize, h: usize, j: usize| -> &[f32] {
        let (past, o) = locate(b, h, j, g.hv);
        &(if past { pv } else { vd })[o..o + g.hv]
    };
    let mask_info = match mask {
        Some(m) => {
            let mw = *m.shape.last().unwrap_or(&0);
            let st = broadcast_strides(m.shape, &[g.b, g.qh, g.sq, mw]);
            Some((m, mw, st))
        }
        None => None,
    };
    let nonpad_lens = match &nonpad {
        Some(n) => Some(n.to_i64_vec()?),
        None => None,
    };
    let reps = g.qh / g.kvh;
    let mut scores = vec![0.0f32; total];
    let mut raw = vec![0.0f32; total];
    let (head, rest) = outputs.split_at_mut(1);
    let y = head[0].f32()?;
    let mut qk_out: Option<&mut [f32]> = None;
    // present_key / present_value, if asked for: [B, kv_heads, total, width].
    fn fill<'r>(dst: &mut [f32], rows: impl Fn(usize, usize, usize) -> &'r [f32], g: &Geo, width: usize) {
        let total = g.past + g.skv;
        for b in 0..g.b {
            for h in 0..g.kvh {
                for j in 0..total {
                    let at = ((b * g.kvh + h) * total + j) * width;
                    dst[at..at + width].copy_from_slice(rows(b, h, j));
                }
            }
        }
    }
    for (idx, o) in rest.iter_mut().enumerate() {
        match idx {
            0 => fill(o.f32()?, k_row, &g, g.hd),
            1 => fill(o.f32()?, v_row, &g, g.hv),
            _ => qk_out = Some(o.f32()?),
        }
    }
    for b in 0..g.b {
        let np = nonpad_lens.as_ref().map(|l| l.get(b).copied().unwrap_or(total as i64));
        for h in 0..g.qh {
            let kh = h / reps;
            for i in 0..g.sq {
                let qo = q_at(b, h, i);
                let qrow = &qd[qo..qo + g.hd];
                // Whether any key's bias leaves it attendable (decided on the bias, as ONNX
                // does, so a row the masks close entirely gives zeros whatever the logits).
                let mut open = false;
                for j in 0..total {
                    let krow = k_row(b, kh, j);
                    let mut s = 0.0f32;
                    for d in 0..g.hd {
                        s += (qrow[d] * s2) * (krow[d] * s2);
                    }
                    if a.softcap > 0.0 {
                        s = (s / a.softcap).tanh() * a.softcap;
                    }
                    raw[j] = s;
                    let mut bias = 0.0f32;
                    if let Some((m, mw, st)) = &mask_info {
                        if j >= *mw {
                            bias = f32::NEG_INFINITY;
                        } else {
                            let off = b * st[0] as usize + h * st[1] as usize + i * st[2] as usize + j * st[3] as usize;
                            bias = match m.dtype {
                                DType::Bool => {
                                    if m.bytes[off] != 0 {
                                        0.0
                                    } else {
                                        f32::NEG_INFINITY
                                    }
                                }
                                _ => m.f32()?[off],
                            };
                        }
                    }
                    // Causal frontier, bottom-right aligned: after the past, or — with
                    // `nonpad_kv_seqlen` and no past (an external cache) — after the
                    // nonpad_kv_seqlen[b] − S_q keys that precede this query block.
                    let offset = match np {
                        Some(n) if g.past == 0 => n - g.sq as i64,
                        _ => g.past as i64,
                    };
                    if a.is_causal && j as i64 > i as i64 + offset {
                        bias = f32::NEG_INFINITY;
                    }
                    // Sliding window around the query's position, whether causal or not.
                    if let Some((left, right)) = window {
                        let diff = i as i64 + offset - j as i64;
                        if (left >= 0 && diff > left) || (right >= 0 && -diff > right) {
                            bias = f32::NEG_INFINITY;
                        }
                    }
                    if let Some(n) = np {
                        if j as i64 >= n {
                            bias += f32::NEG_INFINITY;
                        }
                    }
                    scores[j] = s + bias;
                    open |= bias != f32::NEG_INFINITY;
                }
                let qk_row = qk_out.as_deref_mut().map(|o| {
                    let at = ((b * g.qh + h) * g.sq + i) * total;
                    &mut o[at..at + total]
                });
                if let Some(r) = qk_row {
                    match a.qk_mode {
                        0 | 1 => r.copy_from_slice(&raw),
                        2 => r.copy_from_slice(&scores),
                        _ => {}
                    }
                }
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for s in scores.iter_mut() {
                    *s = (*s - m).exp();
                    sum += *s;
                }
                for s in scores.iter_mut() {
                    *s = if open { *s / sum } else { 0.0 };
                }
                if a.qk_mode == 3 {
                    if let Some(o) = qk_out.as_deref_mut() {
                        let at = ((b * g.qh + h) * g.sq + i) * total;
                        o[at..at + total].copy_from_slice(&scores);
                    }
                }
                let yo = if g.three_d {
                    (b * g.sq + i) * g.qh * g.hv + h * g.hv
                } else {
                    ((b * g.qh + h) * g.sq + i) * g.hv
                };
                let yrow = &mut y[yo..yo + g.hv];
                yrow.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    for (acc, &vv) in yrow.iter_mut().zip(v_row(b, kh, j)) {
                        *acc += p * vv;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The grouped kernel on a whole node: per batch and K/V head, the (past, new) row pieces read
/// in place; present outputs filled if asked for.
fn run_grouped<'a>(
    a: &AttentionAttrs,
    g: &Geo,
    inputs: &[Option<View<'a>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let (q, k, v) = (inputs[0].expect("Q"), inputs[1].expect("K"), inputs[2].expect("V"));
    let (qd, kd, vd) = (q.f32()?, k.f32()?, v.f32()?);
    let (pk, pv) = match (inputs.get(4).copied().flatten(), inputs.get(5).copied().flatten()) {
        (Some(k), Some(v)) => (k.f32()?, v.f32()?),
        _ => (&[][..], &[][..]),
    };
    let total = g.past + g.skv;
    let (head, rest) = outputs.split_at_mut(1);
    // present = past ‖ new, per batch and head.
    for (o, (past, new, w)) in rest.iter_mut().zip([(pk, kd, g.hd), (pv, vd, g.hv)]) {
        let dst = o.f32()?;
        for bh in 0..g.b * g.kvh {
            let at = bh * total * w;
            dst[at..at + g.past * w].copy_from_slice(&past[bh * g.past * w..(bh + 1) * g.past * w]);
            dst[at + g.past * w..at + total * w].copy_from_slice(&new[bh * g.skv * w..(bh + 1) * g.skv * w]);
        }
    }
    let mask = inputs.get(3).copied().flatten();
    attend_heads(a, g, qd, head[0].f32()?, mask, (&mut *ctx.scratch, ctx.threads), |b, h| {
        let rows = |past: &'a [f32], new: &'a [f32], w: usize| Rows {
            pieces: [
                Piece::of(past, b * g.past, g.past, g.kvh, h, w, false),
                Piece::of(new, b * g.skv, g.skv, g.kvh, h, w, g.three_d),
            ],
            width: w,
        };
        (rows(pk, kd, g.hd), rows(pv, vd, g.hv))
    })
}
