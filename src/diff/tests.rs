//! Unit tests for the diff rules. Property tests live in `tests/diff_props.rs`.

use serde_json::{json, Value};

use super::*;

fn keyed() -> Options {
    Options {
        array_key: Some("id".into()),
    }
}

fn both() -> [Options; 2] {
    [Options::default(), keyed()]
}

/// Items like `{"id": i, "name": "build i", "status": "ok"}`.
fn items(ids: impl IntoIterator<Item = u64>) -> Vec<Value> {
    ids.into_iter()
        .map(|i| json!({"id": i, "name": format!("build {i}"), "status": "ok"}))
        .collect()
}

fn len(v: &Value) -> usize {
    serde_json::to_vec(v).unwrap().len()
}

fn patch_value(ops: Vec<Op>) -> Value {
    Value::Array(ops.into_iter().map(Value::from).collect())
}

/// Apply `patch` with our applier and with the independent `json-patch` crate; both must give
/// `new`.
fn assert_applies(old: &Value, patch: &Value, new: &Value) {
    let mut ours = old.clone();
    apply_json_patch(&mut ours, patch).unwrap_or_else(|e| panic!("{e}: {patch}"));
    assert_eq!(&ours, new, "our applier, patch {patch}");
    let mut theirs = old.clone();
    // Read from text, as a client does: with `arbitrary_precision`, `from_value` hands integers
    // past 64 bits to serde as u128, which the tagged-enum buffering in `json_patch` refuses.
    let p: ::json_patch::Patch = serde_json::from_str(&patch.to_string()).unwrap();
    ::json_patch::patch(&mut theirs, &p).unwrap_or_else(|e| panic!("{e}: {patch}"));
    assert_eq!(&theirs, new, "json-patch crate, patch {patch}");
}

/// `diff` in JsonPatch mode must give a patch; check it applies and is smaller than `new`.
fn expect_patch(old: &Value, new: &Value, opts: &Options) -> Value {
    match diff(old, new, Mode::JsonPatch, opts) {
        Change::Patch(p) => {
            assert_applies(old, &p, new);
            assert!(len(&p) < len(new), "patch {} >= body {}", len(&p), len(new));
            p
        }
        other => panic!("expected a patch, got {other:?}"),
    }
}

