//! The browser client (`client/herald.js`) passes the same patch fixture as the server's diff
//! (`tests/fixtures/patch-cases.json`): runs `node --test tests/js/` so `cargo test` covers it.
//! Skipped, with a note, where Node is not installed.

use std::process::Command;

#[test]
fn browser_client_applies_every_fixture_patch() {
    let root = env!("CARGO_MANIFEST_DIR");
    match Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!("note: `node` not found; skipping the browser client's patch tests");
            return;
        }
    }
    let out = Command::new("node")
        .args(["--test", "tests/js/"])
        .current_dir(root)
        .output()
        .expect("run node --test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node --test tests/js/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
}
