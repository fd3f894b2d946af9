//! Numbers reach clients exactly as the upstream wrote them: a real upstream serves JSON text,
//! herald polls, diffs and streams it, and what a client rebuilds from the snapshot and patches
//! must carry the upstream's number texts, digit for digit (17-digit floats, integers of any
//! length, values beyond `f64`, `-0`, trailing zeros).
//!
//! Expected numbers are taken from the text we serve, never from a serde_json parse of it (which
//! would hide a lossy parser). The one respelling herald makes is an exponent's: serde_json
//! writes it `e+N`/`e-N` (`1E5` arrives as `1e+5`), which [`canonical`] applies.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::Value;

const T: Duration = Duration::from_secs(5);
const CASES: u32 = 40;

/// Filler that makes documents big enough for patches to beat snapshots.
const NOTE: &str = "filler text so that a change to one number is sent as a patch";

fn routes() -> String {
    let route = |path: &str, extra: &str| {
        format!("[[route]]\npath = \"{path}\"\ninterval = \"10ms\"\n{extra}")
    };
    [
        route("/keyed/{n}", "array_key = \"id\"\n"),
        route("/plain/{n}", ""),
        route("/merge/{n}", "diff = \"merge-patch\"\n"),
    ]
    .concat()
}

/// The text serde_json keeps for a number written as `text`: the same, except that an
/// exponent marker is `e` and always followed by a sign.
fn canonical(text: &str) -> String {
    match text.split_once(['e', 'E']) {
        Some((mantissa, exp)) if exp.starts_with(['+', '-']) => format!("{mantissa}e{exp}"),
        Some((mantissa, exp)) => format!("{mantissa}e+{exp}"),
        None => text.to_string(),
    }
}

/// Every number text in JSON text (strings skipped), in order.
fn number_texts(json: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = json.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '-' | '0'..='9' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, c)) = chars.peek() {
                    if !matches!(c, '0'..='9' | '.' | 'e' | 'E' | '+' | '-') {
                        break;
                    }
                    end = j + c.len_utf8();
                    chars.next();
                }
                out.push(json[i..end].to_string());
            }
            _ => {}
        }
    }
    out
}

async fn start() -> (TestUpstream, TestHerald) {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), &routes())).await;
    (up, h)
}

fn serve(up: &TestUpstream, path: &str, text: &str) {
    up.set(path, Reply::raw(Some("application/json"), text.as_bytes()));
}

/// The next snapshot or patch (other events, comments and retries skipped).
async fn next_change(c: &mut SseClient, what: &str) -> SseEvent {
    loop {
        let ev = c.expect_event(what, T).await;
        if ev.event == "snapshot" || ev.event == "patch" {
            return ev;
        }
    }
}

