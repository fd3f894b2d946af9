// client.js sharing one stream between the tabs of an origin: a leader elected with Web Locks holds
// the stream with the union of every tab's watches (added and removed through the control API with
// refcounts), the others follow over a BroadcastChannel, a late tab gets the current state at once,
// and the stream is handed over from the last id when the leader goes (closed, frozen, crashed).
// Each `Herald` here is one tab; the browser APIs are the fakes in fakes.mjs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { FakeEventSource, MuxWriter, install, json, settle } from "./fakes.mjs";
import { Herald } from "../../client/herald.js";

const CONTROL = "/_herald/stream/tok";
const LOCK = "herald /_herald/stream";

function accepting(call) {
  if (call.url.startsWith(CONTROL + "/")) return json(200, { path: call.body.path, topic: call.body.path, watching: true, changed: true, watches: 1 });
  return json(404, { error: "not-found", message: "no" });
}

// A tab: a Herald and what each of its watches saw (states, event ids, types).
function tab(name) {
  const h = new Herald();
  const seen = {};
  const errors = [];
  h.onError((e) => errors.push(e));
  return {
    name,
    h,
    seen,
    errors,
    handles: {},
    watch(path, options) {
      seen[path] = [];
      this.handles[path] = h.watch(path, (s, info) => seen[path].push({ s: structuredClone(s), id: info.id, type: info.type, hidden: info.hidden }), options);
      return this.handles[path];
    },
    states(path) {
      return seen[path].map((x) => x.s);
    },
  };
}

// The one live stream, opened and greeted as herald would.
async function serve(positions = {}) {
  await settle();
  const live = FakeEventSource.live();
  assert.equal(live.length, 1, `one stream for every tab, not ${live.length}`);
  const es = live[0];
  es.open();
  const w = new MuxWriter(es, positions);
  w.hello(es.params.getAll("watch"));
  await settle();
  return w;
}

const posts = (env, action) => env.fetch.calls.filter((c) => c.url === `${CONTROL}/${action}`).map((c) => c.body.path);
const leaders = (tabs) => tabs.filter((t) => t.h.role === "leader");

test("tabs share one stream carrying the union of their watches, each path once", async () => {
  const env = install({ handler: accepting });
  const [a, b, c] = [tab("a"), tab("b"), tab("c")];
  a.watch("/api/1");
  a.watch("/api/2");
  b.watch("/api/2");
  b.watch("/api/3");
  c.watch("/api/1");
  c.watch("/api/3");
  const w = await serve();
  assert.equal(leaders([a, b, c]).length, 1);
  const onServer = [...w.es.params.getAll("watch"), ...posts(env, "watch")];
  assert.deepEqual(onServer.sort(), ["/api/1", "/api/2", "/api/3"], "each path watched once");
  for (const [i, topic] of ["/api/1", "/api/2", "/api/3"].entries()) w.send("snapshot", topic, { n: 0 }, `e${i}`, 1);
  w.send("patch", "/api/2", { n: 1 }, "e1", 2, { format: "merge-patch" });
  await settle();
  assert.deepEqual(b.states("/api/2"), [{ n: 0 }, { n: 1 }]);
  assert.deepEqual(a.states("/api/2"), [{ n: 0 }, { n: 1 }]);
  assert.deepEqual(c.states("/api/3"), [{ n: 0 }]);
  assert.deepEqual(b.seen["/api/2"].map((x) => x.id), ["e1-1", "e1-2"], "followers see the leader's positions");
  assert.equal(a.h.stats.opens + b.h.stats.opens + c.h.stats.opens, 1);
  for (const t of [a, b, c]) assert.equal(t.h.status, "live", t.name);

  // Refcounts: /api/2 leaves the stream only when its last tab closes it.
  b.handles["/api/2"].close();
  await settle();
  assert.deepEqual(posts(env, "unwatch"), []);
  a.handles["/api/2"].close();
  await settle();
  assert.deepEqual(posts(env, "unwatch"), ["/api/2"]);

  // A tab that opens later gets the current state at once, from the leader: no new stream, no request.
  w.send("patch", "/api/1", { n: 5 }, "e0", 2, { format: "merge-patch" });
  await settle();
  const requests = env.fetch.calls.length;
  const d = tab("d");
  d.watch("/api/1");
  await settle();
  assert.deepEqual(d.seen["/api/1"], [{ s: { n: 5 }, id: "e0-2", type: "snapshot", hidden: false }]);
  assert.equal(env.fetch.calls.length, requests);
  assert.equal(FakeEventSource.all.length, 1);
  for (const t of [a, b, c, d]) t.h.close();
});

