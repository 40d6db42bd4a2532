//! Signal family: `DFT`, `STFT` (through the batched FFT of `kernels::fft`), the window
//! generators (`HannWindow`, `HammingWindow`, `BlackmanWindow`) and `MelWeightMatrix` — what an
//! audio front-end inside a model (a log-mel spectrogram before a speech encoder) is made of.
//! Complex values are ONNX's: a trailing dimension of 2 (real, imaginary); a trailing 1 is a
//! real signal.

use super::elementwise::{read, write, Num};
use super::{norm_axis, numel, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{Op, WindowKind};
use crate::kernels::fft::Fft;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// The FFT plan for `n` points, made once per process: a plan's twiddles cost O(n) sines and
/// cosines in f64 — as much as transforming a frame or two — and a streaming front-end runs the
/// same length on every call. At most 32 lengths are kept.
fn plan(n: usize) -> std::sync::Arc<Fft> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static PLANS: OnceLock<Mutex<HashMap<usize, Arc<Fft>>>> = OnceLock::new();
    let mut plans = PLANS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if plans.len() >= 32 && !plans.contains_key(&n) {
        plans.clear();
    }
    plans.entry(n).or_insert_with(|| Arc::new(Fft::new(n))).clone()
}

/// Longest transform or window the ops plan (2²⁶ points: far past any audio frame).
const MAX_POINTS: i64 = 1 << 26;

fn int_scalar(v: &[i64], what: &str) -> OpResult<i64> {
    match v {
        [x] => Ok(*x),
        _ => op_bail!("{what} must be a scalar, got {} values", v.len()),
    }
}

