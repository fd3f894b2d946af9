// herald browser client: keeps the current JSON state of herald streams by applying their
// snapshots and patches (RFC 6902 JSON Patch, RFC 7386 merge patch). No dependencies. The wire
// protocol it implements is docs/PROTOCOL.md; the types are herald.d.ts.
//
//   import { herald } from "/_herald/client.js";
//   const w = herald.watch("/api/builds/42", (build, info) => render(build));
//   herald.onStatus((status) => banner(status)); // connecting | live | reconnecting | stopped | closed
//   herald.onError((e) => console.warn(e.type, e.path, e.message)); // refusals, expired sessions
//   w.close();
//
// Watches made by one Herald share one connection (the multiplexed stream, `[mux] path`), and
// can be added and removed while it runs. The tabs of one origin share that connection too: one
// tab (the leader, elected with Web Locks) holds the stream with every tab's watches and passes
// its events to the others over a BroadcastChannel; when it goes, another takes over from the
// last event id. `new Herald({ mux: null })` opens one EventSource per watch instead (for a
// herald without `[mux]`). The state handed to callbacks is updated in place: treat it as
// read-only.

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

// Positions (`<epoch>-<seq>`, base 36): a topic's place in its history.
const epochOf = (p) => p.slice(0, p.indexOf("-"));
const seqOf = (p) => parseInt(p.slice(p.indexOf("-") + 1), 36);
// How far `a` is past `b` in one epoch (NaN across epochs: not comparable).
const ahead = (a, b) => (epochOf(a) === epochOf(b) ? seqOf(a) - seqOf(b) : NaN);

const hidden = () => !!(globalThis.document && globalThis.document.visibilityState === "hidden");
const later = (e) => setTimeout(() => { throw e; });

// What a tab knows of one topic. Every tab sharing a stream keeps these for every topic on it, so
// that any of them can lead next and resume each topic from its position.
class Topic {
  constructor(name) {
    this.name = name;
    this.state = undefined;
    this.ready = false; // `state` is valid: a snapshot, or a page's state from `from`
    this.pos = null; // the position of `state` (null: unknown, resume with a snapshot)
    this.epoch = null; // the topic's epoch once seen: finds its position in a stream id
    this.error = null; // the last upstream-error, until the next change
    this.events = 0;
    this.asked = false; // a follower asked the leader for the state
  }
}

// One watched path of this tab and its callbacks.
class Watch {
  constructor(client, path) {
    this.client = client;
    this.path = path;
    this.error = null; // why herald refused or ended it
    this.listeners = new Set();
  }

  emit(type, only) {
    const c = this.client;
    const t = c.record(this.path);
    const info = {
      type,
      path: this.path,
      topic: c.key(this.path),
      id: t && t.ready ? t.pos : null,
      error: this.error || (t && t.error) || null,
      events: t ? t.events : 0,
      hidden: hidden(),
    };
    const state = t && t.ready ? t.state : undefined;
    for (const fn of only ? [only] : [...this.listeners]) {
      try {
        fn(state, info);
      } catch (e) {
        later(e);
      }
    }
  }
}

const EVENTS = ["hello", "snapshot", "patch", "upstream-error", "refused", "auth-expiring", "auth-expired", "error", "shutdown"];

/**
 * A set of watches over one connection (shared by the tabs of the origin; one per watch with
 * `mux: null`). Options are described in herald.d.ts.
 */
export class Herald {
  constructor(options = {}) {
    this.mux = options.mux === undefined ? "/_herald/stream" : options.mux;
    this.base = options.base || "";
    this.withCredentials = !!options.withCredentials;
    this.share = options.share === undefined ? true : options.share;
    this.accessToken = options.accessToken;
    this.tokenParam = options.tokenParam || "access_token";
    this.renewToken = options.refresh || null;
    this.token = typeof options.accessToken === "string" ? options.accessToken : null;
    this.status = "idle";
    this.stats = { opens: 0, events: 0, resyncs: 0 };
    this.watches = new Map(); // path -> Watch: this tab's
    this.topics = new Map(); // topic -> Topic: every topic on the stream
    this.names = new Map(); // path -> topic, as herald named it
    this.refs = new Map(); // path -> Set of the tabs watching it (this one included)
    this.refused = new Map(); // path -> why herald refused it: not asked for again
    this.conns = new Map(); // key -> Connection (one for mux; one per path otherwise)
    this.statusListeners = new Set();
    this.errorListeners = new Set();
    this.tab = Math.random().toString(36).slice(2);
    this.role = null; // null (not started or suspended), "solo", "follower" or "leader"
    this.lastId = ""; // the last stream id seen
    this.lock = `herald ${this.base}${this.mux}${typeof this.share === "string" ? " " + this.share : ""}`;
    this.scheduled = false;
    this.closed = false;
  }