/// The reported case: the snapshot and the patch carry the upstream's digits, and so does a
/// plain GET through herald.
#[tokio::test]
async fn reported_float_and_big_integer_are_exact_in_snapshot_and_patch() {
    let (up, h) = start().await;
    let path = "/plain/reported";
    let pad = "x".repeat(300);
    let a = format!(r#"{{"f":1.5,"l":1,"pad":"{pad}"}}"#);
    let b =
        format!(r#"{{"f":1796195052.4752579,"l":123456789012345678901234567890,"pad":"{pad}"}}"#);
    serve(&up, path, &a);

    let mut first = SseClient::connect(&h.url(path), None).await;
    let snap = next_change(&mut first, "snapshot of A").await;
    assert_eq!(snap.event, "snapshot");
    assert!(
        snap.data.contains(&format!(r#""data":{a}"#)),
        "{}",
        snap.data
    );
    let mut state = None;
    apply_event(&mut state, &snap);

    serve(&up, path, &b);
    let patch = next_change(&mut first, "patch to B").await;
    assert_eq!(patch.event, "patch", "{}", patch.data);
    for exact in [
        r#"{"op":"replace","path":"/f","value":1796195052.4752579}"#,
        r#"{"op":"replace","path":"/l","value":123456789012345678901234567890}"#,
    ] {
        assert!(patch.data.contains(exact), "{exact} in {}", patch.data);
    }
    assert_eq!(
        number_texts(&patch.data),
        ["1796195052.4752579", "123456789012345678901234567890"],
        "{}",
        patch.data
    );
    apply_event(&mut state, &patch);
    let state = state.expect("a document");
    assert_eq!(state.to_string(), b, "patched state");

    // A client arriving now gets B in its snapshot, digit for digit.
    let mut second = SseClient::connect(&h.url(path), None).await;
    let snap = next_change(&mut second, "snapshot of B").await;
    assert_eq!(snap.event, "snapshot");
    assert!(
        snap.data.contains(&format!(r#""data":{b}"#)),
        "{}",
        snap.data
    );

    // Pass-through was already exact; it stays so.
    let plain = reqwest::get(h.url(path))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(plain, b);

    drop((first, second));
    h.stop().await;
    up.stop().await;
}

// --- the property -----------------------------------------------------------------------------

/// A number as JSON text, from families that a lossy reading changes or refuses.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        // 16-18 significant digits: most do not survive f64 printing as written.
        3 => "-?[1-9][0-9]{0,9}\\.[0-9]{5,7}[0-9]{0,8}[1-9]",
        2 => "-?0\\.0{0,3}[1-9][0-9]{15,17}",
        // Integers past 64 bits (and some below).
        3 => "-?[1-9][0-9]{15,40}",
        // Exponents in every spelling, including beyond f64's range.
        2 => "-?[1-9](\\.[0-9]{1,17})?[eE][+-]?[0-9]{1,3}",
        // Trailing zeros and zeros that value equality would merge.
        1 => "-?(0|[1-9][0-9]{0,3})\\.[0-9]{0,3}0{1,3}",
        1 => prop::sample::select(&[
            "-0", "-0.0", "0", "0.1", "0.10", "1.0", "1", "100", "1e2", "1E+2",
            "0.30000000000000004", "9007199254740993", "1796195052.4752579",
            "123456789012345678901234567890", "1e400", "-1e-400", "2.2250738585072014e-308",
        ][..])
        .prop_map(str::to_string),
        1 => (-1000i64..1000).prop_map(|n| n.to_string()),
    ]
}

/// An item of a list; its `id` (a number, unique in the list) is given when the document is
/// written.
#[derive(Clone, Debug)]
struct Item {
    id: String,
    vals: Vec<String>,
}

#[derive(Clone, Debug)]
struct Doc {
    meta: Vec<String>,
    items: Vec<Item>,
}

/// Ids are numbers too: a random prefix, then a counter so they stay unique in a list.
fn id(prefix: &str, form: u8, counter: usize) -> String {
    match form % 3 {
        0 => format!("{prefix}{counter:04}"),
        1 => format!("-{prefix}{counter:04}"),
        _ => format!("{prefix}.{counter:04}"),
    }
}

#[derive(Clone, Debug)]
enum Edit {
    Meta(usize, String),
    Val(usize, usize, String),
    Insert(usize, Vec<String>, String, u8),
    Remove(usize),
    Swap(usize, usize),
}

fn item_values() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(number(), 0..4)
}

fn id_prefix() -> impl Strategy<Value = String> {
    "[1-9][0-9]{0,30}"
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<usize>(), number()).prop_map(|(i, n)| Edit::Meta(i, n)),
        4 => (any::<usize>(), any::<usize>(), number()).prop_map(|(i, j, n)| Edit::Val(i, j, n)),
        1 => (any::<usize>(), item_values(), id_prefix(), any::<u8>())
            .prop_map(|(i, v, p, f)| Edit::Insert(i, v, p, f)),
        1 => any::<usize>().prop_map(Edit::Remove),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Edit::Swap(i, j)),
    ]
}

/// A case: the route, the first document, and the edits that make each following version.
#[derive(Clone, Debug)]
struct Case {
    route: &'static str,
    first: Doc,
    versions: Vec<Vec<Edit>>,
}

fn case() -> impl Strategy<Value = Case> {
    let items = prop::collection::vec((item_values(), id_prefix(), any::<u8>()), 0..6);
    (
        prop::sample::select(&["keyed", "plain", "merge"][..]),
        prop::collection::vec(number(), 0..6),
        items,
        prop::collection::vec(prop::collection::vec(edit(), 1..4), 1..4),
    )
        .prop_map(|(route, meta, items, versions)| {
            let items = items
                .into_iter()
                .enumerate()
                .map(|(n, (vals, prefix, form))| Item {
                    id: id(&prefix, form, n),
                    vals,
                })
                .collect();
            Case {
                route,
                first: Doc { meta, items },
                versions,
            }
        })
}

impl Doc {
    fn apply(&mut self, edit: &Edit, counter: &mut usize) {
        let items = self.items.len();
        match edit.clone() {
            Edit::Meta(i, n) if !self.meta.is_empty() => {
                let len = self.meta.len();
                self.meta[i % len] = n;
            }
            Edit::Meta(_, n) => self.meta.push(n),
            Edit::Val(i, j, n) if items > 0 => {
                let vals = &mut self.items[i % items].vals;
                match vals.len() {
                    0 => vals.push(n),
                    len => vals[j % len] = n,
                }
            }
            Edit::Val(..) => {}
            Edit::Insert(i, vals, prefix, form) => {
                *counter += 1;
                let item = Item {
                    id: id(&prefix, form, 1000 + *counter),
                    vals,
                };
                self.items.insert(i % (items + 1), item);
            }
            Edit::Remove(i) if items > 0 => {
                self.items.remove(i % items);
            }
            Edit::Swap(i, j) if items > 0 => self.items.swap(i % items, j % items),
            Edit::Remove(_) | Edit::Swap(..) => {}
        }
    }

