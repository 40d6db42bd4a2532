//! Convolution (1-D and 2-D, NCHW, groups, strides, dilations, pads, auto_pad): depthwise
//! channels by their own stencil kernel, everything else by `im2col` and the f32 GEMM (a 1×1
//! stride-1 convolution reads its input in place), with the bias and any fused activation
//! applied to each output channel as one pass. 1-D is run as 2-D with a unit height.

use super::{req, Ctx, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{AutoPad, ConvAttrs, Epilogue};
use crate::kernels::conv::{self, Post, StaticInput};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};
use crate::weights::TensorEncoding;

/// Resolved 2-D geometry of a convolution.
#[derive(Clone, Copy)]
struct Geo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
    group: usize,
}

fn geometry(a: &ConvAttrs, x: &[usize], wt: &[usize]) -> OpResult<Geo> {
    let sp = x.len().saturating_sub(2);
    // W is [M, C/group, k…], or (Acorn's converter, for the int8 kernels) flattened to
    // [M, K] with K ≥ C/group·Πk zero-padded to a whole number of blocks: then
    // `kernel_shape` gives the window.
    let flat = wt.len() == 2 && x.len() > 2;
    if !(1..=2).contains(&sp) || (wt.len() != x.len() && !flat) {
        op_bail!("Conv supports 1-D and 2-D inputs (N, C, [H,] W); got X {x:?}, W {wt:?}");
    }
    super::check_window_lists("Conv", sp, [&a.kernel_shape, &a.strides, &a.dilations, &a.pads])?;
    let g = a.group as usize;
    let (n, c, m) = (x[0], x[1], wt[0]);
    // The window (no allocation: geometry runs on every call).
    let mut window = [1usize; 2];
    if flat {
        if a.kernel_shape.len() != sp || a.kernel_shape.iter().any(|&k| k < 1) {
            op_bail!("Conv with a flattened W {wt:?} needs kernel_shape for {sp} axes, got {:?}", a.kernel_shape);
        }
        for (w, &k) in window.iter_mut().zip(&a.kernel_shape) {
            *w = k as usize;
        }
    } else {
        window[..sp].copy_from_slice(&wt[2..]);
    }
    let window = &window[..sp];
    let per_out = window.iter().try_fold(c / g.max(1), |a, &k| a.checked_mul(k)).unwrap_or(usize::MAX);
    let fits = if flat { g == 1 && per_out <= wt[1] } else { wt[1] * g == c };
    if g == 0 || c % g != 0 || m % g != 0 || !fits {
        op_bail!("Conv channels do not match: X {x:?}, W {wt:?}, group {g}");
    }
    let ks = window;
    if !a.kernel_shape.is_empty()
        && (a.kernel_shape.len() != ks.len() || a.kernel_shape.iter().zip(ks).any(|(&k, &w)| k != w as i64))
    {
        op_bail!("Conv kernel_shape {:?} disagrees with W {wt:?}", a.kernel_shape);
    }
    let get = |v: &[i64], i: usize, d: i64| -> OpResult<usize> {
        let x = *v.get(i).unwrap_or(&d);
        if x < 0 || (d == 1 && x == 0) {
            op_bail!("Conv attribute value {x} is invalid");
        }
        Ok(x as usize)
    };
    let mut strides = [1usize; 2];
    let mut dil = [1usize; 2];
    let mut pb = [0usize; 2];
    let mut pe = [0usize; 2];
    let mut out = [1usize; 2];
    let mut ins = [1usize; 2];
    let mut kk = [1usize; 2];
    for i in 0..sp {
        let j = 2 - sp + i;
        strides[j] = get(&a.strides, i, 1)?;
        dil[j] = get(&a.dilations, i, 1)?;
        kk[j] = ks[i];
        ins[j] = x[2 + i];
        let eff = super::mul_add(dil[j], kk[j].max(1) - 1, 1)?;
        match a.auto_pad {
            AutoPad::NotSet => {
                pb[j] = get(&a.pads, i, 0)?;
                pe[j] = get(&a.pads, i + sp, 0)?;
            }
            AutoPad::Valid => {}
            AutoPad::SameUpper | AutoPad::SameLower => {
                (pb[j], pe[j]) = super::same_pads(ins[j], strides[j], eff, a.auto_pad == AutoPad::SameUpper)?;
            }
        }
        let padded = super::mul_add(1, ins[j], pb[j]).and_then(|p| super::mul_add(1, p, pe[j]))?;
        if padded < eff {
            op_bail!("Conv kernel (effective size {eff}) larger than padded input {padded}");
        }
        out[j] = (padded - eff) / strides[j] + 1;
    }
    Ok(Geo {
        n,
        c,
        h: ins[0],
        w: ins[1],
        m,
        kh: kk[0],
        kw: kk[1],
        sh: strides[0],
        sw: strides[1],
        dh: dil[0],
        dw: dil[1],
        ph: pb[0],
        pw: pb[1],
        oh: out[0],
        ow: out[1],
        group: g,
    })
}