  /**
   * Watch `path` (a stream route, e.g. "/api/builds/42"): `onState(state, info)` runs with the
   * current state after each snapshot, patch, upstream error or refusal. `options.from` starts
   * from a state the page already has (`{ id, state }`, `id` from `Herald-Event-Id`).
   */
  watch(path, onState, options = {}) {
    this.closed = false;
    let w = this.watches.get(path);
    const fresh = !w;
    if (fresh) this.watches.set(path, (w = new Watch(this, path)));
    const from = options.from;
    if (from && from.state !== undefined) {
      const t = this.topic(this.key(path));
      if (!t.ready) {
        this.adopt(t, clone(from.state), from.id || null, null);
        w.seed = { since: t.pos, state: t.state };
      }
    }
    if (onState) {
      w.listeners.add(onState);
      const t = this.record(path);
      if (t && t.ready) queueMicrotask(() => w.listeners.has(onState) && w.emit("snapshot", onState));
    }
    if (fresh) {
      // Refused already (for another watch of this path, or another tab's): say so again.
      if (this.refused.has(path)) queueMicrotask(() => this.refuse(path, {}));
      this.addRef(path, this.tab);
      if (this.joined) this.post({ t: "sub", paths: [this.entry(path)] });
      this.schedule();
    }
    return {
      path,
      get state() {
        return w.client.stateOf(path);
      },
      get error() {
        return w.error || (w.client.record(path) || {}).error || null;
      },
      close: () => {
        if (onState) w.listeners.delete(onState);
        if (w.listeners.size === 0 && this.watches.get(path) === w) {
          this.watches.delete(path);
          this.removeRef(path, this.tab);
          if (this.joined) this.post({ t: "unsub", path });
          this.schedule();
        }
      },
    };
  }

  /**
   * GET `path` (with the stream's credentials), then watch it from that state and its
   * `Herald-Event-Id`, so the page shows the document at once and misses no change after it.
   */
  async fetchAndWatch(path, onState) {
    const token = await this.credential();
    const resp = await fetch(this.withToken(this.base + path, token), {
      headers: { accept: "application/json" },
      credentials: this.withCredentials ? "include" : "same-origin",
    });
    if (!resp.ok) {
      const e = await errorOf(resp);
      throw Object.assign(new Error(`GET ${path}: ${e.message}`), e);
    }
    const state = await resp.json();
    const id = resp.headers.get("herald-event-id");
    return this.watch(path, onState, { from: { id, state } });
  }

  /** Call `fn(status)` whenever the connection status changes; returns an unsubscribe function. */
  onStatus(fn) {
    this.statusListeners.add(fn);
    fn(this.status);
    return () => this.statusListeners.delete(fn);
  }

  /** Call `fn(error)` on every refusal, expired session or failed refresh; returns an unsubscribe function. */
  onError(fn) {
    this.errorListeners.add(fn);
    return () => this.errorListeners.delete(fn);
  }

  /** Try again after a refusal or an expired session (e.g. once the user has logged in again). */
  reconnect() {
    this.post({ t: "reconnect" });
    this.restart();
  }

  /** Close every connection and forget every watch. */
  close() {
    for (const path of this.watches.keys()) this.removeRef(path, this.tab);
    this.watches.clear();
    this.suspend();
    for (const c of this.conns.values()) c.close();
    this.conns.clear();
    for (const off of this.offs || []) off();
    this.offs = null;
    this.closed = true;
    this.role = null;
    this.setStatus("closed");
  }

  /**
   * Step back from the shared stream (what a tab does on `pagehide` and `freeze`): the leader
   * closes its stream and releases the lock, so another tab takes over at once.
   */
  suspend() {
    if (!this.bus) return;
    this.post({ t: "bye" });
    this.bus.close();
    this.bus = null;
    this.joined = false;
    this.abort.abort();
    for (const release of [this.releaseLead, this.releaseTab]) if (release) release();
    this.releaseLead = this.releaseTab = null;
    for (const c of this.conns.values()) c.close();
    this.conns.clear();
    this.role = null;
    // Other tabs are learned again on return; what this tab saw may be old by then.
    for (const [path, tabs] of this.refs) {
      for (const tab of tabs) if (tab !== this.tab) this.removeRef(path, tab);
    }
  }

