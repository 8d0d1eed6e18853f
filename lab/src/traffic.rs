//! `mesh-lab traffic`: the demo's real traffic and its summary.

use anyhow::bail;
use mesh_lab::{LabState, PodPlan, probe};

/// Sends every probe and prints a table; fails if anything did not answer.
pub fn run(state: &LabState) -> anyhow::Result<()> {
    let plan = &state.plan;
    let Some(client) = plan
        .pods
        .iter()
        .find(|p| p.app() == "productpage")
        .or(plan.pods.first())
    else {
        bail!("the lab has no pods");
    };
    let mut failures = 0;
    println!(
        "\nFrom {} ({}, {}):",
        client.name, client.ip, plan.nodes[client.node].name
    );
    println!(
        "{:<44} {:<20} {:<8} {:<6} RESULT",
        "TARGET", "ANSWERED BY", "VERSION", "NODE"
    );
    let mut report = |target: String,
                      result: Result<Vec<probe::Answer>, mesh_lab::Error>,
                      expect: &dyn Fn(&probe::Answer) -> bool| {
        match result {
            Ok(answers) if answers.first().is_some_and(expect) => {
                let a = &answers[0];
                println!(
                    "{target:<44} {:<20} {:<8} {:<6} ok ({})",
                    a.field("pod"),
                    a.field("version"),
                    a.field("node"),
                    a.field("protocol")
                );
            }
            Ok(answers) => {
                failures += 1;
                println!(
                    "{target:<44} unexpected answer: {:?}",
                    answers.first().map(|a| &a.body)
                );
            }
            Err(err) => {
                failures += 1;
                println!("{target:<44} FAILED: {err}");
            }
        }
    };
    // Waypoints are the mesh's own proxies, not apps: they are not probed.
    for pod in plan.pods.iter().filter(|p| p.waypoint().is_none()) {
        for (port, protocol) in &pod.ports {
            if *protocol == mesh_lab::PortProtocol::Http {
                let url = format!("http://{}:{port}/", pod.ip);
                report(
                    format!("pod {} {url}", pod.name),
                    probe::http_get(state, client, &url, &[]),
                    &|a| a.field("pod") == pod.name,
                );
            }
        }
    }
    for svc in &plan.services {
        for port in &svc.ports {
            let backends: Vec<&PodPlan> = plan
                .pods
                .iter()
                .filter(|p| port.endpoints.iter().any(|e| *e.ip() == p.ip))
                .collect();
            if backends.iter().any(|p| p.waypoint().is_some()) {
                continue;
            }
            for host in [svc.vip.to_string(), svc.name.clone()] {
                let url = format!("http://{host}:{}/", port.port);
                report(
                    format!("svc {url}"),
                    probe::http_get(state, client, &url, &[]),
                    &|a| backends.iter().any(|p| p.name == a.field("pod")),
                );
            }
        }
    }
    if plan.services.iter().any(|s| s.name == "productpage") {
        println!("\nbookinfo call graph (GET http://productpage:9080/productpage):");
        match probe::http_get(state, client, "http://productpage:9080/productpage", &[]) {
            Ok(answers) => {
                for answer in &answers {
                    print_tree(answer, 1);
                }
            }
            Err(err) => {
                failures += 1;
                println!("  FAILED: {err}");
            }
        }
    }
    println!();
    if failures > 0 {
        bail!("{failures} probe(s) failed");
    }
    println!(
        "all probes answered: {} pods, {} services",
        plan.pods.len(),
        plan.services.len()
    );
    print_captured(state);
    Ok(())
}

/// Summarizes each node's ztunnel access records: which connections the
/// mesh carried.
fn print_captured(state: &LabState) {
    let enrolled: Vec<&str> = state
        .plan
        .pods
        .iter()
        .filter(|p| state.is_enrolled(p))
        .map(|p| p.name.as_str())
        .collect();
    println!(
        "\nenrolled pods: {}",
        if enrolled.is_empty() {
            "none".to_owned()
        } else {
            enrolled.join(", ")
        }
    );
    for (index, node) in state.plan.nodes.iter().enumerate() {
        let log = std::fs::read_to_string(state.ztunnel_log(index)).unwrap_or_default();
        let records: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ztunnel::access"))
            .collect();
        let outbound = records
            .iter()
            .filter(|r| r.contains(r#"direction="outbound""#))
            .count();
        println!(
            "ztunnel on {}: {} connections captured ({outbound} outbound, {} inbound)",
            node.name,
            records.len(),
            records.len() - outbound
        );
        for record in records.iter().rev().take(3).rev() {
            if let Some(fields) = record.split("ztunnel::access: ").nth(1) {
                println!("  {fields}");
            }
        }
    }
}

fn print_tree(answer: &probe::Answer, depth: usize) {
    println!(
        "{:indent$}{} {} on {} (called from {})",
        "",
        answer.field("pod"),
        answer.field("version"),
        answer.field("node"),
        answer.field("caller"),
        indent = depth * 2
    );
    for call in answer.calls() {
        print_tree(&call, depth + 1);
    }
}