pub(super) fn infer(a: &ConvAttrs, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    let w = req(inputs, 1, "W")?;
    if x.dtype != DType::F32 || w.dtype != DType::F32 {
        op_bail!("Conv needs f32 tensors");
    }
    let g = geometry(a, x.shape, w.shape)?;
    if let Some(Some(b)) = inputs.get(2) {
        if b.shape != [g.m] {
            op_bail!("Conv bias {:?} should be [{}]", b.shape, g.m);
        }
    }
    let mut s = vec![g.n, g.m];
    if x.shape.len() == 4 {
        s.push(g.oh);
    }
    s.push(g.ow);
    Ok(vec![(DType::F32, s)])
}

/// The blocked GEMM's buffers for one thread (more threads grow it at their first run).
pub(super) fn scratch_len(a: &ConvAttrs, quantized: bool, inputs: &[Option<Fact<'_>>]) -> usize {
    let (Some(Some(x)), Some(Some(w))) = (inputs.first(), inputs.get(1)) else { return 0 };
    let Ok(g) = geometry(a, x.shape, w.shape) else { return 0 };
    let cg = g.c / g.group;
    if g.oh * g.ow == 0 {
        return 0;
    }
    if depthwise(&g, w.shape.len()) {
        return conv::depthwise_scratch(&kernel_geo(&g));
    }
    if batch_folded(&g) {
        // A weight stored q8 pads each pixel's values to its rows' length.
        let kvol = if w.shape.len() == 2 { w.shape[1] } else { cg * g.kh * g.kw };
        return folded_scratch(&g, kvol);
    }
    conv::gemm_scratch(&kernel_geo(&g), cg, g.m / g.group, quantized)
}

/// Largest output image (pixels) whose batch is folded into one product (`batch_folded`).
const FOLD_MAX_PIXELS: usize = 16;

/// Pixels (rows of the folded product) from which a folded convolution on q8 weights runs the
/// int8 product; below, the f32 one on the weights decoded once per session. Measured on AVX-512
/// VNNI: the OpenVINO silero VAD's q8 file per chunk (encoder products of 4, 2, 1, 1 rows) ran
/// 0.037 ms with them int8, 0.029 ms with them f32; over 100 chunks (400, 200, 100, 100 rows)
/// the encoder's four convolutions took 0.90 ms int8, against 0.98 ms in the fp32 file.
const FOLD_INT8_MIN_ROWS: usize = 64;

/// Whether a convolution with small outputs runs as one product over the whole batch (every
/// image's output pixels as the product's rows, the channels as its columns) instead of one
/// product per image with the pixels as columns: silero's encoder convolves 4, 2 and 1 frames
/// per chunk, and products with 1–4 columns wasted most of every tile — one chunk's encoder took
/// 0.041 ms of 0.060 (ONNX Runtime ran the whole model in 0.057), 100 chunks' 3.9 ms of 5.1
/// (ONNX Runtime 3.5).
fn batch_folded(g: &Geo) -> bool {
    g.n >= 1 && g.group == 1 && g.c * g.kh * g.kw > 0 && g.oh * g.ow <= FOLD_MAX_PIXELS && g.oh * g.ow > 0
}

/// The folded product's buffers: every pixel's `kvol` inputs and its `m` outputs.
fn folded_scratch(g: &Geo, kvol: usize) -> usize {
    let rows = g.n * g.oh * g.ow;
    rows * kvol + rows * g.m
}

/// `cols` (`rows × ldc`, the first `kvol` of each row written, the rest 0) = every output
/// pixel's inputs over the whole batch, channel-major then tap (W's order), padding as 0.
fn fold_pixels(g: &Geo, x: &[f32], kvol: usize, ldc: usize, cols: &mut [f32]) {
    let (plane, ospat) = (g.h * g.w, g.oh * g.ow);
    for (r, row) in cols.chunks_exact_mut(ldc).enumerate() {
        let (b, p) = (r / ospat, r % ospat);
        let (oy, ox) = (p / g.ow, p % g.ow);
        let img = &x[b * g.c * plane..(b + 1) * g.c * plane];
        for ci in 0..g.c {
            for ky in 0..g.kh {
                let iy = (oy * g.sh + ky * g.dh) as isize - g.ph as isize;
                for kx in 0..g.kw {
                    let ix = (ox * g.sw + kx * g.dw) as isize - g.pw as isize;
                    let inside = iy >= 0 && (iy as usize) < g.h && ix >= 0 && (ix as usize) < g.w;
                    row[(ci * g.kh + ky) * g.kw + kx] =
                        if inside { img[ci * plane + iy as usize * g.w + ix as usize] } else { 0.0 };
                }
            }
        }
        row[kvol..].fill(0.0);
    }
}

/// The folded product `c` (pixels × channels) into NCHW `out`, with the bias and post.
fn unfold_channels(g: &Geo, c: &[f32], bias: Option<&[f32]>, post: Post<'_>, out: &mut [f32]) {
    let ospat = g.oh * g.ow;
    for (i, o) in out.chunks_exact_mut(ospat).take(g.n * g.m).enumerate() {
        let (b, ch) = (i / g.m, i % g.m);
        for (p, v) in o.iter_mut().enumerate() {
            *v = c[(b * ospat + p) * g.m + ch];
        }
        conv::finish(o, bias.map_or(0.0, |bv| bv[ch]), post.channel(ch));
    }
}

/// [`batch_folded`]'s convolutions on f32 weights (or q8 ones the int8 kernels would not speed
/// up, decoded once per session): pixels × inputs times the weights' transpose (packed once per
/// session), one product for the batch.
fn run_folded(
    g: &Geo,
    x: &[f32],
    w: WindowWeights<'_>,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    use crate::kernels::{self, MatRef};
    let (rows, kvol) = (g.n * g.oh * g.ow, g.c * g.kh * g.kw);
    w.check(kvol, g.m)?;
    let need = folded_scratch(g, kvol);
    if ctx.scratch.len() < need {
        ctx.scratch.resize(need, 0.0);
    }
    let (cols, c) = ctx.scratch[..need].split_at_mut(rows * kvol);
    fold_pixels(g, x, kvol, kvol, cols);
    let threads = ctx.threads;
    let mut local = None;
    let b = w.transposed(kvol, g.m, ctx.prepared.as_deref_mut(), &mut local);
    kernels::sgemm(rows, g.m, kvol, MatRef { data: cols, rs: kvol, cs: 1 }, b, c, g.m, false, threads);
    unfold_channels(g, c, bias, post, out);
    Ok(())
}

/// Largest channel multiplier (outputs per group of one input channel) run as depthwise
/// stencils; above it the GEMM computes every output of a pixel from one layout of the input.
const DEPTHWISE_MAX_MULTIPLIER: usize = 4;

/// Whether a convolution runs as depthwise stencils: one input channel per group, few outputs
/// each, and W not flattened (`w_rank > 2`).
fn depthwise(g: &Geo, w_rank: usize) -> bool {
    g.c / g.group == 1 && g.m / g.group <= DEPTHWISE_MAX_MULTIPLIER && w_rank > 2
}

/// The kernels' view of one group's 2-D geometry.
fn kernel_geo(g: &Geo) -> conv::Geo {
    conv::Geo {
        h: g.h,
        w: g.w,
        kh: g.kh,
        kw: g.kw,
        sh: g.sh,
        sw: g.sw,
        dh: g.dh,
        dw: g.dw,
        ph: g.ph,
        pw: g.pw,
        oh: g.oh,
        ow: g.ow,
    }
}

thread_local! {
    /// A static input's quantized-and-dequantized values, for the f32 kernels (grown once per
    /// thread).
    static DEQUANTIZED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on `x` as a statically quantized model reads it — `(clamp(round(x / scale) + zero,
/// −128, 127) − zero) · scale` — or on `x` itself without `input`.
fn with_input<R>(x: &[f32], input: Option<StaticInput>, f: impl FnOnce(&[f32]) -> R) -> R {
    let Some(s) = input else { return f(x) };
    // Taken out of the cell for the call (a nested convolution on this thread grows its own).
    let mut buf = DEQUANTIZED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    buf.resize(x.len(), 0.0);
    crate::kernels::math::quantize_dequantize(x, s.scale, s.zero as f32, -128.0, 127.0, &mut buf);
    let r = f(&buf);
    DEQUANTIZED.with(|c| *c.borrow_mut() = buf);
    r
}

pub(super) fn run(
    a: &ConvAttrs,
    post: Post<'_>,
    input: Option<StaticInput>,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let w = *req(inputs, 1, "W")?;
    let g = geometry(a, x.shape, w.shape)?;
    let xd = x.f32()?;
    let bias = match inputs.get(2) {
        Some(Some(b)) => Some(b.f32()?),
        _ => None,
    };
    let input = input
        .map(|s| s.check().map_err(|e| crate::error::OpError::Failed(format!("ConvStaticQ8: {}", e.0))))
        .transpose()?;
    let out = outputs[0].f32()?;
    if w.encoding != TensorEncoding::Dense {
        return run_q8(&g, &w, xd, input, bias, post, out, ctx);
    }
    run_f32(&g, &w, xd, input, bias, post, out, ctx)
}

/// Where a static convolution sits among others on the same grid, as the planner found it
/// (never stored): its input already on its grid, written so by its producer (`on_grid`: the
/// f32 kernels read it as it is), or its output snapped to the grid every reader quantizes it
/// to (`snap`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Chain {
    pub on_grid: bool,
    pub snap: Option<StaticInput>,
}

/// `ConvStaticQ8`: the convolution on the model's codes of its input, then, with `out`, per
/// output channel `post(mul[c] · dq(q(v)) + add[c])` — applied by the kernels with their
/// epilogue, as is `chain`'s snap.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_static(
    a: &ConvAttrs,
    post: Epilogue,
    input: StaticInput,
    out: Option<&crate::graph::OutRequant>,
    chain: Chain,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let requant = match out {
        None => None,
        Some(r) => {
            let (lo, hi) = (r.lo, r.hi);
            if !(r.scale.is_finite()
                && r.scale > 0.0
                && -128 <= lo
                && lo <= r.zero_point
                && r.zero_point <= hi
                && hi <= 255)
            {
                op_bail!(
                    "ConvStaticQ8: output scale {} and zero point {} in [{lo}, {hi}] are not an 8-bit quantization",
                    r.scale,
                    r.zero_point
                );
            }
            // The output [N, M, spatial…].
            let m = outputs.first().and_then(|o| o.shape.get(1).copied()).unwrap_or(1);
            for (v, what) in [(&r.mul, "scale"), (&r.add, "shift")] {
                if v.len() > 1 && v.len() != m {
                    op_bail!("ConvStaticQ8: {} output {what} values for {m} channels", v.len());
                }
            }
            let q = (r.scale, r.zero_point as f32, lo as f32, hi as f32);
            Some(conv::Requant { q, mul: &r.mul, add: &r.add, table: &[] })
        }
    };
    let fail = |e: crate::kernels::quant::QuantError| crate::error::OpError::Failed(format!("ConvStaticQ8: {}", e.0));
    let snap = match chain.snap {
        Some(s) => Some(s.check().map_err(fail)?),
        None => None,
    };
    let snap = snap.map(|s| crate::kernels::math::Grid::new(s.scale, s.zero as f32, -128.0, 127.0));
    // An input its producer put on this grid: the f32 kernels read it as it is (the int8 ones
    // still take its codes).
    let dense = matches!(inputs.get(1), Some(Some(w)) if w.encoding == TensorEncoding::Dense);
    let input = if chain.on_grid && dense { None } else { Some(input) };
    let post = Post { requant, ep: post, snap };
    let shape = outputs.first().map_or(&[][..], |o| o.shape);
    let m = shape.get(1).copied().unwrap_or(1).max(1);
    let per_channel = shape.iter().product::<usize>() / m;
    if !conv::tables_pay(&post, per_channel) {
        return run(a, post, input, inputs, outputs, ctx);
    }
    // The tables depend on the op's constants and the plan's snap only: made once per session
    // (`Prepared`, by the output requantization's address and the snap grid), taken out of it
    // for the call.
    let key = (out.map_or(0, |r| r as *const _ as usize), chain.snap.map(|s| (s.scale.to_bits(), s.zero)));
    let kept = ctx.prepared.as_deref_mut().and_then(|p| p.requant_tables.remove(&key));
    let tables = kept.unwrap_or_else(|| {
        let mut t = vec![0.0; m * conv::CODES];
        if !conv::requant_tables(post, m, &mut t) {
            t.clear();
        }
        t
    });
    let r = if tables.len() == m * conv::CODES {
        let requant = requant.map(|r| conv::Requant { table: &tables, ..r });
        run(a, Post { requant, ..post }, input, inputs, outputs, ctx)
    } else {
        run(a, post, input, inputs, outputs, ctx)
    };
    if let Some(p) = ctx.prepared.as_deref_mut() {
        p.requant_tables.insert(key, tables);
    }
    r
}

