// client.js against a scripted herald, one tab: patch formats on the wire, starting from a page's
// state (`from`, `fetchAndWatch`), refusals (events, control requests, HTTP answers), backoff on
// 503/429, reconnecting on `online`/`visibilitychange`, and sessions that refresh or expire.
// The browser APIs are the fakes in fakes.mjs; `share: false` keeps the tab to itself (tabs.test.mjs
// covers sharing).
import { test } from "node:test";
import assert from "node:assert/strict";
import { FakeEventSource, MuxWriter, install, json, settle } from "./fakes.mjs";
import { Herald } from "../../client/herald.js";

const CONTROL = "/_herald/stream/tok";

// Every callback of one watch: [state, info] pairs (the state copied as it was then).
function recorder() {
  const seen = [];
  const fn = (state, info) => seen.push([structuredClone(state), info]);
  fn.seen = seen;
  fn.states = () => seen.map(([s]) => s);
  fn.last = () => seen[seen.length - 1];
  return fn;
}

// A control API that accepts every watch and unwatch.
function accepting(call) {
  if (call.url.startsWith(CONTROL + "/")) return json(200, { path: call.body.path, topic: call.body.path, watching: true, changed: true, watches: 1 });
  return json(404, { error: "not-found", message: "no" });
}

async function liveStream(h, paths) {
  await settle();
  const es = FakeEventSource.live().at(-1);
  assert.ok(es, "a stream is open");
  es.open();
  const w = new MuxWriter(es);
  w.hello(paths);
  await settle();
  return w;
}

test("patches are applied by the envelope's format; envelopes without one by their shape", async () => {
  install({ handler: accepting });
  const h = new Herald({ share: false });
  const cb = recorder();
  h.watch("/api/a", cb);
  const w = await liveStream(h, ["/api/a"]);
  w.send("snapshot", "/api/a", { list: [1] }, "ka", 1);
  w.send("patch", "/api/a", [{ op: "add", path: "/list/-", value: 2 }], "ka", 2, { format: "json-patch" });
  // A merge patch that is an array replaces the document: only `format` tells it from a JSON Patch.
  w.send("patch", "/api/a", ["whole"], "ka", 3, { format: "merge-patch" });
  w.send("patch", "/api/a", { x: 1 }, "ka", 4, { format: "merge-patch" });
  w.send("snapshot", "/api/a", { list: [1] }, "ka", 5);
  w.send("patch", "/api/a", [{ op: "replace", path: "/list/0", value: 7 }], "ka", 6); // legacy: array
  w.send("patch", "/api/a", { y: 2 }, "ka", 7); // legacy: merge patch
  assert.deepEqual(cb.states(), [{ list: [1] }, { list: [1, 2] }, ["whole"], { x: 1 }, { list: [1] }, { list: [7] }, { list: [7], y: 2 }]);
  assert.deepEqual(cb.seen.map(([, i]) => i.id), ["ka-1", "ka-2", "ka-3", "ka-4", "ka-5", "ka-6", "ka-7"]);
  assert.equal(h.stats.resyncs, 0);
  // An unknown format does not apply: the client starts that topic again from a snapshot.
  w.send("patch", "/api/a", { z: 1 }, "ka", 8, { format: "yaml-patch" });
  await new Promise((r) => setTimeout(r, 10)); // the reopen is a 0 ms timer
  assert.equal(h.stats.resyncs, 1);
  const again = FakeEventSource.live().at(-1);
  assert.notEqual(again, w.es);
  assert.equal(again.params.get("last_event_id"), null, "the lost topic resumes from a snapshot");
  h.close();
});