  /** Come back after `suspend` (on `pageshow` and `resume`). */
  resume() {
    if (this.closed) return;
    if (this.role === null && this.watches.size > 0) {
      for (const t of this.topics.values()) t.asked = false;
      this.schedule();
    }
    this.wake();
  }

  // --- state -------------------------------------------------------------------------------

  key(path) {
    return this.names.get(path) || path;
  }

  record(path) {
    return this.topics.get(this.key(path));
  }

  stateOf(path) {
    const t = this.record(path);
    return t && t.ready ? t.state : undefined;
  }

  topic(name) {
    let t = this.topics.get(name);
    if (!t) this.topics.set(name, (t = new Topic(name)));
    return t;
  }

  // `state` at position `pos` becomes the topic's.
  adopt(t, state, pos, error) {
    t.state = state;
    t.ready = true;
    t.asked = false;
    t.pos = pos;
    if (pos) t.epoch = epochOf(pos);
    t.error = error;
  }

  // Where a topic resumes from: its position, when its state is known.
  since(path) {
    const t = this.record(path);
    return (t && t.ready && t.pos) || null;
  }

  // The paths the stream should carry: every tab's, less those herald refused.
  wanted() {
    return [...this.refs.keys()].filter((p) => !this.refused.has(p));
  }

  addRef(path, tab) {
    let tabs = this.refs.get(path);
    if (!tabs) this.refs.set(path, (tabs = new Set()));
    tabs.add(tab);
  }

  removeRef(path, tab) {
    const tabs = this.refs.get(path);
    if (!tabs || !tabs.delete(tab) || tabs.size > 0) return;
    this.refs.delete(path);
    this.refused.delete(path);
    const name = this.key(path);
    this.names.delete(path);
    if (![...this.refs.keys()].some((p) => this.key(p) === name)) this.topics.delete(name);
  }

  // herald named `path`'s topic: move a state seeded under the path, and hand it over.
  map(path, topic) {
    const before = this.key(path);
    if (!topic || before === topic) return;
    this.names.set(path, topic);
    const old = this.topics.get(before);
    const t = this.topics.get(topic);
    if (old && !(t && t.ready)) {
      this.topics.delete(before);
      old.name = topic;
      this.topics.set(topic, old);
    }
    const w = this.watches.get(path);
    if (w && this.stateOf(path) !== undefined) w.emit("snapshot");
  }

  notify(name, type) {
    for (const w of [...this.watches.values()]) if (this.key(w.path) === name) w.emit(type);
  }

  // The position of `t`'s event in stream id `id`: the one with `t`'s epoch, or else the only
  // one that no other topic claims (and, if that is not enough, that is new since the last id).
  position(t, id) {
    const ps = id.split("~");
    if (ps.length === 1) return ps[0];
    if (t.epoch) {
      const p = ps.find((x) => epochOf(x) === t.epoch);
      if (p) return p;
    }
    const claimed = new Set([...this.topics.values()].filter((o) => o !== t && o.epoch).map((o) => o.epoch));
    let c = ps.filter((x) => !claimed.has(epochOf(x)));
    if (c.length > 1) {
      const prev = new Set(this.lastId.split("~"));
      c = c.filter((x) => !prev.has(x));
    }
    return c.length === 1 ? c[0] : null;
  }

  // One event of the stream: from this tab's connection or from the leader's (with the
  // position the leader found for it). Returns the event's position, when it has one.
  receive(name, data, id, pos) {
    let env;
    try {
      env = JSON.parse(data);
    } catch (e) {
      return;
    }
    this.stats.events++;
    const d = (env && env.data) || {};
    let at;
    if (name === "hello") {
      for (const w of env.watches || []) this.map(w.path, w.topic);
    } else if (name === "refused") {
      this.refuse(d.path, d);
    } else if (name === "snapshot" || name === "patch" || name === "upstream-error") {
      at = this.apply(env, id, pos);
    } else if (name === "error" && (d.status === 401 || d.status === 403 || d.error === "unauthorized" || d.error === "forbidden")) {
      // Access to this topic ended: its watches end; the others go on after the reconnect.
      for (const path of this.refs.keys()) if (this.key(path) === env.topic) this.refuse(path, d, "error");
    } else if (name === "auth-expired") {
      this.report({ type: "auth-expired", status: 401, error: "auth-expired", message: "the session expired", ...d });
    }
    if (id) this.lastId = id;
    return at;
  }

