//! The ingress gateway: bookinfo's `bookinfo-gateway` sample (an Istio
//! `Gateway` selecting `istio: ingressgateway` and the VirtualService bound
//! to it) lets clients outside the mesh reach productpage through the
//! gateway the lab deploys, as Istio's install does; an HTTPS server
//! (`tls.mode: SIMPLE`, certificate from a Secret) terminates TLS for its
//! SNI host, a `MUTUAL` one also requires a client certificate from its CA,
//! `httpsRedirect` sends plaintext clients to HTTPS, and TCP and TLS
//! servers relay bytes to a VirtualService's `tcp` route. A slowloris client is cut off at the head time limit without
//! affecting other requests.

use std::time::Duration;

use mesh_lab::PodPlan;
use mesh_tests::{Lab, bookinfo_manifest};

/// How long config may take to show in traffic.
const SETTLE: Duration = Duration::from_secs(10);

fn eventually(what: &str, check: impl FnMut() -> Result<(), String>) {
    mesh_tests::eventually(what, SETTLE, check);
}
use serde_json::Value;

const GATEWAY_URL: &str = "http://istio-ingressgateway.istio-system";

#[test]
fn bookinfo_gateway_routes_outside_traffic_to_productpage() {
    let gateway_sample =
        mesh_lab::istio_samples_dir().join("bookinfo/networking/bookinfo-gateway.yaml");
    let tls_backend =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/tls-backend.yaml");
    let mut lab = Lab::up(
        "tig",
        vec![bookinfo_manifest(), gateway_sample, tls_backend],
        2,
    );
    lab.enrol_namespace("default");
    lab.state
        .wait_for_waypoints(Duration::from_secs(15))
        .expect("ingress gateway ready");
    let gateway = lab
        .state
        .pod("istio-ingressgateway")
        .expect("the lab deploys Istio's ingress gateway")
        .clone();
    assert_eq!(gateway.namespace, "istio-system");
    // A client outside the mesh: a pod that opted out.
    let outside = lab.opt_out("details");

    // The routed paths reach productpage (which calls details and reviews),
    // over HBONE once the gateway's endpoints say productpage is enrolled
    // (that push may land after the gateway first became ready).
    let url = format!("{GATEWAY_URL}/productpage");
    let over_hbone = |metrics: &str| {
        metrics.lines().any(|l| {
            l.starts_with("istio_requests_total")
                && l.contains("reporter=\"source\"")
                && l.contains("response_code=\"200\"")
                && l.contains("destination_service=\"productpage.default.svc.cluster.local\"")
                // Over HBONE to the enrolled pod, its identity checked.
                && l.contains(
                    "destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"",
                )
        })
    };
    eventually("productpage through the gateway over HBONE", || {
        let (ok, body, text) = lab.get(&outside, &url, &[]);
        if !(ok && body["app"] == "productpage") {
            return Err(text);
        }
        let metrics = lab
            .state
            .waypoint_metrics(&gateway)
            .map_err(|e| e.to_string())?;
        over_hbone(&metrics).then_some(()).ok_or(metrics)
    });
    let (ok, body, text) = lab.get(&outside, &format!("{GATEWAY_URL}/api/v1/products"), &[]);
    assert!(ok && body["app"] == "productpage", "{text}");

    // Paths the VirtualService does not route are 404 at the gateway.
    let (ok, _, text) = lab.get(&outside, &format!("{GATEWAY_URL}/admin"), &[]);
    assert!(!ok && text.contains("404"), "{text}");

    let metrics = lab
        .state
        .waypoint_metrics(&gateway)
        .expect("gateway metrics");
    assert!(
        over_hbone(&metrics),
        "no 200 to productpage over HBONE in\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("response_code=\"404\"")
                && l.contains("response_flags=\"NR\"")),
        "no 404 NR in\n{metrics}"
    );

    https_server(&lab, &outside);
    slowloris(&lab, &outside);
}

