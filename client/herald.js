// herald browser client: keeps the current JSON state of herald streams by applying their
// snapshots and patches (RFC 6902 JSON Patch, RFC 7386 merge patch). No dependencies.
//
//   import { herald } from "/_herald/client.js";
//   const w = herald.watch("/api/builds/42", (build, info) => render(build));
//   herald.onStatus((status) => banner(status));   // connecting | live | reconnecting | closed
//   w.close();
//
// Watches made by one Herald share one connection (the multiplexed stream, `[mux] path`), and
// can be added and removed while it runs. `new Herald({ mux: null })` opens one EventSource per
// watch instead (for a herald without `[mux]`). The state handed to callbacks is updated in
// place: treat it as read-only.

const own = (o, k) => Object.prototype.hasOwnProperty.call(o, k);
const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);

// Assign without ever reaching a prototype: "__proto__" is an ordinary member in JSON.
function put(obj, key, value) {
  if (key === "__proto__") {
    Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
  } else {
    obj[key] = value;
  }
}

// A deep copy of parsed JSON (numbers such as -0 kept as they are).
function clone(v) {
  if (Array.isArray(v)) return v.map(clone);
  if (!isObject(v)) return v;
  const out = {};
  for (const k of Object.keys(v)) put(out, k, clone(v[k]));
  return out;
}

/** Deep JSON equality (member order does not matter). */
export function equal(a, b) {
  if (a === b) return true;
  if (Array.isArray(a)) {
    return Array.isArray(b) && a.length === b.length && a.every((x, i) => equal(x, b[i]));
  }
  if (isObject(a) && isObject(b)) {
    const ka = Object.keys(a);
    return ka.length === Object.keys(b).length && ka.every((k) => own(b, k) && equal(a[k], b[k]));
  }
  return false;
}

function parsePointer(ptr) {
  if (ptr === "") return [];
  if (ptr[0] !== "/") throw new Error(`bad JSON pointer ${JSON.stringify(ptr)}`);
  return ptr.slice(1).split("/").map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~"));
}

function index(arr, key, allowEnd) {
  if (allowEnd && key === "-") return arr.length;
  if (!/^(0|[1-9][0-9]*)$/.test(key)) throw new Error(`bad array index ${JSON.stringify(key)}`);
  const i = Number(key);
  if (i > arr.length || (!allowEnd && i === arr.length)) throw new Error(`index ${i} out of range`);
  return i;
}

// The container holding the last token of `keys`, and that token.
function locate(doc, keys) {
  let parent = doc;
  for (let n = 0; n < keys.length - 1; n++) {
    const k = keys[n];
    if (Array.isArray(parent)) parent = parent[index(parent, k, false)];
    else if (isObject(parent) && own(parent, k)) parent = parent[k];
    else throw new Error(`path not found: /${keys.slice(0, n + 1).join("/")}`);
  }
  if (typeof parent !== "object" || parent === null) throw new Error("path not found");
  return [parent, keys[keys.length - 1]];
}

function getAt(doc, keys) {
  if (keys.length === 0) return doc;
  const [parent, last] = locate(doc, keys);
  if (Array.isArray(parent)) return parent[index(parent, last, false)];
  if (!own(parent, last)) throw new Error(`path not found: /${keys.join("/")}`);
  return parent[last];
}

function addAt(doc, keys, value) {
  if (keys.length === 0) return value;
  const [parent, last] = locate(doc, keys);
  if (Array.isArray(parent)) parent.splice(index(parent, last, true), 0, value);
  else put(parent, last, value);
  return doc;
}

function removeAt(doc, keys) {
  if (keys.length === 0) throw new Error("cannot remove the whole document");
  const [parent, last] = locate(doc, keys);
  if (Array.isArray(parent)) return parent.splice(index(parent, last, false), 1)[0];
  if (!own(parent, last)) throw new Error(`path not found: /${keys.join("/")}`);
  const v = parent[last];
  delete parent[last];
  return v;
}

/**
 * Apply an RFC 6902 JSON Patch to `doc` (modified in place where possible); returns the result.
 * Throws on an operation that does not apply (the caller then resyncs from a snapshot).
 */