test("the leader closing hands the stream over from the last id: no gap, no duplicate", async () => {
  install({ handler: accepting });
  const [a, b, c] = [tab("a"), tab("b"), tab("c")];
  a.watch("/api/1");
  b.watch("/api/1");
  b.watch("/api/2");
  c.watch("/api/2");
  const w = await serve();
  const [first] = leaders([a, b, c]);
  w.send("snapshot", "/api/1", { n: 1 }, "e0", 1);
  w.send("snapshot", "/api/2", { m: 1 }, "e1", 1);
  w.send("patch", "/api/1", [{ op: "replace", path: "/n", value: 2 }], "e0", 2, { format: "json-patch" });
  await settle();

  first.h.close(); // the tab closes (pagehide does the same)
  await settle();
  const rest = [a, b, c].filter((t) => t !== first);
  assert.equal(leaders(rest).length, 1, "another tab took the lock");
  const live = FakeEventSource.live();
  assert.equal(live.length, 1);
  const next = live[0];
  assert.notEqual(next, w.es);
  const wanted = rest.flatMap((t) => Object.keys(t.seen).filter((p) => t.handles[p]));
  assert.deepEqual(next.params.getAll("watch").sort(), [...new Set(wanted)].sort());
  // It resumes each topic from the position every tab's state is at.
  const resumed = next.params.get("last_event_id").split("~").sort();
  assert.deepEqual(resumed, next.params.getAll("watch").includes("/api/1") ? ["e0-2", "e1-1"] : ["e1-1"]);

  // herald replays what came after (a patch the old leader never passed on), then goes on.
  next.open();
  const w2 = new MuxWriter(next, { "/api/1": "e0-2", "/api/2": "e1-1" });
  w2.hello(next.params.getAll("watch"));
  w2.send("patch", "/api/2", { m: 2 }, "e1", 2, { format: "merge-patch" });
  w2.send("patch", "/api/2", { m: 3 }, "e1", 3, { format: "merge-patch" });
  // A duplicate (herald resent an event the tabs have) changes nothing.
  w2.send("patch", "/api/2", { m: 99 }, "e1", 3, { format: "merge-patch" });
  await settle();
  for (const t of rest) {
    if (!t.handles["/api/2"]) continue;
    assert.deepEqual(t.states("/api/2"), [{ m: 1 }, { m: 2 }, { m: 3 }], t.name);
    assert.deepEqual(t.seen["/api/2"].map((x) => x.id), ["e1-1", "e1-2", "e1-3"], t.name);
  }
  for (const t of rest) assert.equal(t.h.status, "live", t.name);
  for (const t of rest) t.h.close();
});

test("a tab that joins late learns each event's position from the leader, and sees each state once", async () => {
  install({ handler: accepting });
  const a = tab("a");
  a.watch("/api/1");
  a.watch("/api/2");
  const w = await serve();
  w.send("snapshot", "/api/1", { n: 0 }, "e0", 1);
  w.send("snapshot", "/api/2", { n: 0 }, "e1", 1);
  await settle();
  // b has seen none of the stream's topics: in "e0-1~e1-1~e2-1" it cannot tell which is /api/3's.
  const b = tab("b");
  b.watch("/api/3");
  b.watch("/api/2");
  await settle();
  w.send("snapshot", "/api/3", { n: 0 }, "e2", 1);
  await settle();
  // A third tab makes every tab announce itself again: b must not take the leader's answer as news.
  const c = tab("c");
  c.watch("/api/1");
  await settle();
  w.send("patch", "/api/3", { n: 1 }, "e2", 2, { format: "merge-patch" });
  await settle();
  assert.deepEqual(b.seen["/api/3"].map((x) => [x.s.n, x.type, x.id]), [[0, "snapshot", "e2-1"], [1, "patch", "e2-2"]]);
  assert.deepEqual(b.seen["/api/2"].map((x) => [x.s.n, x.type, x.id]), [[0, "snapshot", "e1-1"]]);
  for (const t of [a, b, c]) t.h.close();
});