fn known_int(inputs: &[Option<Fact<'_>>], i: usize, what: &str) -> OpResult<Option<i64>> {
    match inputs.get(i).copied().flatten() {
        Some(f) => Ok(Some(int_scalar(&f.known_ints(what)?, what)?)),
        None => Ok(None),
    }
}

fn value_int(inputs: &[Option<View<'_>>], i: usize, what: &str) -> OpResult<Option<i64>> {
    match inputs.get(i).copied().flatten() {
        Some(v) => Ok(Some(int_scalar(&v.to_i64_vec()?, what)?)),
        None => Ok(None),
    }
}

fn points(n: i64, what: &str) -> OpResult<usize> {
    if !(1..=MAX_POINTS).contains(&n) {
        op_bail!("{what} = {n} is out of range (1..={MAX_POINTS})");
    }
    Ok(n as usize)
}

/// The DFT's geometry: the transformed axis, the transform length, the output length on the
/// axis and the output's last dimension.
struct DftGeo {
    axis: usize,
    n: usize,
    out_len: usize,
    out_c: usize,
}

fn dft_geometry(op: &Op, shape: &[usize], dtype: DType, length: Option<i64>, axis_in: Option<i64>) -> OpResult<DftGeo> {
    let Op::Dft { inverse, onesided, axis } = op else { op_bail!("not DFT") };
    if dtype != DType::F32 {
        op_bail!("DFT needs a float input, got {dtype}");
    }
    let rank = shape.len();
    let c = *shape.last().unwrap_or(&0);
    if rank < 2 || !(c == 1 || c == 2) {
        op_bail!("DFT input {shape:?} needs rank ≥ 2 and a last dimension of 1 (real) or 2 (complex)");
    }
    let a = axis.or(axis_in).unwrap_or(-2);
    let ax = norm_axis(a, rank)?;
    if ax == rank - 1 {
        op_bail!("DFT axis {a} is the complex dimension of {shape:?}");
    }
    let len = shape[ax];
    let n = match length {
        Some(l) => points(l, "dft_length")?,
        None if *inverse && *onesided => points(2 * (len as i64 - 1), "the full length of a one-sided spectrum")?,
        None => points(len as i64, "the signal length")?,
    };
    let (out_len, out_c) = match (*inverse, *onesided) {
        (true, true) => (n, 1),
        (false, true) => (n / 2 + 1, 2),
        _ => (n, 2),
    };
    Ok(DftGeo { axis: ax, n, out_len, out_c })
}

/// STFT geometry: (batch, signal length, channels, frame step, frame length, frames, bins).
fn stft_geometry(
    onesided: bool,
    shape: &[usize],
    step: i64,
    window_len: Option<usize>,
    length: Option<i64>,
) -> OpResult<(usize, usize, usize, usize, usize, usize, usize)> {
    let &[b, t, c] = shape else { op_bail!("STFT signal must be [batch, length, 1 or 2], got {shape:?}") };
    if !(c == 1 || c == 2) {
        op_bail!("STFT signal {shape:?}: the last dimension must be 1 (real) or 2 (complex)");
    }
    let step = points(step, "frame_step")?;
    let f = match (length, window_len) {
        (Some(l), Some(w)) if l != w as i64 => op_bail!("STFT frame_length {l} differs from the window's {w}"),
        (Some(l), _) => points(l, "frame_length")?,
        (None, Some(w)) => w,
        (None, None) => t,
    };
    if f > t {
        op_bail!("STFT frame_length {f} is longer than the signal ({t})");
    }
    let frames = 1 + (t - f) / step;
    let bins = if onesided { f / 2 + 1 } else { f };
    Ok((b, t, c, step, f, frames, bins))
}

fn window_len(inputs: &[Option<Fact<'_>>]) -> OpResult<Option<usize>> {
    match inputs.get(2).copied().flatten() {
        Some(w) if w.shape.len() == 1 && w.dtype == DType::F32 => Ok(Some(w.shape[0])),
        Some(w) => op_bail!("STFT window must be a 1-D float tensor, got {} {:?}", w.dtype, w.shape),
        None => Ok(None),
    }
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    match op {
        Op::Dft { axis, .. } => {
            let x = req(inputs, 0, "input")?;
            let length = known_int(inputs, 1, "dft_length")?;
            let axis_in = if axis.is_none() { known_int(inputs, 2, "axis")? } else { None };
            let g = dft_geometry(op, x.shape, x.dtype, length, axis_in)?;
            let mut s = x.shape.to_vec();
            s[g.axis] = g.out_len;
            *s.last_mut().expect("rank ≥ 2") = g.out_c;
            Ok(vec![(DType::F32, s)])
        }
        Op::Stft { onesided } => {
            let x = req(inputs, 0, "signal")?;
            if x.dtype != DType::F32 {
                op_bail!("STFT needs a float signal, got {}", x.dtype);
            }
            let step = int_scalar(&req(inputs, 1, "frame_step")?.known_ints("frame_step")?, "frame_step")?;
            let (b, _, _, _, _, frames, bins) =
                stft_geometry(*onesided, x.shape, step, window_len(inputs)?, known_int(inputs, 3, "frame_length")?)?;
            Ok(vec![(DType::F32, vec![b, frames, bins, 2])])
        }
        Op::Window { dtype, .. } => {
            let n = int_scalar(&req(inputs, 0, "size")?.known_ints("size")?, "size")?;
            if !(0..=MAX_POINTS).contains(&n) {
                op_bail!("window size {n} is out of range (0..={MAX_POINTS})");
            }
            numeric(*dtype)?;
            Ok(vec![(*dtype, vec![n as usize])])
        }
        Op::MelWeightMatrix { dtype } => {
            let bins = int_scalar(&req(inputs, 0, "num_mel_bins")?.known_ints("num_mel_bins")?, "num_mel_bins")?;
            let dft = int_scalar(&req(inputs, 1, "dft_length")?.known_ints("dft_length")?, "dft_length")?;
            if !(1..=1 << 16).contains(&bins) {
                op_bail!("num_mel_bins = {bins} is out of range (1..=65536)");
            }
            points(dft, "dft_length")?;
            numeric(*dtype)?;
            Ok(vec![(*dtype, vec![dft as usize / 2 + 1, bins as usize])])
        }
        _ => op_bail!("not a signal op"),
    }
}

fn numeric(d: DType) -> OpResult<()> {
    if matches!(d, DType::Bool) {
        op_bail!("a generated window or matrix of type {d}");
    }
    Ok(())
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    match op {
        Op::Dft { inverse, onesided, axis } => {
            let x = req(inputs, 0, "input")?;
            let length = value_int(inputs, 1, "dft_length")?;
            let axis_in = if axis.is_none() { value_int(inputs, 2, "axis")? } else { None };
            let g = dft_geometry(op, x.shape, x.dtype, length, axis_in)?;
            dft(*x, &g, *inverse, *onesided, outputs[0].f32()?)
        }
        Op::Stft { onesided } => {
            let x = req(inputs, 0, "signal")?;
            let step = int_scalar(&req(inputs, 1, "frame_step")?.to_i64_vec()?, "frame_step")?;
            let window = inputs.get(2).copied().flatten();
            let wlen = window.map(|w| w.shape.first().copied().unwrap_or(0));
            let geo = stft_geometry(*onesided, x.shape, step, wlen, value_int(inputs, 3, "frame_length")?)?;
            stft(x.f32()?, window.map(|w| w.f32()).transpose()?, geo, outputs[0].f32()?);
            Ok(())
        }
        Op::Window { kind, periodic, .. } => {
            let out = &mut outputs[0];
            let n = out.shape[0];
            let den = if *periodic { n as f64 } else { n as f64 - 1.0 };
            for i in 0..n {
                let x = 2.0 * std::f64::consts::PI * i as f64 / den;
                let v = match kind {
                    WindowKind::Hann => (std::f64::consts::PI * i as f64 / den).sin().powi(2),
                    WindowKind::Hamming => 25.0 / 46.0 - (21.0 / 46.0) * x.cos(),
                    WindowKind::Blackman => 0.42 - 0.5 * x.cos() + 0.08 * (2.0 * x).cos(),
                };
                write_num(out, i, v);
            }
            Ok(())
        }
        Op::MelWeightMatrix { .. } => {
            let int =
                |i: usize, what: &str| -> OpResult<i64> { int_scalar(&req(inputs, i, what)?.to_i64_vec()?, what) };
            let (bins, dft, rate) = (int(0, "num_mel_bins")?, int(1, "dft_length")?, int(2, "sample_rate")?);
            let float = |i: usize, what: &str| -> OpResult<f64> {
                let v = req(inputs, i, what)?;
                if v.len() != 1 {
                    op_bail!("{what} must be a scalar");
                }
                Ok(match read(v.dtype, v.bytes, 0) {
                    Num::F(f) => f,
                    Num::I(i) => i as f64,
                })
            };
            let (low, high) = (float(3, "lower_edge_hertz")?, float(4, "upper_edge_hertz")?);
            if rate <= 0 {
                op_bail!("sample_rate = {rate} must be positive");
            }
            mel_matrix(bins as usize, dft, rate, low, high, &mut outputs[0]);
            Ok(())
        }
        _ => op_bail!("not a signal op"),
    }
}

fn write_num(out: &mut ViewMut<'_>, i: usize, v: f64) {
    let num = if matches!(out.dtype, DType::F32 | DType::F64 | DType::F16) { Num::F(v) } else { Num::I(v as i128) };
    write(out.dtype, out.bytes, i, num);
}

/// ONNX MelWeightMatrix (the reference's arithmetic: `num_mel_bins + 2` edges spaced over
/// `num_mel_bins + 2` steps, bins at `⌊(dft_length + 1)·f / sample_rate⌋`).
fn mel_matrix(bins: usize, dft: i64, rate: i64, low: f64, high: f64, out: &mut ViewMut<'_>) {
    let spec = dft as usize / 2 + 1;
    let mel = |hz: f64| 2595.0 * (1.0 + hz / 700.0).log10();
    let (lo, hi) = (mel(low), mel(high));
    let step = (hi - lo) / (bins + 2) as f64;
    let edges: Vec<i64> = (0..bins + 2)
        .map(|i| {
            let hz = 700.0 * (10f64.powf((i as f64 * step + lo) / 2595.0) - 1.0);
            ((dft + 1) as f64 * hz / rate as f64).floor() as i64
        })
        .collect();
    let mut m = vec![0.0f64; spec * bins];
    let mut set = |j: i64, i: usize, v: f64| {
        if (0..spec as i64).contains(&j) {
            m[j as usize * bins + i] = v;
        }
    };
    for i in 0..bins {
        let (l, c, h) = (edges[i], edges[i + 1], edges[i + 2]);
        if c == l {
            set(c, i, 1.0);
        } else {
            for j in l..=c {
                set(j, i, (j - l) as f64 / (c - l) as f64);
            }
        }
        if h > c {
            for j in c..h {
                set(j, i, (h - j) as f64 / (h - c) as f64);
            }
        }
    }
    for (i, &v) in m.iter().enumerate() {
        write_num(out, i, v);
    }
}

fn dft(x: View<'_>, g: &DftGeo, inverse: bool, onesided: bool, y: &mut [f32]) -> OpResult<()> {
    let xs = x.f32()?;
    let shape = x.shape;
    let c = *shape.last().expect("rank ≥ 2");
    let len = shape[g.axis];
    let outer = numel(&shape[..g.axis]);
    let inner = numel(&shape[g.axis + 1..shape.len() - 1]);
    let n = g.n;
    let fft = plan(n);
    let (mut re, mut im) = (vec![0.0f32; n * inner], vec![0.0f32; n * inner]);
    let mut scratch = Vec::new();
    // A one-sided inverse rebuilds the Hermitian spectrum from its first half (n/2 + 1 values).
    let half = n / 2 + 1;
    for o in 0..outer {
        re.fill(0.0);
        im.fill(0.0);
        let take = if inverse && onesided { len.min(half) } else { len.min(n) };
        for t in 0..take {
            for i in 0..inner {
                let at = ((o * len + t) * inner + i) * c;
                re[t * inner + i] = xs[at];
                im[t * inner + i] = if c == 2 { xs[at + 1] } else { 0.0 };
            }
        }
        if inverse && onesided {
            for k in 1..n.div_ceil(2) {
                for i in 0..inner {
                    re[(n - k) * inner + i] = re[k * inner + i];
                    im[(n - k) * inner + i] = -im[k * inner + i];
                }
            }
        }
        if inverse {
            fft.inverse(&mut re, &mut im, inner, &mut scratch);
        } else {
            fft.forward(&mut re, &mut im, inner, &mut scratch);
        }
        let scale = if inverse { 1.0 / n as f32 } else { 1.0 };
        for k in 0..g.out_len {
            for i in 0..inner {
                let at = ((o * g.out_len + k) * inner + i) * g.out_c;
                y[at] = re[k * inner + i] * scale;
                if g.out_c == 2 {
                    y[at + 1] = im[k * inner + i] * scale;
                }
            }
        }
    }
    Ok(())
}

/// Every frame of a batch row in one batched FFT: frame `f`'s sample `t` at `t·frames + f`.
fn stft(
    x: &[f32],
    window: Option<&[f32]>,
    (b, t_len, c, step, f, frames, bins): (usize, usize, usize, usize, usize, usize, usize),
    y: &mut [f32],
) {
    let fft = plan(f);
    let (mut re, mut im) = (vec![0.0f32; f * frames], vec![0.0f32; f * frames]);
    let mut scratch = Vec::new();
    for bi in 0..b {
        let sig = &x[bi * t_len * c..(bi + 1) * t_len * c];
        for t in 0..f {
            let w = window.map_or(1.0, |w| w[t]);
            let (rr, ri) = (&mut re[t * frames..(t + 1) * frames], &mut im[t * frames..(t + 1) * frames]);
            for fr in 0..frames {
                let at = (fr * step + t) * c;
                rr[fr] = sig[at] * w;
                ri[fr] = if c == 2 { sig[at + 1] * w } else { 0.0 };
            }
        }
        fft.forward(&mut re, &mut im, frames, &mut scratch);
        let out = &mut y[bi * frames * bins * 2..(bi + 1) * frames * bins * 2];
        for k in 0..bins {
            for fr in 0..frames {
                let at = (fr * bins + k) * 2;
                out[at] = re[k * frames + fr];
                out[at + 1] = im[k * frames + fr];
            }
        }
    }
}
