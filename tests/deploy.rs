//! deploy/ is checked here, as far as this machine can: `deploy/validate.sh` runs
//! `systemd-analyze verify` on the unit and a structural check of the Kubernetes manifest whose
//! embedded proxy.toml must pass `herald check`. Tools that are missing are reported as skipped.

#[test]
fn deploy_files_validate() {
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/validate.sh"))
        .arg(env!("CARGO_BIN_EXE_herald"))
        .output()
        .expect("run deploy/validate.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "deploy/validate.sh failed:\n{stdout}\n{stderr}"
    );
    for line in stdout.lines().filter(|l| l.starts_with("skip:")) {
        eprintln!("note: {line}");
    }
}
