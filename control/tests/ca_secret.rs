//! Replicas share one CA through a Secret: of two starting together one
//! stores its root, the other takes it; a later replica takes it too.

use mesh_control::{ca::CertificateAuthority, ca_secret};
use mesh_fake_apiserver::{FakeApiServer, Kind};

#[tokio::test]
async fn replicas_starting_together_end_with_one_root() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::secret());
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let sync = |dir: std::path::PathBuf| {
        let client = server.client();
        async move {
            ca_secret::sync(
                client,
                "istio-system",
                "istio-ca-secret",
                &dir,
                "cluster.local",
            )
            .await
        }
    };
    let path = |i: usize| dirs[i].path().to_path_buf();
    let (a, b) = tokio::join!(sync(path(0)), sync(path(1)));
    let created = [a.unwrap(), b.unwrap()];
    assert_eq!(
        created.iter().filter(|c| **c).count(),
        1,
        "exactly one stored its root: {created:?}"
    );
    assert!(!sync(path(2)).await.unwrap(), "a later replica only reads");
    let roots: Vec<String> = dirs
        .iter()
        .map(|d| {
            CertificateAuthority::load_or_create(d.path(), "cluster.local")
                .unwrap()
                .root_pem()
                .to_owned()
        })
        .collect();
    assert_eq!(roots[0], roots[1]);
    assert_eq!(roots[1], roots[2]);
    let secret = server
        .get("v1", "Secret", "istio-system", "istio-ca-secret")
        .unwrap();
    assert_eq!(secret["type"], "Opaque");
    assert!(secret["data"][ca_secret::KEY_KEY].is_string());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dirs[2].path().join("root-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
}
