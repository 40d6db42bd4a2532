//! `pair-bench`: two `.acorn` files on the same inputs, run in alternation inside one process
//! (both open, one run of each per pair, the order swapped every pair), so that both see the same
//! moment of a shared, noisy machine. Prints each file's fastest, fastest-quarter mean and median
//! time, and the ratio A / B as the median of the per-pair ratios (the figure the benchmark notes
//! quote), at the kernel set `ACORN_KERNELS` selects.
//!
//! ```text
//! cargo run --release -p acorn-benches --bin pair-bench -- A.acorn B.acorn -i x=x.npy [--pairs 24]
//! ```

use std::time::Instant;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut files, mut inputs, mut pairs) = (Vec::new(), Vec::new(), 24usize);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-i" | "--input" => inputs.push(it.next().context("-i needs NAME=FILE.npy")?.clone()),
            "--pairs" => pairs = it.next().context("--pairs needs a number")?.parse()?,
            _ => files.push(a.clone()),
        }
    }
    let [a, b] = &files[..] else { bail!("usage: pair-bench A.acorn B.acorn -i NAME=FILE.npy… [--pairs N]") };
    if pairs < 4 {
        bail!("--pairs: at least 4");
    }
    let mut feeds = Vec::new();
    for spec in &inputs {
        let (name, path) = spec.split_once('=').context("an input is NAME=FILE.npy")?;
        feeds.push((name.to_string(), acorn_cli::npy::read_npy(path.as_ref())?));
    }
    let models = [acorn::Model::open(a)?, acorn::Model::open(b)?];
    let mut sessions = Vec::new();
    for m in &models {
        sessions.push(m.session().commit()?);
    }
    let feed: Vec<(&str, &acorn::Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for s in sessions.iter_mut() {
        for _ in 0..3 {
            s.run(&feed)?;
        }
    }
    let mut times = [Vec::new(), Vec::new()];
    for p in 0..pairs {
        for k in [p % 2, 1 - p % 2] {
            let t = Instant::now();
            sessions[k].run(&feed)?;
            times[k].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut ratios: Vec<f64> = times[0].iter().zip(&times[1]).map(|(x, y)| x / y).collect();
    ratios.sort_by(f64::total_cmp);
    let summary = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let quarter = v[..v.len() / 4].iter().sum::<f64>() / (v.len() / 4) as f64;
        (v[0], quarter, v[v.len() / 2])
    };
    let (sa, sb) = (summary(&times[0]), summary(&times[1]));
    println!("kernels {}, {pairs} pairs", acorn::kernels::selected().name());
    for (name, s) in [(a, sa), (b, sb)] {
        println!("{name}: fastest {:.2} ms, fastest quarter {:.2} ms, median {:.2} ms", s.0, s.1, s.2);
    }
    println!("A / B: median of per-pair ratios {:.3}, fastest quarters {:.3}", ratios[pairs / 2], sa.1 / sb.1);
    Ok(())
}
