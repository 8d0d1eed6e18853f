//! `mesh-control-bench`: how long the control plane takes to load, translate
//! and push a large cluster to many proxies, and how much memory it needs.
//!
//! Generates a synthetic cluster (services, pods spread over nodes, and
//! Istio config documents) as YAML files, starts a real control plane on
//! loopback, connects N real delta ADS clients, and reports as JSON:
//! load+translate time, time until every proxy holds every resource, the
//! control plane's CPU and peak RSS (also as of the proxies' connect), and
//! the simulated proxies' own CPU, which shares the machine's cores. Used by `cargo xtask bench` (scenario
//! `control-plane`).

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use mesh_api::type_url;
use mesh_xds::{ClientConfig, Handler, Rejected, Update};
use tokio::sync::Notify;

/// The simulated proxies allocate as the control plane does (see
/// `mesh-control`'s allocator, tuned by [`mesh_control::alloc::configure`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Control plane scale benchmark")]
struct Args {
    /// Services.
    #[arg(long, default_value_t = 5000)]
    services: usize,
    /// Pods (endpoints), spread evenly over the services.
    #[arg(long, default_value_t = 50_000)]
    pods: usize,
    /// VirtualServices (one per service, up to this many).
    #[arg(long, default_value_t = 2000)]
    virtual_services: usize,
    /// Simulated proxies.
    #[arg(long, default_value_t = 100)]
    proxies: usize,
    /// Nodes the pods are spread over.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
}

/// Counts resources held and signals when the target is reached.
struct Counter {
    held: foldhash::HashSet<String>,
    target: usize,
    done: Arc<AtomicUsize>,
    notify: Arc<Notify>,
    reported: bool,
}

impl Handler for Counter {
    fn apply(&mut self, update: Update) -> Result<(), Rejected> {
        for name in update.removed {
            self.held.remove(&name);
        }
        for resource in update.resources {
            self.held.insert(resource.name);
        }
        if !self.reported && self.held.len() >= self.target {
            self.reported = true;
            self.done.fetch_add(1, Ordering::AcqRel);
            self.notify.notify_one();
        }
        Ok(())
    }
}

fn generate(args: &Args, dir: &std::path::Path) -> std::io::Result<()> {
    let mut text = String::new();
    let mut file_no = 0;
    let mut flush = |text: &mut String, force: bool| -> std::io::Result<()> {
        if force || text.len() > 8 * 1024 * 1024 {
            std::fs::write(dir.join(format!("cluster-{file_no:03}.yaml")), &*text)?;
            file_no += 1;
            text.clear();
        }
        Ok(())
    };
    // Every Service is bound to the namespace's waypoint, so the
    // VirtualServices and DestinationRules are translated into the
    // waypoint's Envoy resources, not only the workload API.
    let _ = writeln!(
        text,
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: bench}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}"
    );
    for s in 0..args.services {
        let _ = writeln!(
            text,
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: sa-{s}, namespace: bench}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: bench}}\nspec: {{clusterIP: 10.{}.{}.{}, selector: {{app: svc-{s}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}",
            96 + s / 65536,
            (s / 256) % 256,
            s % 256
        );
        flush(&mut text, false)?;
    }
    for p in 0..args.pods {
        let s = p % args.services.max(1);
        let _ = writeln!(
            text,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{p}, namespace: bench, labels: {{app: svc-{s}, version: v{}}}}}\nspec: {{nodeName: node{}, serviceAccountName: sa-{s}, containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]}}\nstatus: {{podIP: 10.{}.{}.{}, phase: Running, conditions: [{{type: Ready, status: \"True\"}}]}}",
            1 + (p / args.services.max(1)) % 2,
            p % args.nodes.max(1),
            128 + p / 65536,
            (p / 256) % 256,
            p % 256
        );
        flush(&mut text, false)?;
    }
    for v in 0..args.virtual_services.min(args.services) {
        let _ = writeln!(
            text,
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs-{v}, namespace: bench}}\nspec: {{hosts: [svc-{v}], http: [{{match: [{{headers: {{end-user: {{exact: jason}}}}}}], route: [{{destination: {{host: svc-{v}, subset: v2}}}}]}}, {{route: [{{destination: {{host: svc-{v}, subset: v1}}, weight: 80}}, {{destination: {{host: svc-{v}, subset: v2}}, weight: 20}}]}}]}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr-{v}, namespace: bench}}\nspec: {{host: svc-{v}, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}"
        );
        flush(&mut text, false)?;
    }
    flush(&mut text, true)
}