test("a tab that vanishes without a word (crash) is dropped once its lock frees", async () => {
  const env = install({ handler: accepting });
  const [a, b] = [tab("a"), tab("b")];
  a.watch("/api/1");
  await settle();
  b.watch("/api/2");
  await serve();
  assert.equal(a.h.role, "leader");
  assert.ok(posts(env, "watch").includes("/api/2") || FakeEventSource.all[0].params.getAll("watch").includes("/api/2"));
  // The tab's process dies: no `bye`, but the browser frees its locks.
  b.h.bus.close();
  b.h.bus = null;
  b.h.abort.abort();
  b.h.releaseTab();
  await settle();
  assert.deepEqual(posts(env, "unwatch"), ["/api/2"]);
  a.h.close();
});

test("a frozen leader steps back (freeze), and comes back from its positions (resume)", async () => {
  const env = install({ handler: accepting });
  const a = tab("a");
  a.watch("/api/1");
  const w = await serve();
  w.send("snapshot", "/api/1", { n: 1 }, "e0", 4);
  assert.ok(env.locks.isHeld(LOCK));
  env.document.dispatchEvent(new Event("freeze"));
  await settle();
  assert.ok(w.es.closed, "the stream is closed");
  assert.ok(!env.locks.isHeld(LOCK), "the lock is free for another tab");
  env.document.dispatchEvent(new Event("resume"));
  await settle();
  assert.equal(a.h.role, "leader");
  const next = FakeEventSource.live()[0];
  assert.equal(next.params.get("last_event_id"), "e0-4");
  a.h.close();
});

test("a follower's page state (from) is where the shared stream starts that topic", async () => {
  const env = install({ handler: accepting });
  const [a, b] = [tab("a"), tab("b")];
  a.watch("/api/1");
  const w = await serve();
  w.send("snapshot", "/api/1", { n: 1 }, "e0", 1);
  b.watch("/api/9", { from: { id: "e9-7", state: { v: 7 } } });
  await settle();
  const post = env.fetch.calls.find((c) => c.url === `${CONTROL}/watch`);
  assert.deepEqual(post.body, { path: "/api/9", since: "e9-7" });
  w.send("patch", "/api/9", { v: 8 }, "e9", 8, { format: "merge-patch" });
  await settle();
  assert.deepEqual(b.states("/api/9"), [{ v: 7 }, { v: 8 }]);
  a.h.close();
  b.h.close();
});

test("a refusal reaches the tab that watches the path, not the others", async () => {
  install({
    handler: (call) => (call.body && call.body.path === "/api/secret" ? json(403, { error: "forbidden", message: "no" }) : accepting(call)),
  });
  const [a, b] = [tab("a"), tab("b")];
  a.watch("/api/1");
  const w = await serve();
  b.watch("/api/secret");
  await settle();
  assert.deepEqual(b.errors, [{ type: "refused", path: "/api/secret", status: 403, error: "forbidden", message: "no" }]);
  assert.equal(b.seen["/api/secret"].at(-1).type, "refused");
  assert.deepEqual(a.errors, []);
  // On the stream: a `refused` event for b's other path.
  b.watch("/api/2");
  await settle();
  w.es.emit("refused", { type: "refused", data: { path: "/api/2", status: 404, error: "not-a-stream", message: "no route" } });
  await settle();
  assert.deepEqual(b.errors.map((e) => e.path), ["/api/secret", "/api/2"]);
  assert.deepEqual(a.errors, []);
  a.h.close();
  b.h.close();
});

test("hidden tabs keep their state current, and are told they are hidden", async () => {
  const env = install({ handler: accepting });
  const [a, b] = [tab("a"), tab("b")];
  a.watch("/api/1");
  b.watch("/api/1");
  const w = await serve();
  env.document.visibilityState = "hidden";
  w.send("snapshot", "/api/1", { n: 1 }, "e0", 1);
  w.send("patch", "/api/1", { n: 2 }, "e0", 2, { format: "merge-patch" });
  await settle();
  for (const t of [a, b]) {
    assert.deepEqual(t.states("/api/1"), [{ n: 1 }, { n: 2 }], t.name);
    assert.ok(t.seen["/api/1"].every((x) => x.hidden), t.name);
  }
  a.h.close();
  b.h.close();
});

test("without Web Locks or BroadcastChannel, each tab opens its own stream", async () => {
  for (const missing of [{ locks: false }, { channel: false }]) {
    install({ handler: accepting, ...missing });
    const [a, b] = [tab("a"), tab("b")];
    a.watch("/api/1");
    b.watch("/api/1");
    await settle();
    assert.equal(FakeEventSource.live().length, 2, JSON.stringify(missing));
    assert.deepEqual([a.h.role, b.h.role], ["solo", "solo"]);
    a.h.close();
    b.h.close();
  }
});