/// The waypoint's time limit for a request head (`HEADER_READ_TIMEOUT` in
/// `waypoint/src/proxy.rs`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A client trickling a request head a byte at a time (slowloris) is cut
/// off at the head time limit without an answer, and the gateway serves
/// other requests meanwhile.
fn slowloris(lab: &Lab, client: &PodPlan) {
    let head = format!(
        "GET /productpage HTTP/1.1\r\nhost: bookinfo\r\nx-slow: {}\r\n\r\n",
        "a".repeat(300)
    );
    let slow = lab
        .state
        .app_client(
            client,
            &[
                "tcp",
                "istio-ingressgateway.istio-system:80",
                "--send",
                &head,
                "--trickle-ms",
                "50",
                "--timeout-ms",
                "30000",
            ],
        )
        .expect("client")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lab-app tcp");
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        let (ok, body, text) = lab.get(client, &format!("{GATEWAY_URL}/productpage"), &[]);
        assert!(
            ok && body["app"] == "productpage",
            "served during slowloris: {text}"
        );
    }
    let output = slow.wait_with_output().expect("lab-app tcp");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    let closed_ms: u128 = text
        .strip_prefix("closed after ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no close time in {text}"));
    let limit = HEADER_READ_TIMEOUT.as_millis();
    assert!(
        (limit - 500..limit + 5000).contains(&closed_ms),
        "closed after {closed_ms} ms, expected about {limit}: {text}"
    );
    assert!(
        !text.contains(&format!("sent {0} of {0}", head.len())),
        "{text}"
    );
    assert!(
        !text.contains("200 OK"),
        "a trickled head was answered: {text}"
    );
}

/// An HTTPS server for `bookinfo.example.com` with a certificate from a
/// Secret: the right SNI gets productpage over HTTP/1.1 and HTTP/2 (ALPN),
/// another SNI gets no TLS handshake at all. Its HTTP server on port 80
/// (`httpsRedirect`) redirects plaintext requests for that host, and
/// `secure.example.com` (`MUTUAL`) serves only clients with a certificate
/// from its client CA that names `client.example.com`.
fn https_server(lab: &Lab, client: &PodPlan) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec![
        "bookinfo.example.com".to_owned(),
        "secure.example.com".to_owned(),
        "tls.example.com".to_owned(),
        "pass.example.com".to_owned(),
    ])
    .expect("params")
    .signed_by(&key, &issuer)
    .expect("leaf");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    // A client certificate from the client CA (here the same test CA), and
    // one from a CA the gateway does not trust.
    let client_key = rcgen::KeyPair::generate().expect("key");
    let client_cert = rcgen::CertificateParams::new(vec!["client.example.com".to_owned()])
        .expect("params")
        .signed_by(&client_key, &issuer)
        .expect("client certificate");
    let (client_cert_file, client_key_file) = (
        dir.path().join("client.pem"),
        dir.path().join("client-key.pem"),
    );
    std::fs::write(&client_cert_file, client_cert.pem()).expect("write client cert");
    std::fs::write(&client_key_file, client_key.serialize_pem()).expect("write client key");
    // From the client CA too, but without the name the server requires.
    let intruder_key = rcgen::KeyPair::generate().expect("key");
    let intruder_cert = rcgen::CertificateParams::new(vec!["intruder.example.com".to_owned()])
        .expect("params")
        .signed_by(&intruder_key, &issuer)
        .expect("intruder certificate");
    let (intruder_cert_file, intruder_key_file) = (
        dir.path().join("intruder.pem"),
        dir.path().join("intruder-key.pem"),
    );
    std::fs::write(&intruder_cert_file, intruder_cert.pem()).expect("write intruder cert");
    std::fs::write(&intruder_key_file, intruder_key.serialize_pem()).expect("write intruder key");
    let other_key = rcgen::KeyPair::generate().expect("key");
    let other_cert = rcgen::CertificateParams::new(vec!["client.example.com".to_owned()])
        .expect("params")
        .self_signed(&other_key)
        .expect("untrusted client certificate");
    let (other_cert_file, other_key_file) = (
        dir.path().join("other.pem"),
        dir.path().join("other-key.pem"),
    );
    std::fs::write(&other_cert_file, other_cert.pem()).expect("write other cert");
    std::fs::write(&other_key_file, other_key.serialize_pem()).expect("write other key");

    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("bookinfo-credential".into()),
            namespace: Some("istio-system".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt", leaf.pem()),
                ("tls.key", key.serialize_pem()),
                ("ca.crt", ca.pem()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.into_bytes())))
            .collect(),
        ),
        ..Default::default()
    };
    // The passthrough backend's own copy, in its namespace.
    let mut backend_secret = secret.clone();
    backend_secret.metadata.name = Some("backend-credential".into());
    backend_secret.metadata.namespace = Some("default".into());
    let config = format!(
        "{}---\n{}---\n{}",
        serde_yaml::to_string(&secret).expect("secret yaml"),
        serde_yaml::to_string(&backend_secret).expect("secret yaml"),
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-https, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [bookinfo.example.com]
    tls: {mode: SIMPLE, credentialName: bookinfo-credential}
  - port: {number: 8443, name: https-mutual, protocol: HTTPS}
    hosts: [secure.example.com]
    tls: {mode: MUTUAL, credentialName: bookinfo-credential, subjectAltNames: [client.example.com]}
  - port: {number: 8080, name: http-redirect, protocol: HTTP}
    hosts: [bookinfo.example.com]
    tls: {httpsRedirect: true}
  - port: {number: 8443, name: tls, protocol: TLS}
    hosts: [tls.example.com]
    tls: {mode: SIMPLE, credentialName: bookinfo-credential}
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
  - port: {number: 8443, name: tls-passthrough, protocol: TLS}
    hosts: [pass.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass, namespace: default}
spec:
  hosts: [pass.example.com]
  gateways: [bookinfo-https]
  tls:
  - match: [{sniHosts: [pass.example.com], port: 8443}]
    route: [{destination: {host: tls-backend, port: {number: 443}}}]
---
# The backend behind the passthrough: it terminates TLS itself.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tls-backend, namespace: default}
spec:
  selector: {istio: tls-backend}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [pass.example.com]
    tls: {mode: SIMPLE, credentialName: backend-credential}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tls-backend, namespace: default}