export function applyPatch(doc, ops) {
  for (const op of ops) {
    const keys = parsePointer(op.path);
    switch (op.op) {
      case "add":
        doc = addAt(doc, keys, clone(op.value));
        break;
      case "remove":
        removeAt(doc, keys);
        break;
      case "replace":
        if (keys.length === 0) {
          doc = clone(op.value);
        } else {
          const [parent, last] = locate(doc, keys);
          if (Array.isArray(parent)) parent[index(parent, last, false)] = clone(op.value);
          else if (own(parent, last)) put(parent, last, clone(op.value));
          else throw new Error(`path not found: ${op.path}`);
        }
        break;
      case "move": {
        const from = parsePointer(op.from);
        if (op.from === op.path) break;
        if (op.path.startsWith(op.from + "/")) throw new Error("cannot move a value into itself");
        doc = addAt(doc, keys, removeAt(doc, from));
        break;
      }
      case "copy":
        doc = addAt(doc, keys, clone(getAt(doc, parsePointer(op.from))));
        break;
      case "test":
        if (!equal(getAt(doc, keys), op.value)) throw new Error(`test failed at ${op.path}`);
        break;
      default:
        throw new Error(`unknown patch operation ${JSON.stringify(op.op)}`);
    }
  }
  return doc;
}

/** Apply an RFC 7386 merge patch to `doc` (modified in place where possible); returns the result. */
export function applyMergePatch(doc, patch) {
  if (!isObject(patch)) return clone(patch);
  if (!isObject(doc)) doc = {};
  for (const k of Object.keys(patch)) {
    const v = patch[k];
    if (v === null) delete doc[k];
    else put(doc, k, applyMergePatch(own(doc, k) ? doc[k] : undefined, v));
  }
  return doc;
}

/**
 * Apply a patch envelope's `data` to `state`. `format` is the envelope's: "json-patch" (RFC 6902)
 * or "merge-patch" (RFC 7386); without one (an envelope from before `format`), an array is a JSON
 * Patch and anything else a merge patch.
 */
export function applyChange(state, data, format) {
  if (format === "json-patch") return applyPatch(state, data);
  if (format === "merge-patch") return applyMergePatch(state, data);
  if (format != null) throw new Error(`unknown patch format ${JSON.stringify(format)}`);
  return Array.isArray(data) ? applyPatch(state, data) : applyMergePatch(state, data);
}

// One watched path: its state, its listeners, and what the stream last said about it.
class Watch {
  constructor(client, path) {
    this.client = client;
    this.path = path;
    this.topic = null;
    this.state = undefined;
    this.ready = false;
    this.error = null;
    this.events = 0;
    this.listeners = new Set();
  }

  emit(type) {
    const info = { type, path: this.path, topic: this.topic, error: this.error, events: this.events };
    for (const fn of [...this.listeners]) {
      try {
        fn(this.state, info);
      } catch (e) {
        setTimeout(() => { throw e; });
      }
    }
  }

  // One envelope for this watch's topic. Returns false when a patch did not apply.
  apply(env) {
    this.events++;
    if (env.type === "snapshot") {
      this.state = env.data;
      this.ready = true;
      this.error = null;
    } else if (env.type === "patch") {
      if (!this.ready) return false;
      try {
        this.state = applyChange(this.state, env.data, env.format);
      } catch (e) {
        return false;
      }
      this.error = null;
    } else if (env.type === "upstream-error") {
      // herald keeps the last good state; the error says why it may be old.
      this.error = env.data;
    } else {
      return true;
    }
    this.emit(env.type);
    return true;
  }
}

const EVENTS = ["hello", "snapshot", "patch", "upstream-error", "error", "shutdown"];

/**
 * A set of watches over one connection (or one per watch with `mux: null`).
 * Options: `mux` (the multiplexed stream's path, default "/_herald/stream"), `base` (an origin
 * to prefix, default the page's), `withCredentials` (send cookies cross-origin).
 */
export class Herald {
  constructor(options = {}) {
    this.mux = options.mux === undefined ? "/_herald/stream" : options.mux;
    this.base = options.base || "";
    this.withCredentials = !!options.withCredentials;
    this.status = "idle";
    this.stats = { opens: 0, events: 0, resyncs: 0 };
    this.watches = new Map(); // path -> Watch
    this.statusListeners = new Set();
    this.conns = new Map(); // key -> connection (one for mux; one per path otherwise)
    this.scheduled = false;
  }