/// A convolution on f32 weights; on a static `input`, its values quantized and dequantized
/// (by the depthwise and GEMM kernels as they lay the input out).
#[allow(clippy::too_many_arguments)]
fn run_f32(
    g: &Geo,
    w: &View<'_>,
    xd: &[f32],
    input: Option<StaticInput>,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let g = *g;
    let wd = w.f32()?;
    // Row stride of W: the window's values, or the padded width of a flattened W.
    let ldw = if w.shape.len() == 2 { w.shape[1] } else { g.c / g.group * g.kh * g.kw };
    let cg = g.c / g.group;
    let mg = g.m / g.group;
    let kvol = cg * g.kh * g.kw;
    let ospat = g.oh * g.ow;
    let plane = g.h * g.w;
    let kg = kernel_geo(&g);
    if depthwise(&g, w.shape.len()) {
        // Depthwise (one input channel per group, few outputs each): each output channel is
        // its own small stencil, no GEMM; channels split across threads. (A flattened W — one
        // input channel, rows padded — runs as the GEMM below, as does one input channel
        // feeding many outputs: silero's STFT, 1 → 258 channels, ran 9× slower as 258
        // stencils, each re-padding the input.)
        conv::depthwise(&kg, g.m, mg, xd, input, wd, bias, post, out, ctx.threads, ctx.scratch);
        return Ok(());
    }
    if windows_in_place(&g) {
        return with_input(xd, input, |xd| {
            for b in 0..g.n {
                let xin = &xd[b * plane..(b + 1) * plane];
                let o = &mut out[b * g.m * ospat..(b + 1) * g.m * ospat];
                run_windows(&g, xin, WindowWeights::F32 { data: wd, ldw }, bias, post, o, ctx)?;
            }
            Ok(())
        });
    }
    if batch_folded(&g) {
        return with_input(xd, input, |xd| {
            run_folded(&g, xd, WindowWeights::F32 { data: wd, ldw }, bias, post, out, ctx)
        });
    }
    // Winograd's sums round differently from the direct ones, and a static model's rounding of a
    // convolution's output turns such differences into whole codes: its convolutions (a
    // requantization or a snap in the epilogue) keep the direct sums.
    if g.group == 1
        && input.is_none()
        && post.requant.is_none()
        && post.snap.is_none()
        && crate::kernels::winograd::applies(g.kh, g.kw, (g.sh, g.sw), (g.dh, g.dw), g.c, g.m, ospat)
    {
        // The weights transformed once per session (`Prepared`).
        let build = || crate::kernels::winograd::weights(wd, ldw, g.m, g.c);
        let mut local = None;
        let u = match ctx.prepared.as_deref_mut() {
            Some(p) => &p.winograd.entry((wd.as_ptr() as usize, g.m)).or_insert_with(build)[..],
            None => &local.insert(build())[..],
        };
        for b in 0..g.n {
            let xin = &xd[b * g.c * plane..(b + 1) * g.c * plane];
            let o = &mut out[b * g.m * ospat..(b + 1) * g.m * ospat];
            crate::kernels::winograd::conv3x3(&kg, g.c, g.m, xin, u, bias, post, o, ctx.threads);
        }
        return Ok(());
    }
    for b in 0..g.n {
        for gi in 0..g.group {
            let xin = &xd[(b * g.c + gi * cg) * plane..(b * g.c + (gi + 1) * cg) * plane];
            let o = &mut out[(b * g.m + gi * mg) * ospat..(b * g.m + (gi + 1) * mg) * ospat];
            let wg = &wd[gi * mg * ldw..][..(mg - 1) * ldw + kvol];
            let bg = bias.map(|bv| &bv[gi * mg..(gi + 1) * mg]);
            let pg = post.from_channel(gi * mg);
            conv::conv_gemm(&kg, cg, mg, xin, input, wg, ldw, bg, pg, o, ctx.threads, ctx.scratch);
        }
    }
    Ok(())
}

