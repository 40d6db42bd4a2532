//! The ONNX backend node test suite (onnx==1.22.0): every test listed in
//! `tests/data/conformance_passing.txt` must still pass, so the pass count never drops below the
//! committed baseline. Regenerate the baseline and `docs/CONFORMANCE.md` with
//! `acorn conformance <suite> --passing tests/data/conformance_passing.txt --markdown docs/CONFORMANCE.md`.

use acorn_converter::conformance::{self, Outcome};
use acorn_tests::{asset, repo_root, ONNX_NODE_TESTS, ONNX_NODE_TESTS_1_23};

#[test]
fn node_suite_keeps_its_baseline() {
    let suite = asset(ONNX_NODE_TESTS);
    let baseline_path = repo_root().join("tests/data/conformance_passing.txt");
    let baseline = std::fs::read_to_string(&baseline_path).expect("baseline file");
    let expected: Vec<&str> = baseline.lines().filter(|l| !l.is_empty()).collect();
    let scratch = tempfile::tempdir().unwrap();
    let tests = conformance::list_tests(&suite).unwrap();
    assert_eq!(tests.len(), 1765, "the onnx 1.22.0 node suite has 1765 tests");
    let results: Vec<_> = tests.iter().map(|t| conformance::run_case(t, scratch.path())).collect();
    let (passed, failed, unsupported) = conformance::totals(&results);
    println!("conformance: {passed} passed, {failed} failed, {unsupported} unsupported of {}", results.len());
    let regressions: Vec<String> = expected
        .iter()
        .filter_map(|name| match results.iter().find(|r| r.name == *name) {
            Some(r) if r.outcome == Outcome::Passed => None,
            Some(r) => Some(format!("{name}: {} ({})", r.outcome.name(), r.reason)),
            None => Some(format!("{name}: missing from the suite")),
        })
        .collect();
    assert!(regressions.is_empty(), "{} baseline tests no longer pass:\n{}", regressions.len(), regressions.join("\n"));
    assert!(passed >= expected.len(), "{passed} passed, baseline {}", expected.len());
    // No test may crash the converter or runtime: panics are bugs even in unsupported corners.
    let panics: Vec<&str> = results.iter().filter(|r| r.reason.starts_with("PANIC")).map(|r| r.name.as_str()).collect();
    assert!(panics.is_empty(), "panics in: {panics:?}");
}

/// The node tests of the newest onnx release (1.23.2: new attributes such as SpaceToDepth's
/// `mode`, Attention's windows, BitShift on signed integers): no wrong answers. Each test either
/// passes or is refused with the reason (an unsupported op, attribute value, input or type);
/// none may convert and run to a different result.
#[test]
fn newest_node_suite_has_no_wrong_answers() {
    let suite = asset(ONNX_NODE_TESTS_1_23);
    let scratch = tempfile::tempdir().unwrap();
    let tests = conformance::list_tests(&suite).unwrap();
    assert_eq!(tests.len(), 1884, "the onnx 1.23.2 node suite has 1884 tests");
    let results: Vec<_> = tests.iter().map(|t| conformance::run_case(t, scratch.path())).collect();
    let (passed, failed, unsupported) = conformance::totals(&results);
    println!("onnx 1.23.2 node tests: {passed} passed, {failed} failed, {unsupported} refused of {}", results.len());
    let wrong: Vec<String> = results
        .iter()
        .filter(|r| r.outcome == Outcome::Failed && !undefined_in_onnx(&r.name))
        .map(|r| format!("{}: {}", r.name, r.reason))
        .collect();
    let undefined = results.iter().filter(|r| r.outcome == Outcome::Failed && undefined_in_onnx(&r.name)).count();
    println!("{undefined} tests expect a value ONNX leaves undefined (see undefined_in_onnx)");
    assert!(wrong.is_empty(), "{} tests gave a wrong answer or failed unclearly:\n{}", wrong.len(), wrong.join("\n"));
}

/// Tests whose expected output is a value the ONNX spec leaves undefined: `Cast` / `CastLike`
/// from a float to a 4- or 2-bit integer of a value outside its range ("fixed point: undefined if
/// OOR"). The two suites disagree on the very same inputs: onnx 1.22's expects the value wrapped
/// (−9 → 7 as int4), onnx 1.23's expects 0 — each is what its ml_dtypes release happened to do.
/// Acorn wraps (as C integer conversion and onnx 1.22 do) and passes the 1.22 tests; here the
/// in-range values of these tests are still checked by the 1.22 suite.
fn undefined_in_onnx(name: &str) -> bool {
    let cast = name.starts_with("test_cast_FLOAT") || name.starts_with("test_castlike_FLOAT");
    let target = ["_to_INT4", "_to_UINT4", "_to_INT2", "_to_UINT2"].iter().any(|t| name.contains(t));
    cast && target
}