  /**
   * Watch `path` (a stream route, e.g. "/api/builds/42"): `onState(state, info)` runs after each
   * snapshot, patch or upstream error. Returns `{ path, state, close() }`.
   */
  watch(path, onState) {
    let w = this.watches.get(path);
    if (!w) {
      w = new Watch(this, path);
      this.watches.set(path, w);
      this.schedule();
    } else if (w.ready && onState) {
      queueMicrotask(() => onState(w.state, { type: "snapshot", path, topic: w.topic, error: w.error }));
    }
    if (onState) w.listeners.add(onState);
    return {
      path,
      get state() { return w.state; },
      get error() { return w.error; },
      close: () => {
        if (onState) w.listeners.delete(onState);
        if (w.listeners.size === 0 && this.watches.get(path) === w) {
          this.watches.delete(path);
          this.schedule();
        }
      },
    };
  }

  /** Call `fn(status)` whenever the connection status changes; returns an unsubscribe function. */
  onStatus(fn) {
    this.statusListeners.add(fn);
    fn(this.status);
    return () => this.statusListeners.delete(fn);
  }

  /** Close every connection and forget every watch. */
  close() {
    this.watches.clear();
    for (const c of this.conns.values()) c.close();
    this.conns.clear();
    this.setStatus("closed");
  }

  setStatus(s) {
    if (s === this.status) return;
    this.status = s;
    for (const fn of [...this.statusListeners]) fn(s);
  }

  // The overall status: live only when every connection is.
  refreshStatus() {
    const all = [...this.conns.values()].map((c) => c.status);
    if (all.length === 0) return this.setStatus(this.status === "closed" ? "closed" : "idle");
    if (all.every((s) => s === "live")) return this.setStatus("live");
    if (all.some((s) => s === "reconnecting")) return this.setStatus("reconnecting");
    this.setStatus("connecting");
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    // Watches made in the same task go out together, in one request.
    queueMicrotask(() => {
      this.scheduled = false;
      this.sync();
    });
  }

  sync() {
    if (this.mux) {
      let c = this.conns.get("mux");
      if (!c && this.watches.size > 0) {
        c = new Connection(this, null);
        this.conns.set("mux", c);
      }
      if (c) c.sync();
    } else {
      for (const path of this.watches.keys()) {
        if (!this.conns.has(path)) this.conns.set(path, new Connection(this, path));
      }
      for (const [path, c] of this.conns) {
        if (!this.watches.has(path)) {
          c.close();
          this.conns.delete(path);
        }
      }
    }
    this.refreshStatus();
  }
}

// One EventSource: the multiplexed stream (`single` null) or one path's own stream.
class Connection {
  constructor(client, single) {
    this.client = client;
    this.single = single;
    this.status = "connecting";
    this.lastId = "";
    this.retry = 2000;
    this.failures = 0;
    this.token = null;
    this.control = null;
    this.server = new Set(); // paths the server watches for this stream (as far as we know)
    this.byTopic = new Map(); // topic -> Set<path>
    this.orphans = new Map(); // topic -> envelopes that arrived before their watch was known
    this.inFlight = false;
    this.timer = null;
    this.open();
  }

  url() {
    const c = this.client;
    if (this.single) return c.base + this.single;
    const q = this.wanted().map((p) => "watch=" + encodeURIComponent(p));
    if (this.lastId) q.push("last_event_id=" + encodeURIComponent(this.lastId));
    return c.base + c.mux + "?" + q.join("&");
  }

  open() {
    const c = this.client;
    this.token = null;
    this.server = new Set(this.wanted());
    this.byTopic.clear();
    this.orphans.clear();
    const es = new EventSource(this.url(), { withCredentials: c.withCredentials });
    c.stats.opens++;
    this.es = es;
    es.onopen = () => {
      this.failures = 0;
      this.setStatus("live");
    };
    es.onerror = () => this.onError();
    for (const name of EVENTS) es.addEventListener(name, (e) => this.onEvent(name, e));
  }

  setStatus(s) {
    this.status = s;
    this.client.refreshStatus();
  }

  // The paths this connection should watch: all but those herald refused.
  wanted() {
    if (this.single) return [this.single];
    return [...this.client.watches.values()].filter((w) => !w.refused).map((w) => w.path);
  }

  close() {
    clearTimeout(this.timer);
    if (this.es) this.es.close();
    this.es = null;
    this.status = "closed";
  }