/// Whether a convolution is one input channel read by few windows along one row with no
/// padding or dilation (silero's STFT front end: 1 → 258 channels, 256 taps at stride 128, 4
/// frames), run by [`run_windows`]. As channels × pixels its product had 4 columns: a tile
/// of 32 wasted 28, and the thin-product path's dot products ran at 5 GMAC/s. Weights stored
/// q8 run it too, decoded once per session: one input channel gives the int8 kernels nothing to
/// sum over but the taps, and their per-image products had the same 4 columns (silero's
/// sequence model after `quantize_dynamic`, 100 chunks: this convolution took 2.49 ms in int8
/// on AVX-512 VNNI, 0.52 ms as f32 windows).
fn windows_in_place(g: &Geo) -> bool {
    let one_row = g.h == 1 && g.kh == 1 && g.oh == 1;
    let inside = (g.ow.max(1) - 1) * g.sw + g.kw <= g.w;
    g.group == 1 && g.c == 1 && one_row && g.pw == 0 && g.dw == 1 && inside && g.ow < 32 && g.m >= 32
}

/// The weights [`run_windows`] reads: f32 rows `ldw` apart (the window's `kw` values first), or
/// q8 rows (decoded once per session).
#[derive(Clone, Copy)]
enum WindowWeights<'a> {
    F32 { data: &'a [f32], ldw: usize },
    Q8(crate::weights::Q8Weights<'a>),
}

impl WindowWeights<'_> {
    /// The `n × k` matrix's transpose (`k × n`) in GEMM panels of `nr`.
    fn panels(&self, k: usize, n: usize, nr: usize) -> Vec<f32> {
        use crate::kernels::{self, BMat, MatRef};
        let mut v = Vec::new();
        match *self {
            WindowWeights::F32 { data, ldw } => {
                kernels::pack_panels_append(&mut v, BMat::Strided(MatRef { data, rs: 1, cs: ldw }), k, n, nr)
            }
            WindowWeights::Q8(_) => {
                let rows = self.rows(k, n);
                kernels::pack_panels_append(&mut v, BMat::Strided(MatRef { data: &rows, rs: 1, cs: k }), k, n, nr)
            }
        }
        v
    }

    /// An error unless the weights hold `n` rows of at least `k` values.
    fn check(&self, k: usize, n: usize) -> OpResult<()> {
        let holds = match *self {
            WindowWeights::F32 { data, ldw } => ldw >= k && data.len() >= (n.max(1) - 1) * ldw + k,
            WindowWeights::Q8(q) => q.k >= k && q.n >= n,
        };
        if !holds {
            op_bail!("Conv: weights do not hold {n} rows of {k} values");
        }
        Ok(())
    }

    /// The first `k` values of each of the first `n` q8 rows, decoded (`n × k`).
    fn rows(&self, k: usize, n: usize) -> Vec<f32> {
        let WindowWeights::Q8(w) = *self else { return Vec::new() };
        let full = crate::weights::Weights::Q8(w).decode();
        full.chunks_exact(w.k.max(1)).take(n).flat_map(|r| r[..k].iter().copied()).collect()
    }

    /// The weights' transpose (`k × n`) as a product's B operand: packed once per session for
    /// the selected tile (`prepared`); without a session (a single evaluation) or a tile (the
    /// reference set), read as rows (q8 decoded first, into `local`).
    fn transposed<'b>(
        &self,
        k: usize,
        n: usize,
        prepared: Option<&'b mut super::Prepared>,
        local: &'b mut Option<Vec<f32>>,
    ) -> crate::kernels::BMat<'b>
    where
        Self: 'b,
    {
        use crate::kernels::{self, BMat, MatRef, Panels};
        match (kernels::selected().f32_panel(), prepared) {
            (Some(nr), Some(p)) => {
                let data = &p.f32_panels.entry((self.key(), k, n)).or_insert_with(|| self.panels(k, n, nr))[..];
                BMat::Panels(Panels { data, k, n, nr })
            }
            _ => match *self {
                WindowWeights::F32 { data, ldw } => BMat::Strided(MatRef { data, rs: 1, cs: ldw }),
                WindowWeights::Q8(_) => BMat::Strided(MatRef { data: local.insert(self.rows(k, n)), rs: 1, cs: k }),
            },
        }
    }

    fn key(&self) -> usize {
        match self {
            WindowWeights::F32 { data, .. } => data.as_ptr() as usize,
            WindowWeights::Q8(w) => w.q.as_ptr() as usize,
        }
    }
}

