//! The HTTP server: HTTP/1.1 and prior-knowledge HTTP/2 on one port, answering
//! every request with JSON that says who answered, who called, and what any
//! downstream calls returned.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Version,
    header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE},
};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use serde::Serialize;
use serde_json::Value;
use tokio::{io::AsyncWriteExt, net::TcpListener};
use tracing::{debug, info, warn};

use super::{CallRoute, Identity};
use crate::{
    client::{Target, error_chain, get_once},
    resolve::Resolver,
};

/// The time limit of each downstream call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `?delay_ms=` honoured.
pub const MAX_DELAY: Duration = Duration::from_secs(30);

/// What every HTTP connection shares.
#[derive(Debug)]
pub struct App {
    identity: Identity,
    routes: HashMap<String, Vec<String>>,
    resolver: Resolver,
}

impl App {
    /// The app for `identity`, fanning out on `calls`, resolving with `resolver`.
    pub fn new(identity: Identity, calls: Vec<CallRoute>, resolver: Resolver) -> Self {
        let mut routes: HashMap<String, Vec<String>> = HashMap::new();
        for call in calls {
            routes.entry(call.path).or_default().extend(call.urls);
        }
        Self {
            identity,
            routes,
            resolver,
        }
    }
}

/// Both ends of an accepted connection.
#[derive(Clone, Copy, Debug)]
struct Peers {
    caller: SocketAddr,
    local: SocketAddr,
}

/// Accepts connections on `listener` forever, serving each on its own task.
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Lets hyper enforce its default timeout for reading request heads.
    builder.http1().timer(TokioTimer::new());
    let grpc = crate::grpc::server(&app.identity.pod);
    loop {
        let (stream, caller) = super::accept(&listener).await;
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(err) => {
                warn!(%caller, error = %err, "connection without a local address");
                continue;
            }
        };
        let peers = Peers { caller, local };
        let app = Arc::clone(&app);
        let builder = builder.clone();
        let grpc = grpc.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let app = Arc::clone(&app);
                let mut grpc = grpc.clone();
                async move {
                    if is_grpc(request.headers()) {
                        use tonic::codegen::Service;
                        let response = match grpc.call(request).await {
                            Ok(response) => response,
                            Err(never) => match never {},
                        };
                        return Ok(
                            response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
                        );
                    }
                    handle(app, peers, request)
                        .await
                        .map(|r| r.map(|b| b.map_err(|never| match never {}).boxed_unsync()))
                }
            });
            if let Err(err) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                debug!(%caller, %local, error = %err, "HTTP connection ended with an error");
            }
        });
    }
}

/// The error of a response body of either server (the JSON app or gRPC).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether a request is a gRPC call.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The largest `/bytes/N` body served.
pub const MAX_BYTES: usize = 1 << 20;

/// A static body `/bytes/N` slices from, so the benchmark's server does no
/// work per request beyond HTTP itself.
static FILLER: [u8; MAX_BYTES] = [b'x'; MAX_BYTES];

/// `?reset=1`: the request is dropped unanswered. Returned to hyper as the
/// service's error, which closes an HTTP/1.1 connection without a response
/// and resets an HTTP/2 stream.
#[derive(Debug, thiserror::Error)]
#[error("closing the connection without an answer, as the request's ?reset=1 asks")]
pub struct ResetRequested;

