// The browser client's patch appliers against the server's fixture (`tests/fixtures/patch-cases.json`,
// made by the diff's property tests): every case's JSON Patch and merge patch must turn `before`
// into `after`. Run with `node --test tests/js/`; `cargo test --test client_js` runs it too.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { applyPatch, applyMergePatch, applyChange, equal } from "../../client/herald.js";

const fixture = fileURLToPath(new URL("../fixtures/patch-cases.json", import.meta.url));
// A JSON array with one case per line.
const cases = JSON.parse(readFileSync(fixture, "utf8"));

// structuredClone keeps -0 (a JSON round trip would turn it into 0).
const copy = (v) => structuredClone(v);

test("the fixture has the cases the server's tests use", () => {
  assert.ok(cases.length >= 200, `only ${cases.length} cases`);
  for (const c of cases) {
    for (const k of ["name", "before", "after", "json_patch", "merge_patch", "array_key"]) {
      assert.ok(k in c, `${c.name}: no ${k}`);
    }
  }
});

test("every JSON Patch (RFC 6902) turns before into after", () => {
  for (const c of cases) {
    const got = applyPatch(copy(c.before), copy(c.json_patch));
    assert.ok(equal(got, c.after), `${c.name}: got ${JSON.stringify(got)}`);
    assert.deepEqual(got, c.after, c.name);
  }
});

test("every merge patch (RFC 7386) turns before into after", () => {
  let applied = 0;
  for (const c of cases) {
    // null: the change cannot be said as a merge patch (herald sends a snapshot instead).
    if (c.merge_patch === null) continue;
    const got = applyMergePatch(copy(c.before), copy(c.merge_patch));
    assert.deepEqual(got, c.after, c.name);
    applied++;
  }
  assert.ok(applied >= 50, `only ${applied} merge patches`);
});

test("applyChange picks the patch kind by its shape", () => {
  for (const c of cases) {
    assert.deepEqual(applyChange(copy(c.before), copy(c.json_patch)), c.after, c.name);
  }
});

test("RFC 6902 edge cases", () => {
  assert.deepEqual(applyPatch({ a: 1 }, [{ op: "replace", path: "", value: [1] }]), [1]);
  assert.deepEqual(applyPatch([1, 2], [{ op: "add", path: "/-", value: 3 }]), [1, 2, 3]);
  assert.deepEqual(applyPatch({ a: { b: 1 } }, [{ op: "move", from: "/a/b", path: "/c" }]), { a: {}, c: 1 });
  assert.deepEqual(applyPatch({ a: [1] }, [{ op: "copy", from: "/a", path: "/b" }]), { a: [1], b: [1] });
  assert.deepEqual(applyPatch({ "a/b": 1, "~": 2 }, [{ op: "remove", path: "/a~1b" }, { op: "replace", path: "/~0", value: 3 }]), { "~": 3 });
  assert.deepEqual(applyPatch({ a: 1 }, [{ op: "test", path: "/a", value: 1 }]), { a: 1 });
  assert.throws(() => applyPatch({ a: 1 }, [{ op: "test", path: "/a", value: 2 }]));
  assert.throws(() => applyPatch({}, [{ op: "replace", path: "/missing", value: 1 }]));
  assert.throws(() => applyPatch([1], [{ op: "add", path: "/01", value: 1 }]));
  assert.throws(() => applyPatch([1], [{ op: "add", path: "/5", value: 1 }]));
  assert.throws(() => applyPatch({}, [{ op: "nope", path: "/a" }]));
  // "__proto__" is a member like any other; it never reaches a prototype.
  const doc = applyPatch({}, JSON.parse('[{"op":"add","path":"/__proto__","value":{"polluted":1}}]'));
  assert.equal({}.polluted, undefined);
  assert.deepEqual(Object.keys(doc), ["__proto__"]);
  const merged = applyMergePatch({}, JSON.parse('{"__proto__":{"polluted":1}}'));
  assert.equal({}.polluted, undefined);
  assert.deepEqual(Object.keys(merged), ["__proto__"]);
});

test("RFC 7386 appendix A examples", () => {
  const ex = [
    [{ a: "b" }, { a: "c" }, { a: "c" }],
    [{ a: "b" }, { b: "c" }, { a: "b", b: "c" }],
    [{ a: "b" }, { a: null }, {}],
    [{ a: "b", b: "c" }, { a: null }, { b: "c" }],
    [{ a: ["b"] }, { a: "c" }, { a: "c" }],
    [{ a: "c" }, { a: ["b"] }, { a: ["b"] }],
    [{ a: { b: "c" } }, { a: { b: "d", c: null } }, { a: { b: "d" } }],
    [{ a: [{ b: "c" }] }, { a: [1] }, { a: [1] }],
    [["a", "b"], ["c", "d"], ["c", "d"]],
    [{ a: "b" }, ["c"], ["c"]],
    [{ a: "foo" }, null, null],
    [{ a: "foo" }, "bar", "bar"],
    [{ e: null }, { a: 1 }, { e: null, a: 1 }],
    [[1, 2], { a: "b", c: null }, { a: "b" }],
    [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
  ];
  for (const [before, patch, after] of ex) {
    assert.deepEqual(applyMergePatch(before, patch), after, JSON.stringify(patch));
  }
});

test("applyChange follows the envelope's format, and old envelopes by their shape", () => {
  const ops = [{ op: "replace", path: "/a", value: 2 }];
  assert.deepEqual(applyChange({ a: 1 }, copy(ops), "json-patch"), { a: 2 });
  assert.deepEqual(applyChange({ a: 1, b: 1 }, { b: null, c: 3 }, "merge-patch"), { a: 1, c: 3 });
  // A merge patch may be an array: it replaces the document (the shape alone would misread it).
  assert.deepEqual(applyChange({ a: 1 }, [1, 2], "merge-patch"), [1, 2]);
  assert.throws(() => applyChange({ a: 1 }, { a: 2 }, "json-patch"));
  // Envelopes from before `format`: an array is a JSON Patch, anything else a merge patch.
  assert.deepEqual(applyChange({ a: 1 }, copy(ops)), { a: 2 });
  assert.deepEqual(applyChange({ a: 1 }, { b: 2 }), { a: 1, b: 2 });
  assert.deepEqual(applyChange({ a: 1 }, { b: 2 }, null), { a: 1, b: 2 });
  assert.throws(() => applyChange({ a: 1 }, { b: 2 }, "xml-patch"), /unknown patch format/);
});