#[test]
fn equal_documents_are_none_in_every_mode() {
    for doc in [
        json!({"a": [1, {"b": null}]}),
        json!([]),
        json!(3),
        json!(null),
    ] {
        for mode in [Mode::JsonPatch, Mode::MergePatch, Mode::Snapshot] {
            for opts in both() {
                assert_eq!(diff(&doc, &doc.clone(), mode, &opts), Change::None);
            }
        }
    }
    // Member order does not make documents different.
    let a: Value = serde_json::from_str(r#"{"x":1,"y":2}"#).unwrap();
    let b: Value = serde_json::from_str(r#"{"y":2,"x":1}"#).unwrap();
    assert_eq!(
        diff(&a, &b, Mode::JsonPatch, &Options::default()),
        Change::None
    );
    assert!(json_patch(&a, &b, &Options::default()).is_empty());
}

#[test]
fn snapshot_mode_sends_snapshots() {
    let old = json!({"items": items(0..100)});
    let mut new = old.clone();
    new["items"][3]["status"] = json!("failed");
    assert_eq!(
        diff(&old, &new, Mode::Snapshot, &Options::default()),
        Change::Snapshot
    );
}

#[test]
fn scalar_or_kind_change_at_the_top_is_a_snapshot() {
    let opts = Options::default();
    for (old, new) in [
        (json!(1), json!(2)),
        (json!("a"), json!({"a": 1})),
        (json!({"a": 1}), json!([1])),
        (json!([1]), json!(null)),
    ] {
        assert_eq!(diff(&old, &new, Mode::JsonPatch, &opts), Change::Snapshot);
        assert_eq!(diff(&old, &new, Mode::MergePatch, &opts), Change::Snapshot);
        // The raw patch still describes it, as a root replace.
        let p = json_patch(&old, &new, &opts);
        assert_eq!(
            p,
            vec![Op::Replace {
                path: String::new(),
                value: new.clone()
            }]
        );
        assert_applies(&old, &patch_value(p), &new);
    }
}

#[test]
fn front_insert_into_500_items_is_one_add() {
    for opts in both() {
        // Top-level array.
        let old = Value::Array(items(1..=500));
        let new = Value::Array(items(0..=500));
        let p = expect_patch(&old, &new, &opts);
        assert_eq!(
            p,
            json!([{"op": "add", "path": "/0", "value": {"id": 0, "name": "build 0", "status": "ok"}}])
        );

        // Nested in an object.
        let old = json!({"total": 500, "items": items(1..=500)});
        let new = json!({"total": 500, "items": items(0..=500)});
        let p = expect_patch(&old, &new, &opts);
        assert_eq!(
            p,
            json!([{"op": "add", "path": "/items/0", "value": {"id": 0, "name": "build 0", "status": "ok"}}])
        );
        assert!(len(&p) * 100 < len(&new), "{} vs {}", len(&p), len(&new));
    }
}

#[test]
fn insert_in_the_middle() {
    for opts in both() {
        let old = json!({"items": items((0..200).chain(201..400))});
        let new = json!({"items": items(0..400)});
        let p = expect_patch(&old, &new, &opts);
        assert_eq!(
            p,
            json!([{"op": "add", "path": "/items/200", "value": {"id": 200, "name": "build 200", "status": "ok"}}])
        );
        // Several inserts at different places, indexes shifting as they apply.
        let old = json!({"items": items((0..400).filter(|i| i % 50 != 7))});
        let p = expect_patch(&old, &new, &opts);
        assert_eq!(p.as_array().unwrap().len(), 8);
        for (n, op) in p.as_array().unwrap().iter().enumerate() {
            assert_eq!(op["op"], "add");
            assert_eq!(op["path"], format!("/items/{}", n * 50 + 7));
        }
    }
}

#[test]
fn delete_elements() {
    for opts in both() {
        let old = json!({"items": items(0..400)});
        let new = json!({"items": items((0..400).filter(|&i| i != 123))});
        assert_eq!(
            expect_patch(&old, &new, &opts),
            json!([{"op": "remove", "path": "/items/123"}])
        );
        let new = json!({"items": items((0..400).filter(|&i| i % 100 != 10))});
        let p = expect_patch(&old, &new, &opts);
        assert_eq!(p.as_array().unwrap().len(), 4);
        assert!(p.as_array().unwrap().iter().all(|op| op["op"] == "remove"));
    }
}

#[test]
fn changed_field_inside_one_element_is_a_replace() {
    for opts in both() {
        let old = json!({"items": items(0..500)});
        let mut new = old.clone();
        new["items"][7]["status"] = json!("failed");
        assert_eq!(
            expect_patch(&old, &new, &opts),
            json!([{"op": "replace", "path": "/items/7/status", "value": "failed"}])
        );
    }
}

#[test]
fn changed_field_plus_insert_elsewhere() {
    // Without a key the changed element becomes an unmatched remove/add pair at the same
    // position, which is diffed recursively; with a key it is matched by id.
    for opts in both() {
        let old = json!({"items": items(0..300)});
        let mut new = json!({"items": items(0..301)});
        new["items"].as_array_mut().unwrap().remove(300);
        new["items"]
            .as_array_mut()
            .unwrap()
            .insert(0, items([999]).remove(0));
        new["items"][101]["status"] = json!("failed");
        let p = expect_patch(&old, &new, &opts);
        assert_eq!(
            p,
            json!([
                {"op": "add", "path": "/items/0", "value": {"id": 999, "name": "build 999", "status": "ok"}},
                {"op": "replace", "path": "/items/101/status", "value": "failed"},
            ])
        );
    }
}

#[test]
fn keyed_reorder_uses_moves() {
    let old = json!({"items": items(0..100)});
    // Item 90 jumps to the front, item 5 to the end.
    let order: Vec<u64> = [90]
        .into_iter()
        .chain((0..100).filter(|&i| i != 90 && i != 5))
        .chain([5])
        .collect();
    let new = json!({"items": items(order)});
    let p = expect_patch(&old, &new, &keyed());
    assert_eq!(
        p,
        json!([
            {"op": "move", "from": "/items/90", "path": "/items/0"},
            {"op": "move", "from": "/items/6", "path": "/items/99"},
        ])
    );
}

#[test]
fn keyed_move_plus_change_and_deletes() {
    let el = |id: &str, v: i64| json!({"id": id, "v": v, "pad": "p".repeat(60)});
    let old = json!([el("a", 1), el("b", 2), el("c", 3), el("d", 4), el("e", 5)]);
    let new = json!([el("e", 50), el("b", 2), el("x", 0), el("c", 3), el("a", 1)]);
    let p = expect_patch(&old, &new, &keyed());
    assert_eq!(
        p,
        json!([
            {"op": "remove", "path": "/3"},
            {"op": "move", "from": "/3", "path": "/0"},
            {"op": "replace", "path": "/0/v", "value": 50},
            {"op": "add", "path": "/3", "value": el("x", 0)},
            {"op": "move", "from": "/1", "path": "/4"},
        ])
    );
}

#[test]
fn duplicate_or_missing_keys_fall_back_to_content_alignment() {
    for new in [
        json!([{"id": 1, "v": 1}, {"id": 1, "v": 2}, {"id": 2}]),
        json!([{"id": 1}, {"v": 2}, {"id": 2}]),
        json!([{"id": 1}, 7, {"id": 2}]),
        json!([{"id": null}, {"id": 2}]),
        json!([{"id": [1]}, {"id": 2}]),
    ] {
        let old = json!([{"id": 1}, {"id": 2}]);
        let p = json_patch(&old, &new, &keyed());
        assert_applies(&old, &patch_value(p), &new);
    }
}

#[test]
fn object_keys_are_escaped() {
    let pad = "p".repeat(200);
    let old = json!({"pad": pad, "a/b": 1, "m~n": {"~1": 2, "pad": pad}, "": 3, "x": 0});
    let new =
        json!({"pad": pad, "a/b": 10, "m~n": {"~1": 20, "pad": pad}, "": 30, "x": 0, "new/~": 4});
    let pv = expect_patch(&old, &new, &Options::default());
    assert_eq!(
        pv,
        json!([
            {"op": "replace", "path": "/a~1b", "value": 10},
            {"op": "replace", "path": "/m~0n/~01", "value": 20},
            {"op": "replace", "path": "/", "value": 30},
            {"op": "add", "path": "/new~1~0", "value": 4},
        ])
    );
}

#[test]
fn removed_and_added_members() {
    let pad = "p".repeat(200);
    let old = json!({"keep": pad, "gone": {"deep": true}, "n": {"a": pad, "b": 2}});
    let new = json!({"keep": pad, "n": {"a": pad, "c": 3}, "fresh": [1, 2]});
    let p = expect_patch(&old, &new, &Options::default());
    assert_eq!(
        p,
        json!([
            {"op": "remove", "path": "/gone"},
            {"op": "remove", "path": "/n/b"},
            {"op": "add", "path": "/n/c", "value": 3},
            {"op": "add", "path": "/fresh", "value": [1, 2]},
        ])
    );
}

#[test]
fn small_values_with_many_changes_collapse_into_a_replace() {
    // Two ops on {"a":1,"b":2} cost more than replacing it; then the root replace is the
    // cheapest raw patch, and not smaller than the document, so `diff` sends a snapshot.
    let old = json!({"keep": 1, "gone": {"deep": true}, "n": {"a": 1, "b": 2}});
    let new = json!({"keep": 1, "n": {"a": 1, "c": 3}, "fresh": [1, 2]});
    assert_eq!(
        json_patch(&old, &new, &Options::default()),
        vec![Op::Replace {
            path: String::new(),
            value: new.clone()
        }]
    );
    assert_eq!(
        diff(&old, &new, Mode::JsonPatch, &Options::default()),
        Change::Snapshot
    );
}

#[test]
fn patch_not_smaller_than_body_is_a_snapshot() {
    let old = json!({"a": 1, "b": 2});
    let new = json!({"a": 2, "b": 3});
    assert_eq!(
        diff(&old, &new, Mode::JsonPatch, &Options::default()),
        Change::Snapshot
    );
    let new = json!({"b": 3});
    assert_eq!(
        diff(&old, &new, Mode::MergePatch, &Options::default()),
        Change::Snapshot
    );
    // A big document with a small change is a patch in both modes.
    let old = json!({"a": 1, "items": items(0..10)});
    let new = json!({"a": 2, "items": items(0..10)});
    assert!(matches!(
        diff(&old, &new, Mode::JsonPatch, &Options::default()),
        Change::Patch(_)
    ));
    assert_eq!(
        diff(&old, &new, Mode::MergePatch, &Options::default()),
        Change::Patch(json!({"a": 2}))
    );
}

#[test]
fn size_rule_boundary_is_strict() {
    // Patch `[{"op":"add","path":"/b","value":1}]` is 36 bytes; the body `{"a":"<s>","b":1}` is
    // 14 + len(s): equal at len(s) = 22, which must still be a snapshot.
    let mut seen_equal = false;
    for n in 0..40 {
        let s = "x".repeat(n);
        let (old, new) = (json!({"a": s}), json!({"a": s, "b": 1}));
        let ops = patch_value(json_patch(&old, &new, &Options::default()));
        assert_eq!(ops, json!([{"op": "add", "path": "/b", "value": 1}]));
        let change = diff(&old, &new, Mode::JsonPatch, &Options::default());
        seen_equal |= len(&ops) == len(&new);
        if len(&ops) >= len(&new) {
            assert_eq!(change, Change::Snapshot, "n = {n}");
        } else {
            assert_eq!(change, Change::Patch(ops), "n = {n}");
        }
        // Same for merge patch: `{"b":1}` is 7 bytes.
        let change = diff(&old, &new, Mode::MergePatch, &Options::default());
        assert_eq!(change, Change::Patch(json!({"b": 1})));
    }
    assert!(seen_equal);
    let (old, new) = (json!({"a": 1}), json!({"b": 2}));
    // `{"a":null,"b":2}` is longer than `{"b":2}`.
    assert_eq!(
        diff(&old, &new, Mode::MergePatch, &Options::default()),
        Change::Snapshot
    );
}

#[test]
fn many_changes_collapse_into_a_replace() {
    let old = json!({"meta": {"a": 1, "b": 2, "c": 3}, "items": items(0..50)});
    let new = json!({"meta": {"a": 10, "b": 20, "c": 30}, "items": items(0..50)});
    let p = expect_patch(&old, &new, &Options::default());
    assert_eq!(
        p,
        json!([{"op": "replace", "path": "/meta", "value": {"a": 10, "b": 20, "c": 30}}])
    );
}

#[test]
fn content_alignment_handles_duplicates_and_scalars() {
    let opts = Options::default();
    let old = json!({"xs": [1, 1, 2, 3, 1, 2, 2, 5]});
    let new = json!({"xs": [1, 2, 1, 3, 2, 2, 9, 5, 1]});
    let p = patch_value(json_patch(&old, &new, &opts));
    assert_applies(&old, &p, &new);
    // An element swapped for a scalar is a replace, not remove + add.
    let old = json!({"xs": [1, 2, 3]});
    let new = json!({"xs": [1, "two", 3]});
    assert_eq!(
        patch_value(json_patch(&old, &new, &opts)),
        json!([{"op": "replace", "path": "/xs/1", "value": "two"}])
    );
}

#[test]
fn nested_arrays() {
    let row = |r: i64| Value::Array((0..10).map(|c| json!(r * 100 + c)).collect());
    let old = json!({"m": (0..6).map(row).collect::<Vec<_>>()});
    let mut new = old.clone();
    new["m"][1].as_array_mut().unwrap().remove(4);
    new["m"][2].as_array_mut().unwrap().insert(0, json!(-1));
    let p = expect_patch(&old, &new, &Options::default());
    assert_eq!(
        p,
        json!([
            {"op": "remove", "path": "/m/1/4"},
            {"op": "add", "path": "/m/2/0", "value": -1},
        ])
    );
}

#[test]
fn large_unrelated_arrays_stay_bounded_and_correct() {
    // Far beyond the exact algorithm's reach: patience anchors plus positional pairing.
    let old = Value::Array((0..20_000).map(|i| json!((i * 7919) % 20_011)).collect());
    let new = Value::Array((0..20_000).map(|i| json!((i * 104_729) % 20_011)).collect());
    let start = std::time::Instant::now();
    let p = patch_value(json_patch(&old, &new, &Options::default()));
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    let mut doc = old.clone();
    apply_json_patch(&mut doc, &p).unwrap();
    assert_eq!(doc, new);
    assert_eq!(
        diff(&old, &new, Mode::JsonPatch, &Options::default()),
        Change::Snapshot
    );
}

#[test]
fn bulk_insert_with_scattered_changes_in_a_big_list() {
    // Edit distance well past the exact algorithm's limit; unique anchors still find it.
    let old_ids: Vec<u64> = (0..20_000).collect();
    let mut new_items = items(old_ids.iter().copied());
    new_items.splice(10_000..10_000, items(50_000..51_000));
    new_items[10]["status"] = json!("failed");
    new_items[20_500]["status"] = json!("failed");
    let old = json!({"items": items(old_ids)});
    let new = json!({"items": new_items});
    let p = expect_patch(&old, &new, &Options::default());
    let ops = p.as_array().unwrap();
    assert_eq!(ops.len(), 1002, "{}", ops.len());
    assert_eq!(
        ops[0],
        json!({"op": "replace", "path": "/items/10/status", "value": "failed"})
    );
    assert_eq!(ops[1]["path"], "/items/10000");
}

#[test]
fn json_patch_bytes_match_serialization() {
    let old = json!({"a": [1, 2, {"b": "é\"/"}], "c": "x"});
    let new = json!({"a": [2, {"b": "ü"}, 3], "d": null});
    let patch = generate::generate(&old, &new, &Options::default());
    let as_value = Value::Array(patch.ops.iter().map(generate::RawOp::to_value).collect());
    assert_eq!(patch.serialized_len(), len(&as_value));
    assert_eq!(
        serde_json::to_value(json_patch(&old, &new, &Options::default())).unwrap(),
        as_value
    );
}

// --- merge patch --------------------------------------------------------------------------

#[test]
fn merge_patch_basics() {
    let old = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "gone": true});
    let new = json!({"a": 1, "b": {"c": 20, "d": 3}, "e": [1, 2, 3], "f": {"g": [null]}});
    let p = merge_patch(&old, &new).unwrap();
    assert_eq!(
        p,
        json!({"b": {"c": 20}, "e": [1, 2, 3], "f": {"g": [null]}, "gone": null})
    );
    let mut doc = old.clone();
    apply_merge_patch(&mut doc, &p);
    assert_eq!(doc, new);
    let mut theirs = old.clone();
    ::json_patch::merge(&mut theirs, &p);
    assert_eq!(theirs, new);
    assert_eq!(merge_patch(&old, &old), Some(json!({})));
}