spec:
  hosts: [pass.example.com]
  gateways: [tls-backend]
  http:
  - route: [{destination: {host: productpage, port: {number: 9080}}}]
    headers: {response: {set: {x-terminated-by: tls-backend}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo-tcp, namespace: default}
spec:
  hosts: [tls.example.com]
  gateways: [bookinfo-https]
  tcp:
  - route: [{destination: {host: productpage, port: {number: 9080}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo-https, namespace: default}
spec:
  hosts: [bookinfo.example.com, secure.example.com]
  gateways: [bookinfo-https]
  http:
  - match: [{uri: {exact: /productpage}}]
    route: [{destination: {host: productpage, port: {number: 9080}}}]
"#
    );
    let file = dir.path().join("bookinfo-https.yaml");
    std::fs::write(&file, config).expect("write config");
    mesh_lab::cluster::apply(&lab.state.plan.name, &file).expect("apply");

    let ca = ca_file.to_str().expect("utf-8 path");
    let via_gateway = [
        "--connect-to",
        "istio-ingressgateway.istio-system:443",
        "--ca-file",
        ca,
    ];
    eventually("HTTPS through the gateway", || {
        let (ok, body, text) = lab.get(
            client,
            "https://bookinfo.example.com/productpage",
            &via_gateway,
        );
        (ok && body["app"] == "productpage")
            .then_some(())
            .ok_or(text)
    });
    let mut h2 = via_gateway.to_vec();
    h2.push("--http2");
    let (ok, body, text) = lab.get(client, "https://bookinfo.example.com/productpage", &h2);
    assert!(
        ok && body["app"] == "productpage",
        "HTTP/2 over TLS: {text}"
    );
    // No server for that name: the gateway ends the handshake.
    let (ok, _, text) = lab.get(
        client,
        "https://other.example.com/productpage",
        &via_gateway,
    );
    assert!(!ok && text.contains("TLS"), "{text}");

    // Mutual TLS: a certificate from the client CA is served, none or one
    // from another CA gets no further than the handshake.
    let secure = "https://secure.example.com/productpage";
    let with_cert = |cert: &std::path::Path, key: &std::path::Path| {
        let mut args = via_gateway.to_vec();
        args.extend([
            "--cert-file",
            cert.to_str().expect("utf-8 path"),
            "--key-file",
            key.to_str().expect("utf-8 path"),
        ]);
        lab.get(client, secure, &args)
    };
    let (ok, body, text) = with_cert(&client_cert_file, &client_key_file);
    assert!(
        ok && body["app"] == "productpage",
        "MUTUAL with a client certificate: {text}"
    );
    let (ok, body, text) = lab.get(client, secure, &via_gateway);
    assert!(
        refused_in_handshake(ok, &body, &text),
        "MUTUAL without a client certificate: {text}"
    );
    let (ok, body, text) = with_cert(&other_cert_file, &other_key_file);
    assert!(
        refused_in_handshake(ok, &body, &text),
        "MUTUAL with an untrusted certificate: {text}"
    );
    let (ok, body, text) = with_cert(&intruder_cert_file, &intruder_key_file);
    assert!(
        refused_in_handshake(ok, &body, &text),
        "MUTUAL with a trusted certificate lacking the required SAN: {text}"
    );

    // httpsRedirect: plaintext for that host is sent to https://; other
    // hosts on the port are routed as before.
    let (ok, _, text) = lab.get(
        client,
        "http://bookinfo.example.com/productpage?u=1",
        &["--connect-to", "istio-ingressgateway.istio-system:80"],
    );
    assert!(
        !ok && text.contains("301")
            && text.contains("(location: https://bookinfo.example.com/productpage?u=1)"),
        "{text}"
    );
    let (ok, body, text) = lab.get(client, &format!("{GATEWAY_URL}/productpage"), &[]);
    assert!(ok && body["app"] == "productpage", "{text}");

    // A TCP server: the bytes go to the `tcp` route's destination as they
    // are (here an HTTP/1.0 request, answered and closed by productpage).
    let request = "GET /productpage HTTP/1.0\r\nHost: bookinfo\r\n\r\n";
    let answer = mesh_lab::probe::tcp(
        &lab.state,
        client,
        "istio-ingressgateway.istio-system:31400",
        &["--send", request, "--trickle-ms", "1"],
    )
    .expect("a TCP exchange through the gateway");
    assert!(
        answer.contains("HTTP/1.0 200") && answer.contains("\"app\":\"productpage\""),
        "{answer}"
    );
    // A TLS server: TLS ends at the gateway, the plaintext inside goes to
    // the `tcp` route (here the client's HTTP/1.1, answered by productpage).
    let (ok, body, text) = lab.get(client, "https://tls.example.com/productpage", &via_gateway);
    assert!(ok && body["app"] == "productpage", "TLS server: {text}");

    // TLS passthrough: the gateway routes by SNI without terminating; the
    // backend's own TLS (its response header shows) reaches productpage.
    mesh_tests::eventually("passthrough backend ready", SETTLE, || {
        let (ok, body, text) = lab.get(
            client,
            "https://pass.example.com/productpage",
            &[&via_gateway[..], &["--show-headers"]].concat(),
        );
        (ok && body["app"] == "productpage" && text.contains("x-terminated-by: tls-backend"))
            .then_some(())
            .ok_or(text)
    });
}

/// Whether `lab-app get` failed at the connection, with no answer: with
/// TLS 1.3 a client learns of a refused certificate from the server's alert
/// after its handshake, as the alert itself or as the connection closing.
fn refused_in_handshake(ok: bool, body: &Value, text: &str) -> bool {
    !ok && body.is_null() && text.starts_with("error: ")
}