  apply(env, id, known) {
    const t = this.topic(env.topic);
    const pos = known || (id ? this.position(t, id) : null);
    if (pos) t.epoch = epochOf(pos);
    const type = env.type;
    if (t.ready && pos && t.pos) {
      // Seen already: a replay after another tab took over, or a page's state that was newer.
      const d = ahead(pos, t.pos);
      if (d < 0 || (d === 0 && type !== "snapshot")) return pos;
    }
    if (type === "snapshot") {
      // The state this topic already shows (a page's, whose GET herald could not place): only
      // its position is news, so the app is not told the same state twice.
      const same = t.ready && !t.error && t.events === 0 && equal(t.state, env.data);
      this.adopt(t, same ? t.state : env.data, pos, null);
      if (same) return pos;
    } else if (type === "patch") {
      if (!t.ready) return this.lost(t);
      try {
        t.state = applyChange(t.state, env.data, env.format);
      } catch (e) {
        return this.lost(t);
      }
      t.error = null;
    } else {
      // herald keeps the last good state; the error says why it may be old.
      t.error = env.data;
    }
    if (pos && t.ready) t.pos = pos;
    t.events++;
    this.notify(t.name, type);
    return pos;
  }

  // A patch did not apply: this topic needs its whole state again.
  lost(t) {
    t.ready = false;
    t.pos = null;
    const paths = [...this.refs.keys()].filter((p) => this.key(p) === t.name);
    if (this.role === "follower") {
      const mine = paths.filter((p) => this.watches.has(p));
      if (mine.length && !t.asked && this.joined) {
        t.asked = true;
        this.post({ t: "sub", paths: mine.map((path) => ({ path })) });
      }
    } else if (paths.length) {
      this.stats.resyncs++;
      for (const c of this.conns.values()) if (!c.single || paths.includes(c.single)) c.resync();
    }
  }

  refuse(path, err, type = "refused") {
    if (!path) return;
    const error = this.refused.get(path) || { status: err.status, error: err.error || type, message: err.message || "" };
    this.refused.set(path, error);
    for (const c of this.conns.values()) c.server.delete(path);
    const w = this.watches.get(path);
    if (w && !w.error) {
      w.error = error;
      w.emit(type);
      this.report({ type, path, ...error });
    }
    this.schedule();
  }

  // The stream ended for good (an expired session that was not refreshed): every watch hears why.
  halt(error) {
    for (const w of this.watches.values()) {
      w.error = error;
      w.emit("error");
    }
  }

  report(error) {
    for (const fn of [...this.errorListeners]) {
      try {
        fn(error);
      } catch (e) {
        later(e);
      }
    }
  }

