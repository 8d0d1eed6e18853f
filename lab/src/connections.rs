//! `mesh-lab connections`: who called whom through the mesh, read from the
//! ztunnels' access records (the inbound side, which saw both identities).

use std::collections::BTreeMap;

use mesh_lab::LabState;

/// One aggregated row: a caller identity reaching a pod, over a policy.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    pod: String,
    security: String,
    source: String,
    destination: String,
}

/// Prints the table; returns how many connections were recorded.
pub fn run(state: &LabState) -> anyhow::Result<usize> {
    let mut rows: BTreeMap<Key, (u64, u64)> = BTreeMap::new();
    for node in 0..state.plan.nodes.len() {
        let Ok(log) = std::fs::read_to_string(state.ztunnel_log(node)) else {
            continue;
        };
        for record in log.lines().filter(|l| l.contains("connection closed")) {
            let fields = fields(record);
            if fields.get("direction") != Some(&"inbound") {
                continue;
            }
            let get = |k: &str| fields.get(k).copied().unwrap_or("-").to_owned();
            let entry = rows
                .entry(Key {
                    pod: get("pod"),
                    security: get("security"),
                    source: get("src_identity"),
                    destination: get("dst_identity"),
                })
                .or_default();
            entry.0 += 1;
            entry.1 += fields
                .get("bytes_sent")
                .and_then(|b| b.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    println!(
        "{:<34} {:<11} {:<6} {:<58} DESTINATION IDENTITY",
        "DESTINATION POD", "SECURITY", "CONNS", "SOURCE IDENTITY"
    );
    let mut total = 0;
    for (key, (count, _bytes)) in &rows {
        total += *count as usize;
        println!(
            "{:<34} {:<11} {:<6} {:<58} {}",
            key.pod, key.security, count, key.source, key.destination
        );
    }
    Ok(total)
}

/// `key=value` fields of a tracing record (string values are quoted).
fn fields(record: &str) -> BTreeMap<&str, &str> {
    record
        .split_whitespace()
        .filter_map(|token| token.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::fields;

    #[test]
    fn reads_an_access_record() {
        let line = r#"2026-11-23T13:00:00Z  INFO ztunnel::access: connection closed conn=7 direction="inbound" pod=default/details-v1 src=10.244.0.10:40000 dst=10.244.1.10:9080 security="mutual_tls" src_identity=spiffe://cluster.local/ns/default/sa/bookinfo-productpage dst_identity=spiffe://cluster.local/ns/default/sa/bookinfo-details bytes_sent=120 error="""#;
        let f = fields(line);
        assert_eq!(f["direction"], "inbound");
        assert_eq!(f["security"], "mutual_tls");
        assert_eq!(
            f["src_identity"],
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
        assert_eq!(f["bytes_sent"], "120");
    }
}