test("from: the watch starts at the page's state and position; a later snapshot wins", async () => {
  install({ handler: accepting });
  const h = new Herald({ share: false });
  const cb = recorder();
  const handle = h.watch("/api/a", cb, { from: { id: "ka-5", state: { n: 5 } } });
  await settle();
  const es = FakeEventSource.live()[0];
  assert.deepEqual(es.params.getAll("watch"), ["/api/a"]);
  assert.equal(es.params.get("last_event_id"), "ka-5", "the stream opens from the page's position");
  assert.deepEqual(cb.last(), [{ n: 5 }, cb.last()[1]]);
  assert.equal(cb.last()[1].id, "ka-5");
  assert.equal(cb.last()[1].type, "snapshot");
  es.open();
  const w = new MuxWriter(es, { "/api/a": "ka-5" });
  w.hello(["/api/a"]);
  w.send("patch", "/api/a", { n: 6 }, "ka", 6, { format: "merge-patch" });
  // The same event again (a replay from before the page's position) changes nothing.
  w.send("patch", "/api/a", { n: 99 }, "ka", 6, { format: "merge-patch" });
  w.send("patch", "/api/a", { n: 98 }, "ka", 4, { format: "merge-patch" });
  assert.deepEqual(handle.state, { n: 6 });
  // herald could not resume (history lost): its snapshot replaces the page's state.
  w.send("snapshot", "/api/a", { n: 1, fresh: true }, "kb", 1);
  assert.deepEqual(cb.states(), [{ n: 5 }, { n: 6 }, { n: 1, fresh: true }]);
  assert.deepEqual(cb.seen.map(([, i]) => i.type), ["snapshot", "patch", "snapshot"]);
  h.close();
});

test("from on a live stream: the watch request carries `since`", async () => {
  const env = install({ handler: accepting });
  const h = new Herald({ share: false });
  h.watch("/api/a", () => {});
  const w = await liveStream(h, ["/api/a"]);
  const cb = recorder();
  h.watch("/api/b", cb, { from: { id: "kb-3", state: { v: 3 } } });
  await settle();
  const post = env.fetch.calls.find((c) => c.url === CONTROL + "/watch");
  assert.deepEqual(post.body, { path: "/api/b", since: "kb-3" });
  assert.equal(post.headers["content-type"], "application/json");
  w.send("patch", "/api/b", [{ op: "replace", path: "/v", value: 4 }], "kb", 4, { format: "json-patch" });
  assert.deepEqual(cb.states(), [{ v: 3 }, { v: 4 }]);
  h.close();
});

test("a herald that does not know `since` yet (400): the watch is asked again without it", async () => {
  const env = install({
    handler: (call) =>
      call.url === CONTROL + "/watch" && "since" in call.body
        ? json(400, { error: "bad-request", message: 'expected a JSON body like {"path": "/api/builds/3"}' })
        : accepting(call),
  });
  const h = new Herald({ share: false });
  const errors = [];
  h.onError((e) => errors.push(e));
  h.watch("/api/a", () => {});
  const w = await liveStream(h, ["/api/a"]);
  const cb = recorder();
  h.watch("/api/b", cb, { from: { id: "kb-3", state: { v: 3 } } });
  await settle();
  assert.deepEqual(env.fetch.calls.filter((c) => c.url === CONTROL + "/watch").map((c) => c.body), [{ path: "/api/b", since: "kb-3" }, { path: "/api/b" }]);
  assert.deepEqual(errors, []);
  // herald sends the topic's snapshot, which replaces the page's state.
  w.send("snapshot", "/api/b", { v: 4 }, "kb", 4);
  assert.deepEqual(cb.states(), [{ v: 3 }, { v: 4 }]);
  assert.equal(cb.last()[1].error, null);
  h.close();
});

test("fetchAndWatch: GET, then watch from its Herald-Event-Id", async () => {
  const env = install({
    handler: (call) =>
      call.url === "/api/a?access_token=t1"
        ? json(200, { n: 41 }, { "herald-event-id": "ka-29" })
        : json(404, { error: "not-found", message: "no" }),
  });
  const h = new Herald({ share: false, accessToken: "t1" });
  const cb = recorder();
  const handle = await h.fetchAndWatch("/api/a", cb);
  await settle();
  assert.equal(env.fetch.calls[0].method, "GET");
  assert.deepEqual(handle.state, { n: 41 });
  const es = FakeEventSource.live()[0];
  assert.equal(es.params.get("last_event_id"), "ka-29");
  assert.equal(es.params.get("access_token"), "t1");
  assert.deepEqual(cb.states(), [{ n: 41 }]);
  // A failed GET rejects with herald's reason.
  await assert.rejects(h.fetchAndWatch("/api/nope", () => {}), (e) => e.status === 404 && e.error === "not-found");
  h.close();
});

