//! iperf3, the reference bulk-transfer tool, as the `iperf3` scenario's
//! load: a one-off server in the server pod, the client in the client pod,
//! its JSON report read back.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::LoadReport;
use crate::{Error, LabState, PodPlan, Result, io_err};

/// Where Debian's package puts it.
pub const BINARY: &str = "/usr/bin/iperf3";
/// The port the one-off server listens on (iperf3's default).
pub const PORT: u16 = 5201;

/// A one-off iperf3 server (`-1`: exits after one test); killed if still
/// running when dropped.
#[derive(Debug)]
pub struct Server(Child);

impl Server {
    /// Starts it in `pod` and waits until it listens.
    pub fn start(state: &LabState, pod: &PodPlan) -> Result<Self> {
        if !std::path::Path::new(BINARY).exists() {
            return Err(Error::Invalid(format!(
                "{BINARY} not found: the iperf3 scenario needs Debian's iperf3 \
                 (`cargo xtask bench` installs it; or `apt-get install iperf3`)"
            )));
        }
        let child = state
            .command_in_pod(pod, BINARY)?
            .args(["-s", "-1", "-p", &PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err(format!(
                "starting iperf3 in {}",
                pod.qualified_name()
            )))?;
        let server = Self(child);
        // Not by connecting: a one-off server takes any connection for its
        // test. `ss` lists the pod's listening sockets instead.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let listing = state
                .command_in_pod(pod, "ss")?
                .args(["-Hltn", &format!("sport = :{PORT}")])
                .output()
                .map_err(io_err(format!("running ss in {}", pod.qualified_name())))?;
            if !listing.stdout.is_empty() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "iperf3 in {} not listening on {PORT} after 5 s",
                    pod.qualified_name()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The client command: one TCP stream to `server` for `seconds`, rounded
/// up to whole seconds (iperf3 takes an integer, and 0 would mean forever),
/// JSON out.
pub fn client(state: &LabState, pod: &PodPlan, server: &PodPlan, seconds: f64) -> Result<Command> {
    let seconds = (seconds.ceil() as u64).max(1).to_string();
    let mut command = state.command_in_pod(pod, BINARY)?;
    command
        .args(["-c", &server.ip.to_string(), "-p", &PORT.to_string()])
        .args(["-t", &seconds, "-J"]);
    Ok(command)
}

/// What the client's JSON report says was received, as a load report.
pub fn parse(stdout: &[u8]) -> Result<LoadReport> {
    let json: serde_json::Value = serde_json::from_slice(stdout)
        .map_err(|e| Error::Invalid(format!("iperf3 printed no JSON report: {e}")))?;
    if let Some(error) = json["error"].as_str() {
        return Err(Error::Invalid(format!("iperf3: {error}")));
    }
    let received = &json["end"]["sum_received"];
    let (Some(bytes), Some(seconds)) = (received["bytes"].as_u64(), received["seconds"].as_f64())
    else {
        return Err(Error::Invalid(format!(
            "iperf3 report has no end.sum_received: {json}"
        )));
    };
    Ok(LoadReport {
        ops: 1,
        bytes,
        seconds,
        ops_per_second: 1.0 / seconds.max(f64::MIN_POSITIVE),
        bytes_per_second: bytes as f64 / seconds.max(f64::MIN_POSITIVE),
        ..LoadReport::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_received_sum_is_the_result() {
        let report = parse(
            br#"{"start": {}, "end": {"sum_sent": {"bytes": 2000, "seconds": 1.0},
                "sum_received": {"bytes": 1048576, "seconds": 0.5}}}"#,
        )
        .unwrap();
        assert_eq!(report.bytes, 1 << 20);
        assert_eq!(report.bytes_per_second, 2.0 * (1 << 20) as f64);
        let err = parse(br#"{"start": {}, "end": {}, "error": "unable to connect to server"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unable to connect"), "{err}");
        assert!(parse(b"not json").is_err());
    }
}
