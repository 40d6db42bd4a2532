//! The session surface bindings and early exits build on: borrowed inputs read in place, and a
//! run that a step hook can end early.

use std::ops::ControlFlow;

use acorn::{DType, Model, RunEnd, Tensor, View};
use acorn_tests::write_tiny_model;

fn tiny() -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.acorn");
    write_tiny_model(&path).unwrap();
    let model = Model::open(&path).unwrap();
    (dir, model)
}

#[test]
fn borrowed_inputs_give_the_owned_inputs_outputs() {
    let (_dir, model) = tiny();
    let x = Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.5, 4.0]);
    let scale = Tensor::from_f32(vec![2, 1], vec![2.0, -1.0]);
    let mut s = model.session().commit().unwrap();
    let owned = s.run(&[("x", &x), ("scale", &scale)]).unwrap();
    // Caller memory (here a plain byte buffer) viewed in place.
    let xb: Vec<u8> = x.as_f32().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
    let sb: Vec<u8> = scale.as_f32().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
    let xv = View::dense(DType::F32, &[2, 3], &xb).unwrap();
    let sv = View::dense(DType::F32, &[2, 1], &sb).unwrap();
    let borrowed = s.run_views(&[("x", xv), ("scale", sv)]).unwrap();
    assert_eq!(owned, borrowed);
    // A view whose bytes do not match its shape is refused when made.
    let e = View::dense(DType::F32, &[2, 3], &xb[..20]).unwrap_err();
    assert!(e.to_string().contains("needs 24 bytes, got 20"), "{e}");
    // Inputs are still checked against the model (dtype here), also when a plan for these
    // shapes exists already (plans are keyed on shapes: a reused plan once read these bytes
    // as f32).
    let iv = View::dense(DType::I32, &[2, 3], &xb).unwrap();
    let e = s.run_views(&[("x", iv), ("scale", sv)]).unwrap_err();
    assert!(e.to_string().contains("must be f32"), "{e}");
}

#[test]
fn a_step_hook_sees_every_step_and_can_end_the_run() {
    let (_dir, model) = tiny();
    let x = Tensor::from_f32(vec![1, 3], vec![1.0, 2.0, 3.0]);
    let scale = Tensor::from_f32(vec![1, 1], vec![3.0]);
    let inputs = [("x", x.view()), ("scale", scale.view())];
    let mut s = model.session().commit().unwrap();
    let want = s.run_views(&inputs).unwrap();
    // Watching only: every step in order, the last one writing the output.
    let mut seen: Vec<(usize, String, Vec<f32>)> = Vec::new();
    let end = s
        .run_until(&inputs, &mut |d| {
            seen.push((d.index, d.node.to_string(), d.outputs[0].f32().unwrap().to_vec()));
            assert_eq!(d.steps, 4);
            ControlFlow::Continue(())
        })
        .unwrap();
    let RunEnd::Finished(outs) = end else { panic!("the hook did not stop the run") };
    assert_eq!(outs, *want);
    // Outputs are addressable by name too.
    assert_eq!(want["y"], want[0]);
    assert_eq!(want.get("y"), Some(&want[0]));
    assert!(want.get("nope").is_none());
    assert_eq!(want.names(), ["y"]);
    let names: Vec<&str> = seen.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(names, ["mm", "add", "relu", "mul"]);
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
    // x·W = [1+4-3, -1+1+3] = [2, 3]; + b = [2.5, 2.75].
    assert_eq!(seen[1].2, [2.5, 2.75]);
    assert_eq!(seen[3].2, want[0].as_f32().unwrap());
    // Stopping after the second step: later steps do not run, no outputs.
    let mut calls = 0;
    let end = s
        .run_until(&inputs, &mut |d| {
            calls += 1;
            if d.index == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert!(matches!(end, RunEnd::Stopped { after_step: 1 }), "{end:?}");
    assert_eq!(calls, 2);
    // The session runs normally afterwards.
    assert_eq!(s.run_views(&inputs).unwrap(), want);
}

#[test]
fn models_open_from_memory_and_from_a_region_of_a_file() {
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.acorn");
    write_tiny_model(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let x = Tensor::from_f32(vec![1, 3], vec![1.0, 2.0, 3.0]);
    let scale = Tensor::from_f32(vec![1, 1], vec![3.0]);
    let run = |m: &Model| m.session().commit().unwrap().run(&[("x", &x), ("scale", &scale)]).unwrap().into_vec();
    let want = run(&Model::open(&path).unwrap());
    let opts = acorn::OpenOptions::default();
    // Handed-over memory: a Vec (aligned: read in place) and bytes at an odd address (copied).
    assert_eq!(run(&Model::from_memory(bytes.clone(), &opts).unwrap()), want);
    struct Odd(Vec<u8>);
    impl AsRef<[u8]> for Odd {
        fn as_ref(&self) -> &[u8] {
            &self.0[1..]
        }
    }
    let mut odd = vec![0u8];
    odd.extend_from_slice(&bytes);
    assert_eq!(run(&Model::from_memory(Odd(odd), &opts).unwrap()), want);
    // A model inside a bigger file (as in an APK): at an offset that is a multiple of 8 (mapped
    // in place) and at one that is not (copied), by file and by descriptor.
    let packed = dir.path().join("container.bin");
    for pad in [96usize, 100] {
        let mut c = vec![0xA5u8; pad];
        c.extend_from_slice(&bytes);
        c.extend_from_slice(&[0x5A; 37]);
        std::fs::write(&packed, &c).unwrap();
        let f = std::fs::File::open(&packed).unwrap();
        let len = bytes.len() as u64;
        assert_eq!(run(&Model::open_region(&f, pad as u64, len, &opts).unwrap()), want, "offset {pad}");
        assert_eq!(run(&Model::open_fd(f.as_fd(), pad as u64, len, &opts).unwrap()), want, "offset {pad}");
        // A region past the end, or one that cuts the model, is an error.
        let e = Model::open_region(&f, pad as u64, len + 100, &opts).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(Model::open_region(&f, pad as u64, len - 8, &opts).is_err());
        assert!(Model::open_region(&f, pad as u64 + 1, len, &opts).is_err());
    }
}