test("a `refused` event ends that watch only, and tells the app", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  install({ handler: accepting });
  const h = new Herald({ share: false });
  const errors = [];
  h.onError((e) => errors.push(e));
  const a = recorder();
  const b = recorder();
  h.watch("/api/a", a);
  h.watch("/api/b", b);
  const w = await liveStream(h, ["/api/a", "/api/b"]);
  w.es.emit("refused", { type: "refused", data: { path: "/api/b", status: 403, error: "forbidden", message: "not yours" } });
  w.send("snapshot", "/api/a", { ok: true }, "ka", 1);
  assert.equal(b.last()[1].type, "refused");
  assert.deepEqual(b.last()[1].error, { status: 403, error: "forbidden", message: "not yours" });
  assert.deepEqual(errors, [{ type: "refused", path: "/api/b", status: 403, error: "forbidden", message: "not yours" }]);
  assert.deepEqual(a.states(), [{ ok: true }]);
  // The next stream leaves the refused path out, and goes on from /api/a's position.
  h.watch("/api/c", () => {});
  w.es.fail(false);
  t.mock.timers.tick(2000); // the first backoff is 1-2 s
  const next = FakeEventSource.live().at(-1);
  assert.notEqual(next, w.es);
  assert.deepEqual(next.params.getAll("watch").sort(), ["/api/a", "/api/c"]);
  assert.equal(next.params.get("last_event_id"), "ka-1");
  h.close();
});

test("a refused watch request surfaces on the watch and the error event", async () => {
  const env = install({
    handler: (call) =>
      call.url === CONTROL + "/watch" && call.body.path === "/api/secret"
        ? json(403, { error: "forbidden", message: "no access" })
        : accepting(call),
  });
  const h = new Herald({ share: false });
  const errors = [];
  h.onError((e) => errors.push(e));
  h.watch("/api/a", () => {});
  await liveStream(h, ["/api/a"]);
  const cb = recorder();
  const handle = h.watch("/api/secret", cb);
  await settle();
  assert.equal(cb.last()[1].type, "refused");
  assert.deepEqual(handle.error, { status: 403, error: "forbidden", message: "no access" });
  assert.deepEqual(errors, [{ type: "refused", path: "/api/secret", status: 403, error: "forbidden", message: "no access" }]);
  await settle();
  assert.equal(env.fetch.calls.filter((c) => c.body && c.body.path === "/api/secret").length, 1, "asked once");
  h.close();
});

test("an HTTP refusal at open: one request learns why, and the stream is not retried", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  const env = install({ handler: () => json(401, { error: "unauthorized", message: "log in" }) });
  const h = new Herald({ share: false });
  const errors = [];
  h.onError((e) => errors.push(e));
  const a = recorder();
  h.watch("/api/a", a);
  h.watch("/api/b", () => {});
  await settle();
  const es = FakeEventSource.live()[0];
  es.fail(true); // EventSource gives up on a non-200 answer and does not say which
  await settle();
  assert.equal(env.fetch.calls.length, 1);
  const probe = env.fetch.calls[0];
  assert.equal(probe.url, es.url);
  assert.equal(probe.headers.accept, "text/event-stream");
  assert.ok(probe.init.signal, "the probe can be aborted");
  assert.ok(probe.init.signal.aborted, "and is, once answered");
  assert.deepEqual(a.last()[1].error, { status: 401, error: "unauthorized", message: "log in" });
  assert.deepEqual(errors.map((e) => [e.type, e.path, e.status]), [["refused", "/api/a", 401], ["refused", "/api/b", 401]]);
  t.mock.timers.tick(120000);
  await settle();
  assert.equal(FakeEventSource.all.length, 1, "no retry after a refusal");
  assert.equal(env.fetch.calls.length, 1);
  // The app logs in again: reconnect() tries once more.
  env.handler = () => json(200, {});
  h.reconnect();
  await settle();
  assert.equal(FakeEventSource.live().length, 1);
  h.close();
});

test("a refused single stream (mux: null) is probed once and not retried", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  const env = install({ handler: () => json(404, { error: "not-a-stream", message: "/api/x is not a stream route" }) });
  const h = new Herald({ mux: null });
  const cb = recorder();
  h.watch("/api/x", cb);
  h.watch("/api/y", () => {});
  await settle();
  assert.deepEqual(FakeEventSource.all.map((e) => e.url), ["/api/x", "/api/y"]);
  FakeEventSource.all[0].fail(true);
  await settle();
  assert.equal(cb.last()[1].error.error, "not-a-stream");
  for (let i = 0; i < 10; i++) {
    t.mock.timers.tick(30000);
    await settle();
  }
  assert.equal(FakeEventSource.all.length, 2, "/api/x was not opened again");
  assert.equal(env.fetch.calls.length, 1);
  assert.ok(!FakeEventSource.all[1].closed, "/api/y goes on");
  h.close();
});