    /// The upstream's body for version `v`.
    fn text(&self, v: usize) -> String {
        let items: Vec<String> = self
            .items
            .iter()
            .map(|it| {
                format!(
                    r#"{{"id":{},"vals":[{}],"note":"{NOTE}"}}"#,
                    it.id,
                    it.vals.join(",")
                )
            })
            .collect();
        format!(
            r#"{{"v":{v},"meta":[{}],"items":[{}],"note":"{NOTE}"}}"#,
            self.meta.join(","),
            items.join(",")
        )
    }

    /// Check a client's document against this one, number text by number text.
    fn check(&self, v: usize, got: &Value) -> Result<(), String> {
        let num = |at: String, want: &str, got: &Value| match got {
            // `to_string` of a number is its text: no serde_json parse on the expected side.
            // Snapshots carry the upstream's text as is; a patch's values went through
            // serde_json, which may respell an exponent (`1E5` as `1e+5`, the same digits).
            Value::Number(n) if n.to_string() == want || n.to_string() == canonical(want) => Ok(()),
            other => Err(format!("{at}: want {} got {other}", canonical(want))),
        };
        num("/v".into(), &v.to_string(), &got["v"])?;
        let meta = got["meta"].as_array().ok_or("no /meta array")?;
        if meta.len() != self.meta.len() {
            return Err(format!(
                "/meta has {} numbers, want {}",
                meta.len(),
                self.meta.len()
            ));
        }
        for (i, (want, got)) in self.meta.iter().zip(meta).enumerate() {
            num(format!("/meta/{i}"), want, got)?;
        }
        let items = got["items"].as_array().ok_or("no /items array")?;
        if items.len() != self.items.len() {
            return Err(format!(
                "/items has {} items, want {}",
                items.len(),
                self.items.len()
            ));
        }
        for (i, (want, got)) in self.items.iter().zip(items).enumerate() {
            num(format!("/items/{i}/id"), &want.id, &got["id"])?;
            let vals = got["vals"].as_array().ok_or("no vals array")?;
            if vals.len() != want.vals.len() {
                return Err(format!("/items/{i}/vals has {} numbers", vals.len()));
            }
            for (j, (w, g)) in want.vals.iter().zip(vals).enumerate() {
                num(format!("/items/{i}/vals/{j}"), w, g)?;
            }
        }
        Ok(())
    }
}

/// Serve every version of `case` at a fresh path, follow herald's stream, and check the
/// client's document after each event.
async fn run_case(up: &TestUpstream, h: &TestHerald, n: usize, case: Case) -> Result<(), String> {
    let path = format!("/{}/{n}", case.route);
    let mut doc = case.first.clone();
    let mut counter = 0;
    serve(up, &path, &doc.text(0));
    let mut c = SseClient::connect(&h.url(&path), None).await;
    let mut state = None;
    for v in 0..=case.versions.len() {
        if v > 0 {
            for e in &case.versions[v - 1] {
                doc.apply(e, &mut counter);
            }
            serve(up, &path, &doc.text(v));
        }
        let ev = next_change(&mut c, &format!("version {v}")).await;
        // Every number on the wire (the raw `data:` text) is one the upstream sent.
        let sent: Vec<String> = number_texts(&doc.text(v))
            .iter()
            .flat_map(|t| [t.clone(), canonical(t)])
            .collect();
        for t in number_texts(&ev.data) {
            if !sent.contains(&t) {
                return Err(format!("{t} is not a number of version {v}: {}", ev.data));
            }
        }
        apply_event(&mut state, &ev);
        let got = state.as_ref().ok_or("no document")?;
        doc.check(v, got)
            .map_err(|e| format!("after {} for version {v}: {e}\n{}", ev.event, ev.data))?;
    }
    Ok(())
}

/// Random documents of exact numbers, served by a real upstream and streamed by herald: the
/// snapshot and every patch, applied with the `json-patch` crate, give back the upstream's
/// number texts.
#[test]
fn streamed_documents_keep_every_number_text() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (up, h) = rt.block_on(start());
    let config = ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    };
    let next = AtomicUsize::new(0);
    let result = TestRunner::new(config).run(&case(), |case| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        rt.block_on(run_case(&up, &h, n, case))
            .map_err(TestCaseError::fail)
    });
    rt.block_on(async {
        h.stop().await;
        up.stop().await;
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn canonical_and_number_texts() {
    assert_eq!(canonical("1E5"), "1e+5");
    assert_eq!(canonical("-2.5e-3"), "-2.5e-3");
    assert_eq!(canonical("7"), "7");
    assert_eq!(
        number_texts(r#"{"a-1":[1.5e+3,-0],"b":"x\"9","c":-12}"#),
        ["1.5e+3", "-0", "-12"]
    );
}