  // --- connections (this tab's, when it leads or does not share) ---------------------------

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
    if (this.closed) return;
    if (this.role === null && this.watches.size > 0) this.join();
    if (this.role !== "solo" && this.role !== "leader") return;
    const wanted = this.wanted();
    if (this.mux) {
      let c = this.conns.get("mux");
      if (!c && wanted.length > 0) this.conns.set("mux", (c = new Connection(this, null)));
      else if (c && wanted.length === 0 && c.status !== "stopped") {
        c.close();
        this.conns.delete("mux");
        c = null;
      }
      if (c) c.sync();
    } else {
      for (const path of wanted) if (!this.conns.has(path)) this.conns.set(path, new Connection(this, path));
      for (const [path, c] of this.conns) {
        if (!wanted.includes(path)) {
          c.close();
          this.conns.delete(path);
        }
      }
    }
    this.refreshStatus();
  }

  // After a refusal or an expired session: forget them and open again.
  restart() {
    this.refused.clear();
    for (const w of this.watches.values()) w.error = null;
    for (const c of this.conns.values()) c.close();
    this.conns.clear();
    this.schedule();
  }

  setStatus(s) {
    if (s === this.status) return;
    this.status = s;
    if (this.role === "leader") this.post({ t: "status", status: s });
    for (const fn of [...this.statusListeners]) fn(s);
  }

  // The overall status: live only when every connection is.
  refreshStatus() {
    if (this.role === "follower") return;
    const all = [...this.conns.values()].map((c) => c.status);
    if (this.closed) return this.setStatus("closed");
    if (all.length === 0) return this.setStatus("idle");
    for (const s of ["reconnecting", "connecting", "stopped"]) if (all.includes(s)) return this.setStatus(s);
    this.setStatus("live");
  }

  // An event of this tab's stream: here, then to the other tabs with its position (a tab that
  // joined late cannot always tell which of a stream id's positions is the event's).
  publish(name, data, id) {
    const pos = this.receive(name, data, id);
    if (this.role === "leader") this.post({ t: "ev", name, data, id, pos });
  }

  // The token to open a stream with: the app's current one (`accessToken` read afresh when it
  // is a function), else the last one `refresh` gave.
  credential() {
    const a = this.accessToken;
    if (typeof a !== "function") return this.token;
    const keep = (v) => (v ? (this.token = v) : this.token);
    const v = a();
    return v && typeof v.then === "function" ? v.then(keep) : keep(v);
  }

  withToken(url, token) {
    if (!token) return url;
    return `${url}${url.includes("?") ? "&" : "?"}${encodeURIComponent(this.tokenParam)}=${encodeURIComponent(token)}`;
  }

  // `auth-expiring`: ask the app for a new credential and hand it to the stream.
  async renew() {
    if (!this.renewToken || this.renewing) return;
    this.renewing = true;
    try {
      const token = await this.renewToken();
      const c = this.conns.get("mux");
      if (c && c.control) {
        const resp = await c.request("/refresh", token ? { access_token: token } : {});
        if (!resp.ok) throw await errorOf(resp);
      }
      if (token) {
        this.token = token;
        this.post({ t: "token", token });
      }
    } catch (e) {
      const error = { type: "refresh-failed", status: e.status, error: e.error || "refresh-failed", message: e.message || String(e) };
      this.post({ t: "error", error });
      this.report(error);
    } finally {
      this.renewing = false;
    }
  }

  // --- tabs ----------------------------------------------------------------------------------

  post(m) {
    if (this.bus) this.bus.postMessage({ ...m, tab: this.tab });
  }

  // Start: share the stream with the origin's other tabs where the browser can, else alone.
  join() {
    this.listen();
    const locks = globalThis.navigator && globalThis.navigator.locks;
    if (!this.mux || !this.share || !locks || typeof BroadcastChannel !== "function") {
      this.role = "solo";
      return;
    }
    this.role = "follower";
    this.setStatus("connecting");
    this.known = new Set();
    const abort = (this.abort = new AbortController());
    const signal = abort.signal;
    this.bus = new BroadcastChannel(this.lock);
    this.bus.onmessage = (e) => this.onBus(e.data);
    // This tab's own lock tells the others when it is gone (closed, crashed or frozen). It is
    // held before the tab says anything, so no one takes it for gone.
    locks
      .request(`${this.lock} tab ${this.tab}`, { signal }, () => {
        if (signal.aborted) return;
        this.joined = true;
        this.post({ t: "sync" });
        this.announce();
        locks.request(this.lock, { signal }, () => this.lead(signal)).catch(() => {});
        return new Promise((r) => (this.releaseTab = r));
      })
      .catch(() => {});
  }

  // This tab holds the stream until it releases the lock.
  lead(signal) {
    if (signal.aborted) return;
    this.role = "leader";
    this.post({ t: "sync" });
    this.post({ t: "status", status: this.status });
    this.schedule();
    return new Promise((r) => (this.releaseLead = r));
  }

  // This tab's watches, to whoever leads (`all`: the whole set, replacing what it had).
  announce() {
    this.post({ t: "sub", all: true, paths: [...this.watches.keys()].map((p) => this.entry(p)) });
  }

  // A watched path as announced: where this tab's state is, and a page's state (`from`) until
  // the stream has moved on from it, so that every tab starts the topic there.
  entry(path) {
    const since = this.since(path);
    const seed = this.watches.get(path).seed;
    return seed && seed.since === since ? { path, ...seed } : { path, since };
  }

  // Learn of another tab, and forget it once its lock is free (it closed, crashed or froze).
  noteTab(tab) {
    if (this.known.has(tab)) return;
    this.known.add(tab);
    const locks = globalThis.navigator.locks;
    locks.request(`${this.lock} tab ${tab}`, { signal: this.abort.signal }, () => this.dropTab(tab)).catch(() => {});
  }

  dropTab(tab) {
    if (this.known) this.known.delete(tab);
    for (const path of [...this.refs.keys()]) this.removeRef(path, tab);
    this.schedule();
  }

  onBus(m) {
    if (!m || m.tab === this.tab) return;
    const leader = this.role === "leader";
    switch (m.t) {
      case "sub":
        this.noteTab(m.tab);
        if (m.all) for (const path of [...this.refs.keys()]) if (!m.paths.some((e) => e.path === path)) this.removeRef(path, m.tab);
        for (const e of m.paths) {
          // A page's state (`from`): every tab starts the topic from it, as the asking tab does.
          const t = e.state !== undefined ? this.topic(this.key(e.path)) : null;
          if (t && !t.ready) {
            this.adopt(t, e.state, e.since || null, null);
            this.notify(t.name, "snapshot");
          }
          this.addRef(e.path, m.tab);
        }
        if (leader) {
          // A tab that joins late gets the current state at once, and what herald refused.
          this.post({ t: "status", status: this.status });
          for (const e of m.paths) {
            const t = this.record(e.path);
            if (this.refused.has(e.path)) this.post({ t: "refused", path: e.path, error: this.refused.get(e.path) });
            else if (t && t.ready && t.pos !== e.since) {
              this.post({ t: "state", path: e.path, topic: t.name, state: t.state, pos: t.pos, error: t.error });
            }
          }
        }
        this.schedule();
        break;
      case "unsub":
        this.removeRef(m.path, m.tab);
        this.schedule();
        break;
      case "bye":
        this.dropTab(m.tab);
        break;
      case "sync":
        if (this.joined) this.announce();
        break;
      case "ev":
        if (!leader) this.receive(m.name, m.data, m.id, m.pos);
        break;
      case "state":
        if (!leader) this.offer(m);
        break;
      case "map":
        this.map(m.path, m.topic);
        break;
      case "refused":
        this.refuse(m.path, m.error);
        break;
      case "status":
        if (!leader) this.setStatus(m.status);
        break;
      case "halt":
        this.halt(m.error);
        break;
      case "error":
        this.report(m.error);
        break;
      case "token":
        this.token = m.token;
        break;
      case "reconnect":
        this.restart();
        break;
    }
  }

  // The leader's state of a topic: taken unless this tab's is as new.
  offer(m) {
    this.map(m.path, m.topic);
    const t = this.topic(m.topic);
    if (t.ready && t.pos && m.pos && ahead(m.pos, t.pos) <= 0) return;
    this.adopt(t, m.state, m.pos, m.error);
    this.notify(t.name, "snapshot");
  }

  // Page lifecycle: reconnect at once when the network or the tab comes back; step back from the
  // shared stream when the page is hidden for good or frozen.
  listen() {
    if (this.offs) return;
    this.offs = [];
    const on = (target, name, fn) => {
      if (!target || typeof target.addEventListener !== "function") return;
      target.addEventListener(name, fn);
      this.offs.push(() => target.removeEventListener(name, fn));
    };
    const doc = globalThis.document;
    on(globalThis, "online", () => this.wake());
    on(globalThis, "pagehide", () => this.suspend());
    on(globalThis, "pageshow", (e) => e.persisted && this.resume());
    on(doc, "freeze", () => this.suspend());
    on(doc, "resume", () => this.resume());
    on(doc, "visibilitychange", () => doc.visibilityState === "visible" && this.wake());
  }

  wake() {
    for (const c of this.conns.values()) c.wake();
  }
}