test("503 with Retry-After: no reconnect before it, not even on `online`; then one, jittered", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  const env = install({ handler: () => json(503, { error: "overloaded", message: "busy" }, { "retry-after": "5" }) });
  const h = new Herald({ share: false });
  h.watch("/api/a", () => {});
  await settle();
  FakeEventSource.all[0].fail(true);
  await settle();
  assert.equal(env.fetch.calls.length, 1);
  t.mock.timers.tick(4990);
  env.window.dispatchEvent(new Event("online"));
  await settle();
  assert.equal(FakeEventSource.all.length, 1, "Retry-After is honoured");
  t.mock.timers.tick(5000 + 2000); // at most Retry-After plus min(Retry-After, retry) of jitter
  await settle();
  assert.equal(FakeEventSource.all.length, 2);
  h.close();
});

test("429 without Retry-After backs off with jitter, growing with each failure", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  install({ handler: () => json(429, { error: "too-many-requests", message: "slow down" }) });
  const h = new Herald({ share: false });
  h.watch("/api/a", () => {});
  await settle();
  // retry is 2 s: the n-th failure waits 2^(n-1) * 2 s, times 0.5..1 (jitter).
  const waits = [];
  for (let n = 1; n <= 4; n++) {
    const count = FakeEventSource.all.length;
    FakeEventSource.all.at(-1).fail(true);
    await settle();
    let waited = 0;
    while (FakeEventSource.all.length === count && waited < 60000) {
      t.mock.timers.tick(100);
      waited += 100;
      await settle(3);
    }
    waits.push(waited);
    const full = 2000 * 2 ** (n - 1);
    assert.ok(waited >= full / 2 && waited <= full + 100, `failure ${n}: waited ${waited} ms`);
  }
  h.close();
});

test("`online` and a tab coming back reconnect at once, with the last id", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  const env = install({ handler: () => json(200, {}) });
  const h = new Herald({ share: false });
  h.watch("/api/a", () => {});
  const w = await liveStream(h, ["/api/a"]);
  w.send("snapshot", "/api/a", { n: 1 }, "ka", 7);
  // The network drops: the browser is retrying on its own (after `retry:`).
  w.es.fail(false);
  env.window.dispatchEvent(new Event("online"));
  const next = FakeEventSource.live().at(-1);
  assert.notEqual(next, w.es, "reconnected at once");
  assert.ok(w.es.closed);
  assert.equal(next.params.get("last_event_id"), "ka-7");
  // Down again, waiting for a backoff step (herald answered 200 to the probe: a blip).
  next.fail(true);
  await settle();
  const count = FakeEventSource.all.length;
  env.document.visibilityState = "hidden";
  env.document.dispatchEvent(new Event("visibilitychange"));
  assert.equal(FakeEventSource.all.length, count, "hidden: no hurry");
  env.document.visibilityState = "visible";
  env.document.dispatchEvent(new Event("visibilitychange"));
  assert.equal(FakeEventSource.all.length, count + 1, "visible: at once");
  assert.equal(FakeEventSource.all.at(-1).params.get("last_event_id"), "ka-7");
  // A live stream is left alone.
  FakeEventSource.all.at(-1).open();
  env.window.dispatchEvent(new Event("online"));
  assert.equal(FakeEventSource.all.length, count + 1);
  h.close();
});

test("auth-expiring: refresh() is called, its token posted to <control>/refresh and used from then on", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  const env = install({ handler: accepting });
  let refreshed = 0;
  const h = new Herald({
    share: false,
    accessToken: "t1",
    refresh: async () => `t${++refreshed + 1}`,
  });
  h.watch("/api/a", () => {});
  const w = await liveStream(h, ["/api/a"]);
  assert.equal(w.es.params.get("access_token"), "t1");
  w.es.emit("auth-expiring", { type: "auth-expiring", data: { expires_at: "2026-12-02T10:00:00Z", expires_in_ms: 30000 } });
  await settle();
  assert.equal(refreshed, 1);
  const post = env.fetch.calls.find((c) => c.url.startsWith(CONTROL + "/refresh"));
  assert.equal(post.url, `${CONTROL}/refresh?access_token=t1`, "asked with the credential that opened the stream");
  assert.equal(post.method, "POST");
  assert.deepEqual(post.body, { access_token: "t2" });
  // The next stream carries the new token: a browser reconnect would reuse the old URL (same
  // watches), so the client reopens it itself.
  w.es.fail(false);
  assert.ok(w.es.closed);
  t.mock.timers.tick(2000);
  const next = FakeEventSource.live().at(-1);
  assert.equal(next.params.get("access_token"), "t2");
  // Control requests carry it too.
  next.open();
  new MuxWriter(next).hello(["/api/a"]);
  h.watch("/api/b", () => {});
  await settle();
  assert.equal(env.fetch.calls.at(-1).url, `${CONTROL}/watch?access_token=t2`);
  h.close();
});

