//! Sending traffic from a pod with the stand-in app's client modes, and
//! reading what answered. Used by the demo and the end-to-end tests.

use std::process::Output;

use serde_json::Value;

use crate::{Error, LabState, PodPlan, Result, io_err};

/// One answer of the stand-in app's HTTP server.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The whole JSON body.
    pub body: Value,
}

impl Answer {
    /// A string field of the body (`pod`, `version`, `node`, `caller`, `protocol`...).
    pub fn field(&self, name: &str) -> &str {
        self.body
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The answers of the downstream calls the app made, in order.
    pub fn calls(&self) -> Vec<Answer> {
        self.body
            .get("calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|call| call.get("body").cloned())
            .map(|body| Answer { body })
            .collect()
    }
}

/// `GET url` from `from` (`lab-app get url extra...`); one [`Answer`] per response.
pub fn http_get(
    state: &LabState,
    from: &PodPlan,
    url: &str,
    extra: &[&str],
) -> Result<Vec<Answer>> {
    let mut args = vec!["get", url];
    args.extend_from_slice(extra);
    let output = run(state, from, &args)?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .map(|body| Answer { body })
                .map_err(|err| {
                    Error::Invalid(format!(
                        "answer to GET {url} from {} is not JSON ({err}): {line}",
                        from.name
                    ))
                })
        })
        .collect()
}

/// A raw TCP exchange from `from` (`lab-app tcp addr extra...`); returns stdout.
pub fn tcp(state: &LabState, from: &PodPlan, addr: &str, extra: &[&str]) -> Result<String> {
    let mut args = vec!["tcp", addr];
    args.extend_from_slice(extra);
    Ok(String::from_utf8_lossy(&run(state, from, &args)?.stdout).into_owned())
}

fn run(state: &LabState, from: &PodPlan, args: &[&str]) -> Result<Output> {
    let output = state
        .app_client(from, args)?
        .output()
        .map_err(io_err(format!(
            "running lab-app {} in pod {}",
            args.join(" "),
            from.name
        )))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::App {
            pod: from.qualified_name(),
            message: format!(
                "lab-app {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            log: "stderr above".into(),
        })
    }
}
