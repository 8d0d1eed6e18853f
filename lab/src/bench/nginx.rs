//! nginx as an L7 reverse proxy in a lab pod: the well-known baseline the
//! waypoint is compared with on the same path (client → proxy → server).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
};

use crate::{Error, LabState, PodPlan, Result, io_err};

/// Where Debian's package puts it.
pub const BINARY: &str = "/usr/sbin/nginx";

/// A running nginx; stopped when dropped.
#[derive(Debug)]
pub struct Nginx {
    master: Child,
}

impl Nginx {
    /// Starts nginx in `pod`, listening on `port` and proxying every request
    /// over HTTP/1.1 keep-alive to `upstream:port`. Its configuration, logs
    /// and temporary files live in `dir`.
    ///
    /// Configured as a production reverse proxy would be: one worker per
    /// core, pooled upstream connections, an access log line per request
    /// (the waypoint writes one too).
    pub fn start(
        state: &LabState,
        pod: &PodPlan,
        port: u16,
        upstream: Ipv4Addr,
        dir: &Path,
    ) -> Result<Self> {
        if !Path::new(BINARY).exists() {
            return Err(Error::Invalid(format!(
                "{BINARY} not found: the nginx variant needs Debian's nginx \
                 (`cargo xtask bench` installs it; or `apt-get install nginx-light`)"
            )));
        }
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir, port, upstream))
            .map_err(io_err(format!("writing {}", conf.display())))?;
        let master = state
            .command_in_pod(pod, BINARY)?
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err(format!(
                "starting nginx in {}",
                pod.qualified_name()
            )))?;
        Ok(Self { master })
    }

    /// The master's PID (its workers are its children).
    pub fn pid(&self) -> u32 {
        self.master.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown of the master and its workers.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.master.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.master.wait();
    }
}

fn config(dir: &Path, port: u16, upstream: Ipv4Addr) -> String {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    format!(
        r#"daemon off;
master_process on;
worker_processes auto;
pid {pid};
error_log {error_log} warn;
events {{ worker_connections 16384; }}
http {{
    access_log {access_log};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{
        server {upstream}:{port};
        keepalive 64;
    }}
    server {{
        listen {port} reuseport;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        pid = path("nginx.pid").display(),
        error_log = path("error.log").display(),
        access_log = path("access.log").display(),
        tmp = dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_proxies_with_pooled_upstreams() {
        let text = config(Path::new("/run/x"), 8080, Ipv4Addr::new(10, 244, 1, 11));
        assert!(text.contains("server 10.244.1.11:8080;"), "{text}");
        assert!(text.contains("listen 8080 reuseport;"), "{text}");
        assert!(text.contains("proxy_http_version 1.1;"), "{text}");
        assert!(text.contains("access_log /run/x/access.log;"), "{text}");
    }
}