/// Answers one request and logs it (but `/bytes/N`, the benchmarks' target,
/// which is answered without a log line or JSON, as cheaply as possible).
async fn handle(
    app: Arc<App>,
    peers: Peers,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ResetRequested> {
    if let Some(size) = request.uri().path().strip_prefix("/bytes/") {
        return Ok(bytes_body(size));
    }
    let started = Instant::now();
    let method = request.method().clone();
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path().to_owned(), ToString::to_string);
    let protocol = protocol(request.version());
    let reset = Shaping::from_query(request.uri().query()).is_ok_and(|s| s.reset);
    if reset && !app.routes.contains_key(request.uri().path()) {
        info!(
            caller = %peers.caller,
            local = %peers.local,
            protocol,
            %method,
            %target,
            "request reset without an answer"
        );
        return Err(ResetRequested);
    }
    let response = respond(app, peers, request).await;
    info!(
        caller = %peers.caller,
        local = %peers.local,
        protocol,
        %method,
        %target,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    Ok(response)
}

async fn respond(
    app: Arc<App>,
    peers: Peers,
    mut request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    if let Some(protocol) = upgrade_protocol(&request) {
        return switch_protocols(&app, protocol, hyper::upgrade::on(&mut request));
    }
    let mut reply = Reply::new(&app.identity, peers, &request);
    let status = if let Some(urls) = app.routes.get(path) {
        reply.calls = call_all(&app, urls.clone(), propagated(request.headers())).await;
        calls_status(&reply.calls)
    } else if let Some(rest) = path.strip_prefix("/call/") {
        let mut url = format!("http://{rest}");
        if let Some(query) = request.uri().query() {
            url.push('?');
            url.push_str(query);
        }
        reply.calls = call_all(&app, vec![url], propagated(request.headers())).await;
        calls_status(&reply.calls)
    } else {
        match Shaping::from_query(request.uri().query()) {
            Ok(shaping) => {
                if !shaping.delay.is_zero() {
                    // Logged on arrival: a caller may give up before the answer.
                    info!(
                        caller = %peers.caller,
                        target = %request.uri(),
                        delay_ms = shaping.delay.as_millis() as u64,
                        "delaying the answer"
                    );
                    tokio::time::sleep(shaping.delay).await;
                }
                shaping.status
            }
            Err(error) => {
                reply.error = Some(error);
                StatusCode::BAD_REQUEST
            }
        }
    };
    json(status, &reply)
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection:
/// upgrade` and `Upgrade: <protocol>`).
fn upgrade_protocol(request: &Request<Incoming>) -> Option<HeaderValue> {
    let wants = request
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    (request.version() == Version::HTTP_11 && wants)
        .then(|| request.headers().get(UPGRADE).cloned())
        .flatten()
}

/// Answers an upgrade with 101, then on the switched connection writes a
/// line naming the pod and echoes what arrives until the client
/// half-closes.
fn switch_protocols(
    app: &App,
    protocol: HeaderValue,
    upgrade: hyper::upgrade::OnUpgrade,
) -> Response<Full<Bytes>> {
    let banner = format!("{}-{}\n", app.identity.app, app.identity.version);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let mut io = TokioIo::new(upgraded);
                let echoed = async {
                    io.write_all(banner.as_bytes()).await?;
                    let (mut reader, mut writer) = tokio::io::split(io);
                    tokio::io::copy(&mut reader, &mut writer).await?;
                    writer.shutdown().await
                };
                if let Err(err) = echoed.await {
                    debug!(error = %err, "upgraded connection ended with an error");
                }
            }
            Err(err) => debug!(error = %err, "upgrade failed"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    response.headers_mut().insert(UPGRADE, protocol);
    response
}

/// `HTTP/1.1` or `HTTP/2`, as reported in answers.
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The body of every answer.
#[derive(Debug, Serialize)]
struct Reply<'a> {
    #[serde(flatten)]
    identity: &'a Identity,
    caller: String,
    local: String,
    protocol: &'static str,
    method: &'a str,
    path: &'a str,
    host: Option<&'a str>,
    headers: BTreeMap<String, String>,
    calls: Vec<Call>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl<'a> Reply<'a> {
    fn new(identity: &'a Identity, peers: Peers, request: &'a Request<Incoming>) -> Self {
        // HTTP/1.1 names the host in `Host`; HTTP/2 in `:authority`, which hyper puts in the URI.
        let host = request
            .headers()
            .get(HOST)
            .and_then(|value| value.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        Self {
            identity,
            caller: peers.caller.to_string(),
            local: peers.local.to_string(),
            protocol: protocol(request.version()),
            method: request.method().as_str(),
            path: request.uri().path(),
            host,
            headers: reported(request.headers()),
            calls: Vec::new(),
            error: None,
        }
    }
}

/// Whether a request header is echoed in the answer.
fn is_reported(name: &str) -> bool {
    is_propagated(name) || name == "forwarded"
}

/// Whether a request header is passed on to downstream calls: tracing and
/// routing context, including bookinfo's `end-user`.
fn is_propagated(name: &str) -> bool {
    name.starts_with("x-") || matches!(name, "traceparent" | "baggage" | "end-user")
}

/// The reported headers, repeated values joined with `, `.
fn reported(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in headers.keys().filter(|name| is_reported(name.as_str())) {
        let values: Vec<_> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()))
            .collect();
        out.insert(name.as_str().to_owned(), values.join(", "));
    }
    out
}

fn propagated(headers: &HeaderMap) -> HeaderMap {
    headers
        .iter()
        .filter(|(name, _)| is_propagated(name.as_str()))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// The outcome of one downstream call.
#[derive(Debug, Serialize)]
struct Call {
    url: String,
    #[serde(flatten)]
    outcome: Outcome,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Outcome {
    Answered { status: u16, body: Value },
    Failed { error: String },
}

impl Call {
    fn succeeded(&self) -> bool {
        matches!(self.outcome, Outcome::Answered { status, .. } if (200..300).contains(&status))
    }
}

/// 200 if every call answered 2xx, else 502.
fn calls_status(calls: &[Call]) -> StatusCode {
    if calls.iter().all(Call::succeeded) {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    }
}

/// GETs every URL concurrently, each over its own connection; results keep
/// the order of `urls`.
async fn call_all(app: &Arc<App>, urls: Vec<String>, headers: HeaderMap) -> Vec<Call> {
    let headers = Arc::new(headers);
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let app = Arc::clone(app);
            let headers = Arc::clone(&headers);
            let task_url = url.clone();
            let task = tokio::spawn(async move { call(&app.resolver, &task_url, &headers).await });
            (url, task)
        })
        .collect();
    let mut calls = Vec::with_capacity(tasks.len());
    for (url, task) in tasks {
        calls.push(task.await.unwrap_or_else(|err| Call {
            url,
            outcome: Outcome::Failed {
                error: format!("call task failed: {err}"),
            },
        }));
    }
    calls
}

async fn call(resolver: &Resolver, url: &str, headers: &HeaderMap) -> Call {
    let result = match Target::parse(url) {
        Ok(target) => get_once(resolver, &target, headers, CALL_TIMEOUT).await,
        Err(err) => Err(err),
    };
    let outcome = match result {
        Ok(response) => Outcome::Answered {
            status: response.status().as_u16(),
            body: serde_json::from_slice(response.body()).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(response.body()).into_owned())
            }),
        },
        Err(err) => {
            let error = error_chain(&err);
            debug!(url, error, "call failed");
            Outcome::Failed { error }
        }
    };
    Call {
        url: url.to_owned(),
        outcome,
    }
}