// The JSON error herald answers a refusal with, as `{status, error, message}`.
async function errorOf(resp) {
  const body = await resp.json().catch(() => ({}));
  return {
    status: resp.status,
    error: (body && body.error) || `http-${resp.status}`,
    message: (body && body.message) || `HTTP ${resp.status}`,
  };
}

// `Retry-After` in ms (seconds or an HTTP date), or null.
function retryAfter(v) {
  if (!v) return null;
  const ms = /^\d+$/.test(v.trim()) ? Number(v) * 1000 : Date.parse(v) - Date.now();
  return Number.isFinite(ms) ? Math.max(0, ms) : null;
}

// One EventSource: the multiplexed stream (`single` null) or one path's own stream.
class Connection {
  constructor(client, single) {
    this.client = client;
    this.single = single;
    this.status = "connecting";
    this.retry = 2000;
    this.failures = 0;
    this.opens = 0;
    this.gen = 0; // bumped by every open and close: what an older one started is dropped
    this.notBefore = 0; // herald asked to wait until then (Retry-After)
    this.control = null;
    this.server = new Set(); // paths the server watches for this stream (as far as we know)
    this.inFlight = false;
    this.timer = null;
    this.es = null;
    this.open();
  }

  wanted() {
    return this.single ? [this.single] : this.client.wanted();
  }