/// User + system CPU time of process `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of those.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1000 / hz
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mesh_control::alloc::configure();
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("mesh-control-bench-{}", std::process::id()));
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    generate(&args, &config)?;
    let tokens = dir.join("tokens.json");
    let token = "bench-token-0123456789abcdef";
    std::fs::write(
        &tokens,
        format!(r#"{{"tokens": {{"{token}": {{"node": "node0"}}}}}}"#),
    )?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, token)?;

    // The real binary, as its own process, so its memory is measured alone.
    let binary = std::env::current_exe()?.with_file_name("mesh-control");
    let grpc = free_port()?;
    let status = free_port()?;
    let mut child = std::process::Command::new(&binary)
        .arg("--config-dir")
        .arg(&config)
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--tokens-file")
        .arg(&tokens)
        .arg("--grpc-addr")
        .arg(format!("127.0.0.1:{grpc}"))
        .arg("--grpc-tls-addr")
        .arg("127.0.0.1:0")
        .arg("--status-addr")
        .arg(format!("127.0.0.1:{status}"))
        .env("MESH_LOG", "warn")
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {}: {e}", binary.display()))?;
    let outcome = measure(&args, child.id(), grpc, status, &token_file).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", outcome?);
    Ok(())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits for the control plane's first config, connects the proxies, and
/// measures until every one holds everything.
async fn measure(
    args: &Args,
    pid: u32,
    grpc: u16,
    status: u16,
    token_file: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let status_url = format!("http://127.0.0.1:{status}/debug/config_errors");
    let deadline = Instant::now() + Duration::from_secs(300);
    let config = loop {
        if let Ok(config) = get_json(&status_url).await
            && config["version"].as_u64().unwrap_or(0) > 0
        {
            break config;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "control plane not ready in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A rejected resource would make the benchmark measure less than it
    // claims.
    let errors = config["errors"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(
        errors == 0,
        "the generated config has {errors} errors, e.g. {}",
        config["errors"][0]
    );

    let target = args.services + args.pods;
    let done = Arc::new(AtomicUsize::new(0));
    let notify = Arc::new(Notify::new());
    let push_started = Instant::now();
    let cpu_before = cpu_ms(pid);
    let clients_cpu_before = cpu_ms(std::process::id());
    let loaded_peak_kib = peak_rss_kib(pid);
    for i in 0..args.proxies {
        tokio::spawn(mesh_xds::run(
            ClientConfig {
                address: format!("http://127.0.0.1:{grpc}"),
                root_cert: None,
                token_file: Some(token_file.to_owned()),
                node_id: format!("bench~{i}"),
                types: vec![type_url::ADDRESS, type_url::AUTHORIZATION],
                metadata: Vec::new(),
            },
            Counter {
                // Sized for the whole push, as a proxy's own tables are
                // after its first sync.
                held: foldhash::HashSet::with_capacity_and_hasher(target, Default::default()),
                target,
                done: done.clone(),
                notify: notify.clone(),
                reported: false,
            },
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::Acquire) < args.proxies {
        if Instant::now() > deadline {
            anyhow::bail!(
                "only {} of {} proxies synced within 120 s",
                done.load(Ordering::Acquire),
                args.proxies
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), notify.notified()).await;
    }
    let pushed = push_started.elapsed();
    let push_cpu_ms = cpu_ms(pid) - cpu_before;
    // The simulated proxies share the machine with the control plane: what
    // they spend receiving and decoding is not the server's, but it is
    // taken from the same cores.
    let clients_cpu_ms = cpu_ms(std::process::id()) - clients_cpu_before;
    Ok(serde_json::json!({
        "control_plane_push_cpu_ms": push_cpu_ms,
        "proxies_cpu_ms": clients_cpu_ms,
        "services": args.services,
        "pods": args.pods,
        "virtual_services": args.virtual_services,
        "proxies": args.proxies,
        "resources_per_proxy": target,
        "load_ms": config["load_ms"],
        "translate_ms": config["translate_ms"],
        "full_push_ms": pushed.as_millis() as u64,
        "translate_and_push_ms": config["translate_ms"].as_u64().unwrap_or(0) + pushed.as_millis() as u64,
        "control_plane_peak_rss_mib": peak_rss_kib(pid) / 1024,
        "control_plane_peak_rss_before_push_mib": loaded_peak_kib / 1024,
    }))
}

async fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let mut stream = tokio::net::TcpStream::connect(&authority).await?;
    stream
        .write_all(
            format!(
                "GET {} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n",
                uri.path()
            )
            .as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(serde_json::from_str(body)?)
}
