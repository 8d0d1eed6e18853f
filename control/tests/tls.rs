//! The TLS gRPC listener (15012): clients that verify it with the mesh
//! root get ADS and certificates; a client trusting another root is
//! refused during the handshake; the bearer token is still required.

mod common;
use common::{create_certificate, csr};

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_api::type_url;
use mesh_control::{
    ControlPlane, Options, SourceOptions, ca::CertificateAuthority, model::MeshSettings,
    tls::TlsOptions,
};
use mesh_xds::{ChannelError, ClientConfig, Handler, Rejected, Target, Update};
use tokio::sync::watch;

const TOKEN: &str = "node0-token-0123456789";

const PLATFORM: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: node0, serviceAccountName: web, containers: [{name: app}]}
status: {podIP: 10.244.0.10, conditions: [{type: Ready, status: "True"}]}
"#;

async fn start(dir: &Path) -> ControlPlane {
    let config = dir.join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("platform.yaml"), PLATFORM).unwrap();
    let tokens = dir.join("tokens.json");
    std::fs::write(
        &tokens,
        format!(r#"{{"tokens": {{"{TOKEN}": {{"node": "node0"}}}}}}"#),
    )
    .unwrap();
    ControlPlane::start(Options {
        source: SourceOptions::Dirs(vec![config]),
        ca_dir: dir.join("ca"),
        tokens_file: Some(tokens),
        token_review: None,
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        tls: Some(TlsOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            dns_names: vec!["mesh-control.istio-system.svc".into()],
            ip_sans: vec!["127.0.0.1".parse().unwrap()],
        }),
        status_addr: "127.0.0.1:0".parse().unwrap(),
        settings: MeshSettings::default(),
    })
    .await
    .unwrap()
}

struct Names(Arc<Mutex<BTreeSet<String>>>, watch::Sender<()>);

impl Handler for Names {
    fn apply(&mut self, update: Update) -> Result<(), Rejected> {
        let mut names = self.0.lock().unwrap();
        names.extend(update.resources.into_iter().map(|r| r.name));
        self.1.send_replace(());
        Ok(())
    }
}

#[tokio::test]
async fn verified_clients_get_ads_and_certificates_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let control = start(dir.path()).await;
    let tls = control.ports().grpc_tls.expect("TLS listener");
    let address = format!("https://{tls}");
    let root = dir.path().join("ca/root-cert.pem");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();

    // ADS, through the client the proxies use.
    let names = Arc::new(Mutex::new(BTreeSet::new()));
    let (changed, mut rx) = watch::channel(());
    tokio::spawn(mesh_xds::run(
        ClientConfig {
            address: address.clone(),
            root_cert: Some(root.clone()),
            token_file: Some(token_file),
            node_id: "ztunnel~node0".into(),
            types: vec![type_url::ADDRESS],
            metadata: Vec::new(),
        },
        Names(names.clone(), changed),
    ));
    tokio::time::timeout(Duration::from_secs(10), async {
        while names.lock().unwrap().is_empty() {
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no address over TLS: {:?}", names.lock().unwrap()));

    // A certificate, with the token; without it, refused as over plaintext.
    let target = Target {
        address: address.clone(),
        root_cert: Some(root),
    };
    let chain = create_certificate(
        target.connect(|e| e).await.unwrap(),
        Some(TOKEN),
        csr("spiffe://cluster.local/ns/shop/sa/web"),
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 2);
    let refused = create_certificate(
        target.connect(|e| e).await.unwrap(),
        None,
        csr("spiffe://cluster.local/ns/shop/sa/web"),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
}

#[tokio::test]
async fn a_client_trusting_another_root_is_refused_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let control = start(dir.path()).await;
    let tls = control.ports().grpc_tls.expect("TLS listener");
    let other = dir.path().join("other-ca");
    CertificateAuthority::load_or_create(&other, "cluster.local").unwrap();
    let target = Target {
        address: format!("https://{tls}"),
        root_cert: Some(other.join("root-cert.pem")),
    };
    let error = target.connect(|e| e).await.unwrap_err();
    assert!(matches!(error, ChannelError::Connect { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&target.address), "{message}");
    assert!(message.contains("other-ca/root-cert.pem"), "{message}");
    assert!(message.contains("invalid peer certificate"), "{message}");

    // A missing root file is named before anything is sent.
    let missing = Target {
        address: format!("https://{tls}"),
        root_cert: Some(dir.path().join("absent.pem")),
    };
    let message = missing.connect(|e| e).await.unwrap_err().to_string();
    assert!(message.contains("absent.pem"), "{message}");
}