  url(wanted, token) {
    const c = this.client;
    const q = [];
    let path = this.single;
    if (!path) {
      path = c.mux;
      for (const p of wanted) q.push("watch=" + encodeURIComponent(p));
    }
    // The stream goes on from each topic's position (a single stream's browser reconnects send
    // `Last-Event-ID` themselves; its first open may start from a page's state).
    const ids = this.single && this.opens > 0 ? [] : [...new Set(wanted.map((p) => c.since(p)).filter(Boolean))];
    if (ids.length) q.push("last_event_id=" + encodeURIComponent(ids.join("~")));
    return c.withToken(c.base + path + (q.length ? (path.includes("?") ? "&" : "?") + q.join("&") : ""), token);
  }

  open() {
    clearTimeout(this.timer);
    this.timer = null;
    const gen = ++this.gen;
    let token;
    try {
      token = this.client.credential();
    } catch (e) {
      token = Promise.reject(e);
    }
    if (token && typeof token.then === "function") {
      token.then(
        (t) => gen === this.gen && this.start(t),
        (e) => {
          if (gen !== this.gen) return;
          this.client.report({ type: "error", error: "access-token", message: String((e && e.message) || e) });
          this.later();
        },
      );
    } else {
      this.start(token);
    }
  }

  start(token) {
    const c = this.client;
    const wanted = this.wanted();
    this.token = token;
    this.control = null;
    this.inUrl = new Set(wanted);
    this.server = new Set(wanted);
    this.href = this.url(wanted, token);
    this.opens++;
    c.stats.opens++;
    const es = (this.es = new EventSource(this.href, { withCredentials: c.withCredentials }));
    es.onopen = () => {
      this.failures = 0;
      this.reauthed = false;
      this.setStatus("live");
    };
    es.onerror = () => this.onError(es);
    // (The browser's own `error` events, without data, come here too: onerror handles them.)
    const on = (name) => (e) => es === this.es && typeof e.data === "string" && this.onEvent(name, e);
    for (const name of EVENTS) es.addEventListener(name, on(name));
  }

  setStatus(s) {
    this.status = s;
    this.client.refreshStatus();
  }

