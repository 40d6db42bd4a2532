//! Distillation (issue 21): a student built from all-MiniLM-L6-v2 and trained on unlabelled
//! text, and the teacher check of a student trained elsewhere (`--teacher`).

use acorn_converter::distill::{DistillOptions, Layers};
use acorn_converter::{convert, ConvertOptions, TeacherCheck};
use acorn_tests::{asset, distillation_texts, play_lines, MINILM_L3, MINILM_L6, MINILM_TOKENIZER};

fn report(r: &acorn_converter::ConvertReport, pass: &str, key: &str) -> f64 {
    let rec = r.passes.iter().find(|p| p.name == pass).unwrap_or_else(|| panic!("no {pass} record"));
    rec.report.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("{pass} has no {key}")).1
}

fn param<'a>(r: &'a acorn_converter::ConvertReport, pass: &str, key: &str) -> &'a str {
    let rec = r.passes.iter().find(|p| p.name == pass).unwrap_or_else(|| panic!("no {pass} record"));
    &rec.params.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("{pass} has no {key}")).1
}

fn mean_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| acorn_tests::cosine(x, y)).sum::<f64>() / a.len() as f64
}

/// A 3-layer student of the 6-layer teacher, a few dozen steps: the layers are chosen and
/// removed, training improves the validation embeddings, and the file written is the student
/// the training measured (the runtime's embeddings of the validation texts give the recorded
/// cosine to the teacher's).
#[test]
fn a_three_layer_student_learns_from_the_teacher_and_is_what_the_file_runs() {
    three_layer_student(false);
}

/// The same with the removed layers replaced by fitted maps trained with the blocks: the maps
/// are in the file, trained (the runtime agrees with the training's figure), and the student
/// starts better than skipping the layers.
#[test]
fn a_student_with_fitted_maps_trains_them_too() {
    three_layer_student(true);
}

fn three_layer_student(maps: bool) {
    let dir = tempfile::tempdir().unwrap();
    let texts = distillation_texts("macbeth", 24_000).unwrap();
    let data = dir.path().join("texts.txt");
    std::fs::write(&data, texts.join("\n")).unwrap();
    let train =
        acorn_converter::heal::HealOptions { max_epochs: 1, max_steps: Some(30), ..DistillOptions::default_training() };
    let opts = ConvertOptions {
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        distill: Some(DistillOptions {
            layers: Layers::Count(3),
            width: None,
            data,
            maps,
            train,
            blocks: Default::default(),
        }),
        ..ConvertOptions::default()
    };
    let student = dir.path().join("student.acorn");
    let r = convert(&asset(MINILM_L6), &student, &opts).unwrap();
    let kept = param(&r, "distill", "kept_layers").to_string();
    let (before, after) = (
        report(&r, "distill", "distill_validation_cosine_before"),
        report(&r, "distill", "distill_validation_cosine_after"),
    );
    println!(
        "kept layers {kept}; validation cosine {before:.4} → {after:.4}; {:.0} s",
        report(&r, "distill", "distill_seconds")
    );
    assert_eq!(kept.split(',').count(), 3);
    assert_eq!(report(&r, "drop_layers", "layers_after"), 3.0);
    // The maps start the student close (0.85 against 0.69 skipped): 30 steps move it less.
    let gain = if maps { 0.002 } else { 0.05 };
    assert!(after > before + gain, "training did not move the student: {before} → {after}");
    assert!(report(&r, "distill", "distill_steps") <= 30.0);
    let model = acorn::Model::open(&student).unwrap();
    let attention =
        model.metadata().graph.nodes.iter().filter(|n| matches!(n.op, acorn::graph::Op::Attention(_))).count();
    assert_eq!(attention, 3);
    let products = model.metadata().graph.nodes.iter().filter(|n| n.op == acorn::graph::Op::MatMul).count();
    let removed = report(&r, "drop_layers", "layers_before") as usize - 3;
    let runs = r
        .passes
        .iter()
        .find(|p| p.name == "drop_layers")
        .unwrap()
        .report
        .iter()
        .filter(|(k, _)| k.starts_with("skip_error:"))
        .count();
    assert!(removed == 3 && (1..=3).contains(&runs));
    // 4 products a block (QKV, output, two FFN), one per map.
    assert_eq!(products, 3 * 4 + if maps { runs } else { 0 });
    if maps {
        assert!(kept.ends_with('6'), "with maps the last layer stays: {kept}");
        assert!(before > 0.75, "the fitted maps start the student at {before}");
    }
    // The validation texts are the last eighth of the data file.
    let n_val = (texts.len() / 8).max(1);
    let val: Vec<&str> = texts[texts.len() - n_val..].iter().map(String::as_str).collect();
    let teacher_file = dir.path().join("teacher.acorn");
    convert(
        &asset(MINILM_L6),
        &teacher_file,
        &ConvertOptions { tokenizer: Some(asset(MINILM_TOKENIZER)), ..Default::default() },
    )
    .unwrap();
    let embed = |p: &std::path::Path| {
        let m = acorn::Model::open(p).unwrap();
        let mut e = acorn_text::TextEmbedder::new(&m, 2).unwrap();
        val.chunks(16).flat_map(|c| e.embed(c).unwrap()).collect::<Vec<_>>()
    };
    let runtime = mean_cosine(&embed(&teacher_file), &embed(&student));
    assert!((runtime - after).abs() < 2e-3, "the file's student gives {runtime}, training measured {after}");
    // Held-out lines (a play the texts leave out): better than the untrained student's.
    let lines: Vec<String> = play_lines("macbeth_gut.txt").unwrap().into_iter().take(200).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let embed_lines = |p: &std::path::Path| {
        let m = acorn::Model::open(p).unwrap();
        let mut e = acorn_text::TextEmbedder::new(&m, 2).unwrap();
        refs.chunks(16).flat_map(|c| e.embed(c).unwrap()).collect::<Vec<_>>()
    };
    let macbeth = mean_cosine(&embed_lines(&teacher_file), &embed_lines(&student));
    let untrained = report(&r, "distill", &format!("untrained_cosine:layers_{kept}"));
    println!(
        "held-out Macbeth lines: cosine {macbeth:.4} (the untrained student on the validation texts: {untrained:.4})"
    );
    assert!(macbeth > untrained + 0.05, "{macbeth} vs untrained {untrained}");
}