thread_local! {
    /// [`run_windows`]' product, pixels × channels, grown once per thread.
    static WINDOWS_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`windows_in_place`]'s convolutions as the transposed product: each output pixel's window is
/// a contiguous run of the input, so pixels × taps is the input itself at row stride `sw`,
/// times the weights' transpose (`kw × m`, packed into the GEMM's panels once per session,
/// `Prepared`) — a product with `m` columns — then its pixels × channels transposed into the
/// NCHW output with the bias and epilogue.
fn run_windows(
    g: &Geo,
    x: &[f32],
    w: WindowWeights<'_>,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    use crate::kernels::{self, MatRef};
    let (m, k, n) = (g.ow, g.kw, g.m);
    w.check(k, n)?;
    let a = MatRef { data: x, rs: g.sw, cs: 1 };
    let threads = ctx.threads;
    let mut local = None;
    let b = w.transposed(k, n, ctx.prepared.as_deref_mut(), &mut local);
    WINDOWS_OUT.with(|cell| {
        let c = &mut *cell.borrow_mut();
        c.resize(m * n, 0.0);
        kernels::sgemm(m, n, k, a, b, c, n, false, threads);
        for (ch, row) in out.chunks_exact_mut(m).take(n).enumerate() {
            for (j, o) in row.iter_mut().enumerate() {
                *o = c[j * n + ch];
            }
            conv::finish(row, bias.map_or(0.0, |b| b[ch]), post.channel(ch));
        }
    });
    Ok(())
}