#[test]
fn merge_patch_cannot_set_null() {
    let opts = Options::default();
    let old = json!({"a": 1, "items": items(0..20)});
    for new in [
        json!({"a": null, "items": items(0..20)}),
        json!({"a": 1, "b": null, "items": items(0..20)}),
        json!({"a": {"x": {"y": null}}, "items": items(0..20)}),
    ] {
        assert_eq!(merge_patch(&old, &new), None);
        assert_eq!(diff(&old, &new, Mode::MergePatch, &opts), Change::Snapshot);
        // JSON Patch has no such problem.
        assert!(matches!(
            diff(&old, &new, Mode::JsonPatch, &opts),
            Change::Patch(_)
        ));
    }
    // Nulls that stay, or sit inside arrays, are fine.
    let old = json!({"a": null, "b": 1, "items": items(0..20)});
    let new = json!({"a": null, "b": [null], "items": items(0..20)});
    assert_eq!(
        diff(&old, &new, Mode::MergePatch, &opts),
        Change::Patch(json!({"b": [null]}))
    );
}

#[test]
fn merge_patch_needs_objects_at_the_top() {
    assert_eq!(merge_patch(&json!([1]), &json!([2])), None);
    assert_eq!(merge_patch(&json!({"a": 1}), &json!([2])), None);
    assert_eq!(
        diff(
            &json!([1, 2, 3, 4, 5, 6]),
            &json!([1, 2, 3, 4, 5]),
            Mode::MergePatch,
            &Options::default()
        ),
        Change::Snapshot
    );
}