/// `--teacher`: a student made elsewhere is compared with its teacher and the figures go into
/// the file's provenance; the outputs are paired by name, or by shape when the names differ.
#[test]
fn a_student_is_checked_against_its_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = play_lines("macbeth_gut.txt").unwrap().into_iter().take(40).collect();
    let calib = dir.path().join("lines.txt");
    std::fs::write(&calib, lines.join("\n")).unwrap();
    let check = |student: &str, quantize: bool| {
        let out = dir.path().join("s.acorn");
        let opts = ConvertOptions {
            tokenizer: Some(asset(MINILM_TOKENIZER)),
            teacher: Some(TeacherCheck { teacher: asset(MINILM_L6), calib: calib.clone() }),
            quantize: quantize.then(|| acorn_converter::quantize::QuantOptions {
                format: acorn_converter::quantize::QuantFormat::Q8,
                ..Default::default()
            }),
            ..ConvertOptions::default()
        };
        let r = convert(&asset(student), &out, &opts).unwrap();
        let model = acorn::Model::open(&out).unwrap();
        let rec = model
            .metadata()
            .provenance
            .passes
            .iter()
            .find(|p| p.name == "teacher")
            .expect("teacher record in the file")
            .clone();
        (r, rec)
    };
    // The teacher itself, in q8: agrees closely.
    let (r, rec) = check(MINILM_L6, true);
    let cos = report(&r, "teacher", "teacher_cosine");
    assert!(cos > 0.99 && cos <= 1.0 + 1e-9, "q8 against fp32: {cos}");
    assert_eq!(report(&r, "teacher", "teacher_samples"), 40.0);
    assert!(report(&r, "teacher", "teacher_nn_agreement") >= 0.9);
    assert!(rec.params.iter().any(|(k, v)| k == "teacher_sha256" && v.len() == 64));
    // Another model (paraphrase-MiniLM-L3-v2: not distilled from this teacher): its
    // sentence-embedding output (named otherwise) is paired by shape, and the figure says
    // it is far from this teacher.
    let (r, _) = check(MINILM_L3, false);
    assert_eq!(param(&r, "teacher", "output"), acorn_tests::MINILM_EMBEDDING);
    assert_eq!(param(&r, "teacher", "teacher_output"), "sentence_embedding");
    let cos = report(&r, "teacher", "teacher_cosine");
    assert!(cos < 0.9, "{cos}");
}

/// Settings that cannot build a student are refused before any training, with the reason.
#[test]
fn distill_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("texts.txt");
    std::fs::write(&data, "one line of text\n").unwrap();
    let err = |layers: Layers, width: Option<usize>| {
        let opts = ConvertOptions {
            tokenizer: Some(asset(MINILM_TOKENIZER)),
            distill: Some(DistillOptions {
                layers,
                width,
                maps: false,
                data: data.clone(),
                train: DistillOptions::default_training(),
                blocks: Default::default(),
            }),
            ..ConvertOptions::default()
        };
        format!("{:#}", convert(&asset(MINILM_L6), &dir.path().join("s.acorn"), &opts).unwrap_err())
    };
    assert!(err(Layers::List(vec![6]), None).contains("outside 1..6"));
    assert!(err(Layers::Count(7), None).contains("the teacher has 6 layers"));
    assert!(err(Layers::All, None).contains("would be the teacher"));
    let opts = ConvertOptions {
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        distill: Some(DistillOptions {
            layers: Layers::All,
            width: Some(768),
            maps: true,
            data: data.clone(),
            train: DistillOptions::default_training(),
            blocks: Default::default(),
        }),
        ..ConvertOptions::default()
    };
    let e = format!("{:#}", convert(&asset(MINILM_L6), &dir.path().join("s.acorn"), &opts).unwrap_err());
    assert!(e.contains("keeps all 6 layers"), "{e}");
    assert!(err(Layers::Count(3), Some(100)).contains("multiple of 32"));
    assert!(err(Layers::Count(3), Some(1536)).contains("below the teacher's 1536"));
    // One text: too few to keep an eighth for validation.
    assert!(err(Layers::Count(3), None).contains("at least 8 texts"));
    assert!(!dir.path().join("s.acorn").exists());
}
