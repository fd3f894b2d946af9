//! The browser client (`client/herald.js`) outside a browser:
//!
//! * its Node tests (`node --test tests/js/`): the same patch fixture as the server's diff
//!   (`tests/fixtures/patch-cases.json`), and its stream, refusal, session and tab-sharing logic
//!   against fakes of the browser APIs;
//! * its npm package (`client/package.json`, `client/herald.d.ts`): the declarations name every
//!   export, and a small app (`tests/ts/consumer.ts`) that installs the package type-checks with
//!   `tsc --strict`, and fails where it misuses the API.
//!
//! Skipped, with a note, where Node is not installed. The TypeScript check installs TypeScript
//! into the target directory on first use:
//! `npm install --prefix target/tmp/typescript-5.9.3 --no-save --no-package-lock typescript@5.9.3`;
//! it is skipped only where the npm registry cannot be reached, and never when `CI` is set.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TYPESCRIPT: &str = "5.9.3";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn has(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn browser_client_passes_its_node_tests() {
    if !has("node") {
        eprintln!("note: `node` not found; skipping the browser client's tests");
        return;
    }
    let out = Command::new("node")
        .args(["--test", "tests/js/"])
        .current_dir(root())
        .output()
        .expect("run node --test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node --test tests/js/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
    // The patch fixture, the stream tests and the tab tests all ran.
    for name in [
        "every JSON Patch (RFC 6902) turns before into after",
        "from: the watch starts at the page's state and position",
        "the leader closing hands the stream over from the last id",
    ] {
        assert!(stdout.contains(name), "{name:?} did not run:\n{stdout}");
    }
}

/// The names a module source exports (`export function|class|const NAME`, `export default`).
fn exports(source: &str, declared: bool) -> Vec<String> {
    let mut names: Vec<String> = source
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| {
            let l = if declared {
                l.strip_prefix("declare ").unwrap_or(l)
            } else {
                l
            };
            let l = l.strip_prefix("async ").unwrap_or(l);
            if l.starts_with("default ") {
                return Some("default".to_string());
            }
            let rest = ["function ", "class ", "const "]
                .iter()
                .find_map(|k| l.strip_prefix(k))?;
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            Some(name)
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn package_declares_every_export_and_no_dependencies() {
    let js = std::fs::read_to_string(root().join("client/herald.js")).unwrap();
    let dts = std::fs::read_to_string(root().join("client/herald.d.ts")).unwrap();
    let in_js = exports(&js, false);
    assert!(
        in_js.len() >= 8,
        "found too few exports in herald.js: {in_js:?}"
    );
    assert_eq!(
        exports(&dts, true),
        in_js,
        "herald.d.ts must declare exactly herald.js's exports"
    );

    let pkg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("client/package.json")).unwrap())
            .expect("client/package.json is JSON");
    assert_eq!(pkg["name"], "@herald/client");
    assert_eq!(pkg["type"], "module");
    assert_eq!(pkg["types"], "./herald.d.ts");
    assert_eq!(pkg["exports"]["."]["types"], "./herald.d.ts");
    assert_eq!(pkg["exports"]["."]["default"], "./herald.js");
    for key in [
        "dependencies",
        "peerDependencies",
        "optionalDependencies",
        "devDependencies",
    ] {
        assert!(pkg.get(key).is_none(), "the client has no {key}");
    }
    for file in pkg["files"].as_array().expect("files") {
        let file = file.as_str().unwrap();
        assert!(root().join("client").join(file).exists(), "{file}");
    }
}

/// `tsc` of the pinned TypeScript, installed into the target directory on first use. None (with
/// a note) where npm or its registry is out of reach, outside CI.
fn tsc() -> Option<PathBuf> {
    let ci = std::env::var_os("CI").is_some();
    let skip = |why: &str| {
        assert!(!ci, "CI must run the TypeScript check, but {why}");
        eprintln!("note: {why}; skipping the TypeScript declarations check");
        None
    };
    let prefix =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("typescript-{TYPESCRIPT}"));
    let tsc = prefix.join("node_modules/typescript/bin/tsc");
    if tsc.exists() {
        return Some(tsc);
    }
    if !has("npm") {
        return skip("`npm` is not installed");
    }
    let out = Command::new("npm")
        .arg("install")
        .arg("--prefix")
        .arg(&prefix)
        .args([
            "--no-save",
            "--no-package-lock",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .arg(format!("typescript@{TYPESCRIPT}"))
        .output()
        .expect("run npm install");
    let said = text(&out);
    if !out.status.success() {
        let offline = [
            "ENOTFOUND",
            "EAI_AGAIN",
            "ECONNREFUSED",
            "ETIMEDOUT",
            "ENETUNREACH",
            "ECONNRESET",
        ]
        .iter()
        .any(|code| said.contains(code));
        if offline {
            return skip(&format!(
                "the npm registry is unreachable ({})",
                said.trim()
            ));
        }
        panic!("npm install typescript@{TYPESCRIPT} failed:\n{said}");
    }
    assert!(tsc.exists(), "npm installed no {}: {said}", tsc.display());
    Some(tsc)
}

#[test]
fn typescript_app_type_checks_against_the_declarations() {
    if !has("node") {
        eprintln!("note: `node` not found; skipping the TypeScript declarations check");
        return;
    }
    let Some(tsc) = tsc() else { return };
    // An app with the package installed as `npm install /path/to/herald/client` leaves it: the
    // package's published files under node_modules/@herald/client.
    let app =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("ts-app-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&app);
    let pkg = app.join("node_modules/@herald/client");
    std::fs::create_dir_all(&pkg).unwrap();
    for file in ["package.json", "herald.js", "herald.d.ts"] {
        std::fs::copy(root().join("client").join(file), pkg.join(file)).unwrap();
    }
    std::fs::copy(root().join("tests/ts/consumer.ts"), app.join("consumer.ts")).unwrap();
    std::fs::write(
        app.join("package.json"),
        r#"{"private": true, "type": "module"}"#,
    )
    .unwrap();
    // Both ways apps resolve packages: a bundler's, and Node's own ESM rules.
    for (module, resolution) in [("esnext", "bundler"), ("nodenext", "nodenext")] {
        let config = serde_json::json!({
            "compilerOptions": {
                "strict": true,
                "noEmit": true,
                "target": "es2022",
                "lib": ["es2022", "dom"],
                "types": [],
                "module": module,
                "moduleResolution": resolution,
            },
            "files": ["consumer.ts"],
        });
        std::fs::write(app.join("tsconfig.json"), config.to_string()).unwrap();
        let out = Command::new("node")
            .arg(&tsc)
            .args(["-p", "tsconfig.json"])
            .current_dir(&app)
            .output()
            .expect("run tsc");
        assert!(
            out.status.success(),
            "tsc ({resolution} resolution) found type errors in tests/ts/consumer.ts:\n{}",
            text(&out)
        );
    }
    std::fs::remove_dir_all(&app).unwrap();
}
