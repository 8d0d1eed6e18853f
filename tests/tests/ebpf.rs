//! The embedded BPF object on this kernel: every program passes the verifier.

use std::process::Command;

#[test]
fn kernel_accepts_every_program() {
    mesh_tests::require_root();
    let output = Command::new(mesh_tests::workspace_binary("ztunnel"))
        .arg("ebpf-check")
        .output()
        .expect("run ztunnel ebpf-check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ebpf-check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for program in [
        "ok lab_service_lb (CgroupSockAddr)",
        "ok capture_connect4 (CgroupSockAddr)",
        "ok capture_sockops (SockOps)",
        "ok capture_sk_lookup (SkLookup)",
        "ok fastpath_sk_msg (SkMsg)",
    ] {
        assert!(
            stdout.contains(program),
            "{program} missing from:\n{stdout}"
        );
    }
}
