//! `acorn optimize` (issue 21): the seven techniques on one encoder from a recipe, one row per
//! step, the table stored in the file.

use acorn_converter::optimize::{self, OptimizeOptions, Recipe, STEP_NAMES};
use acorn_tests::{asset, data, write_distillation_texts, MINILM_L3, MINILM_TOKENIZER};

/// Every step of a short recipe on paraphrase-MiniLM-L3-v2 (3 layers → a 2-layer student):
/// each step's file is written and measured, the sizes fall where a step removes weights, the
/// last file is the last row (its accuracy on the held-out split, recomputed here through the
/// runtime, is the row's; its encodings are the recipe's), and the table is in its provenance.
#[test]
fn a_recipe_runs_every_step_and_the_table_is_what_the_files_measure() {
    let dir = tempfile::tempdir().unwrap();
    let texts_file = dir.path().join("texts.txt");
    write_distillation_texts(&texts_file, "macbeth", 20_000).unwrap();
    let recipe_text = r#"
[transfer]
[fine_tune]
layers = 1
[distill]
layers = 2
epochs = 1
steps = 20
fine_tune_layers = 1
[prune]
ffn = 0.25
[quantize]
format = "q8"
embeddings = "q4"
[optimize]
target = "host"
[exits]
layers = "all"
"#;
    let recipe = Recipe::parse(recipe_text, "(test)").unwrap();
    let steps = dir.path().join("steps");
    let out = dir.path().join("intent.acorn");
    let test = data("intents/test.tsv");
    let opts = OptimizeOptions {
        tokenizer: asset(MINILM_TOKENIZER),
        train: data("intents/train.tsv"),
        test: Some(test.clone()),
        data: Some(texts_file),
        recipe,
        steps_dir: Some(steps.clone()),
        threads: 0,
        memory_limit: None,
        rounds: 1,
        progress: Default::default(),
    };
    let r = optimize::optimize(&asset(MINILM_L3), &out, &opts).unwrap();
    println!("{}", optimize::table(&r.rows, Some(&r.reference), Some(r.held_out)));
    let names: Vec<&str> = r.rows.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, STEP_NAMES);
    // Every step's file is kept, with the size its row says.
    for row in &r.rows {
        let slug = row.name.replace(['/', ' '], "-");
        let f = steps.join(format!("{:02}-{slug}.acorn", row.step));
        assert_eq!(std::fs::metadata(&f).unwrap().len(), row.file_bytes, "{}", f.display());
        assert!(row.latency_ms > 0.0 && row.open_ms > 0.0, "{row:?}");
        assert!(row.accuracy > 0.5 && row.accuracy <= 1.0, "{row:?}");
    }
    let size = |i: usize| r.rows[i].file_bytes as f64;
    // Transfer learning and fine-tuning change no size; the student, its pruning and the
    // rounding remove bytes.
    assert!((size(1) - size(0)).abs() < 0.01 * size(0));
    assert!(size(2) < size(1) && r.rows[2].mean_layers == 2.0, "distillation: {:?}", r.rows[2]);
    assert!(size(3) < size(2), "pruning: {} → {}", size(2), size(3));
    assert!(size(4) < 0.2 * size(0), "q8 with q4 embeddings: {} of {}", size(4), size(0));
    // Exits run fewer layers; without them every utterance runs the student's two.
    assert!(r.rows[5].mean_layers == 2.0, "{:?}", r.rows[5]);
    assert!(r.rows[6].mean_layers < 2.0, "{:?}", r.rows[6]);
    assert_eq!(r.reference.mean_layers, 3.0);
    // The output is the last step: its accuracy through the runtime is the last row's.
    let model = acorn::Model::open(&out).unwrap();
    let mut clf = acorn_text::TextClassifier::new(&model, 1).unwrap();
    let labels = clf.labels().to_vec();
    let held = std::fs::read_to_string(&test).unwrap();
    let (mut right, mut n) = (0usize, 0usize);
    for line in held.lines().filter(|l| !l.trim().is_empty()) {
        let (gold, utt) = line.split_once('\t').unwrap();
        right += usize::from(labels[clf.classify(&[utt]).unwrap()[0].label] == gold);
        n += 1;
    }
    assert_eq!(n, r.held_out);
    assert_eq!(right as f64 / n as f64, r.rows[6].accuracy);
    // The recipe's encodings: q8 products in the kernels' panels, the embedding table in q4.
    let encs: Vec<acorn::format::TensorEncoding> = model.metadata().tensors.iter().map(|t| t.encoding).collect();
    assert!(encs.iter().any(|e| matches!(e, acorn::format::TensorEncoding::Q4 { transposed: false, .. })));
    assert!(encs.iter().any(|e| matches!(
        e,
        acorn::format::TensorEncoding::Q8Panels { .. } | acorn::format::TensorEncoding::Q8PanelsNarrow { .. }
    )));
    // Quantization writes the portable rows; graph/kernel optimization the kernels' panels.
    let encodings = |step: usize| -> Vec<acorn::format::TensorEncoding> {
        let row = &r.rows[step - 1];
        let f = steps.join(format!("{:02}-{}.acorn", step, row.name.replace(['/', ' '], "-")));
        acorn::Model::open(&f).unwrap().metadata().tensors.iter().map(|t| t.encoding).collect()
    };
    assert!(encodings(5).iter().any(|e| matches!(e, acorn::format::TensorEncoding::Q8 { transposed: true })));
    assert!(!encodings(5).iter().any(|e| matches!(e, acorn::format::TensorEncoding::PanelF32 { .. })));
    assert!(!encodings(6).iter().any(|e| matches!(e, acorn::format::TensorEncoding::Q8 { transposed: true })));
    // The table is in the provenance, as measured.
    let rec = model.metadata().provenance.passes.iter().find(|p| p.name == "optimize").expect("optimize record");
    let (rows, reference) = optimize::table_from_record(rec).unwrap();
    assert_eq!(rows, r.rows);
    assert_eq!(reference.as_ref(), Some(&r.reference));
    let stored = &rec.params.iter().find(|(k, _)| k == "recipe").unwrap().1;
    assert_eq!(stored, &Recipe::parse(recipe_text, "(test)").unwrap().canonical());
    assert!(
        stored.contains(r#""distill":{"epochs":1,"fine_tune_layers":1,"layers":2,"maps":false,"steps":20}"#),
        "{stored}"
    );
}