  onError() {
    if (!this.es) return;
    this.setStatus("reconnecting");
    const desired = this.wanted();
    const same = desired.length === this.server.size && desired.every((p) => this.server.has(p));
    // The browser reconnects by itself, to the same URL with Last-Event-ID. When the watches
    // changed since the URL was made, or the browser gave up (HTTP error), reopen ourselves with
    // the current watches and the id in the query string.
    if (this.es.readyState === EventSource.CLOSED || !same) {
      this.es.close();
      this.es = null;
      this.failures++;
      const backoff = Math.min(30000, this.retry * 2 ** Math.min(this.failures - 1, 4));
      this.timer = setTimeout(() => this.open(), backoff * (0.5 + Math.random() / 2));
    }
  }

  onEvent(name, e) {
    let env;
    try {
      env = JSON.parse(e.data);
    } catch (err) {
      return;
    }
    if (e.lastEventId) this.lastId = e.lastEventId;
    this.client.stats.events++;
    if (name === "hello") return this.hello(env);
    if (name === "shutdown" || name === "error") {
      // herald is restarting, or ended this stream: the browser reconnects after `retry`.
      if (env.data && env.data.retry) this.retry = env.data.retry;
      this.setStatus("reconnecting");
      return;
    }
    this.deliver(env);
  }

  hello(h) {
    this.token = h.token;
    this.control = h.control;
    if (h.retry) this.retry = h.retry;
    this.server = new Set(h.watches.map((w) => w.path));
    for (const w of h.watches) this.mapTopic(w.path, w.topic);
    this.sync();
  }

  mapTopic(path, topic) {
    const w = this.client.watches.get(path);
    if (w) w.topic = topic;
    if (!this.byTopic.has(topic)) this.byTopic.set(topic, new Set());
    this.byTopic.get(topic).add(path);
    const early = this.orphans.get(topic);
    if (early) {
      this.orphans.delete(topic);
      for (const env of early) this.deliver(env);
    }
  }

  deliver(env) {
    const c = this.client;
    let paths = this.single ? [this.single] : this.byTopic.get(env.topic);
    if (!paths || paths.size === 0) {
      // A new watch's snapshot can arrive before the answer that names its topic.
      if (c.watches.has(env.topic)) {
        this.mapTopic(env.topic, env.topic);
        paths = this.byTopic.get(env.topic);
      } else {
        const q = this.orphans.get(env.topic) || [];
        if (q.length < 64) q.push(env);
        this.orphans.set(env.topic, q);
        return;
      }
    }
    for (const p of paths) {
      const w = c.watches.get(p);
      if (w && !w.apply(env)) this.resync();
    }
  }

  // A patch did not apply: start again from fresh snapshots (no Last-Event-ID).
  resync() {
    this.client.stats.resyncs++;
    this.lastId = "";
    if (this.es) this.es.close();
    this.es = null;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), 0);
  }

  // Bring the server's watches in line with the client's, one control request at a time.
  async sync() {
    if (this.single || !this.token || this.inFlight || !this.es) return;
    const desired = this.client.watches;
    const wanted = new Set(this.wanted());
    const add = [...wanted].find((p) => !this.server.has(p));
    const remove = add ? null : [...this.server].find((p) => !wanted.has(p));
    const path = add || remove;
    if (!path) return;
    this.inFlight = true;
    const token = this.token;
    try {
      const resp = await fetch(this.client.base + this.control + (add ? "/watch" : "/unwatch"), {
        method: "POST",
        headers: { "content-type": "application/json" },
        credentials: this.client.withCredentials ? "include" : "same-origin",
        body: JSON.stringify({ path }),
      });
      if (token !== this.token) return; // the stream was replaced meanwhile
      if (resp.ok) {
        const r = await resp.json();
        if (add) {
          this.server.add(path);
          this.mapTopic(path, r.topic);
        } else {
          this.server.delete(path);
          const set = this.byTopic.get(r.topic);
          if (set) set.delete(path);
          if (set && set.size === 0) this.byTopic.delete(r.topic);
        }
      } else if (add) {
        // Refused (not a stream route, too many watches): report it on the watch, do not retry.
        const w = desired.get(path);
        const body = await resp.json().catch(() => ({}));
        if (w) {
          w.error = { error: body.error || "refused", status: resp.status, message: body.message || "" };
          w.refused = true; // left out of this stream and of the next ones
          w.emit("error");
        }
      }
    } catch (e) {
      // The stream is probably gone; its reconnect will carry the current watches.
    } finally {
      this.inFlight = false;
    }
    if (token === this.token) this.sync();
  }
}

/** The default client: one multiplexed connection for the page. */
export const herald = new Herald();

/** `herald.watch(path, onState)` on the default client. */
export function watch(path, onState) {
  return herald.watch(path, onState);
}

export default herald;