/// `GET /bytes/N`: N bytes of filler (at most [`MAX_BYTES`]).
fn bytes_body(size: &str) -> Response<Full<Bytes>> {
    match size.parse::<usize>() {
        Ok(size) if size <= MAX_BYTES => response(
            StatusCode::OK,
            "application/octet-stream",
            Bytes::from_static(&FILLER[..size]),
        ),
        _ => text(
            StatusCode::BAD_REQUEST,
            &format!("/bytes/N needs N in 0..={MAX_BYTES}\n"),
        ),
    }
}

/// `?status=NNN&delay_ms=N&reset=1` on a plain path.
#[derive(Debug, PartialEq, Eq)]
struct Shaping {
    status: StatusCode,
    delay: Duration,
    /// Drop the request without answering it.
    reset: bool,
}

impl Shaping {
    fn from_query(query: Option<&str>) -> Result<Self, String> {
        let mut shaping = Self {
            status: StatusCode::OK,
            delay: Duration::ZERO,
            reset: false,
        };
        let pairs = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|pair| pair.split_once('='));
        for (key, value) in pairs {
            match key {
                "status" => {
                    shaping.status = value
                        .parse::<u16>()
                        .ok()
                        .filter(|code| (200..=599).contains(code))
                        .and_then(|code| StatusCode::from_u16(code).ok())
                        .ok_or_else(|| format!("status={value}: expected a code in 200..=599"))?;
                }
                "delay_ms" => {
                    let ms: u64 = value
                        .parse()
                        .map_err(|_| format!("delay_ms={value}: expected milliseconds"))?;
                    shaping.delay = Duration::from_millis(ms).min(MAX_DELAY);
                }
                "reset" => shaping.reset = value == "1" || value == "true",
                _ => {}
            }
        }
        Ok(shaping)
    }
}