/// Output channels and weights (`m`, `m·k`) from which a q8 convolution runs the int8 kernels,
/// by how those kernels read the input. With AVX-512 VNNI the int8 tile reads the interleaved
/// input where it lies (`conv::conv_q8`, no `im2col`): from 16 channels and 512 weights. Single
/// convolutions from PP-OCRv4's detector, f32 against int8 alternating (Zen 4, 2026-12-03):
/// 16→32 pointwise over 192×384 1.22×, 12→96 1.26×, 48→48 1.55×, 32→48 1.47×, 48→96 1.59×,
/// the 3→16 stem 1.04–1.24×, but 48→12 (12 channels) 1.0×. Whole models: the detector 1.58 →
/// 1.61–1.67× over fp32, the recogniser 1.96 → 2.0×, the angle classifier unchanged at 1 and 2
/// threads (all its convolutions now int8; in an earlier session it ran 1.06× slower than f32 at
/// 2 threads, before the quantizers were vectorised). The other int8 kernels build pixel panels
/// first, which costs about what the int8 products save on small convolutions: from 16 channels
/// (the OCR detector's 24-channel 3×3 convolutions still gain: 1.22× over f32 for the whole
/// model with them in int8, 1.07× without) and 16 384 weights (the angle classifier's
/// convolutions, 6 400 weights and ≤ 1 M multiply-adds each, ran 0.93× of f32 in int8).
fn q8_conv_min(isa: crate::kernels::Isa) -> (usize, usize) {
    match isa {
        crate::kernels::Isa::Avx512Vnni => (16, 512),
        _ => (16, 1 << 14),
    }
}

