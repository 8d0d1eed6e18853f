//! Any sequence of delta ADS requests from an authenticated proxy, sent over
//! real gRPC to an in-process control plane: the stream is answered or
//! closed, never panics the server, and a well-behaved proxy connecting
//! afterwards still gets its workloads.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_api::{
    envoy::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    type_url,
};
use mesh_control::{ControlPlane, Options, SourceOptions, model::MeshSettings};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

const TOKEN: &str = "fuzz-node-token-0123456789";
const PLATFORM: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\nspec: {nodeName: node0, serviceAccountName: web, containers: [{name: app}]}\nstatus: {podIP: 10.244.0.10, conditions: [{type: Ready, status: \"True\"}]}\n";

struct Fixture {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    _dir: tempfile::TempDir,
    _control: ControlPlane,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        std::fs::create_dir(&config).expect("config dir");
        std::fs::write(config.join("platform.yaml"), PLATFORM).expect("platform");
        let tokens = dir.path().join("tokens.json");
        std::fs::write(
            &tokens,
            format!(r#"{{"tokens": {{"{TOKEN}": {{"node": "node0"}}}}}}"#),
        )
        .expect("tokens");
        let (control, channel) = runtime.block_on(async {
            let control = ControlPlane::start(Options {
                source: SourceOptions::Dirs(vec![config]),
                ca_dir: dir.path().join("ca"),
                tokens_file: Some(tokens),
                token_review: None,
                grpc_addr: "127.0.0.1:0".parse().unwrap(),
                tls: None,
                status_addr: "127.0.0.1:0".parse().unwrap(),
                settings: MeshSettings::default(),
            })
            .await
            .expect("control plane");
            let channel = Channel::from_shared(format!("http://{}", control.ports().grpc))
                .unwrap()
                .connect()
                .await
                .expect("channel");
            (control, channel)
        });
        Fixture {
            runtime,
            channel,
            _dir: dir,
            _control: control,
        }
    })
}

/// Splits the input into length-prefixed chunks, each decoded (leniently)
/// as a request; a chunk that is not a valid message becomes a request
/// with a garbage type URL so it still reaches the server.
fn requests(data: &[u8]) -> Vec<DeltaDiscoveryRequest> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        out.push(
            DeltaDiscoveryRequest::decode(chunk).unwrap_or_else(|_| DeltaDiscoveryRequest {
                type_url: String::from_utf8_lossy(chunk).into_owned(),
                ..Default::default()
            }),
        );
        if out.len() == 16 {
            break;
        }
    }
    out
}

/// Sends `requests` on one stream; counts the responses, up to `enough`,
/// that arrive without a pause longer than `patience`.
async fn stream(
    channel: Channel,
    requests: Vec<DeltaDiscoveryRequest>,
    enough: usize,
    patience: Duration,
) -> Result<usize, tonic::Status> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut request = Request::new(tokio_stream::iter(requests));
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {TOKEN}")).unwrap(),
    );
    let mut responses = client
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    let mut count = 0;
    // The request stream ends after the last request; the server may keep
    // the response stream open, so read what arrives within a short time.
    while count < enough {
        match tokio::time::timeout(patience, responses.next()).await {
            Ok(Some(next)) => {
                next?;
                count += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    Ok(count)
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let requests = requests(data);
    fixture.runtime.block_on(async {
        // Errors are fine (that is the server refusing garbage); a hang is not.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            stream(
                fixture.channel.clone(),
                requests,
                usize::MAX,
                Duration::from_millis(10),
            ),
        )
        .await
        .expect("the control plane neither answered nor closed within 5 s");
        // A well-behaved proxy is still served.
        let good = DeltaDiscoveryRequest {
            type_url: type_url::ADDRESS.to_owned(),
            resource_names_subscribe: vec!["*".to_owned()],
            ..Default::default()
        };
        let served = stream(
            fixture.channel.clone(),
            vec![good],
            1,
            Duration::from_secs(2),
        )
        .await
        .expect("a valid subscription after fuzzed input");
        assert!(served >= 1, "no response to a valid subscription");
    });
});