/// Recipes are checked before anything runs: unknown settings, a missing head, values out of
/// range, a distillation without texts.
#[test]
fn recipes_are_checked() {
    let chain = |text: &str| format!("{:#}", Recipe::parse(text, "(test)").unwrap_err());
    assert!(chain("[transfer]\n[fine_tune]\nlayer = 2\n").contains("unknown field"));
    assert!(chain("[fine_tune]\nlayers = 2\n").contains("[transfer] is required"));
    assert!(chain("[transfer]\n[prune]\nffn = 1.5\n").contains("ffn = 1.5"));
    assert!(chain("[transfer]\n[distill]\nepochs = 1\n").contains("layers = N"));
    assert!(chain("[transfer]\n[quantize]\nformat = \"q3\"\n").contains("q3"));
    assert!(chain("[transfer]\n[optimize]\ntarget = \"z80\"\n").contains("z80"));
    assert!(chain("[transfer]\n[exits]\nlayers = \"first\"\n").contains("first"));
    // The default recipe parses and names all seven steps.
    assert_eq!(Recipe::parse(optimize::DEFAULT_RECIPE, "(default)").unwrap().steps(), STEP_NAMES);
    // [distill] without --data: refused before the model is read.
    let dir = tempfile::tempdir().unwrap();
    let recipe = Recipe::parse("[transfer]\n[distill]\nlayers = 2\n", "(test)").unwrap();
    let opts = OptimizeOptions {
        tokenizer: asset(MINILM_TOKENIZER),
        train: data("intents/train.tsv"),
        test: None,
        data: None,
        recipe,
        steps_dir: None,
        threads: 1,
        memory_limit: None,
        rounds: 1,
        progress: Default::default(),
    };
    let out = dir.path().join("x.acorn");
    let e = optimize::optimize(&asset(MINILM_L3), &out, &opts).unwrap_err().to_string();
    assert!(e.contains("--data"), "{e}");
    assert!(!out.exists());
    // A held-out label the head never saw: named before any training.
    let test = dir.path().join("test.tsv");
    std::fs::write(&test, "set_timer\tfive minutes please\nteleport\tbeam me up\n").unwrap();
    let opts = OptimizeOptions { test: Some(test), recipe: Recipe::parse("[transfer]\n", "(test)").unwrap(), ..opts };
    let e = optimize::optimize(&asset(MINILM_L3), &out, &opts).unwrap_err().to_string();
    assert!(e.contains("'teleport'"), "{e}");
    assert!(!out.exists());
}