/// Whether a q8 convolution of `m` output channels and `k` weights each runs the f32 kernels
/// on `isa` (its weights decoded once at open): on NEON without dotprod and the portable sets,
/// where an int8 multiply-add takes as many instructions as an f32 one and quantizing the input
/// and building the pixel panels is extra; elsewhere convolutions smaller than
/// [`q8_conv_min`]. AVX2 and AVX-512 without VNNI have no int8 dot product either, but their
/// in-place pair tile (`conv::ConvTile`: `vpmaddwd`, 16 exact multiply-adds per instruction
/// where AVX2's FMA does 8, on half the f32 input's bytes) pays: measured with `pair-bench`
/// against the fp32 files (`docs/BENCHMARKS.md`, 2026-12-06, tenth session), PP-OCRv4's
/// recogniser after `--quantize q8` went from 1.02× / 1.03× of fp32 (weights decoded) to
/// 0.85× / 0.84× on AVX2, its detector from 1.01× / 0.99× to 0.88× / 0.91×, and the statically
/// quantized detector from 1.14× / 1.13× to 0.95× / 0.99×.
pub(crate) fn q8_conv_runs_f32(isa: crate::kernels::Isa, m: usize, k: usize) -> bool {
    use crate::kernels::Isa;
    let int8 = int8_dot(isa) || matches!(isa, Isa::Avx512 | Isa::Avx2);
    let (min_m, min_weights) = q8_conv_min(isa);
    !int8 || m < min_m || m * k < min_weights
}

/// Whether `isa` has an int8 dot-product instruction (VNNI, AVX-VNNI, dotprod, i8mm).
fn int8_dot(isa: crate::kernels::Isa) -> bool {
    use crate::kernels::Isa;
    matches!(isa, Isa::Avx512Vnni | Isa::AvxVnni | Isa::NeonDot | Isa::NeonI8mm)
}

/// A convolution whose weights are stored q8 by rows (flattened to `[M, K]`, written by
/// `acorn convert --quantize q8`): the int8 kernels, one group; on a static `input`, on the
/// model's own codes (the paths that run in f32 read its values quantized and dequantized).
#[allow(clippy::too_many_arguments)]
fn run_q8(
    g: &Geo,
    w: &View<'_>,
    xd: &[f32],
    input: Option<StaticInput>,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    use crate::kernels::quant::QActs;
    use crate::weights::{Weights, QK};
    let Ok(Weights::Q8(q8)) = super::qweights::qmat(w) else {
        op_bail!("Conv cannot read a weight stored as {} (q8 by rows only)", w.encoding);
    };
    if g.group != 1 || q8.n != g.m || w.shape.len() != 2 {
        op_bail!("Conv: q8 weights {:?} need one group and one row per output channel", w.shape);
    }
    let kg = kernel_geo(g);
    let (plane, ospat) = (g.h * g.w, g.oh * g.ow);
    if windows_in_place(g) {
        return with_input(xd, input, |xd| {
            for b in 0..g.n {
                let xin = &xd[b * plane..(b + 1) * plane];
                let o = &mut out[b * g.m * ospat..(b + 1) * g.m * ospat];
                run_windows(g, xin, WindowWeights::Q8(q8), bias, post, o, ctx)?;
            }
            Ok(())
        });
    }
    if batch_folded(g) {
        // Few rows: the int8 product's quantizing and row kernels cost more than they save;
        // without a dot product (AVX2, AVX-512 without VNNI: the pair tile reads pixels, not
        // folded rows) they save nothing.
        if g.n * ospat < FOLD_INT8_MIN_ROWS || !int8_dot(crate::kernels::selected()) {
            return with_input(xd, input, |xd| run_folded(g, xd, WindowWeights::Q8(q8), bias, post, out, ctx));
        }
        return run_folded_q8(g, q8, xd, input, bias, post, out, ctx);
    }
    // (Weights the int8 kernels would not speed up were decoded to f32 at open:
    // `q8_conv_runs_f32`, `exec::layout::decode_conv_weights`.)
    let isa = crate::kernels::selected();
    #[cfg(target_arch = "x86_64")]
    if let Some(tile) = conv::ConvTile::for_isa(isa).filter(|t| t.holds_depth(g.c * kg.kh * kg.kw)) {
        // The rows regrouped for the in-place tile once per session (`Prepared`).
        let taps = kg.kh * kg.kw;
        if g.c * taps > q8.k || !q8.k.is_multiple_of(QK) {
            op_bail!("Conv: q8 weights of {} per output do not hold {} channels × {taps} taps", q8.k, g.c);
        }
        let build = || conv::ConvRows::new(tile, q8.q, q8.scales, q8.n, q8.k, g.c, taps);
        let threads = ctx.threads;
        let mut local = None;
        let rows = match ctx.prepared.as_deref_mut() {
            Some(p) => p.conv_rows.entry((q8.q.as_ptr() as usize, g.c, taps)).or_insert_with(build),
            None => local.insert(build()),
        };
        for b in 0..g.n {
            let xin = &xd[b * g.c * plane..][..g.c * plane];
            let o = &mut out[b * g.m * ospat..][..g.m * ospat];
            conv::conv_q8_rows(&kg, g.c, rows, xin, input, bias, post, o, threads);
        }
        return Ok(());
    }
    // The weights as the GEMM's row operand: codes, each block's scale and sum (in this
    // thread's buffers: no allocation per run once they have grown).
    let nb = q8.k / QK;
    Q8_ROWS.with(|cell| {
        let rows: &mut QActs = &mut cell.borrow_mut();
        (rows.m, rows.k) = (q8.n, q8.k);
        rows.q.clear();
        rows.q.extend_from_slice(&q8.q[..q8.n * q8.k]);
        rows.scales.clear();
        rows.scales.extend((0..q8.n * nb).map(|i| q8.scales[i / nb]));
        rows.sums.clear();
        rows.sums.extend(rows.q.chunks_exact(QK).map(|b| b.iter().map(|&v| v as i32).sum::<i32>()));
        rows.q4x.clear();
        for b in 0..g.n {
            let xin = &xd[b * g.c * plane..][..g.c * plane];
            let o = &mut out[b * g.m * ospat..][..g.m * ospat];
            conv::conv_q8(isa, &kg, g.c, rows, xin, input, bias, post, o, ctx.threads)
                .map_err(|e| crate::error::OpError::Failed(e.0))?;
        }
        Ok(())
    })
}