fn json(status: StatusCode, reply: &Reply<'_>) -> Response<Full<Bytes>> {
    match serde_json::to_vec(reply) {
        Ok(body) => response(status, "application/json", body.into()),
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the answer: {err}"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(
        status,
        "text/plain",
        Bytes::copy_from_slice(body.as_bytes()),
    )
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shaping_reads_status_and_delay() {
        assert_eq!(
            Shaping::from_query(None),
            Ok(Shaping {
                status: StatusCode::OK,
                delay: Duration::ZERO,
                reset: false,
            })
        );
        assert_eq!(
            Shaping::from_query(Some("a=b&status=503&delay_ms=40&flag")),
            Ok(Shaping {
                status: StatusCode::SERVICE_UNAVAILABLE,
                delay: Duration::from_millis(40),
                reset: false,
            })
        );
        assert_eq!(
            Shaping::from_query(Some("reset=1")).map(|s| s.reset),
            Ok(true)
        );
        assert_eq!(
            Shaping::from_query(Some("delay_ms=999999999")).map(|s| s.delay),
            Ok(MAX_DELAY)
        );
        for bad in [
            "status=abc",
            "status=99",
            "status=600",
            "delay_ms=-1",
            "delay_ms=x",
        ] {
            assert!(Shaping::from_query(Some(bad)).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn headers_reported_and_propagated() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-request-id", "1"),
            ("x-b3-traceid", "2"),
            ("traceparent", "00-abc-def-01"),
            ("baggage", "k=v"),
            ("forwarded", "for=10.0.0.1"),
            ("end-user", "jason"),
            ("accept", "*/*"),
            ("cookie", "secret"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        headers.append("x-request-id", HeaderValue::from_static("3"));

        let shown = reported(&headers);
        assert_eq!(shown.get("x-request-id").map(String::as_str), Some("1, 3"));
        assert_eq!(
            shown.get("forwarded").map(String::as_str),
            Some("for=10.0.0.1")
        );
        assert!(!shown.contains_key("accept") && !shown.contains_key("cookie"));
        assert_eq!(shown.len(), 6);

        let passed = propagated(&headers);
        assert_eq!(passed.get_all("x-request-id").iter().count(), 2);
        assert!(passed.contains_key("end-user") && passed.contains_key("traceparent"));
        assert!(!passed.contains_key("forwarded") && !passed.contains_key("cookie"));
    }

    #[test]
    fn call_status_needs_every_call_2xx() {
        let ok = |status| Call {
            url: "u".into(),
            outcome: Outcome::Answered {
                status,
                body: Value::Null,
            },
        };
        let failed = Call {
            url: "u".into(),
            outcome: Outcome::Failed { error: "e".into() },
        };
        assert_eq!(calls_status(&[ok(200), ok(204)]), StatusCode::OK);
        assert_eq!(calls_status(&[ok(200), ok(503)]), StatusCode::BAD_GATEWAY);
        assert_eq!(calls_status(&[ok(200), failed]), StatusCode::BAD_GATEWAY);
    }
}