  close() {
    this.gen++;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.es) this.es.close();
    this.es = null;
    this.status = "closed";
  }

  onError(es) {
    if (es !== this.es) return;
    this.setStatus("reconnecting");
    this.control = null; // the stream's token died with it
    if (es.readyState === EventSource.CLOSED) {
      // The browser gave up: herald answered with an HTTP error (or not with a stream).
      this.es = null;
      return this.diagnose();
    }
    const wanted = this.wanted();
    const same = wanted.length === this.inUrl.size && wanted.every((p) => this.inUrl.has(p));
    // The browser reconnects by itself, to the same URL with Last-Event-ID. When the watches or
    // the token changed since the URL was made, reopen with the current ones instead.
    if (!same || this.token !== this.client.token) {
      es.close();
      this.es = null;
      this.later();
    }
  }

  // Ask herald once why it refused the stream (an EventSource does not tell), then act on it.
  async diagnose() {
    const gen = this.gen;
    const c = this.client;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 10000);
    let r = null;
    try {
      const resp = await fetch(this.href, {
        headers: { accept: "text/event-stream" },
        credentials: c.withCredentials ? "include" : "same-origin",
        cache: "no-store",
        signal: ctl.signal,
      });
      r = resp.ok ? { status: resp.status } : await errorOf(resp);
      r.retryAfter = retryAfter(resp.headers.get("retry-after"));
    } catch (e) {
      // No answer: the network, not herald.
    } finally {
      clearTimeout(timer);
      ctl.abort();
    }
    if (gen !== this.gen) return;
    const status = r ? r.status : 0;
    if (status === 429 || status === 503) {
      const wait = r.retryAfter;
      if (wait === null) return this.later();
      this.notBefore = Date.now() + wait;
      return this.later(wait + Math.random() * Math.min(wait, this.retry));
    }
    if (status === 401 && c.renewToken && !this.reauthed) return this.reauth();
    if (status >= 400 && status < 500 && status !== 408) {
      // Refused: these watches end, and are not asked for again (`reconnect()` does).
      const error = { status, error: r.error, message: r.message };
      for (const path of this.inUrl) {
        c.refuse(path, error);
        c.post({ t: "refused", path, error });
      }
      if (this.wanted().length) this.later(); // watches added since go on
      return;
    }
    this.later();
  }

  // Reopen after a backoff (jittered, growing with each failure), or after `delay` ms.
  later(delay) {
    this.failures++;
    if (delay === undefined) {
      delay = Math.min(30000, this.retry * 2 ** Math.min(this.failures - 1, 4)) * (0.5 + Math.random() / 2);
    }
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
  }

  // The network or the tab is back: a stream that is down reconnects now, from the last id.
  wake() {
    if (this.status === "stopped" || this.status === "closed" || this.es && this.es.readyState === EventSource.OPEN) return;
    if (!this.timer && !this.es) return; // asking herald why it failed
    if (Date.now() < this.notBefore) return;
    if (this.es) this.es.close();
    this.es = null;
    this.open();
  }

  // The session expired (or a reopen got 401): one refresh, else stop and say why. Never
  // reconnect without the credential.
  async reauth() {
    const c = this.client;
    if (this.es) this.es.close();
    this.es = null;
    this.gen++;
    const gen = this.gen;
    if (c.renewToken && !this.reauthed) {
      this.reauthed = true;
      try {
        const token = await c.renewToken();
        if (gen !== this.gen) return;
        if (token) c.token = token;
        return this.open();
      } catch (e) {
        if (gen !== this.gen) return;
      }
    }
    const error = { status: 401, error: "auth-expired", message: "the session expired" };
    c.post({ t: "halt", error });
    c.halt(error);
    this.setStatus("stopped");
  }

  onEvent(name, e) {
    const c = this.client;
    let h = {};
    if (name === "hello" || name === "shutdown") {
      try {
        h = JSON.parse(e.data);
      } catch (err) {
        return;
      }
    }
    c.publish(name, e.data, e.lastEventId);
    if (name === "hello") {
      // What the stream's URL asked for; refused watches have their own event.
      this.control = h.control;
      if (h.retry) this.retry = h.retry;
      this.server = new Set([...this.inUrl].filter((p) => !c.refused.has(p)));
      this.sync();
    } else if (name === "shutdown" || name === "error") {
      // herald is restarting, or ended this stream: the browser reconnects after `retry`.
      if (h.data && h.data.retry) this.retry = h.data.retry;
      this.setStatus("reconnecting");
    } else if (name === "auth-expiring") {
      c.renew();
    } else if (name === "auth-expired") {
      this.reauth();
    }
  }

  // A topic lost its state: reopen, from every other topic's position.
  resync() {
    if (this.status === "stopped") return;
    if (this.es) this.es.close();
    this.es = null;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), 0);
  }

  request(action, body) {
    const c = this.client;
    return fetch(c.withToken(c.base + this.control + action, c.token), {
      method: "POST",
      headers: { "content-type": "application/json" },
      credentials: c.withCredentials ? "include" : "same-origin",
      body: JSON.stringify(body),
    });
  }

  // Bring the server's watches in line with the wanted ones, one control request at a time.
  async sync() {
    if (this.single || !this.control || this.inFlight || !this.es) return;
    const c = this.client;
    const wanted = new Set(this.wanted());
    const add = [...wanted].find((p) => !this.server.has(p));
    const remove = add ? null : [...this.server].find((p) => !wanted.has(p));
    const path = add || remove;
    if (!path) return;
    this.inFlight = true;
    const control = this.control;
    try {
      const body = { path };
      const since = add && !this.noSince && c.since(path);
      if (since) body.since = since; // the topic goes on from the state this tab has
      const resp = await this.request(add ? "/watch" : "/unwatch", body);
      if (control !== this.control) return; // the stream was replaced meanwhile
      if (resp.ok) {
        const r = await resp.json();
        if (add) {
          this.server.add(path);
          c.post({ t: "map", path, topic: r.topic });
          c.map(path, r.topic);
        } else {
          this.server.delete(path);
        }
      } else if (add && since && resp.status === 400) {
        // A herald from before `since`: ask again without it (a snapshot follows, no gap).
        this.noSince = true;
      } else if (add) {
        // Refused (not a stream route, forbidden, too many watches): that watch ends alone.
        const error = await errorOf(resp);
        if (control !== this.control) return;
        c.refuse(path, error);
        c.post({ t: "refused", path, error });
      } else {
        this.server.delete(path);
      }
    } catch (e) {
      // The stream is probably gone; its reconnect will carry the current watches.
    } finally {
      this.inFlight = false;
    }
    if (control === this.control) this.sync();
  }
}

/** The default client: one multiplexed connection for the page (shared with its other tabs). */
export const herald = new Herald();

/** `herald.watch(path, onState, options)` on the default client. */
export function watch(path, onState, options) {
  return herald.watch(path, onState, options);
}

export default herald;