/// [`batch_folded`]'s convolutions on q8 weights: every pixel's inputs of the batch (padded to
/// the rows' length) quantized as the int8 product's activation rows, one product for the batch;
/// on a static `input`, at the model's scale and zero point (the padding is the code of 0, the
/// zero point's share `−scale · zero · Σw` goes into each output channel's bias).
#[allow(clippy::too_many_arguments)]
fn run_folded_q8(
    g: &Geo,
    q8: crate::weights::Q8Weights<'_>,
    x: &[f32],
    input: Option<StaticInput>,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let (rows, kvol, kp) = (g.n * g.oh * g.ow, g.c * g.kh * g.kw, q8.k);
    if kvol > kp {
        op_bail!("Conv: q8 weights of {kp} per output do not hold {kvol} inputs");
    }
    let need = folded_scratch(g, kp);
    if ctx.scratch.len() < need {
        ctx.scratch.resize(need, 0.0);
    }
    let (cols, c) = ctx.scratch[..need].split_at_mut(rows * kp);
    fold_pixels(g, x, kvol, kp, cols);
    let isa = crate::kernels::selected();
    FOLDED_ACTS.with(|cell| {
        let qa = &mut *cell.borrow_mut();
        let fail = |e: crate::kernels::quant::QuantError| crate::error::OpError::Failed(e.0);
        match input {
            Some(s) => crate::kernels::quant::quantize_acts_static(cols, rows, kp, s.scale, s.zero, qa),
            None => crate::kernels::quant::quantize_acts_q8(cols, rows, kp, qa, ctx.threads),
        }
        .map_err(fail)?;
        crate::kernels::quant::gemm_q8(isa, qa, &q8, c, ctx.threads).map_err(fail)
    })?;
    // The zero point's share of each output channel, from the q8 rows (codes past the window 0).
    let shifted = input.and_then(|s| {
        s.shifted_bias(bias, q8.n, |r| {
            q8.scales[r] as f64 * q8.q[r * q8.k..(r + 1) * q8.k].iter().map(|&v| v as i64).sum::<i64>() as f64
        })
    });
    unfold_channels(g, c, shifted.as_deref().or(bias), post, out);
    Ok(())
}

thread_local! {
    /// [`run_folded_q8`]'s activation rows, grown once per thread.
    static FOLDED_ACTS: std::cell::RefCell<crate::kernels::quant::QActs> =
        std::cell::RefCell::new(crate::kernels::quant::QActs::default());
}

thread_local! {
    /// [`run_q8`]'s weights as the int8 GEMM's row operand, grown once per thread.
    static Q8_ROWS: std::cell::RefCell<crate::kernels::quant::QActs> =
        std::cell::RefCell::new(crate::kernels::quant::QActs::default());
}
