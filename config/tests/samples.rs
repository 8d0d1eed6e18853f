//! Every manifest in Istio's samples loads unmodified, with no error and no
//! unknown field, and passes validation together with the DestinationRules
//! it is documented to be applied with.

use std::path::{Path, PathBuf};

use mesh_config::{load_file, validate::validate};

fn samples_dir() -> PathBuf {
    std::env::var_os("MESH_ISTIO_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-samples"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("samples dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_sample_loads_without_errors_or_unknown_fields() {
    let mut files = Vec::new();
    yaml_files(&samples_dir(), &mut files);
    files.sort();
    assert!(files.len() >= 20, "samples missing: {files:?}");
    for file in &files {
        let loaded = load_file(file);
        assert!(
            loaded.errors.is_empty(),
            "{}: {:?}",
            file.display(),
            loaded.errors
        );
        let unknown: Vec<_> = loaded
            .warnings
            .iter()
            .filter(|w| w.message.starts_with("unknown field"))
            .collect();
        assert!(unknown.is_empty(), "{}: {unknown:#?}", file.display());
        assert!(!loaded.manifests.is_empty(), "{}", file.display());
    }
}

#[test]
fn every_sample_validates_with_its_destination_rules() {
    let dir = samples_dir();
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    files.sort();
    // The samples' READMEs apply these before the routes that name subsets.
    let rules_of = |file: &Path| {
        let rules = if file.starts_with(dir.join("bookinfo/networking")) {
            "bookinfo/networking/destination-rule-all.yaml"
        } else if file.ends_with("tcp-echo/tcp-echo-20-v2.yaml") {
            "tcp-echo/tcp-echo-all-v1.yaml"
        } else {
            return None;
        };
        let mut rules = load_file(&dir.join(rules)).manifests;
        rules.virtual_services.clear();
        rules.istio_gateways.clear();
        Some(rules)
    };
    for file in &files {
        let mut manifests = load_file(file).manifests;
        if manifests.destination_rules.is_empty()
            && let Some(rules) = rules_of(file)
        {
            manifests.extend(rules);
        }
        let errors = validate(&manifests);
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
    }
}
