//! Any text as a manifest file: loading and validating never panics, and
//! every rejected document names where it was.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded = mesh_config::load_str("fuzz.yaml", text);
    for error in &loaded.errors {
        assert!(error.to_string().starts_with("fuzz.yaml: "));
    }
    let (valid, errors) = mesh_config::validate::partition(loaded.manifests);
    for error in &errors {
        assert!(!error.path.is_empty());
    }
    // What survives validation validates again cleanly.
    let again = mesh_config::validate::validate(&valid);
    assert!(again.is_empty(), "{again:?}");
});
