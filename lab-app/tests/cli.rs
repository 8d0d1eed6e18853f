//! End-to-end tests of the `lab-app` binary on loopback: `serve` in a child
//! process, driven by `get`, `tcp` and raw sockets.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lab-app");

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// A `lab-app serve` child, killed when dropped.
struct Server {
    child: Child,
    /// The server's stderr, shown when it fails to start.
    log: PathBuf,
    pod: String,
    http: u16,
    echo: u16,
    banner: u16,
}

impl Server {
    fn start(pod: &str, extra: &[&str]) -> Self {
        let (http, echo, banner) = (free_port(), free_port(), free_port());
        let log = std::env::temp_dir().join(format!("lab-app-{}-{pod}.log", std::process::id()));
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .args(["--pod", pod, "--namespace", "test-ns", "--app"])
            .arg(format!("app-of-{pod}"))
            .args(["--version", "v7", "--node", "node-1", "--service-account"])
            .arg(format!("sa-{pod}"))
            .args(["--http", &http.to_string(), "--echo", &echo.to_string()])
            .args(["--banner", &banner.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"));
        let child = command.spawn().expect("spawn lab-app serve");
        let mut server = Self {
            child,
            log,
            pod: pod.to_owned(),
            http,
            echo,
            banner,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [self.http, self.echo, self.banner] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                    panic!("lab-app serve exited early ({status}):\n{log}");
                }
                assert!(Instant::now() < deadline, "port {port} never opened");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn lab_app(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run lab-app")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The JSON bodies `lab-app get` printed, one per line.
fn bodies(output: &Output) -> Vec<Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect()
}

/// `lab-app get args...`, which must succeed; its bodies.
fn get(args: &[&str]) -> Vec<Value> {
    let output = lab_app(&[&["get"], args].concat());
    assert!(
        output.status.success(),
        "get {args:?} failed: {}",
        stderr(&output)
    );
    bodies(&output)
}

fn field<'a>(body: &'a Value, name: &str) -> &'a str {
    body[name]
        .as_str()
        .unwrap_or_else(|| panic!("no string {name} in {body}"))
}

fn assert_identity(body: &Value, server: &Server) {
    assert_eq!(field(body, "pod"), server.pod);
    assert_eq!(field(body, "namespace"), "test-ns");
    assert_eq!(field(body, "app"), format!("app-of-{}", server.pod));
    assert_eq!(field(body, "version"), "v7");
    assert_eq!(field(body, "node"), "node-1");
    assert_eq!(field(body, "service_account"), format!("sa-{}", server.pod));
}

#[test]
fn http1_and_http2_answer_with_identity_and_protocol() {
    let server = Server::start("web-0", &[]);
    let url = server.url("/some/path?q=1");
    let authority = format!("127.0.0.1:{}", server.http);

    let h1 = get(&[
        &url,
        "--count",
        "3",
        "--header",
        "x-request-id: abc",
        "--header",
        "end-user:jason",
        "--header",
        "accept-language:en",
    ]);
    assert_eq!(h1.len(), 3);
    for body in &h1 {
        assert_identity(body, &server);
        assert_eq!(field(body, "protocol"), "HTTP/1.1");
        assert_eq!(field(body, "method"), "GET");
        assert_eq!(field(body, "path"), "/some/path");
        assert_eq!(field(body, "host"), authority);
        assert_eq!(field(body, "local"), authority);
        assert!(field(body, "caller").starts_with("127.0.0.1:"), "{body}");
        assert_eq!(body["headers"]["x-request-id"], "abc");
        assert_eq!(body["headers"]["end-user"], "jason");
        assert!(body["headers"].get("accept-language").is_none(), "{body}");
        assert_eq!(body["calls"], Value::Array(Vec::new()));
    }
    // Keep-alive: all three came over one connection, from one source port.
    assert!(h1.iter().all(|b| b["caller"] == h1[0]["caller"]), "{h1:?}");

    let h2 = get(&[&url, "--http2", "--count", "2"]);
    assert_eq!(h2.len(), 2);
    for body in &h2 {
        assert_identity(body, &server);
        assert_eq!(field(body, "protocol"), "HTTP/2");
        assert_eq!(field(body, "host"), authority);
        assert_eq!(field(body, "path"), "/some/path");
    }
    assert_eq!(h2[0]["caller"], h2[1]["caller"]);

    let health = lab_app(&["get", &server.url("/healthz")]);
    assert!(health.status.success());
    assert_eq!(stdout(&health), "ok\n");
}

#[test]
fn upgrade_switches_protocols_then_echoes() {
    let server = Server::start("ws-0", &[]);
    let out = lab_app(&["upgrade", &server.url("/ws"), "--send", "ping pong"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app-of-ws-0-v7\nping pong");
}

#[test]
fn call_hop_returns_the_callee_answer() {
    let callee = Server::start("callee-0", &[]);
    let caller = Server::start("caller-0", &[]);

    let url = caller.url(&format!("/call/127.0.0.1:{}/x/y?k=v", callee.http));
    let answers = get(&[&url, "--header", "x-trace:t1", "--header", "end-user:jason"]);
    let answer = &answers[0];
    assert_identity(answer, &caller);
    let calls = answer["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1, "{answer}");
    assert_eq!(
        field(&calls[0], "url"),
        format!("http://127.0.0.1:{}/x/y?k=v", callee.http)
    );
    assert_eq!(calls[0]["status"], 200);
    let nested = &calls[0]["body"];
    assert_identity(nested, &callee);
    assert_eq!(field(nested, "path"), "/x/y");
    assert_eq!(field(nested, "protocol"), "HTTP/1.1");
    // Routing and tracing headers travel with the hop.
    assert_eq!(nested["headers"]["x-trace"], "t1");
    assert_eq!(nested["headers"]["end-user"], "jason");

    // A hop to nothing answers 502 with the error, and `get` exits 1.
    let dead = free_port();
    let output = lab_app(&["get", &caller.url(&format!("/call/127.0.0.1:{dead}/"))]);
    assert_eq!(output.status.code(), Some(1));
    let answer = &bodies(&output)[0];
    let error = field(&answer["calls"][0], "error");
    assert!(
        error.starts_with(&format!("connect 127.0.0.1:{dead}")),
        "{error}"
    );
    assert!(stderr(&output).contains("502"), "{}", stderr(&output));
}

#[test]
fn call_path_fans_out_through_the_hosts_file() {
    let details = Server::start("details-0", &[]);
    let reviews = Server::start("reviews-0", &[]);
    let hosts = temp_file(
        "fanout-hosts",
        "# lab services\n127.0.0.1 details.test-ns.svc.cluster.local details.test-ns\n",
    );
    let route = format!(
        "/productpage=http://details:{}/details/0,http://127.0.0.1:{}/reviews/0",
        details.http, reviews.http
    );
    let page = Server::start(
        "productpage-0",
        &["--hosts", path_str(&hosts), "--call", &route],
    );

    let answer = &get(&[&page.url("/productpage")])[0];
    let calls = answer["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 2, "{answer}");
    assert_eq!(calls[0]["status"], 200);
    assert_identity(&calls[0]["body"], &details);
    assert_eq!(field(&calls[0]["body"], "path"), "/details/0");
    assert_eq!(
        field(&calls[0]["body"], "host"),
        format!("details:{}", details.http)
    );
    assert_identity(&calls[1]["body"], &reviews);
    assert_eq!(field(&calls[1]["body"], "path"), "/reviews/0");

    // Only the exact path fans out.
    assert_eq!(
        get(&[&page.url("/productpage/x")])[0]["calls"],
        Value::Array(Vec::new())
    );

    // The client resolves short names the same way.
    let url = format!("http://details:{}/", details.http);
    let direct = get(&[&url, "--hosts", path_str(&hosts), "--namespace", "test-ns"]);
    assert_identity(&direct[0], &details);
    let _ = std::fs::remove_file(hosts);
}

#[test]
fn status_and_delay_shape_replies() {
    let server = Server::start("faulty-0", &[]);

    let output = lab_app(&["get", &server.url("/fault?status=503")]);
    assert_eq!(output.status.code(), Some(1));
    assert_identity(&bodies(&output)[0], &server);
    assert!(stderr(&output).contains("503"), "{}", stderr(&output));

    let started = Instant::now();
    let answer = &get(&[&server.url("/slow?delay_ms=300")])[0];
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(field(answer, "path"), "/slow");

    let output = lab_app(&[
        "get",
        &server.url("/slow?delay_ms=2000"),
        "--timeout-ms",
        "200",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("timed out"), "{}", stderr(&output));
}

#[test]
fn echo_finishes_after_half_close() {
    let server = Server::start("echo-0", &[]);

    let mut stream = TcpStream::connect(("127.0.0.1", server.echo)).expect("connect echo");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(b"hello mesh\nand more").expect("write");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).expect("read to EOF");
    assert_eq!(echoed, b"hello mesh\nand more");

    let addr = format!("127.0.0.1:{}", server.echo);
    let output = lab_app(&["tcp", &addr, "--send", "hello mesh"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "hello mesh");

    let output = lab_app(&["tcp", &addr, "--bytes", "1048576"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "ok 1048576\n");
}

#[test]
fn banner_arrives_before_the_client_sends() {
    let server = Server::start("db-0", &[]);

    let stream = TcpStream::connect(("127.0.0.1", server.banner)).expect("connect banner");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut banner = String::new();
    reader
        .read_line(&mut banner)
        .expect("banner before sending anything");
    assert_eq!(banner, "LAB-BANNER db-0\r\n");
    // Then it echoes.
    let mut writer = stream;
    writer.write_all(b"select 1").expect("write");
    writer.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("echo");
    assert_eq!(rest, "select 1");

    let addr = format!("127.0.0.1:{}", server.banner);
    let output = lab_app(&["tcp", &addr, "--expect-banner", "--send", "hi"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "LAB-BANNER db-0\nhi");

    // Expecting a banner from a server that sends none times out.
    let addr = format!("127.0.0.1:{}", server.echo);
    let output = lab_app(&["tcp", &addr, "--expect-banner", "--timeout-ms", "300"]);
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn clients_exit_1_on_refused_connections() {
    let port = free_port();
    let output = lab_app(&["get", &format!("http://127.0.0.1:{port}/")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let message = stderr(&output);
    assert!(
        message.contains(&format!("connect 127.0.0.1:{port}")),
        "{message}"
    );

    let output = lab_app(&["tcp", &format!("127.0.0.1:{port}"), "--send", "x"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains(&format!("connect 127.0.0.1:{port}")));
}

#[test]
fn serve_exits_0_on_sigterm() {
    let mut server = Server::start("term-0", &[]);
    let pid = server.child.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("lab-app-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).expect("write temp file");
    path
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}