test("a refresh that herald refuses is reported", async () => {
  install({
    handler: (call) => (call.url.includes("/refresh") ? json(403, { error: "forbidden", message: "another user" }) : accepting(call)),
  });
  const h = new Herald({ share: false, accessToken: "t1", refresh: async () => "someone-else" });
  const errors = [];
  h.onError((e) => errors.push(e));
  h.watch("/api/a", () => {});
  const w = await liveStream(h, ["/api/a"]);
  w.es.emit("auth-expiring", { type: "auth-expiring", data: { expires_in_ms: 1000 } });
  await settle();
  assert.deepEqual(errors, [{ type: "refresh-failed", status: 403, error: "forbidden", message: "another user" }]);
  assert.equal(h.token, "t1", "the stream keeps the credential it has");
  h.close();
});

test("auth-expired without refresh: the app hears it and the client does not reconnect", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  install({ handler: accepting });
  const h = new Herald({ share: false, accessToken: () => "t1" });
  const errors = [];
  h.onError((e) => errors.push(e));
  const statuses = [];
  h.onStatus((s) => statuses.push(s));
  const cb = recorder();
  h.watch("/api/a", cb);
  const w = await liveStream(h, ["/api/a"]);
  w.es.emit("auth-expired", { type: "auth-expired", data: { expired_at: "2026-12-02T10:00:00Z" } });
  await settle();
  assert.ok(w.es.closed, "closed before the browser could reconnect without a credential");
  assert.equal(errors[0].type, "auth-expired");
  assert.equal(errors[0].expired_at, "2026-12-02T10:00:00Z");
  assert.deepEqual(cb.last()[1].error, { status: 401, error: "auth-expired", message: "the session expired" });
  assert.equal(statuses.at(-1), "stopped");
  t.mock.timers.tick(600000);
  await settle();
  assert.equal(FakeEventSource.all.length, 1, "no reconnect");
  h.close();
});

test("auth-expired with refresh: one refresh and a reconnect with the new token; a second failure stops", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  const env = install({ handler: accepting });
  let token = "t1";
  const h = new Herald({ share: false, accessToken: () => token, refresh: async () => (token = "t2") });
  const cb = recorder();
  h.watch("/api/a", cb);
  const w = await liveStream(h, ["/api/a"]);
  w.send("snapshot", "/api/a", { n: 1 }, "ka", 1);
  w.es.emit("auth-expired", { type: "auth-expired", data: { expired_at: "x" } });
  await settle();
  const next = FakeEventSource.live()[0];
  assert.equal(next.params.get("access_token"), "t2");
  assert.equal(next.params.get("last_event_id"), "ka-1", "from where it was");
  // The new credential is refused too (401): no second refresh, no anonymous reconnect.
  env.handler = () => json(401, { error: "unauthorized", message: "expired" });
  next.fail(true);
  await settle();
  t.mock.timers.tick(600000);
  await settle();
  assert.equal(FakeEventSource.all.length, 2);
  assert.equal(cb.last()[1].error.status, 401);
  h.close();
});

test("a stream's `error` event (access ended) ends that topic's watches only", async () => {
  install({ handler: accepting });
  const h = new Herald({ share: false });
  const errors = [];
  h.onError((e) => errors.push(e));
  const a = recorder();
  h.watch("/api/a", a);
  h.watch("/api/b", () => {});
  const w = await liveStream(h, ["/api/a", "/api/b"]);
  w.es.emit("error", { type: "error", topic: "/api/a", data: { error: "forbidden", status: 403 } });
  assert.equal(a.last()[1].type, "error");
  assert.equal(a.last()[1].error.status, 403);
  assert.deepEqual(errors.map((e) => [e.type, e.path]), [["error", "/api/a"]]);
  assert.deepEqual(h.wanted(), ["/api/b"]);
  h.close();
});
