//! The committed C header is what cbindgen makes of the source today. `ACORN_BLESS=1` rewrites
//! it.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen reads src/lib.rs")
        .write(&mut generated);
    let path = dir.join("include/acorn.h");
    if std::env::var_os("ACORN_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/acorn.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: regenerate it with `ACORN_BLESS=1 cargo test -p acorn-ffi --test header` and commit it",
        path.display()
    );
}