#[test]
fn apply_merge_patch_rfc7386_examples() {
    // RFC 7386 appendix A.
    let cases = [
        (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
        (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
        (json!({"a":"b"}), json!({"a":null}), json!({})),
        (
            json!({"a":"b","b":"c"}),
            json!({"a":null}),
            json!({"b":"c"}),
        ),
        (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
        (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
        (
            json!({"a":{"b":"c"}}),
            json!({"a":{"b":"d","c":null}}),
            json!({"a":{"b":"d"}}),
        ),
        (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
        (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
        (json!({"a":"b"}), json!(["c"]), json!(["c"])),
        (json!({"a":"foo"}), json!(null), json!(null)),
        (json!({"a":"foo"}), json!("bar"), json!("bar")),
        (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
        (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
        (
            json!({}),
            json!({"a":{"bb":{"ccc":null}}}),
            json!({"a":{"bb":{}}}),
        ),
    ];
    for (target, patch, result) in cases {
        let mut doc = target;
        apply_merge_patch(&mut doc, &patch);
        assert_eq!(doc, result);
    }
}

// --- applier ------------------------------------------------------------------------------

#[test]
fn applier_supports_all_ops() {
    let mut doc = json!({"a": {"b": [1, 2, 3]}, "c": "x"});
    let patch = json!([
        {"op": "test", "path": "/a/b/1", "value": 2.0},
        {"op": "add", "path": "/a/b/-", "value": 4},
        {"op": "copy", "from": "/a/b", "path": "/copy"},
        {"op": "move", "from": "/c", "path": "/a/c"},
        {"op": "replace", "path": "/a/b/0", "value": "one"},
        {"op": "remove", "path": "/copy/0"},
        {"op": "move", "from": "/a/b/0", "path": "/a/b/3"},
        {"op": "move", "from": "/a", "path": "/a"},
        {"op": "add", "path": "/a~1b", "value": {"~": 1}},
        {"op": "test", "path": "/a~1b/~0", "value": 1},
    ]);
    apply_json_patch(&mut doc, &patch).unwrap();
    assert_eq!(
        doc,
        json!({"a": {"b": [2, 3, 4, "one"], "c": "x"}, "copy": [2, 3, 4], "a/b": {"~": 1}})
    );
    apply_json_patch(&mut doc, &json!([{"op": "add", "path": "", "value": [1]}])).unwrap();
    assert_eq!(doc, json!([1]));
}

#[test]
fn applier_errors_are_typed() {
    let doc = json!({"a": [1, 2], "s": "str"});
    let cases = [
        (json!({"op": "add"}), "NotAnArray"),
        (json!([1]), "BadOp"),
        (json!([{"op": "frobnicate", "path": "/a"}]), "BadOp"),
        (json!([{"op": "add", "path": "/x"}]), "BadOp"),
        (json!([{"op": "add", "value": 1}]), "BadOp"),
        (json!([{"op": "move", "path": "/x"}]), "BadOp"),
        (json!([{"op": "remove", "path": ""}]), "BadOp"),
        (
            json!([{"op": "add", "path": "a", "value": 1}]),
            "BadPointer",
        ),
        (
            json!([{"op": "add", "path": "/a~2", "value": 1}]),
            "BadPointer",
        ),
        (json!([{"op": "remove", "path": "/nope"}]), "PathNotFound"),
        (
            json!([{"op": "add", "path": "/nope/x", "value": 1}]),
            "PathNotFound",
        ),
        (
            json!([{"op": "add", "path": "/s/x", "value": 1}]),
            "PathNotFound",
        ),
        (
            json!([{"op": "replace", "path": "/a/01", "value": 1}]),
            "BadIndex",
        ),
        (
            json!([{"op": "replace", "path": "/a/x", "value": 1}]),
            "BadIndex",
        ),
        (json!([{"op": "remove", "path": "/a/2"}]), "IndexOutOfRange"),
        (json!([{"op": "remove", "path": "/a/-"}]), "IndexOutOfRange"),
        (
            json!([{"op": "add", "path": "/a/3", "value": 1}]),
            "IndexOutOfRange",
        ),
        (
            json!([{"op": "test", "path": "/a/0", "value": 2}]),
            "TestFailed",
        ),
        (
            json!([{"op": "move", "from": "/a", "path": "/a/0"}]),
            "MoveIntoChild",
        ),
        (
            json!([{"op": "copy", "from": "/zz", "path": "/b"}]),
            "PathNotFound",
        ),
    ];
    for (patch, kind) in cases {
        let mut d = doc.clone();
        let err = apply_json_patch(&mut d, &patch).expect_err(&patch.to_string());
        assert!(
            format!("{err:?}").starts_with(kind),
            "{patch}: expected {kind}, got {err:?} ({err})"
        );
        assert_eq!(d, doc);
    }
}

#[test]
fn applier_is_atomic() {
    let doc = json!({"a": [1, 2, 3], "o": {"k": 1}, "s": "x"});
    let mut d = doc.clone();
    let patch = json!([
        {"op": "add", "path": "/a/0", "value": 0},
        {"op": "remove", "path": "/o/k"},
        {"op": "add", "path": "/o/k2", "value": 2},
        {"op": "replace", "path": "/s", "value": "y"},
        {"op": "move", "from": "/a/1", "path": "/o/moved"},
        {"op": "copy", "from": "/o", "path": "/o2"},
        {"op": "add", "path": "/s", "value": {"now": "object"}},
        {"op": "add", "path": "", "value": "root"},
        {"op": "remove", "path": "/a/9"},
    ]);
    let err = apply_json_patch(&mut d, &patch).unwrap_err();
    assert!(
        matches!(err, ApplyError::PathNotFound { op: 8, .. }),
        "{err:?}"
    );
    assert_eq!(d, doc);
}

// --- exact numbers ---------------------------------------------------------------------------

/// Number texts a lossy (`f64`) reading would change or refuse, and same values spelled
/// differently. Exponents are written as serde_json keeps them (`e+N`/`e-N`, see `eq.rs`).
const EXACT: &[&str] = &[
    "1796195052.4752579", // 17 significant digits; printed back from f64: 1796195052.475258
    "0.30000000000000004",
    "2.2250738585072014e-308",
    "9007199254740993",     // 2^53 + 1: no f64
    "18446744073709551616", // u64::MAX + 1
    "-9223372036854775809", // i64::MIN - 1
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "1e+400", // beyond f64
    "-1e+400",
    "1e-400",
    "-0",
    "-0.0",
    "0",
    "0.1",
    "0.10",
    "1.0",
    "1",
    "100",
    "1e+2",
];

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn numbers_keep_their_text() {
    for n in EXACT {
        let text = format!(r#"{{"n":{n},"a":[{n}]}}"#);
        assert_eq!(parse(&text).to_string(), text);
    }
}

/// Every pair of numbers from `EXACT`, in a document big enough for a patch to pay: no change
/// exactly when the texts are equal, otherwise a patch (or merge patch) that gives back the new
/// document's text byte for byte.
#[test]
fn exact_numbers_through_diff_and_apply() {
    let pad = "p".repeat(200);
    for a in EXACT {
        for b in EXACT {
            let old_text = format!(r#"{{"n":{a},"list":[{a},{{"x":{a}}}],"pad":"{pad}"}}"#);
            let new_text = format!(r#"{{"n":{b},"list":[{a},{{"x":{b}}}],"pad":"{pad}"}}"#);
            let (old, new) = (parse(&old_text), parse(&new_text));
            for opts in both() {
                let change = diff(&old, &new, Mode::JsonPatch, &opts);
                if a == b {
                    assert_eq!(change, Change::None, "{a} -> {b}");
                    continue;
                }
                let Change::Patch(patch) = change else {
                    panic!("{a} -> {b}: expected a patch, got {change:?}");
                };
                assert_eq!(
                    patch.to_string(),
                    format!(
                        r#"[{{"op":"replace","path":"/n","value":{b}}},{{"op":"replace","path":"/list/1/x","value":{b}}}]"#
                    )
                );
                assert_applies(&old, &patch, &new);
                let mut applied = old.clone();
                apply_json_patch(&mut applied, &patch).unwrap();
                assert_eq!(applied.to_string(), new_text, "{a} -> {b}");
            }
            match diff(&old, &new, Mode::MergePatch, &Options::default()) {
                Change::None => assert_eq!(a, b),
                Change::Patch(patch) => {
                    assert_eq!(
                        patch.to_string(),
                        format!(r#"{{"n":{b},"list":[{a},{{"x":{b}}}]}}"#)
                    );
                    let mut applied = old.clone();
                    apply_merge_patch(&mut applied, &patch);
                    assert_eq!(applied.to_string(), new_text, "{a} -> {b}");
                }
                Change::Snapshot => panic!("{a} -> {b}: a merge patch is smaller"),
            }
            let snapshot = diff(&old, &new, Mode::Snapshot, &Options::default());
            let expected = if a == b {
                Change::None
            } else {
                Change::Snapshot
            };
            assert_eq!(snapshot, expected, "{a} -> {b}");
        }
    }
}

/// Array elements are matched by identity numbers' text: 30-digit ids one apart (equal as
/// `f64`) are two elements, and `7` and `7.0` are different ids.
#[test]
fn exact_numbers_as_identities() {
    let pad = "p".repeat(60);
    let el = |id: &str| format!(r#"{{"id":{id},"pad":"{pad}"}}"#);
    let ids = [
        "123456789012345678901234567890",
        "123456789012345678901234567891",
        "7",
        "7.0",
        "-0",
        "0",
    ];
    let old_text = format!(
        "[{}]",
        ids.iter().map(|i| el(i)).collect::<Vec<_>>().join(",")
    );
    let new_text = format!(
        "[{}]",
        ids.iter()
            .rev()
            .map(|i| el(i))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (old, new) = (parse(&old_text), parse(&new_text));
    let patch = expect_patch(&old, &new, &keyed());
    let ops = patch.as_array().unwrap();
    assert!(
        ops.iter().all(|op| op["op"] == "move"),
        "a reorder of distinct ids is only moves: {patch}"
    );
    let mut applied = old.clone();
    apply_json_patch(&mut applied, &patch).unwrap();
    assert_eq!(applied.to_string(), new_text);
}

/// `test` compares numbers by exact value (RFC 6902 §4.6), never through `f64`.
#[test]
fn test_op_compares_exact_values() {
    let cases = [
        ("1.0", "1", true),
        ("1e+2", "100", true),
        ("-0", "0", true),
        ("0.10", "0.1", true),
        (
            "123456789012345678901234567890",
            "123456789012345678901234567890.0",
            true,
        ),
        (
            "123456789012345678901234567890",
            "123456789012345678901234567891",
            false,
        ),
        ("1796195052.4752579", "1796195052.475258", false),
        ("1e+400", "1e+401", false),
    ];
    for (actual, expected, ok) in cases {
        let mut doc = parse(&format!(r#"{{"a":[{actual}]}}"#));
        let patch = parse(&format!(
            r#"[{{"op":"test","path":"/a/0","value":{expected}}}]"#
        ));
        let result = apply_json_patch(&mut doc, &patch);
        assert_eq!(result.is_ok(), ok, "{actual} vs {expected}: {result:?}");
    }
}
